-- settle: commit (charge for good) or refund (give back) a held reservation. Repeating
-- a settlement changes nothing.
--
-- KEYS[1] account hash     KEYS[2] holds zset     KEYS[3] events list
-- KEYS[4] the coach's allowance override (absent unless the coach has its own)
-- KEYS[5..7] settled:0..2 hashes (the period's older settled records)
-- ARGV[1] now (ms since epoch)   ARGV[2] token of the hold
-- ARGV[3] lapsed holds released per call   ARGV[4] events kept per period
-- ARGV[5] period keys expire at (ms)       ARGV[6] action: 'commit' or 'refund'
-- ARGV[7] period starts at (ms)            ARGV[8] now, in ms after the period starts, in hex
-- ARGV[9] configured monthly allowance
-- Threshold webhooks, on commits only and only while endpoints are configured:
-- KEYS[8] outbox deliveries hash   KEYS[9] outbox due zset
-- KEYS[10] outbox log zset         KEYS[11] outbox failed zset (the outbox of this slot)
-- ARGV[10] endpoint urls, space-separated
-- ARGV[11] deliveries kept per outbox       ARGV[12] deliveries kept for (ms)
--
-- Reply: {status, used, held, token, state, cost, expires_ms, feature, extra, swept,
--         monthly, granted [, 'deliveries', outbox deliveries key, delivery id, ...]}
--   swept: credits this call returned from lapsed holds (their expiry)
--   monthly, granted: the coach's monthly allowance in force and the period's grants
--   OK         commit: committed now or before (state c)
--              refund: refunded now or before (state r), or it had expired (state e):
--              either way its credits are back
--              extra = 'again' when nothing changed
--   NOT_FOUND  no such reservation (or its record was dropped); nothing was written
--   REFUNDED   commit of a reservation refunded earlier
--   EXPIRED    commit of a reservation that lapsed first
--   COMMITTED  refund of a committed reservation: spent credits are not refunded
--   'deliveries' follows when this commit recorded threshold webhooks: the ids of the
--   new deliveries, each "<url> <webhook-id>", due at once
local account, holds, events = KEYS[1], KEYS[2], KEYS[3]
local now, token = tonumber(ARGV[1]), ARGV[2]
local batch, events_max = tonumber(ARGV[3]), tonumber(ARGV[4])
local commit = ARGV[6] == 'commit'
keys_expire_at = ARGV[5]
base = tonumber(ARGV[7])

-- The usage threshold a commit that leaves `used` credits used has passed, when threshold
-- webhooks are configured: 70 or 90 (used above that share), 100 (all used), else nil.
local function threshold(used, allowance)
  if commit and KEYS[8] and (used * 100 > allowance * 70 or used >= allowance) then
    return (used >= allowance and 100) or (used * 100 > allowance * 90 and 90) or 70
  end
end

-- >>> common path: a live hold in the account, settled before it lapses, with nothing
-- to sweep and no threshold webhook to record. Written out without the helper set, as
-- reserve's is (defining it costs more than this path's commands); it writes and
-- answers exactly what the general path below would.
local field = 'r:' .. token
local got = redis.call('HMGET', account, field, 'used', 'held', 'seq', 'next', 'granted', 'fn:1', 'fn:2',
  'wh')
local nxt = tonumber(got[5])
local cost_text, expires_text, code
if got[1] and nxt and nxt > now then
  cost_text, expires_text, code = string.match(got[1], '^h(%d+)|(%x+)|([^|]*)$')
end
local expires = cost_text and base + tonumber(expires_text, 16)
if expires and expires > now then
  local cost, used, granted = tonumber(cost_text), tonumber(got[2]) or 0, tonumber(got[6]) or 0
  local monthly = tonumber(redis.call('GET', KEYS[4])) or tonumber(ARGV[9])
  local allowance = monthly + granted
  if commit then
    used = used + cost
  end
  -- A threshold this commit passes that no webhook has announced yet: the general path.
  local passed = threshold(used, allowance)
  if not (passed and passed > (tonumber(got[9]) or 0)) then
    local state = commit and 'c' or 'r'
    local held, seq = (tonumber(got[3]) or 0) - cost, (tonumber(got[4]) or 0) + 1
    local rec = record(state, cost_text, expires_text, code) .. '|' .. seq
    if commit then
      redis.call('HSET', account, field, rec, 'held', held, 'seq', seq, 'used', used)
    else
      redis.call('HSET', account, field, rec, 'held', held, 'seq', seq)
    end
    redis.call('ZREM', holds, token)
    local n = redis.call('LPUSH', events, event_line(state, cost_text, ARGV[8], code, token))
    if n == 1 then
      redis.call('PEXPIREAT', events, keys_expire_at)
    end
    if n > events_max then
      define_helpers()
      trim_log(account, events, n, events_max)
    end
    local name = (code == '1' and got[7]) or (code == '2' and got[8])
      or redis.call('HGET', account, 'fn:' .. code) or ''
    return {'OK', used, held, token, state, cost, expires, name, '', swept, monthly, granted}
  end
end
-- <<< common path

define_helpers()

local t = settle_target(account, holds, events, {KEYS[5], KEYS[6], KEYS[7]}, events_max, now, token, batch)
if not t then
  return {'NOT_FOUND', 0, 0, token, '', 0, 0, '', '', swept, 0, 0}
end
t.monthly = monthly_allowance(KEYS[4], ARGV[9])
-- The effective allowance: what used is measured against once this call is done.
local allowance = t.monthly + t.granted

local outcome = 'OK'
local notified -- threshold webhooks: the reply's tail, when this commit recorded any
if t.state == 'h' then
  settle_hold(account, holds, events, events_max, ARGV[8], token, t, commit and 'c' or 'r')
  -- >>> threshold webhooks: each of 70 % / 90 % passed (used above it) and 100 %
  -- reached that was not notified yet this period becomes one delivery per endpoint.
  -- `wh` in the account is the highest threshold notified: never lowered (no re-arming).
  local passed = threshold(t.used, allowance)
  if passed then
    local done = tonumber(redis.call('HGET', account, 'wh')) or 0
    if passed > done then
      redis.call('HSET', account, 'wh', passed)
      notified = outbox_record({KEYS[8], KEYS[9], KEYS[10], KEYS[11]}, ARGV[10],
        tonumber(ARGV[11]), tonumber(ARGV[12]), now, account, t, allowance, done, passed)
    end
  end
  -- <<< threshold webhooks
elseif commit and t.state == 'r' then
  outcome = 'REFUNDED'
elseif commit and t.state == 'e' then
  outcome = 'EXPIRED'
elseif not commit and t.state == 'c' then
  outcome = 'COMMITTED'
end
local reply = settle_reply(account, outcome, token, t)
if notified then
  local n = #reply
  for i = 1, #notified do
    reply[n + i] = notified[i]
  end
end
return reply
