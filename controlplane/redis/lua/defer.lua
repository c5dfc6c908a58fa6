-- defer.lua: an arq job waits for its time in its cluster's deferred set: a new job enqueued
-- with `_defer_by` / `_defer_until` (the client), or a job whose function raised `Retry` (its
-- kernel, fenced as in finish.lua). A client moves it to a kernel when it is due (undefer.lua).
--
-- KEYS[1] deferred set   ZSET   {prefix}cluster:{cluster}:deferred  id -> due unix ms
-- KEYS[2] deferred job   HASH   {prefix}job:{cluster}:{id}:deferred
-- KEYS[3] job            HASH   {prefix}job:{cluster}:{id}
-- KEYS[4] result         STRING {prefix}job:{cluster}:{id}:result
-- KEYS[5] inflight       ZSET   {prefix}kernel:{cluster}:{kernel}:inflight (a retry: the caller's)
-- ARGV[1] job id
-- ARGV[2] arq-serialized job (JSON); a retry's carries the next try in `t`
-- ARGV[3] now, unix ms (a new job's enqueue time)
-- ARGV[4] due, unix ms
-- ARGV[5] key TTL beyond the deadline, ms
-- ARGV[6] a new job: the reply list key of the enqueuing client; a retry: '' (the job's own is kept)
-- ARGV[7] a new job: its deadline, unix ms (arq's `_expires`); a retry keeps the job's own
-- ARGV[8] a new job: the strategy that will route it; a retry keeps the job's own
-- ARGV[9] a retry: the kernel name of the caller ('' for a new job)
-- ARGV[10] a retry: the caller's fencing epoch
-- Returns 1 when deferred; -1 when a new job's id is in use (deferred, queued, running, or its
-- result kept: arq's duplicate); 0 when a retry's job is gone or not the caller's. Nothing is
-- written unless 1 is returned.
--
-- Fields read:    job(kernel, epoch, reply, enqueued_ms, deadline_ms, strategy)
-- Fields written: deferred(job, reply, enqueued_ms, due_ms, deadline_ms, strategy)
local now = tonumber(ARGV[3])
local reply, enqueued, deadline, strategy
if ARGV[9] == '' then
    if redis.call('EXISTS', KEYS[2], KEYS[3], KEYS[4]) > 0 then
        return -1
    end
    reply, enqueued, deadline, strategy = ARGV[6], ARGV[3], ARGV[7], ARGV[8]
else
    local f = redis.call('HMGET', KEYS[3], 'kernel', 'epoch', 'reply', 'enqueued_ms', 'deadline_ms', 'strategy')
    if f[1] ~= ARGV[9] or f[2] ~= ARGV[10] then
        return 0
    end
    reply, enqueued, deadline, strategy = f[3] or '', f[4] or ARGV[3], f[5] or ARGV[4], f[6] or ''
    redis.call('DEL', KEYS[3])
    redis.call('ZREM', KEYS[5], ARGV[1])
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'job', ARGV[2], 'reply', reply, 'enqueued_ms', enqueued,
    'due_ms', ARGV[4], 'deadline_ms', deadline, 'strategy', strategy)
redis.call('PEXPIRE', KEYS[2], math.max(math.floor((tonumber(deadline) or now) - now), 0) + tonumber(ARGV[5]))
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
return 1
