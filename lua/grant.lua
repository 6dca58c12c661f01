-- grant: add credits to (or remove them from) the current period's allowance, with a
-- reason, and log it. A negative grant may not take remaining below 0.
--
-- KEYS[1] account hash     KEYS[2] holds zset     KEYS[3] events list
-- KEYS[4] the coach's allowance override (absent unless the coach has its own)
-- KEYS[5] grants list
-- with an idempotency key only (ARGV[13]):
-- KEYS[6..8] idem:0..2 hashes (the coach's idempotency records)
-- ARGV[1] now (ms since epoch)         ARGV[2] grant id
-- ARGV[3] credits (non-zero)           ARGV[4] reason
-- ARGV[5] the request's fingerprint (what a replay of its key must match)
-- ARGV[6] configured monthly allowance ARGV[7] period keys expire at (ms)
-- ARGV[8] idempotency record TTL (ms)  ARGV[9] period (YYYY-MM)
-- ARGV[10] lapsed holds released per call
-- ARGV[11] events kept per period      ARGV[12] grants allowed per period
-- ARGV[13] idempotency digest ('' without a key)
-- ARGV[14] now, in ms after the period starts, in hex
--
-- Reply: {status, used, held, token, state, cost, expires_ms, feature, extra, swept,
--         monthly, granted}
--   used, held (lapsed holds no longer count), monthly, granted: the period's, after
--   the call
--   OK                granted now; token = grant id, extra = its grants row
--   REPLAY            the idempotency key was seen: extra = the grant it made; nothing
--                     granted again
--   REPLAY_ELSEWHERE  seen, but its grant (token) lives in period `extra`
--   IDEM_REUSED       the key was used for another grant (other credits or reason)
--   EXCEEDS           a negative grant larger than what remains; cost = credits remaining
--   LIMIT             the period has all the grants it may have
local account, holds, events = KEYS[1], KEYS[2], KEYS[3]
local override, grants = KEYS[4], KEYS[5]
local now, grant_id, credits = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local fingerprint, period, digest = ARGV[5], ARGV[9], ARGV[13]
local batch, events_max = tonumber(ARGV[10]), tonumber(ARGV[11])
local idem_ttl = tonumber(ARGV[8])
keys_expire_at = ARGV[7]
define_helpers()

local used, held, seq, nxt, exists, granted = counters(account)
if sweep_due(held, nxt, now) then
  release_lapsed(account, holds, events, events_max, now, batch)
  used, held, seq, nxt, exists, granted = counters(account)
end
-- More than one batch may have lapsed: what is live decides, and what the reply shows.
local live = effective_held(account, holds, now, held, nxt)
local monthly = monthly_allowance(override, ARGV[6])

local function answer(status, token, cost, extra)
  return {status, used, live, token, '', cost, 0, '', extra, swept, monthly, granted}
end

local idem, last_idem
if digest ~= '' then
  idem = {KEYS[6], KEYS[7], KEYS[8]}
  local seen_period, seen_id, seen_print
  last_idem, seen_period, seen_id, seen_print = idem_find(idem, digest, now, idem_ttl)
  if seen_id then
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
if credits < 0 and monthly + granted + credits < used + live then
  return answer('EXCEEDS', '', math.max(0, monthly + granted - used - live), '')
end

granted = granted + credits
seq = seq + 1
local row = grant_id .. '|' .. ARGV[14] .. '|' .. ARGV[3] .. '|' .. ARGV[4]
local place = redis.call('RPUSH', grants, row)
if place == 1 then
  redis.call('PEXPIREAT', grants, keys_expire_at)
end
if exists then
  redis.call('HSET', account, 'granted', granted, 'seq', seq)
else
  redis.call('HSET', account, 'granted', granted, 'seq', seq, 'held', 0)
  redis.call('PEXPIREAT', account, keys_expire_at)
end
push_events(account, events, events_max, {'g' .. ARGV[3] .. '|' .. ARGV[14] .. '|' .. place})
if idem then
  idem_write(idem, digest, period .. '|' .. grant_id, last_idem, ARGV[1], idem_ttl, '|' .. fingerprint)
end
return answer('OK', grant_id, credits, row)
