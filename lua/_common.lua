-- Shared helpers, prepended to every operation script when it is loaded.
--
-- Key layout (all in the slot of the hash tag {coach}; docs/storage.md has the whole
-- picture). Per coach and period:
--   account      HASH  used, held (credits), seq (last event number),
--                      next (ms: no hold expires before it; absent when there are no holds),
--                      moved_at (seq when settled records last moved to settled:0),
--                      archived (records in settled:0),
--                      granted (credits the period's grants added; may be negative),
--                      base_used, base_held, base_granted (what the events trimmed off the
--                      log added up to),
--                      wh (the highest usage threshold, 70, 90 or 100, notified by webhook
--                      this period; written only while webhook endpoints are configured),
--                      fc:<feature> -> code, fn:<code> -> feature, codes (codes given out),
--                      r:<token> -> record
--   holds        ZSET  <token> scored by expires_ms, live holds only
--   events       LIST  event rows, newest first; the head is event number `seq`
--   settled:0..2 HASH  <token> -> record: older settled reservations, GENERATION a hash,
--                      settled:0 the newest
--   grants       LIST  grant rows, oldest first, at most the caller's limit (100)
-- Per coach:
--   idem:0..2    HASH  <digest> -> idempotency record, GENERATION a hash; idem:0 also
--                      holds '#', the number of the newest record
--   allowance    STRING the coach's own monthly allowance; absent unless set, no expiry
--
-- The effective allowance of a period is (the coach's own or the configured allowance)
-- + granted.
--
-- The formats, each defined here once (app/store/replies.py reads the same):
--   record  "<state><cost>|<expires>|<code>", state h held, c committed, r refunded,
--           e expired; "|<seq>" follows while a settled record is still in the account
--           (the event number that settled it, which orders the move to settled:0)
--   event   "<kind><n>|<at>|..." by kind; its number is its place in the log counted
--           down from `seq`:
--             h c r e (as the state it led to)  "<kind><cost>|<at>|<code>|<token>"
--             x extended   "x<cost>|<at>|<code>|<token>|<new expires>"
--             g granted    "g<credits>|<at>|<i>", i the grant's place in the grants list
--                          (1 the oldest), which holds its id and reason
--             a allowance_changed "a<monthly allowance>|<at>" ("a|<at>" once deleted)
--   grant   "<grant_id>|<at>|<credits>|<reason>" (the reason last: it may hold '|')
--   Times in records and events are ms after the period starts, in hex (8 digits where
--   13 decimal ones would do, and the caller writes them: Lua's number formatting costs
--   as much as a Redis command).
--   idem    "<period>|<token>|<n>|<ms>", n its number, ms when it was made; followed by
--           "|<record>" once the reservation's own record was dropped; a grant's
--           "<period>|<grant_id>|<n>|<ms>|<fingerprint>" (of its credits and reason)
-- A feature is stored as its code, given out per period on first use: names are up to 64
-- characters and would otherwise dominate every record and event.
--
-- Every Redis command a script runs costs about as much as the script's own logic, so
-- the common paths read the account in one HMGET and write it in one HSET, and `next`
-- lets a call skip the holds entirely until some hold may have lapsed. Keys get their
-- expiry when a call creates them; none is created any other way.

local unpack = unpack or table.unpack

-- What a coach keeps is bounded (docs/storage.md, "Bounds").
local MAX_LIVE = 1000 -- live holds per coach and period: the next is TOO_MANY_HOLDS
local KEPT = 1000 -- settled records and idempotency records kept, the newest
-- Records a settled:N or idem:N hash takes: Redis keeps a hash of up to 512 short
-- entries as one compact listpack, about half the memory of a hash table.
local GENERATION = 500
-- Events after which the account's settled records move to settled:0 (each action logs
-- two, so about 100 actions' records stay in the account); a reserve reports it due.
local MOVE_EVERY = 200

-- Credits this call returned from lapsed holds; every reply carries it (its 10th field).
local swept = 0

-- When the period's keys expire (ms since epoch); set by every script that writes.
local keys_expire_at

-- When the period starts (ms since epoch, a number); set by every script that reads
-- a record's time.
local base = 0

local RECORD = '^(%a)(%d+)|(%x+)|([^|]*)|?(%d*)$'

-- The two formats every writer shares, defined on every call (two closures cost far
-- less than the whole helper set, which reserve's common path does without).
-- Lua turns numbers into text with sprintf, as costly as a Redis command here: records
-- and events are built from text the caller sent or the record already holds.
local function record(state, cost, expires, code)
  return state .. cost .. '|' .. expires .. '|' .. code
end

local function event_line(kind, cost, ms, code, token)
  return kind .. cost .. '|' .. ms .. '|' .. code .. '|' .. token
end

-- The helpers, defined by define_helpers(). Lua makes a new closure for every function
-- a script defines, on every call: for these that cost about as much as a Redis
-- command, and reserve's common path needs none of them, so a script defines them only
-- when it needs them (reserve: only off its common path).
local num, parse_record, counters, sweep_due, find_record, feature_name
local trim_log, push_events, expire_holds, release_lapsed, effective_held
local settle_target, settle_hold, settle_reply, move_settled, idem_find, idem_write
local outbox_record
local monthly_allowance

local function define_helpers()
  if num then
    return
  end
  function num(v)
    return tonumber(v) or 0
  end

  -- state, cost, expires (numbers, expires in ms since epoch), code, the settling
  -- event's number (nil unless the record is settled and still in the account), and
  -- cost and expires as stored.
  function parse_record(rec)
    local state, cost, expires, code, seq = string.match(rec, RECORD)
    if not state then
      return nil
    end
    return state, tonumber(cost), base + tonumber(expires, 16), code, tonumber(seq), cost, expires
  end

  -- The account's counters: used, held, seq, next (nil without holds), whether the
  -- hash exists (held is written with its first hold and never removed) and granted.
  function counters(account)
    local used, held, seq, nxt, granted =
      unpack(redis.call('HMGET', account, 'used', 'held', 'seq', 'next', 'granted'))
    return num(used), num(held), num(seq), tonumber(nxt), held ~= false, num(granted)
  end

  -- The coach's monthly allowance: its own (the override key), else `configured`.
  function monthly_allowance(override, configured)
    return tonumber(redis.call('GET', override)) or tonumber(configured)
  end

  -- Whether some hold may have lapsed by `now`. Held credits include lapsed holds not yet
  -- released, so none held means no holds at all, whatever `next` says.
  function sweep_due(held, nxt, now)
    return held > 0 and (nxt == nil or nxt <= now)
  end

  -- A reservation's record wherever it is kept: the account, else the settled
  -- generations (KEYS settled:0..2 in `settled`).
  function find_record(account, settled, token)
    local rec = redis.call('HGET', account, 'r:' .. token)
    for i = 1, 3 do
      if rec then
        return rec
      end
      rec = redis.call('HGET', settled[i], token)
    end
    return rec
  end

  function feature_name(account, code)
    return redis.call('HGET', account, 'fn:' .. code) or ''
  end

  -- Keeps the log at `events_max` rows once a push made it `n` long: the rows that fall
  -- off go into the baseline, so the kept rows replayed on it still give used, held and
  -- granted.
  function trim_log(account, events, n, events_max)
    local rows = redis.call('RPOP', events, n - events_max)
    local used, held, granted = 0, 0, 0
    for _, row in ipairs(rows) do
      local kind, amount = string.match(row, '^(%a)(%-?%d*)|')
      amount = num(amount)
      if kind == 'h' then
        held = held + amount
      elseif kind == 'c' then
        held, used = held - amount, used + amount
      elseif kind == 'r' or kind == 'e' then -- the credits came back
        held = held - amount
      elseif kind == 'g' then
        granted = granted + amount
      end -- x, a: no counter changed
    end
    if used ~= 0 then
      redis.call('HINCRBY', account, 'base_used', used)
    end
    if held ~= 0 then
      redis.call('HINCRBY', account, 'base_held', held)
    end
    if granted ~= 0 then
      redis.call('HINCRBY', account, 'base_granted', granted)
    end
  end

  -- Pushes rows (oldest first; their numbers already counted in the account's seq).
  function push_events(account, events, events_max, rows)
    local n = redis.call('LPUSH', events, unpack(rows))
    if n == #rows then
      redis.call('PEXPIREAT', events, keys_expire_at)
    end
    if n > events_max then
      trim_log(account, events, n, events_max)
    end
  end

  -- Turns lapsed holds into expired reservations and returns their credits, in one
  -- write of the account. `lapsed` lists {token, cost_text, expires_text, code}; `t`
  -- holds the counters (held, seq), which are updated; `extra` are more account fields
  -- to write along (`next`).
  function expire_holds(account, holds, events, events_max, lapsed, t, extra)
    local fields, members, rows = {}, {}, {}
    for _, h in ipairs(lapsed) do
      local token, cost_text, expires_text, code = h[1], h[2], h[3], h[4]
      t.seq = t.seq + 1
      fields[#fields + 1] = 'r:' .. token
      fields[#fields + 1] = record('e', cost_text, expires_text, code) .. '|' .. t.seq
      members[#members + 1] = token
      rows[#rows + 1] = event_line('e', cost_text, expires_text, code, token)
      t.held = t.held - tonumber(cost_text)
      swept = swept + tonumber(cost_text)
    end
    for _, v in ipairs(extra or {}) do
      fields[#fields + 1] = v
    end
    local k = #fields
    fields[k + 1], fields[k + 2], fields[k + 3], fields[k + 4] = 'held', t.held, 'seq', t.seq
    redis.call('HSET', account, unpack(fields))
    redis.call('ZREM', holds, unpack(members))
    push_events(account, events, events_max, rows)
  end

  -- Releases at most `limit` holds whose expiry is at or before `now`, and moves `next`
  -- to the earliest hold left. Returns how many it released, so a caller can tell
  -- whether more may remain.
  function release_lapsed(account, holds, events, events_max, now, limit)
    local rows = redis.call('ZRANGE', holds, 0, limit, 'WITHSCORES')
    local members, i = {}, 1
    while rows[i] and #members < limit and tonumber(rows[i + 1]) <= now do
      members[#members + 1] = rows[i]
      i = i + 2
    end
    local earliest = rows[i + 1]
    local next_field = earliest and {'next', earliest} or nil
    if #members == 0 then
      if earliest then
        redis.call('HSET', account, 'next', earliest)
      else
        redis.call('HDEL', account, 'next')
      end
      return 0
    end
    local names = {}
    for j, member in ipairs(members) do
      names[j] = 'r:' .. member
    end
    local n = #names
    names[n + 1], names[n + 2] = 'held', 'seq'
    local got = redis.call('HMGET', account, unpack(names))
    local t = {held = num(got[n + 1]), seq = num(got[n + 2])}
    local lapsed, stray = {}, {}
    for j, member in ipairs(members) do
      local rec = got[j]
      local state, cost, expires, code
      if rec then
        state, cost, expires, code = string.match(rec, RECORD)
      end
      if state == 'h' then
        lapsed[#lapsed + 1] = {string.sub(names[j], 3), cost, expires, code}
      else
        stray[#stray + 1] = member
      end
    end
    if #stray > 0 then
      redis.call('ZREM', holds, unpack(stray))
    end
    if #lapsed > 0 then
      expire_holds(account, holds, events, events_max, lapsed, t, next_field)
    end
    if not earliest then
      redis.call('HDEL', account, 'next')
    elseif #lapsed == 0 then
      redis.call('HSET', account, 'next', earliest)
    end
    return #members
  end

  -- Held credits as of `now` without writing anything: lapsed holds no longer count.
  function effective_held(account, holds, now, held, nxt)
    if not sweep_due(held, nxt, now) then
      return held
    end
    local lapsed = redis.call('ZRANGEBYSCORE', holds, '-inf', now)
    if #lapsed == 0 then
      return held
    end
    for i, token in ipairs(lapsed) do
      lapsed[i] = 'r:' .. token
    end
    for _, rec in ipairs(redis.call('HMGET', account, unpack(lapsed))) do
      if rec then
        held = held - num(string.match(rec, '^%a(%d+)|'))
      end
    end
    return held
  end

  -- The settle script's prologue: the reservation's record and the account's counters
  -- once this call has released lapsed holds, its own included. Returns nil, writing
  -- nothing, for an unknown token.
  function settle_target(account, holds, events, settled, events_max, now, token, batch)
    local field = 'r:' .. token
    -- The names of codes 1 and 2 come along: most coaches use no more than two features.
    local rec, used, held, seq, nxt, granted, name1, name2 = unpack(
      redis.call('HMGET', account, field, 'used', 'held', 'seq', 'next', 'granted', 'fn:1', 'fn:2'))
    if not rec then
      rec = find_record(account, settled, token)
      if not rec then
        return nil
      end
    end
    if not string.match(rec, RECORD) then
      return nil -- not a record this version wrote
    end
    local prior = string.sub(rec, 1, 1)
    local t = {used = num(used), held = num(held), seq = num(seq), granted = num(granted),
               names = {name1, name2}}
    if sweep_due(t.held, tonumber(nxt), now) then
      release_lapsed(account, holds, events, events_max, now, batch)
      local again = redis.call('HMGET', account, field, 'held', 'seq')
      rec = again[1] or rec
      t.held, t.seq = num(again[2]), num(again[3])
    end
    local state, cost, expires, code, _, cost_text, expires_text = parse_record(rec)
    t.prior, t.state, t.code = prior, state, code
    t.cost, t.expires = cost, expires
    t.cost_text, t.expires_text = cost_text, expires_text
    if state == 'h' and t.expires <= now then
      expire_holds(account, holds, events, events_max, {{token, cost_text, expires_text, code}}, t)
      t.state = 'e'
    end
    return t
  end

  -- A live hold leaves the holds, settled as `state` (c or r) and logged as such at
  -- `now` (ms, as text); a commit also adds its cost to used. Updates `t` (from
  -- settle_target) to match.
  function settle_hold(account, holds, events, events_max, now, token, t, state)
    local cost = t.cost_text
    t.held, t.seq = t.held - t.cost, t.seq + 1
    local fields = {
      'r:' .. token, record(state, cost, t.expires_text, t.code) .. '|' .. t.seq,
      'held', t.held, 'seq', t.seq,
    }
    if state == 'c' then
      t.used = t.used + t.cost
      fields[7], fields[8] = 'used', t.used
    end
    redis.call('HSET', account, unpack(fields))
    redis.call('ZREM', holds, token)
    push_events(account, events, events_max, {event_line(state, cost, now, t.code, token)})
    t.state = state
  end

  -- `t.monthly` is the caller's to set (monthly_allowance).
  function settle_reply(account, outcome, token, t)
    local again = t.prior ~= 'h' and 'again' or ''
    local name = t.names[tonumber(t.code)] or feature_name(account, t.code)
    return {outcome, t.used, t.held, token, t.state, t.cost, t.expires,
            name, again, swept, t.monthly, t.granted}
  end

  -- Before dropping the oldest settled records, writes each one's final state into the
  -- idempotency record that still names it, so a replay of that key keeps answering
  -- with the reservation instead of holding again.
  local function keep_final_states(idem, period, dropped)
    local by_token = {}
    for i = 1, #dropped, 2 do
      by_token[dropped[i]] = dropped[i + 1]
    end
    for _, key in ipairs(idem) do
      local all = redis.call('HGETALL', key)
      for i = 1, #all, 2 do
        local value = all[i + 1]
        local p, token = string.match(value, '^([^|]*)|([^|]*)|%d+|%d+$')
        if p == period and by_token[token] then
          redis.call('HSET', key, all[i], value .. '|' .. by_token[token])
        end
      end
    end
  end

  -- settled:0 is full: the oldest generation goes, the others move up one.
  local function rotate_settled(settled, idem, period)
    local dropped = redis.call('HGETALL', settled[3])
    if #dropped > 0 then
      keep_final_states(idem, period, dropped)
      redis.call('DEL', settled[3])
    end
    if redis.call('EXISTS', settled[2]) == 1 then
      redis.call('RENAME', settled[2], settled[3])
    end
    redis.call('RENAME', settled[1], settled[2])
  end

  -- Moves the settled records out of the account into settled:0, oldest first, a new
  -- generation every GENERATION records: the newest KEPT or more stay findable, older
  -- ones are dropped. Runs every MOVE_EVERY events (move.lua), so each record is moved
  -- once and dropped once, and the account is read once per MOVE_EVERY events: O(1)
  -- amortised.
  function move_settled(account, settled, idem, period, seq)
    local all = redis.call('HGETALL', account)
    local moving = {}
    local archived = 0
    for i = 1, #all, 2 do
      local field = all[i]
      if string.sub(field, 1, 2) == 'r:' then
        local state, cost, expires, code, seq = string.match(all[i + 1], RECORD)
        if state and state ~= 'h' then
          moving[#moving + 1] = {tonumber(seq) or 0, field, record(state, cost, expires, code)}
        end
      elseif field == 'archived' then
        archived = tonumber(all[i + 1])
      end
    end
    table.sort(moving, function(a, b) return a[1] < b[1] end)
    local batch, gone = {}, {}
    local function flush()
      if #batch > 0 then
        redis.call('HSET', settled[1], unpack(batch))
        redis.call('PEXPIREAT', settled[1], keys_expire_at)
        batch = {}
      end
    end
    for _, m in ipairs(moving) do
      if archived >= GENERATION then
        flush()
        rotate_settled(settled, idem, period)
        archived = 0
      end
      batch[#batch + 1] = string.sub(m[2], 3)
      batch[#batch + 1] = m[3]
      gone[#gone + 1] = m[2]
      archived = archived + 1
    end
    flush()
    if #gone > 0 then
      redis.call('HDEL', account, unpack(gone))
    end
    redis.call('HSET', account, 'moved_at', seq, 'archived', archived)
  end

  -- The live idempotency record for `digest` (KEYS idem:0..2 in `idem`): the number of
  -- the newest record, then, when it is live (younger than `ttl` ms, fewer than KEPT
  -- newer), its period, token and the reservation's final record ('' while kept).
  function idem_find(idem, digest, now, ttl)
    local got = redis.call('HMGET', idem[1], '#', digest)
    local last, value = num(got[1]), got[2]
    if not value and last > GENERATION then
      value = redis.call('HGET', idem[2], digest)
      if not value and last > 2 * GENERATION then
        value = redis.call('HGET', idem[3], digest)
      end
    end
    if value then
      local period, token, n, at, final = string.match(value, '^([^|]*)|([^|]*)|(%d+)|(%d+)|?(.*)$')
      if last - tonumber(n) < KEPT and now - tonumber(at) < ttl then
        return last, period, token, final
      end
    end
    return last
  end

  -- A new record after the one numbered `last` (`suffix`: what follows its time, for a
  -- grant); idem:0 lives `ttl` ms past its last write, the older generations less, as
  -- everything in them is older.
  function idem_write(idem, digest, value, last, now_text, ttl, suffix)
    if last > 0 and last % GENERATION == 0 then
      redis.call('DEL', idem[3])
      if redis.call('EXISTS', idem[2]) == 1 then
        redis.call('RENAME', idem[2], idem[3])
      end
      redis.call('RENAME', idem[1], idem[2])
    end
    local n = last + 1
    redis.call('HSET', idem[1], digest, value .. '|' .. n .. '|' .. now_text .. (suffix or ''), '#', n)
    redis.call('PEXPIRE', idem[1], ttl)
  end

  -- Threshold webhooks: records one delivery per endpoint (`urls`, space-separated)
  -- for every threshold above `done` up to `passed`, due at once, in this slot's
  -- `outbox` {deliveries, due, log, failed}, and keeps the outbox within its bounds
  -- (`keep` deliveries, for `keep_ms`). `t` is settle_target's, after the commit.
  -- Returns the reply's tail: {'deliveries', deliveries key, id, ...}.
  function outbox_record(outbox, urls, keep, keep_ms, now, account, t, allowance, done, passed)
    local deliveries, due, log, failed = unpack(outbox)
    local coach, period = string.match(account, '{(.*)}:([^:]*):account$')
    local tail = {'deliveries', deliveries}
    for _, threshold in ipairs({70, 90, 100}) do
      if threshold > done and threshold <= passed then
        -- The same for every attempt and endpoint: one event, at most once per coach,
        -- period and threshold.
        local webhook_id = 'msg_' .. period .. '_' .. threshold .. '_' .. coach
        for url in string.gmatch(urls, '%S+') do
          local id = url .. ' ' .. webhook_id
          redis.call('HSET', deliveries, id, cjson.encode({
            webhook_id = webhook_id, url = url, threshold = threshold, coach_id = coach,
            period = period, used = t.used, held = t.held, allowance = allowance,
            base_allowance = t.monthly, granted = t.granted,
            recorded_at = now, attempts = 0, status = 'pending', next_attempt_at = now}))
          redis.call('ZADD', due, now, id)
          redis.call('ZADD', log, now, id)
          tail[#tail + 1] = id
        end
      end
    end
    -- The oldest go first: past their age, then beyond the count.
    local gone = redis.call('ZRANGEBYSCORE', log, '-inf', now - keep_ms, 'LIMIT', 0, 1000)
    local over = math.min(redis.call('ZCARD', log) - #gone - keep, 1000)
    if over > 0 then
      for _, id in ipairs(redis.call('ZRANGE', log, #gone, #gone + over - 1)) do
        gone[#gone + 1] = id
      end
    end
    if #gone > 0 then
      redis.call('HDEL', deliveries, unpack(gone))
      redis.call('ZREM', due, unpack(gone))
      redis.call('ZREM', failed, unpack(gone))
      redis.call('ZREM', log, unpack(gone))
    end
    -- An outbox nobody writes to any more goes with its last deliveries.
    for _, key in ipairs(outbox) do
      redis.call('PEXPIREAT', key, now + keep_ms)
    end
    return tail
  end
end
