-- commit: charge a held reservation for good. Repeating a commit changes nothing.
--
-- KEYS[1] account hash     KEYS[2] holds zset     KEYS[3] events list
-- ARGV[1] now (ms since epoch)   ARGV[2] token of the hold
-- ARGV[3] lapsed holds released per call   ARGV[4] events kept per period
--
-- Reply: {status, used, held, token, state, cost, expires_ms, feature, extra, swept}
--   swept: credits this call returned from lapsed holds (their expiry)
--   OK         committed now, or already committed before (extra = 'again')
--   NOT_FOUND  no such reservation; nothing was written
--   REFUNDED   it was refunded earlier      EXPIRED   it lapsed first
local account, holds, events = KEYS[1], KEYS[2], KEYS[3]
local now, token = tonumber(ARGV[1]), ARGV[2]
local batch, events_max = tonumber(ARGV[3]), tonumber(ARGV[4])

local rec = redis.call('HGET', account, 'r:' .. token)
if not rec then
  return {'NOT_FOUND', 0, 0, token, '', 0, 0, '', '', swept}
end
local prior = parse_record(rec)
release_lapsed(account, holds, events, events_max, now, batch)
local state, cost, expires, feature = parse_record(redis.call('HGET', account, 'r:' .. token))

local outcome, extra = 'OK', (prior ~= 'h') and 'again' or ''
if state == 'h' and expires <= now then
  expire_hold(account, holds, events, events_max, token, cost, expires, feature)
  state = 'e'
end
if state == 'h' then
  redis.call('HSET', account, 'r:' .. token, record('c', cost, expires, feature))
  redis.call('HINCRBY', account, 'held', -cost)
  redis.call('HINCRBY', account, 'used', cost)
  redis.call('ZREM', holds, token .. ':' .. cost)
  log_event(account, events, events_max, now, 'committed', token, feature, cost)
  state = 'c'
elseif state == 'c' then
  -- already committed: the same outcome again
elseif state == 'r' then
  outcome = 'REFUNDED'
else
  outcome = 'EXPIRED'
end
local used, held = unpack(redis.call('HMGET', account, 'used', 'held'))
return {outcome, num(used), num(held), token, state, cost, expires, feature, extra, swept}
