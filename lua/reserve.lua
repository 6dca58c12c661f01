-- reserve: hold `cost` credits for one coach in one period, if they fit.
--
-- KEYS[1] account hash     KEYS[2] holds zset     KEYS[3] events list
-- KEYS[4] the coach's allowance override (absent unless the coach has its own)
-- with an idempotency key only (ARGV[12]):
-- KEYS[5..7] settled:0..2 hashes (the period's older settled records)
-- KEYS[8..10] idem:0..2 hashes (the coach's idempotency records)
-- ARGV[1] now (ms since epoch)         ARGV[2] token of the new hold
-- ARGV[3] feature                      ARGV[4] cost (credits)
-- ARGV[5] hold expires at (ms)         ARGV[6] configured monthly allowance
-- ARGV[7] period keys expire at (ms)   ARGV[8] idempotency record TTL (ms)
-- ARGV[9] period (YYYY-MM)             ARGV[10] lapsed holds released per call
-- ARGV[11] events kept per period      ARGV[12] idempotency digest ('' without a key)
-- ARGV[13] period starts at (ms)       ARGV[14] now, ARGV[15] hold expires at: both in
--                                      ms after the period starts, in hex
--
-- Reply: {status, used, held, token, state, cost, expires_ms, feature, extra, swept,
--         monthly, granted}
--   swept: credits this call returned from lapsed holds (their expiry)
--   monthly, granted: the coach's monthly allowance in force and this period's grants;
--   the check is against their sum (all but IDEM_REUSED)
--   OK              the hold was made; extra = 'move' when the period's settled records
--                   are due to move out of the account (the caller runs move.lua)
--   REPLAY          the idempotency key was seen: the existing reservation, held again never
--   REPLAY_ELSEWHERE  seen, but its reservation lives in period `extra`; feature = its
--                   final record if that was dropped ('' otherwise); used and held are
--                   this period's
--   IDEM_REUSED     the key was used for another feature (`feature`)
--   EXHAUSTED       it does not fit; extra = earliest live hold expiry (ms) or 0
--   TOO_MANY_HOLDS  MAX_LIVE holds are live; extra = the earliest one's expiry (ms)
local account, holds, events = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
local token, feature, cost = ARGV[2], ARGV[3], tonumber(ARGV[4])
local expires = tonumber(ARGV[5])
local period, digest = ARGV[9], ARGV[12]
local batch, events_max = tonumber(ARGV[10]), tonumber(ARGV[11])
keys_expire_at = ARGV[7]
base = tonumber(ARGV[13])

-- The common path (no lapsed hold, no idempotency key, credits left) is written out
-- with no helper: defining them costs more than the checks (see define_helpers).
local got = redis.call('HMGET', account, 'used', 'held', 'seq', 'next', 'moved_at', 'fc:' .. feature, 'granted')
local used, held, seq, nxt = tonumber(got[1]) or 0, tonumber(got[2]) or 0, tonumber(got[3]) or 0, tonumber(got[4])
local moved_at, code, granted = tonumber(got[5]) or 0, got[6], tonumber(got[7]) or 0
-- The effective allowance: the coach's own monthly one (else the configured) + grants.
local monthly = tonumber(redis.call('GET', KEYS[4])) or tonumber(ARGV[6])
local allowance = monthly + granted
-- held is written with the first hold and never removed: it tells whether the hash exists.
local exists = got[2] ~= false
if held > 0 and (nxt == nil or nxt <= now) then -- some hold may have lapsed (sweep_due)
  define_helpers()
  release_lapsed(account, holds, events, events_max, now, batch)
  used, held, seq, nxt, exists = counters(account)
end

local idem, last_idem
if digest ~= '' then
  define_helpers()
  idem = {KEYS[8], KEYS[9], KEYS[10]}
  local seen_period, seen_token, final
  last_idem, seen_period, seen_token, final = idem_find(idem, digest, now, tonumber(ARGV[8]))
  if seen_token and seen_period ~= period then
    return {'REPLAY_ELSEWHERE', used, held, seen_token, '', 0, 0, final, seen_period, swept,
            monthly, granted}
  end
  local rec = seen_token and find_record(account, {KEYS[5], KEYS[6], KEYS[7]}, seen_token)
  if seen_token and not rec and final ~= '' then
    rec = final
  end
  local state, c, e, seen_code, c_text, e_text, _
  if rec then
    state, c, e, seen_code, _, c_text, e_text = parse_record(rec)
  end
  if state then
    if seen_code ~= code then
      return {'IDEM_REUSED', 0, 0, seen_token, '', 0, 0, feature_name(account, seen_code), '', swept,
              0, 0}
    end
    if state == 'h' and e <= now then
      local t = {held = held, seq = seq}
      expire_holds(account, holds, events, events_max, {{seen_token, c_text, e_text, seen_code}}, t)
      state, held = 'e', t.held
    end
    return {'REPLAY', used, held, seen_token, state, c, e, feature, '', swept, monthly, granted}
  end
  -- No live record, or its reservation is gone with its period: hold afresh.
end

if used + held + cost > allowance then
  define_helpers()
  -- Only near exhaustion is it worth releasing beyond one batch: a refusal must be real.
  while used + held + cost > allowance and sweep_due(held, nxt, now)
    and release_lapsed(account, holds, events, events_max, now, batch) > 0 do
    used, held, seq, nxt, exists = counters(account)
  end
  if used + held + cost > allowance then
    local first = redis.call('ZRANGE', holds, 0, 0, 'WITHSCORES')
    return {'EXHAUSTED', used, held, '', '', cost, 0, feature, first[2] or '0', swept, monthly,
            granted}
  end
end

-- Every hold costs a credit or more, so only with MAX_LIVE credits held can that many
-- holds be live: only then are they counted.
if held >= MAX_LIVE and redis.call('ZCARD', holds) >= MAX_LIVE then
  define_helpers()
  while sweep_due(held, nxt, now) and release_lapsed(account, holds, events, events_max, now, batch) > 0 do
    used, held, seq, nxt, exists = counters(account)
    if redis.call('ZCARD', holds) < MAX_LIVE then
      break
    end
  end
  if redis.call('ZCARD', holds) >= MAX_LIVE then
    local first = redis.call('ZRANGE', holds, 0, 0, 'WITHSCORES')
    return {'TOO_MANY_HOLDS', used, held, '', '', cost, 0, feature, first[2] or '0', swept,
            monthly, granted}
  end
end

-- The hold, the new counters, `next` and the event number in one write.
seq = seq + 1
local moves_next = held == 0 or not nxt or expires < nxt
if code then
  local rec = record('h', ARGV[4], ARGV[15], code)
  if moves_next then
    redis.call('HSET', account, 'r:' .. token, rec, 'held', held + cost, 'seq', seq, 'next', ARGV[5])
  else
    redis.call('HSET', account, 'r:' .. token, rec, 'held', held + cost, 'seq', seq)
  end
else
  -- The feature's first use this period: it gets the next code (`codes` counts those
  -- given out), recorded both ways. A coach's first call of the month gives out code 1
  -- in the same HSET that creates the account.
  if exists then
    code = tostring(redis.call('HINCRBY', account, 'codes', 1))
  else
    code = '1'
  end
  local rec = record('h', ARGV[4], ARGV[15], code)
  if moves_next then
    redis.call('HSET', account, 'fc:' .. feature, code, 'fn:' .. code, feature, 'codes', code,
      'r:' .. token, rec, 'held', held + cost, 'seq', seq, 'next', ARGV[5])
  else
    redis.call('HSET', account, 'fc:' .. feature, code, 'fn:' .. code, feature, 'codes', code,
      'r:' .. token, rec, 'held', held + cost, 'seq', seq)
  end
end
redis.call('ZADD', holds, ARGV[5], token)
if not exists then
  redis.call('PEXPIREAT', account, keys_expire_at)
end
if held == 0 or not nxt then
  -- No credits held (or no `next`): the holds were empty, so ZADD just created them.
  redis.call('PEXPIREAT', holds, keys_expire_at)
end
-- push_events, written out.
local n = redis.call('LPUSH', events, event_line('h', ARGV[4], ARGV[14], code, token))
if n == 1 then
  redis.call('PEXPIREAT', events, keys_expire_at)
elseif n > events_max then
  define_helpers()
  trim_log(account, events, n, events_max)
end
if idem then
  idem_write(idem, digest, period .. '|' .. token, last_idem, ARGV[1], tonumber(ARGV[8]))
end
-- The move reads the whole account and needs six more keys: it runs as its own call,
-- once every MOVE_EVERY events, so this one stays short.
local due = seq - moved_at >= MOVE_EVERY and 'move' or ''
return {'OK', used, held + cost, token, 'h', cost, expires, feature, due, swept, monthly, granted}
