-- grant: add credits to (or remove them from) the current period's allowance, with a
-- reason, and log it. A negative grant may not take remaining below 0.
--
-- KEYS[1] account hash     KEYS[2] holds zset     KEYS[3] events list
-- KEYS[4] grants list      KEYS[5] the coach's allowance override
-- KEYS[6] idempotency record (optional; absent when the caller sent no key)
-- ARGV[1] now (ms since epoch)         ARGV[2] grant id
-- ARGV[3] credits (non-zero)           ARGV[4] reason
-- ARGV[5] the request's fingerprint (what a replay of its key must match)
-- ARGV[6] configured monthly allowance ARGV[7] period keys expire at (ms)
-- ARGV[8] idempotency record TTL (ms)  ARGV[9] period (YYYY-MM)
-- ARGV[10] lapsed holds released per call
-- ARGV[11] events kept per period      ARGV[12] grants allowed per period
--
-- Reply: {status, used, held, token, state, cost, expires_ms, feature, extra, swept, base,
--         granted}
--   used, held (lapsed holds no longer count), base, granted: the period's, after the call
--   OK                granted now; token = grant id, extra = its grants row
--   REPLAY            the idempotency key was seen: extra = the grant it made; nothing
--                     granted again
--   REPLAY_ELSEWHERE  seen, but its grant (token) lives in period `extra`
--   IDEM_REUSED       the key was used for another grant (other credits or reason)
--   EXCEEDS           a negative grant larger than what remains; cost = credits remaining
--   LIMIT             the period has all the grants it may have
local account, holds, events, grants = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local override, idem = KEYS[5], KEYS[6]
local now, grant_id, credits = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local fingerprint, period = ARGV[5], ARGV[9]
local batch, events_max = tonumber(ARGV[10]), tonumber(ARGV[11])
keys_expire_at = ARGV[7]
define_helpers()

local used, held, seq, nxt, exists, granted = counters(account)
if sweep_due(held, nxt, now) then
  release_lapsed(account, holds, events, events_max, now, batch, nxt)
  used, held, seq, nxt, exists, granted = counters(account)
end
-- More than one batch may have lapsed: what is live decides, and what the reply shows.
local live = effective_held(holds, now, held, nxt)
local base = base_allowance(override, ARGV[6])

local function answer(status, token, cost, extra)
  return {status, used, live, token, '', cost, 0, '', extra, swept, base, granted}
end

if idem then
  local seen = redis.call('GET', idem)
  if seen then
    local seen_print, seen_period, seen_id = string.match(seen, '^(.*)|(.*)|(.*)$')
    if seen_print ~= fingerprint then
      return answer('IDEM_REUSED', seen_id, 0, '')
    end
    if seen_period ~= period then
      return answer('REPLAY_ELSEWHERE', seen_id, 0, seen_period)
    end
    local prefix = seen_id .. '|'
    for _, row in ipairs(redis.call('LRANGE', grants, 0, -1)) do
      if string.sub(row, 1, #prefix) == prefix then
        return answer('REPLAY', seen_id, 0, row)
      end
    end
    -- The grant is gone with its period's keys: grant afresh.
  end
end

if redis.call('LLEN', grants) >= tonumber(ARGV[12]) then
  return answer('LIMIT', '', 0, '')
end
if credits < 0 and base + granted + credits < used + live then
  return answer('EXCEEDS', '', math.max(0, base + granted - used - live), '')
end

granted = granted + credits
local row = grant_id .. '|' .. ARGV[1] .. '|' .. ARGV[3] .. '|' .. ARGV[4]
if redis.call('RPUSH', grants, row) == 1 then
  redis.call('PEXPIREAT', grants, keys_expire_at)
end
if exists then
  redis.call('HSET', account, 'granted', granted)
else
  redis.call('HSET', account, 'granted', granted, 'held', 0)
  redis.call('PEXPIREAT', account, keys_expire_at)
end
log_event(account, events, events_max, ARGV[1], 'granted', grant_id, ARGV[3], ARGV[4])
if idem then
  redis.call('SET', idem, fingerprint .. '|' .. period .. '|' .. grant_id, 'PX', ARGV[8])
end
return answer('OK', grant_id, credits, row)
