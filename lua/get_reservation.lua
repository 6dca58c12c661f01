-- get_reservation: read one reservation and its period's counters. Writes nothing.
--
-- KEYS[1] account hash     KEYS[2] holds zset
-- KEYS[3] the coach's allowance override (absent unless the coach has its own)
-- KEYS[4..6] settled:0..2 hashes (the period's older settled records)
-- ARGV[1] now (ms since epoch)   ARGV[2] token of the hold
-- ARGV[3] the reservation's final record as an idempotency record kept it, for when its
--         own record was dropped ('' for none)
-- ARGV[4] period starts at (ms)  ARGV[5] configured monthly allowance
--
-- Reply: {status, used, held, token, state, cost, expires_ms, feature, extra, swept,
--         monthly, granted}
--   swept: credits this call returned from lapsed holds (their expiry)
--   monthly, granted: the monthly allowance in force and the period's grants
--   OK         found; a hold past its expiry reads as state e, held excludes lapsed holds
--   NOT_FOUND  no such reservation (or its record was dropped)
local account, holds = KEYS[1], KEYS[2]
local now, token = tonumber(ARGV[1]), ARGV[2]
base = tonumber(ARGV[4])
define_helpers()

local rec, used, held, nxt, granted =
  unpack(redis.call('HMGET', account, 'r:' .. token, 'used', 'held', 'next', 'granted'))
rec = rec or find_record(account, {KEYS[4], KEYS[5], KEYS[6]}, token)
if not rec and ARGV[3] ~= '' then
  rec = ARGV[3]
end
local state, cost, expires, code
if rec then
  state, cost, expires, code = parse_record(rec)
end
if not state then
  return {'NOT_FOUND', 0, 0, token, '', 0, 0, '', '', swept, 0, 0}
end
if state == 'h' and expires <= now then
  state = 'e'
end
return {'OK', num(used), effective_held(account, holds, now, num(held), tonumber(nxt)), token, state,
        cost, expires, feature_name(account, code), '', swept, monthly_allowance(KEYS[3], ARGV[5]),
        num(granted)}
