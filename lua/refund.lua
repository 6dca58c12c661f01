-- refund: return a held reservation's credits. Repeating a refund changes nothing.
--
-- KEYS[1] account hash     KEYS[2] holds zset     KEYS[3] events list
-- ARGV[1] now (ms since epoch)   ARGV[2] token of the hold
-- ARGV[3] lapsed holds released per call   ARGV[4] events kept per period
-- ARGV[5] period keys expire at (ms)
--
-- Reply: {status, used, held, token, state, cost, expires_ms, feature, extra, swept}
--   swept: credits this call returned from lapsed holds (their expiry)
--   OK         refunded now or before (state r), or it had expired (state e):
--              either way its credits are back; extra = 'again' when nothing changed
--   NOT_FOUND  no such reservation; nothing was written
--   COMMITTED  it was committed: spent credits are not refunded
local account, holds, events = KEYS[1], KEYS[2], KEYS[3]
local now, token = tonumber(ARGV[1]), ARGV[2]
local batch, events_max = tonumber(ARGV[3]), tonumber(ARGV[4])
keys_expire_at = ARGV[5]
define_helpers()

local t = settle_target(account, holds, events, events_max, now, token, batch)
if not t then
  return {'NOT_FOUND', 0, 0, token, '', 0, 0, '', '', swept}
end

local outcome = 'OK'
if t.state == 'h' then
  settle_hold(account, holds, events, events_max, ARGV[1], token, t, 'r', 'refunded')
elseif t.state == 'c' then
  outcome = 'COMMITTED'
end
return settle_reply(outcome, token, t)
