-- Shared helpers, prepended to every operation script when it is loaded.
--
-- Key layout for one coach and one period (all in the slot of the hash tag {coach}):
--   account  HASH  used, held (credits), seq (last event number),
--                  r:<token> -> "<state>|<cost>|<expires_ms>|<feature>"
--                  state: h held, c committed, r refunded, e expired
--   holds    ZSET  "<token>:<cost>" scored by expires_ms, live holds only
--   events   LIST  "<seq>|<ms>|<kind>|<token>|<feature>|<cost>", newest first, bounded

local unpack = unpack or table.unpack

-- Credits this call returned from lapsed holds; every reply carries it last.
local swept = 0

local function num(v)
  return tonumber(v) or 0
end

local function parse_record(rec)
  local state, cost, expires, feature = string.match(rec, '^(%a)|(%d+)|(%d+)|(.*)$')
  return state, tonumber(cost), tonumber(expires), feature
end

local function record(state, cost, expires, feature)
  return state .. '|' .. cost .. '|' .. expires .. '|' .. feature
end

local function log_event(account, events, events_max, ms, kind, token, feature, cost)
  if events_max <= 0 then
    return
  end
  local seq = redis.call('HINCRBY', account, 'seq', 1)
  redis.call('LPUSH', events, seq .. '|' .. ms .. '|' .. kind .. '|' .. token .. '|' .. feature .. '|' .. cost)
  redis.call('LTRIM', events, 0, events_max - 1)
end

-- Turns one lapsed hold into an expired reservation and returns its credits.
local function expire_hold(account, holds, events, events_max, token, cost, expires, feature)
  redis.call('HSET', account, 'r:' .. token, record('e', cost, expires, feature))
  redis.call('HINCRBY', account, 'held', -cost)
  redis.call('ZREM', holds, token .. ':' .. cost)
  log_event(account, events, events_max, expires, 'expired', token, feature, cost)
  swept = swept + cost
end

-- Releases at most `limit` holds whose expiry is at or before `now`.
-- Returns how many it released, so a caller can tell whether more may remain.
local function release_lapsed(account, holds, events, events_max, now, limit)
  local lapsed = redis.call('ZRANGEBYSCORE', holds, '-inf', now, 'LIMIT', 0, limit)
  for _, member in ipairs(lapsed) do
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
  end
  return #lapsed
end

-- Held credits as of `now` without writing anything: lapsed holds no longer count.
local function effective_held(account, holds, now)
  local held = num(redis.call('HGET', account, 'held'))
  local lapsed = redis.call('ZRANGEBYSCORE', holds, '-inf', now)
  for _, member in ipairs(lapsed) do
    held = held - num(string.match(member, ':(%d+)$'))
  end
  return held
end

local function touch(expire_at, ...)
  for _, key in ipairs({...}) do
    redis.call('PEXPIREAT', key, expire_at)
  end
end

-- The prologue commit and refund share: the hold's state once this call has released
-- lapsed holds, its own included. Returns nil, writing nothing, for an unknown token.
local function settle_target(account, holds, events, events_max, now, token, batch)
  local rec = redis.call('HGET', account, 'r:' .. token)
  if not rec then
    return nil
  end
  local prior = parse_record(rec)
  release_lapsed(account, holds, events, events_max, now, batch)
  local state, cost, expires, feature = parse_record(redis.call('HGET', account, 'r:' .. token))
  if state == 'h' and expires <= now then
    expire_hold(account, holds, events, events_max, token, cost, expires, feature)
    state = 'e'
  end
  return prior, state, cost, expires, feature
end

-- A live hold leaves the holds, settled as `state` (c or r) and logged as `kind`.
local function settle_hold(account, holds, events, events_max, now, token, cost, expires, feature, state, kind)
  redis.call('HSET', account, 'r:' .. token, record(state, cost, expires, feature))
  redis.call('HINCRBY', account, 'held', -cost)
  redis.call('ZREM', holds, token .. ':' .. cost)
  log_event(account, events, events_max, now, kind, token, feature, cost)
end

local function settle_reply(account, outcome, token, state, cost, expires, feature, again)
  local used, held = unpack(redis.call('HMGET', account, 'used', 'held'))
  return {outcome, num(used), num(held), token, state, cost, expires, feature, again and 'again' or '', swept}
end
