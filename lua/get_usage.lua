-- get_usage: one coach's counters for one period. Writes nothing, creates no key.
--
-- KEYS[1] account hash     KEYS[2] holds zset
-- KEYS[3] the coach's allowance override (absent unless the coach has its own)
-- ARGV[1] now (ms since epoch)   ARGV[2] configured monthly allowance
--
-- Reply: {status, used, held, token, state, cost, expires_ms, feature, extra, swept,
--         monthly, granted}
--   swept: credits this call returned from lapsed holds (their expiry)
--   OK   used and held credits; holds past their expiry no longer count as held; the
--        monthly allowance in force and the period's grants
local account, holds = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])
define_helpers()
local used, held, _, nxt, _, granted = counters(account)
return {'OK', used, effective_held(account, holds, now, held, nxt), '', '', 0, 0, '', '', swept,
        monthly_allowance(KEYS[3], ARGV[2]), granted}
