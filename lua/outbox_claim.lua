-- outbox_claim: take one due delivery from a slot's outbox for one attempt. Until the
-- claim lapses no other process can claim it, so two never send the same attempt at
-- once; a claimer that dies leaves it to be claimed again when the claim lapses.
--
-- KEYS[1] outbox deliveries hash   KEYS[2] outbox due zset
-- ARGV[1] now (ms since epoch)     ARGV[2] delivery id ("<url> <webhook-id>")
-- ARGV[3] the claim lapses at (ms)
--
-- Reply: {status, 0, 0, id, delivery status, attempts, next_attempt_at, '', record, swept, 0, 0}
--   OK        claimed: attempts counts this attempt, next_attempt_at is when the claim
--             lapses, record is the delivery (JSON)
--   NOT_DUE   pending, but claimed elsewhere or not due before next_attempt_at
--   DONE      delivered or failed already (delivery status says which), or no longer
--             kept (delivery status '')
local deliveries, due = KEYS[1], KEYS[2]
local now, id, lapses = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])

local at = tonumber(redis.call('ZSCORE', due, id))
local rec = redis.call('HGET', deliveries, id)
if not at or not rec then
  if at then
    redis.call('ZREM', due, id)
  end
  local status = rec and cjson.decode(rec).status or ''
  return {'DONE', 0, 0, id, status, 0, 0, '', '', swept, 0, 0}
end
if at > now then
  return {'NOT_DUE', 0, 0, id, 'pending', 0, at, '', '', swept, 0, 0}
end
local d = cjson.decode(rec)
d.attempts = d.attempts + 1
d.next_attempt_at = lapses
rec = cjson.encode(d)
redis.call('HSET', deliveries, id, rec)
redis.call('ZADD', due, lapses, id)
return {'OK', 0, 0, id, 'pending', d.attempts, lapses, '', rec, swept, 0, 0}
