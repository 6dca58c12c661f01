-- get_reservation: read one reservation and its period's counters. Writes nothing.
--
-- KEYS[1] account hash     KEYS[2] holds zset
-- KEYS[3] the coach's allowance override (absent unless the coach has its own)
-- ARGV[1] now (ms since epoch)   ARGV[2] token of the hold
-- ARGV[3] configured monthly allowance
--
-- Reply: {status, used, held, token, state, cost, expires_ms, feature, extra, swept, base,
--         granted}
--   swept: credits this call returned from lapsed holds (their expiry)
--   base, granted: the monthly allowance in force and the period's grants
--   OK         found; a hold past its expiry reads as state e, held excludes lapsed holds
--   NOT_FOUND  no such reservation
local account, holds = KEYS[1], KEYS[2]
local now, token = tonumber(ARGV[1]), ARGV[2]
define_helpers()

local rec, used, held, nxt, granted =
  unpack(redis.call('HMGET', account, 'r:' .. token, 'used', 'held', 'next', 'granted'))
if not rec then
  return {'NOT_FOUND', 0, 0, token, '', 0, 0, '', '', swept, 0, 0}
end
local state, cost, expires, feature = parse_record(rec)
if state == 'h' and expires <= now then
  state = 'e'
end
return {'OK', num(used), effective_held(holds, now, num(held), tonumber(nxt)), token, state, cost, expires, feature, '', swept,
        base_allowance(KEYS[3], ARGV[3]), num(granted)}
