-- stats_read.lua: a cluster's stats hash and its kernels', read at one instant. A cluster's
-- dispatch counters are its kernels' summed plus those folded into its own hash when a kernel
-- was removed (fence.lua's HFOLD, in the script that removes the kernel): read apart, a fold
-- between the reads would count a kernel twice or not at all, and the totals would step back.
--
-- KEYS[1]  cluster stats  HASH  {prefix}cluster:{cluster}:stats
-- KEYS[2..] kernel stats  HASH  {prefix}kernel:{cluster}:{kernel}:stats (one per kernel; a
--                         missing one reads as empty)
-- ARGV     none
-- Returns one flat field/value list (HGETALL's reply) per key, in KEYS order.
--
-- Fields read:    none by name (every field of each hash)
-- Fields written: none
local out = {}
for i = 1, #KEYS do
    out[i] = redis.call('HGETALL', KEYS[i])
end
return out
