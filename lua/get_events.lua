-- get_events: one page of a coach's event log for one period, newest first. Writes
-- nothing, creates no key.
--
-- KEYS[1] account hash     KEYS[2] holds zset     KEYS[3] events list
-- KEYS[4] the coach's allowance override (absent unless the coach has its own)
-- ARGV[1] now (ms since epoch)
-- ARGV[2] before: only events with a smaller seq (0: start at the newest)
-- ARGV[3] limit: events per page
-- ARGV[4] configured monthly allowance
--
-- Reply: {status, used, held, token, state, cost, expires_ms, feature, extra, swept, base,
--         granted, event, event, ...}
--   swept: credits this call returned from lapsed holds (their expiry)
--   OK   used and held as of now (lapsed holds no longer count as held); extra = the
--        seq to pass as `before` for the next page, or '' on the last page; the monthly
--        allowance in force and the period's grants; then up to `limit` events (their
--        format is in the key layout above), newest first
local account, holds, events = KEYS[1], KEYS[2], KEYS[3]
local now, before, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
define_helpers()

local used, held, _, nxt, _, granted = counters(account)
local reply = {'OK', used, effective_held(holds, now, held, nxt), '', '', 0, 0, '', '', swept,
               base_allowance(KEYS[4], ARGV[4]), granted}

local head = redis.call('LINDEX', events, 0)
if not head then
  return reply
end
-- Every event takes the next seq in the same call that pushes it, so the list holds
-- consecutive seqs from the head down: the page start is an index, found in O(1)
-- instead of by walking the list.
local top = tonumber(string.match(head, '^(%d+)|'))
local start = 0
if before > 0 then
  if before <= 1 then
    return reply
  end
  start = math.max(0, top - before + 1)
end
local rows = redis.call('LRANGE', events, start, start + limit)
local count = 0
for _, row in ipairs(rows) do
  local seq = tonumber(string.match(row, '^(%d+)|'))
  if before <= 0 or seq < before then
    if count == limit then
      reply[9] = tostring(num(string.match(reply[#reply], '^(%d+)|')))
      break
    end
    reply[#reply + 1] = row
    count = count + 1
  end
end
return reply
