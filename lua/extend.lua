-- extend: move a live hold's expiry to a new instant, and log it. A hold that lapsed
-- before this call is expired by it instead (and logged so): of a lapse and an extend,
-- exactly one wins.
--
-- KEYS[1] account hash     KEYS[2] holds zset     KEYS[3] events list
-- KEYS[4] the coach's allowance override (absent unless the coach has its own)
-- KEYS[5..7] settled:0..2 hashes (the period's older settled records)
-- ARGV[1] now (ms since epoch)   ARGV[2] token of the hold
-- ARGV[3] the new expiry (ms)    ARGV[4] the latest expiry a hold of its period may have
-- ARGV[5] lapsed holds released per call   ARGV[6] events kept per period
-- ARGV[7] period keys expire at (ms)       ARGV[8] configured monthly allowance
-- ARGV[9] period starts at (ms)
-- ARGV[10] now, ARGV[11] the new expiry: both in ms after the period starts, in hex
--
-- Reply: {status, used, held, token, state, cost, expires_ms, feature, extra, swept,
--         monthly, granted}
--   OK         extended: expires_ms is the new expiry
--   NOT_FOUND  no such reservation (or its record was dropped); nothing was written
--   COMMITTED, REFUNDED, EXPIRED   no longer held; nothing extended
--   LIMIT      the new expiry is past ARGV[4]; nothing extended
local account, holds, events = KEYS[1], KEYS[2], KEYS[3]
local now, token = tonumber(ARGV[1]), ARGV[2]
local expires, latest = tonumber(ARGV[3]), tonumber(ARGV[4])
local batch, events_max = tonumber(ARGV[5]), tonumber(ARGV[6])
keys_expire_at = ARGV[7]
base = tonumber(ARGV[9])
define_helpers()

local t = settle_target(account, holds, events, {KEYS[5], KEYS[6], KEYS[7]}, events_max, now, token, batch)
if not t then
  return {'NOT_FOUND', 0, 0, token, '', 0, 0, '', '', swept, 0, 0}
end
t.monthly = monthly_allowance(KEYS[4], ARGV[8])

local outcome = 'OK'
if t.state == 'c' then
  outcome = 'COMMITTED'
elseif t.state == 'r' then
  outcome = 'REFUNDED'
elseif t.state == 'e' then
  outcome = 'EXPIRED'
elseif expires > latest then
  outcome = 'LIMIT'
else
  local nxt = tonumber(redis.call('HGET', account, 'next'))
  t.seq = t.seq + 1
  local fields = {'r:' .. token, record('h', t.cost_text, ARGV[11], t.code), 'seq', t.seq}
  redis.call('ZADD', holds, ARGV[3], token)
  -- `next` stays a bound no live hold expires before: lowered for an earlier expiry,
  -- moved to the earliest hold when this one was it.
  if nxt == nil or expires < nxt then
    fields[5], fields[6] = 'next', ARGV[3]
  elseif nxt == t.expires then
    fields[5], fields[6] = 'next', redis.call('ZRANGE', holds, 0, 0, 'WITHSCORES')[2]
  end
  redis.call('HSET', account, unpack(fields))
  push_events(account, events, events_max,
    {event_line('x', t.cost_text, ARGV[10], t.code, token) .. '|' .. ARGV[11]})
  t.expires = expires
end
local reply = settle_reply(account, outcome, token, t)
reply[9] = ''
return reply
