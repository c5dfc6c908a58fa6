-- finish.lua: a kernel delivers a result. Fenced: only the kernel incarnation the job is
-- assigned to may finish it, and only once (the job key is deleted here).
--
-- KEYS[1] job            HASH  {prefix}job:{cluster}:{id}
-- KEYS[2] inflight       ZSET  {prefix}kernel:{cluster}:{kernel}:inflight
-- KEYS[3] reply          LIST  {prefix}reply:{cluster}:{client} (the job's `reply` field, read by
--                              claim.lua: in the cluster's slot), where the reply stays until the
--                              client takes it (take_replies.lua): no reply is lost to a crash
-- KEYS[4] cluster stats  HASH  {prefix}cluster:{cluster}:stats (written only when KEYS[2] no longer
--                        holds the job: the kernel was removed, its hash folded into this one; a
--                        cluster's counters are this hash plus its kernels', controlplane/protocol/stats.py)
-- KEYS[5] kernel stats   HASH  {prefix}kernel:{cluster}:{kernel}:stats
-- KEYS[6] result         STRING {prefix}job:{cluster}:{id}:result (optional: arq jobs keep their
--                        result there for ARGV[8] ms, for `Job.result()` and `Job.status()`)
-- KEYS[7] bell           ZSET  {prefix}reply:{client}:bell (optional, on one Redis only: the
--                        client's slot): the reply itself is added to it, which wakes the client's
--                        listener with the reply in hand. On a Redis Cluster the bell is on another
--                        node: the caller adds the reply to it once this call returned 1.
-- ARGV[1] job id
-- ARGV[2] kernel name of the caller
-- ARGV[3] fencing epoch of the caller
-- ARGV[4] reply message (arq-serialized result, JSON)
-- ARGV[5] 1 when the syscall succeeded, 0 when it failed
-- ARGV[6] latency, ms: enqueue to finish (queue wait + execution)
-- ARGV[7] reply list TTL, ms (set when the push creates the list or finds 64 or more waiting)
-- ARGV[8] how long KEYS[6] keeps the result, ms (0 or KEYS[6] missing: not kept)
-- ARGV[9] queue wait, whole ms: enqueue to claim (optional; added to queue_ms_sum)
-- ARGV[10] 1: also SPUBLISH the reply on the shard channel named as KEYS[3] (in its slot: on a
--         Redis Cluster, a client subscribed there gets it at once, controlplane/redis/sharded.py)
-- ARGV[11..] histogram bucket fields to increment by 1, e.g. latency_le_0.005 queue_le_0.001
--         (optional; one non-cumulative bucket per histogram, see controlplane/stats.py)
-- The job is counted by the strategy that routed it (the job's `strategy` field, '|' replaced by
-- '_') together with its buckets, in one field 'dispatches:<strategy>|<ARGV[11]>|...', and when it
-- failed in errors:<strategy>; readers split the first into dispatches:<strategy> and the bucket
-- fields and sum those into dispatches and errors (controlplane/protocol/stats.py derive).
-- Returns 1 when delivered, 2 when delivered and published to a subscriber (ARGV[10]), 0 when
-- rejected (job gone or owned by someone else). A job that is
-- gone (cancelled or expired while it ran) leaves the caller's inflight set too: cancel.lua
-- cleaned the sets of the kernel the job was sent to, and a stolen job ran elsewhere.
--
-- Fields read:    job(kernel, epoch, strategy)
-- Fields written: stats(latency_ms_sum, queue_ms_sum; of the kernel's hash, the cluster's once the kernel
--                 is removed, and the per-strategy and bucket fields)
local f = redis.call('HMGET', KEYS[1], 'kernel', 'epoch', 'strategy')
if not f[1] then
    redis.call('ZREM', KEYS[2], ARGV[1])
    return 0
end
if f[1] ~= ARGV[2] or f[2] ~= ARGV[3] then
    return 0
end
redis.call('DEL', KEYS[1])
local owned = redis.call('ZREM', KEYS[2], ARGV[1])
-- the TTL is set when the push creates the list, and renewed while a backlog keeps it alive (the
-- listener takes up to 512 at a time, so a list it keeps up with is created anew at each take)
local waiting = redis.call('RPUSH', KEYS[3], ARGV[4])
if waiting == 1 or waiting >= 64 then
    redis.call('PEXPIRE', KEYS[3], ARGV[7])
end
if KEYS[7] then
    redis.call('ZADD', KEYS[7], 0, ARGV[4])
    redis.call('PEXPIRE', KEYS[7], ARGV[7])
end
local heard = 0
if ARGV[10] == '1' then
    -- pcall: a server without sharded pub/sub (Redis < 7) delivers through the bell instead
    heard = tonumber(redis.pcall('SPUBLISH', KEYS[3], ARGV[4])) or 0
end
local keep = tonumber(ARGV[8]) or 0
if KEYS[6] and keep > 0 then
    redis.call('SET', KEYS[6], ARGV[4], 'PX', math.floor(keep))
end
-- the kernel's stats only (a cluster's are its kernels' summed when read, protocol/stats.py),
-- unless its in-flight set no longer held the job: then the kernel was removed (its sets deleted,
-- its hash folded into the cluster's, which readers would no longer sum) and the cluster's
-- counts it. Increments of 0 are skipped (readers take a missing counter for 0).
local stats = KEYS[5]
if owned == 0 then
    stats = KEYS[4]
end
-- one counter for the job's strategy and its buckets together, 'dispatches:<strategy>|<bucket>|...'
-- (readers split it: protocol/stats.py derive), so a job costs one HINCRBY for all three
local strategy = string.gsub(f[3] or 'unknown', '|', '_')
local counter = {'dispatches:' .. strategy}
for j = 11, #ARGV do
    counter[#counter + 1] = ARGV[j]
end
redis.call('HINCRBY', stats, table.concat(counter, '|'), 1)
if ARGV[5] == '0' then
    redis.call('HINCRBY', stats, 'errors:' .. strategy, 1)
end
redis.call('HINCRBYFLOAT', stats, 'latency_ms_sum', ARGV[6])
local queue_ms = tonumber(ARGV[9]) or 0
if queue_ms ~= 0 then
    redis.call('HINCRBY', stats, 'queue_ms_sum', queue_ms)
end
if heard > 0 then
    return 2
end
return 1
