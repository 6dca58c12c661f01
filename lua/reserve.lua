-- reserve: hold `cost` credits for one coach in one period, if they fit.
--
-- KEYS[1] account hash     KEYS[2] holds zset     KEYS[3] events list
-- KEYS[4] the coach's allowance override (absent unless the coach has its own)
-- KEYS[5] idempotency record (optional; absent when the caller sent no key)
-- ARGV[1] now (ms since epoch)         ARGV[2] token of the new hold
-- ARGV[3] feature                      ARGV[4] cost (credits)
-- ARGV[5] hold expires at (ms)         ARGV[6] configured monthly allowance
-- ARGV[7] period keys expire at (ms)   ARGV[8] idempotency record TTL (ms)
-- ARGV[9] period (YYYY-MM)             ARGV[10] lapsed holds released per call
-- ARGV[11] events kept per period
--
-- Reply: {status, used, held, token, state, cost, expires_ms, feature, extra, swept, base,
--         granted}
--   swept: credits this call returned from lapsed holds (their expiry)
--   base, granted: the monthly allowance in force and this period's grants; the check is
--   against their sum
--   OK              the hold was made
--   REPLAY          the idempotency key was seen: the existing reservation, held again never
--   REPLAY_ELSEWHERE  seen, but its reservation lives in period `extra` (used and held
--                   are this period's)
--   IDEM_REUSED     the key was used for another feature
--   EXHAUSTED       it does not fit; extra = earliest live hold expiry (ms) or 0
local account, holds, events, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[5]
local now = tonumber(ARGV[1])
local token, feature, cost = ARGV[2], ARGV[3], tonumber(ARGV[4])
local expires = tonumber(ARGV[5])
local idem_ttl, period = ARGV[8], ARGV[9]
local batch, events_max = tonumber(ARGV[10]), tonumber(ARGV[11])
keys_expire_at = ARGV[7]

-- The common path (no lapsed hold, no idempotency key, credits left) is written out
-- with no helper: defining them costs more than the checks (see define_helpers).
local got = redis.call('HMGET', account, 'used', 'held', 'seq', 'next', 'granted')
local used, held, seq, nxt = tonumber(got[1]) or 0, tonumber(got[2]) or 0, tonumber(got[3]) or 0, tonumber(got[4])
-- The effective allowance: the coach's own monthly one (else the configured) + grants.
local granted = tonumber(got[5]) or 0
local base = tonumber(redis.call('GET', KEYS[4])) or tonumber(ARGV[6])
local allowance = base + granted
-- held is written with the first hold and never removed: it tells whether the hash exists.
local exists = got[2] ~= false
if held > 0 and (nxt == nil or nxt <= now) then -- some hold may have lapsed (sweep_due)
  define_helpers()
  release_lapsed(account, holds, events, events_max, now, batch, nxt)
  used, held, seq, nxt, exists = counters(account)
end

if idem then
  local seen = redis.call('GET', idem)
  if seen then
    define_helpers()
    local seen_feature, seen_period, seen_token = string.match(seen, '^(.*)|(.*)|(.*)$')
    if seen_feature ~= feature then
      return {'IDEM_REUSED', 0, 0, seen_token, '', 0, 0, seen_feature, '', swept, 0, 0}
    end
    if seen_period ~= period then
      return {'REPLAY_ELSEWHERE', used, held, seen_token, '', 0, 0, seen_feature, seen_period, swept,
              base, granted}
    end
    local rec = redis.call('HGET', account, 'r:' .. seen_token)
    if rec then
      local state, c, e, f = parse_record(rec)
      if state == 'h' and e <= now then
        expire_hold(account, holds, events, events_max, seen_token, c, e, f)
        state, held = 'e', held - c
      end
      return {'REPLAY', used, held, seen_token, state, c, e, f, '', swept, base, granted}
    end
    -- The record is gone with its period: fall through and hold afresh.
  end
end

if used + held + cost > allowance then
  define_helpers()
  -- Only near exhaustion is it worth releasing beyond one batch: a refusal must be real.
  while used + held + cost > allowance and sweep_due(held, nxt, now)
    and release_lapsed(account, holds, events, events_max, now, batch, nxt) > 0 do
    used, held, seq, nxt, exists = counters(account)
  end
  if used + held + cost > allowance then
    local first = redis.call('ZRANGE', holds, 0, 0, 'WITHSCORES')
    return {'EXHAUSTED', used, held, '', '', cost, 0, feature, first[2] or '0', swept, base, granted}
  end
end

-- The hold, the new counters, `next` and the event number in one write.
local rec = record('h', ARGV[4], ARGV[5], feature)
local moves_next = held == 0 or not nxt or expires < nxt
if events_max > 0 then
  seq = seq + 1
  if moves_next then
    redis.call('HSET', account, 'r:' .. token, rec, 'held', held + cost, 'seq', seq, 'next', ARGV[5])
  else
    redis.call('HSET', account, 'r:' .. token, rec, 'held', held + cost, 'seq', seq)
  end
elseif moves_next then
  redis.call('HSET', account, 'r:' .. token, rec, 'held', held + cost, 'next', ARGV[5])
else
  redis.call('HSET', account, 'r:' .. token, rec, 'held', held + cost)
end
redis.call('ZADD', holds, ARGV[5], token .. ':' .. ARGV[4])
if not exists then
  redis.call('PEXPIREAT', account, keys_expire_at)
end
if held == 0 or not nxt then
  -- No credits held (or no `next`): the holds were empty, so ZADD just created them.
  redis.call('PEXPIREAT', holds, keys_expire_at)
end
if events_max > 0 then
  -- push_event, written out.
  local n = redis.call('LPUSH', events, event_line(seq, ARGV[1], 'held', token, feature, ARGV[4]))
  if n == 1 then
    redis.call('PEXPIREAT', events, keys_expire_at)
  elseif n > events_max then
    redis.call('LTRIM', events, 0, events_max - 1)
  end
end
if idem then
  redis.call('SET', idem, feature .. '|' .. period .. '|' .. token, 'PX', idem_ttl)
end
return {'OK', used, held + cost, token, 'h', cost, expires, feature, '', swept, base, granted}
