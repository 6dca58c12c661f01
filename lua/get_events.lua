-- get_events: one page of a coach's event log for one period, newest first. Writes
-- nothing, creates no key.
--
-- KEYS[1] account hash     KEYS[2] holds zset     KEYS[3] events list
-- KEYS[4] the coach's allowance override (absent unless the coach has its own)
-- KEYS[5] grants list
-- ARGV[1] now (ms since epoch)
-- ARGV[2] before: only events with a smaller seq (0: start at the newest)
-- ARGV[3] limit: events per page
-- ARGV[4] configured monthly allowance
--
-- Reply: {status, used, held, token, state, cost, expires_ms, feature, extra, swept,
--         monthly, granted, baseline, seq, event, detail, seq, event, detail, ...}
--   swept: credits this call returned from lapsed holds (their expiry)
--   OK   used and held as of now (lapsed holds no longer count as held); extra = the
--        seq to pass as `before` for the next page, or '' on the last page; the monthly
--        allowance in force and the period's grants; baseline =
--        "<used>|<held>|<granted>" that the events trimmed off the log added up to; then
--        up to `limit` events, newest first, each as its number, its row and its
--        detail: the feature's name for a reservation's event, the grant's row for a
--        granted event, '' otherwise
local account, holds, events = KEYS[1], KEYS[2], KEYS[3]
local now, before, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
define_helpers()

local used, held, top, nxt, _, granted = counters(account)
local baseline = redis.call('HMGET', account, 'base_used', 'base_held', 'base_granted')
local reply = {'OK', used, effective_held(account, holds, now, held, nxt), '', '', 0, 0, '', '', swept,
               monthly_allowance(KEYS[4], ARGV[4]), granted,
               num(baseline[1]) .. '|' .. num(baseline[2]) .. '|' .. num(baseline[3])}
-- Every event takes the next seq in the same call that pushes it, so the list holds
-- consecutive seqs from `seq` at the head down: the page start is an index, found in
-- O(1) instead of by walking the list.
local start = 0
if before > 0 then
  if before <= 1 then
    return reply
  end
  start = math.max(0, top - before + 1)
end
local rows = redis.call('LRANGE', events, start, start + limit)
local names = {}
for i, row in ipairs(rows) do
  if i > limit then
    reply[9] = tostring(top - start - limit + 1)
    break
  end
  local detail = ''
  local code = string.match(row, '^%a%d+|%x+|([^|]*)|')
  if code then
    if not names[code] then
      names[code] = feature_name(account, code)
    end
    detail = names[code]
  else
    local place = string.match(row, '^g%-?%d+|%x+|(%d+)$')
    if place then
      detail = redis.call('LINDEX', KEYS[5], tonumber(place) - 1) or ''
    end
  end
  local n = #reply
  reply[n + 1], reply[n + 2], reply[n + 3] = top - start - i + 1, row, detail
end
return reply
