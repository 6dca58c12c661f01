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
--
-- Reply: {status, used, held, token, state, cost, expires_ms, feature, extra, swept,
--         monthly, granted}
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
local account, holds, events = KEYS[1], KEYS[2], KEYS[3]
local now, token = tonumber(ARGV[1]), ARGV[2]
local batch, events_max = tonumber(ARGV[3]), tonumber(ARGV[4])
local commit = ARGV[6] == 'commit'
keys_expire_at = ARGV[5]
base = tonumber(ARGV[7])
define_helpers()

local t = settle_target(account, holds, events, {KEYS[5], KEYS[6], KEYS[7]}, events_max, now, token, batch)
if not t then
  return {'NOT_FOUND', 0, 0, token, '', 0, 0, '', '', swept, 0, 0}
end
t.monthly = monthly_allowance(KEYS[4], ARGV[9])
-- The effective allowance: what used is measured against once this call is done.
local allowance = t.monthly + t.granted

local outcome = 'OK'
if t.state == 'h' then
  settle_hold(account, holds, events, events_max, ARGV[8], token, t, commit and 'c' or 'r')
elseif commit and t.state == 'r' then
  outcome = 'REFUNDED'
elseif commit and t.state == 'e' then
  outcome = 'EXPIRED'
elseif not commit and t.state == 'c' then
  outcome = 'COMMITTED'
end
return settle_reply(account, outcome, token, t)
