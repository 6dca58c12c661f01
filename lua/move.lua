-- move: once a reserve reported 'move', moves the period's settled records out of the
-- account into settled:0 (move_settled); does nothing when another call did it first.
--
-- KEYS[1] account hash   KEYS[2..4] settled:0..2 hashes   KEYS[5..7] idem:0..2 hashes
-- ARGV[1] period (YYYY-MM)   ARGV[2] period keys expire at (ms)
--
-- Reply: {status, used, held, token, state, cost, expires_ms, feature, extra, swept,
--         monthly, granted}
--   OK   moved, or nothing was due; only status is meaningful
local account = KEYS[1]
keys_expire_at = ARGV[2]
define_helpers()
local seq, moved_at = unpack(redis.call('HMGET', account, 'seq', 'moved_at'))
if num(seq) - num(moved_at) >= MOVE_EVERY then
  move_settled(account, {KEYS[2], KEYS[3], KEYS[4]}, {KEYS[5], KEYS[6], KEYS[7]}, ARGV[1], num(seq))
end
return {'OK', 0, 0, '', '', 0, 0, '', '', swept, 0, 0}
