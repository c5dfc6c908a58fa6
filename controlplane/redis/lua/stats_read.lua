-- stats_read.lua: a cluster's stats hash, its kernel set and its kernels' stats hashes, read at
-- one instant. A cluster's dispatch counters are its kernels' summed plus those folded into its
-- own hash when a kernel was removed (fence.lua's HFOLD, in the script that also SREMs the
-- kernel): read apart, a fold between the reads would count a kernel twice or not at all, and
-- the totals would step back.
--
-- KEYS[1] cluster stats  HASH  {prefix}cluster:{cluster}:stats
-- KEYS[2] kernels        SET   {prefix}cluster:{cluster}:kernels
-- ARGV[1] the kernel key prefix, {prefix}kernel:{cluster}: (a kernel's stats hash is
--         ARGV[1] .. name .. ARGV[2], built here as enqueue.lua builds its candidates' keys)
-- ARGV[2] the stats suffix, ':stats'
-- Returns {cluster hash, kernel names, then each kernel's hash}, each hash as HGETALL's flat
-- field/value list (empty when missing), the names sorted.
--
-- Fields read:    none by name (every field of each hash)
-- Fields written: none
local names = redis.call('SMEMBERS', KEYS[2])
table.sort(names)
local out = {redis.call('HGETALL', KEYS[1]), names}
for i = 1, #names do
    out[i + 2] = redis.call('HGETALL', ARGV[1] .. names[i] .. ARGV[2])
end
return out
