-- set_allowance: set or delete a coach's own monthly allowance, and log the change in
-- the current period's event log. A request that changes nothing writes nothing.
--
-- KEYS[1] account hash     KEYS[2] holds zset     KEYS[3] events list
-- KEYS[4] the coach's allowance override
-- ARGV[1] now (ms since epoch)
-- ARGV[2] the new monthly allowance (credits), or '' to delete the coach's own
-- ARGV[3] configured monthly allowance     ARGV[4] period keys expire at (ms)
-- ARGV[5] events kept per period
-- ARGV[6] now, in ms after the period starts, in hex
--
-- Reply: {status, used, held, token, state, cost, expires_ms, feature, extra, swept,
--         monthly, granted}
--   OK   the current period's counters after the change (lapsed holds no longer count as
--        held); extra = 'again' when nothing changed
local account, holds, events, override = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, value = tonumber(ARGV[1]), ARGV[2]
local events_max = tonumber(ARGV[5])
keys_expire_at = ARGV[4]
define_helpers()

local before = redis.call('GET', override)
local changed
if value == '' then
  changed = before ~= false
  if changed then
    redis.call('DEL', override)
  end
else
  changed = before ~= value
  if changed then
    -- No expiry: the coach's allowance holds every month until it is deleted.
    redis.call('SET', override, value)
  end
end

local used, held, seq, nxt, exists, granted = counters(account)
if changed then
  seq = seq + 1
  if exists then
    redis.call('HSET', account, 'seq', seq)
  else
    -- The account holds the event numbers: made here, it gets its expiry like any other.
    redis.call('HSET', account, 'seq', seq, 'held', 0)
    redis.call('PEXPIREAT', account, keys_expire_at)
  end
  push_events(account, events, events_max, {'a' .. value .. '|' .. ARGV[6]})
end
return {'OK', used, effective_held(account, holds, now, held, nxt), '', '', 0, 0, '', changed and '' or 'again',
        swept, tonumber(value) or tonumber(ARGV[3]), granted}
