-- settle: commit (charge for good) or refund (give back) a held reservation. Repeating
-- a settlement changes nothing.
--
-- KEYS[1] account hash     KEYS[2] holds zset     KEYS[3] events list
-- KEYS[4] the coach's allowance override (absent unless the coach has its own)
-- ARGV[1] now (ms since epoch)   ARGV[2] token of the hold
-- ARGV[3] lapsed holds released per call   ARGV[4] events kept per period
-- ARGV[5] period keys expire at (ms)       ARGV[6] action: 'commit' or 'refund'
-- ARGV[7] configured monthly allowance
--
-- Reply: {status, used, held, token, state, cost, expires_ms, feature, extra, swept, base,
--         granted}
--   swept: credits this call returned from lapsed holds (their expiry)
--   base, granted: the monthly allowance in force and the period's grants
--   OK         commit: committed now or before (state c)
--              refund: refunded now or before (state r), or it had expired (state e):
--              either way its credits are back
--              extra = 'again' when nothing changed
--   NOT_FOUND  no such reservation; nothing was written
--   REFUNDED   commit of a reservation refunded earlier
--   EXPIRED    commit of a reservation that lapsed first
--   COMMITTED  refund of a committed reservation: spent credits are not refunded
local account, holds, events = KEYS[1], KEYS[2], KEYS[3]
local now, token = tonumber(ARGV[1]), ARGV[2]
local batch, events_max = tonumber(ARGV[3]), tonumber(ARGV[4])
local commit = ARGV[6] == 'commit'
keys_expire_at = ARGV[5]
define_helpers()

local t = settle_target(account, holds, events, events_max, now, token, batch)
if not t then
  return {'NOT_FOUND', 0, 0, token, '', 0, 0, '', '', swept, 0, 0}
end
t.base = base_allowance(KEYS[4], ARGV[7])

local outcome = 'OK'
if t.state == 'h' then
  if commit then
    settle_hold(account, holds, events, events_max, ARGV[1], token, t, 'c', 'committed')
  else
    settle_hold(account, holds, events, events_max, ARGV[1], token, t, 'r', 'refunded')
  end
elseif commit and t.state == 'r' then
  outcome = 'REFUNDED'
elseif commit and t.state == 'e' then
  outcome = 'EXPIRED'
elseif not commit and t.state == 'c' then
  outcome = 'COMMITTED'
end
return settle_reply(outcome, token, t)
