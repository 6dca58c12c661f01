-- get_grants: one coach's grants for one period, oldest first, with the period's
-- counters. Writes nothing, creates no key.
--
-- KEYS[1] account hash     KEYS[2] holds zset     KEYS[3] grants list
-- KEYS[4] the coach's allowance override (absent unless the coach has its own)
-- ARGV[1] now (ms since epoch)   ARGV[2] configured monthly allowance
--
-- Reply: {status, used, held, token, state, cost, expires_ms, feature, extra, swept,
--         monthly, granted, grant, grant, ...}
--   OK   used and held as of now (lapsed holds no longer count as held), the monthly
--        allowance in force and the period's grants; then every grants row, oldest first
local account, holds, grants = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
define_helpers()
local used, held, _, nxt, _, granted = counters(account)
local reply = {'OK', used, effective_held(account, holds, now, held, nxt), '', '', 0, 0, '', '', swept,
               monthly_allowance(KEYS[4], ARGV[2]), granted}
for _, row in ipairs(redis.call('LRANGE', grants, 0, -1)) do
  reply[#reply + 1] = row
end
return reply
