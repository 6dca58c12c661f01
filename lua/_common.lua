-- Shared helpers, prepended to every operation script when it is loaded.
--
-- Key layout for one coach and one period (all in the slot of the hash tag {coach}):
--   account  HASH  used, held (credits), seq (last event number),
--                  next (ms: no hold expires before it; absent when there are no holds),
--                  granted (credits the period's grants added, may be negative),
--                  r:<token> -> "<state>|<cost>|<expires_ms>|<feature>"
--                  state: h held, c committed, r refunded, e expired
--   holds    ZSET  "<token>:<cost>" scored by expires_ms, live holds only
--   events   LIST  "<seq>|<ms>|<kind>|<a>|<b>|<c>", newest first, bounded; a|b|c by kind:
--                  held, committed, refunded, expired: <token>|<feature>|<cost>
--                  extended: <token>|<feature>|<expires_ms>
--                  granted: <grant_id>|<credits>|<reason>   allowance_changed: ||<allowance>
--   grants   LIST  "<grant_id>|<ms>|<credits>|<reason>", oldest first, bounded by the caller
-- and for the coach, in no period: the allowance override, a STRING holding the coach's
-- own monthly allowance, absent unless set, never expiring.
--
-- The effective allowance of a period is (override or the configured allowance) + granted.
--
-- Every Redis command a script runs costs about as much as the script's own logic, so
-- the common paths read the account in one HMGET and write it in one HSET, and `next`
-- lets a call skip the holds entirely until some hold may have lapsed. Keys get their
-- expiry when a call creates them; none is created any other way.

local unpack = unpack or table.unpack

-- Credits this call returned from lapsed holds; every reply carries it last.
local swept = 0

-- When the period's keys expire (ms since epoch); set by every script that writes.
local keys_expire_at

local RECORD = '^(%a)|(%d+)|(%d+)|(.*)$'

-- The two formats every writer shares, defined on every call (two closures cost far
-- less than the whole helper set, which reserve's common path does without).
-- Lua turns numbers into text with sprintf, as costly as a Redis command here: records
-- and events are built from text the caller sent or the record already holds.
local function record(state, cost, expires, feature)
  return state .. '|' .. cost .. '|' .. expires .. '|' .. feature
end

local function event_line(seq, ms, kind, token, feature, cost)
  return seq .. '|' .. ms .. '|' .. kind .. '|' .. token .. '|' .. feature .. '|' .. cost
end

-- The helpers, defined by define_helpers(). Lua makes a new closure for every function
-- a script defines, on every call: for these that cost about as much as a Redis
-- command, and reserve's common path needs none of them, so a script defines them only
-- when it needs them (reserve: only off its common path).
local num, parse_record, counters, sweep_due, push_event, log_event, base_allowance
local expire_hold, release_lapsed, effective_held, settle_target, settle_hold, settle_reply

local function define_helpers()
  if num then
    return
  end
  function num(v)
    return tonumber(v) or 0
  end

  function parse_record(rec)
    local state, cost, expires, feature = string.match(rec, RECORD)
    return state, tonumber(cost), tonumber(expires), feature
  end

  -- The account's counters: used, held, seq, next (nil without holds), whether the
  -- hash exists (held is written with its first hold and never removed) and granted.
  function counters(account)
    local used, held, seq, nxt, granted =
      unpack(redis.call('HMGET', account, 'used', 'held', 'seq', 'next', 'granted'))
    return num(used), num(held), num(seq), tonumber(nxt), held ~= false, num(granted)
  end

  -- The coach's monthly allowance: its own (the override key), else `configured`.
  function base_allowance(override, configured)
    return tonumber(redis.call('GET', override)) or tonumber(configured)
  end

  -- Whether some hold may have lapsed by `now`. Held credits include lapsed holds not yet
  -- released, so none held means no holds at all, whatever `next` says. Without `next`
  -- but with credits held (an account written before `next` existed) the holds are
  -- looked at, which sets it.
  function sweep_due(held, nxt, now)
    return held > 0 and (nxt == nil or nxt <= now)
  end

  -- Pushes event number `seq` (already counted in the account's seq by the caller).
  function push_event(events, events_max, seq, ms, kind, token, feature, cost)
    local n = redis.call('LPUSH', events, event_line(seq, ms, kind, token, feature, cost))
    if n == 1 then
      redis.call('PEXPIREAT', events, keys_expire_at)
    elseif n > events_max then
      redis.call('LTRIM', events, 0, events_max - 1)
    end
  end

  function log_event(account, events, events_max, ms, kind, token, feature, cost)
    if events_max > 0 then
      push_event(events, events_max, redis.call('HINCRBY', account, 'seq', 1), ms, kind, token, feature, cost)
    end
  end

  -- Turns one lapsed hold into an expired reservation and returns its credits.
  function expire_hold(account, holds, events, events_max, token, cost, expires, feature)
    redis.call('HSET', account, 'r:' .. token, record('e', cost, expires, feature))
    redis.call('HINCRBY', account, 'held', -cost)
    redis.call('ZREM', holds, token .. ':' .. cost)
    log_event(account, events, events_max, expires, 'expired', token, feature, cost)
    swept = swept + cost
  end

  -- Releases at most `limit` holds whose expiry is at or before `now`, and moves `next`
  -- (now `nxt`) to the earliest hold left. Returns how many it released, so a caller can
  -- tell whether more may remain.
  function release_lapsed(account, holds, events, events_max, now, limit, nxt)
    local rows = redis.call('ZRANGE', holds, 0, limit, 'WITHSCORES')
    local released, i = 0, 1
    while rows[i] and released < limit and tonumber(rows[i + 1]) <= now do
      local member = rows[i]
      local token = string.match(member, '^(.*):%d+$')
      local rec = redis.call('HGET', account, 'r:' .. token)
      local state, cost, expires, feature
      if rec then
        state, cost, expires, feature = parse_record(rec)
      end
      if state == 'h' then
        expire_hold(account, holds, events, events_max, token, cost, expires, feature)
      else
        redis.call('ZREM', holds, member)
      end
      released = released + 1
      i = i + 2
    end
    local earliest = tonumber(rows[i + 1])
    if earliest ~= nxt then
      if earliest then
        redis.call('HSET', account, 'next', rows[i + 1])
      else
        redis.call('HDEL', account, 'next')
      end
    end
    return released
  end

  -- Held credits as of `now` without writing anything: lapsed holds no longer count.
  function effective_held(holds, now, held, nxt)
    if not sweep_due(held, nxt, now) then
      return held
    end
    local lapsed = redis.call('ZRANGEBYSCORE', holds, '-inf', now)
    for _, member in ipairs(lapsed) do
      held = held - num(string.match(member, ':(%d+)$'))
    end
    return held
  end

  -- The settle script's prologue: the hold's record and the account's counters
  -- once this call has released lapsed holds, its own included. Returns nil, writing
  -- nothing, for an unknown token.
  function settle_target(account, holds, events, events_max, now, token, batch)
    local field = 'r:' .. token
    local rec, used, held, seq, nxt, granted =
      unpack(redis.call('HMGET', account, field, 'used', 'held', 'seq', 'next', 'granted'))
    if not rec then
      return nil
    end
    local prior = parse_record(rec)
    used, held, seq, nxt = num(used), num(held), num(seq), tonumber(nxt)
    if sweep_due(held, nxt, now) then
      release_lapsed(account, holds, events, events_max, now, batch, nxt)
      rec, held, seq = unpack(redis.call('HMGET', account, field, 'held', 'seq'))
      held, seq = num(held), num(seq)
    end
    local state, cost_text, expires_text, feature = string.match(rec, RECORD)
    local cost, expires = tonumber(cost_text), tonumber(expires_text)
    if state == 'h' and expires <= now then
      expire_hold(account, holds, events, events_max, token, cost, expires, feature)
      state, held = 'e', held - cost
      if events_max > 0 then
        seq = seq + 1
      end
    end
    return {prior = prior, state = state, cost = cost, expires = expires, feature = feature,
            used = used, held = held, seq = seq, cost_text = cost_text, expires_text = expires_text,
            granted = num(granted), base = 0}
  end

  -- A live hold leaves the holds, settled as `state` (c or r) and logged as `kind` at
  -- `now` (ms, as text); a commit also adds its cost to used. Updates `t` (from
  -- settle_target) to match.
  function settle_hold(account, holds, events, events_max, now, token, t, state, kind)
    local cost = t.cost_text
    t.held = t.held - t.cost
    local fields = {'r:' .. token, record(state, cost, t.expires_text, t.feature), 'held', t.held}
    if state == 'c' then
      t.used = t.used + t.cost
      fields[5], fields[6] = 'used', t.used
    end
    if events_max > 0 then
      t.seq = t.seq + 1
      local n = #fields
      fields[n + 1], fields[n + 2] = 'seq', t.seq
    end
    redis.call('HSET', account, unpack(fields))
    redis.call('ZREM', holds, token .. ':' .. cost)
    if events_max > 0 then
      push_event(events, events_max, t.seq, now, kind, token, t.feature, cost)
    end
    t.state = state
  end

  -- `t.base` is the caller's to set (base_allowance) when the reply carries usage.
  function settle_reply(outcome, token, t)
    local again = t.prior ~= 'h' and 'again' or ''
    return {outcome, t.used, t.held, token, t.state, t.cost, t.expires, t.feature, again, swept,
            t.base, t.granted}
  end
end
