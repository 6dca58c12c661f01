-- outbox_finish: record how one attempt at a delivery ended.
--
-- KEYS[1] outbox deliveries hash   KEYS[2] outbox due zset   KEYS[3] outbox failed zset
-- ARGV[1] now (ms since epoch)     ARGV[2] delivery id ("<url> <webhook-id>")
-- ARGV[3] the attempt (its number, as the claim counted it)
-- ARGV[4] outcome: 'delivered', 'retry' or 'failed' (given up)
-- ARGV[5] next attempt at (ms; retry only)   ARGV[6] the attempt's error ('' if none)
--
-- Reply: {status, 0, 0, id, delivery status, attempts, next_attempt_at, '', '', swept, 0, 0}
--   OK      recorded
--   STALE   a retry or give-up whose claim had lapsed and was taken over by a later
--           attempt: nothing written (a delivery is recorded whichever attempt made it)
--   DONE    delivered or failed already, or no longer kept (delivery status '')
local deliveries, due, failed = KEYS[1], KEYS[2], KEYS[3]
local now, id, attempt, outcome = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4]

local rec = redis.call('HGET', deliveries, id)
if not rec then
  return {'DONE', 0, 0, id, '', 0, 0, '', '', swept, 0, 0}
end
local d = cjson.decode(rec)
if d.status ~= 'pending' then
  return {'DONE', 0, 0, id, d.status, d.attempts, 0, '', '', swept, 0, 0}
end
if outcome ~= 'delivered' and d.attempts ~= attempt then
  return {'STALE', 0, 0, id, d.status, d.attempts, d.next_attempt_at, '', '', swept, 0, 0}
end
if ARGV[6] ~= '' then
  d.last_error = ARGV[6]
end
local next_at = 0
if outcome == 'delivered' then
  d.status, d.next_attempt_at, d.delivered_at = 'delivered', cjson.null, now
  redis.call('ZREM', due, id)
elseif outcome == 'retry' then
  next_at = tonumber(ARGV[5])
  d.next_attempt_at = next_at
  redis.call('ZADD', due, next_at, id)
else
  d.status, d.next_attempt_at = 'failed', cjson.null
  redis.call('ZREM', due, id)
  redis.call('ZADD', failed, d.recorded_at, id)
  -- The failed zset may be new: it goes with the outbox it indexes.
  local ttl = redis.call('PTTL', deliveries)
  if ttl > 0 then
    redis.call('PEXPIRE', failed, ttl)
  end
end
redis.call('HSET', deliveries, id, cjson.encode(d))
return {'OK', 0, 0, id, d.status, d.attempts, next_at, '', '', swept, 0, 0}
