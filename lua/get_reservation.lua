-- get_reservation: read one reservation and its period's counters. Writes nothing.
--
-- KEYS[1] account hash     KEYS[2] holds zset
-- ARGV[1] now (ms since epoch)   ARGV[2] token of the hold
--
-- Reply: {status, used, held, token, state, cost, expires_ms, feature, extra, swept}
--   swept: credits this call returned from lapsed holds (their expiry)
--   OK         found; a hold past its expiry reads as state e, held excludes lapsed holds
--   NOT_FOUND  no such reservation
local account, holds = KEYS[1], KEYS[2]
local now, token = tonumber(ARGV[1]), ARGV[2]
define_helpers()

local rec, used, held, nxt = unpack(redis.call('HMGET', account, 'r:' .. token, 'used', 'held', 'next'))
if not rec then
  return {'NOT_FOUND', 0, 0, token, '', 0, 0, '', '', swept}
end
local state, cost, expires, feature = parse_record(rec)
if state == 'h' and expires <= now then
  state = 'e'
end
return {'OK', num(used), effective_held(holds, now, num(held), tonumber(nxt)), token, state, cost, expires, feature, '', swept}
