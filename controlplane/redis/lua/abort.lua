-- abort.lua: arq's `Job.abort()` for a job that has not started: a deferred job, or one queued on
-- a kernel. Its result becomes a `JobAborted` failure, kept like any arq result. A job a kernel
-- has claimed runs to its end.
--
-- KEYS[1] deferred set   ZSET   {prefix}cluster:{cluster}:deferred
-- KEYS[2] deferred job   HASH   {prefix}job:{cluster}:{id}:deferred
-- KEYS[3] job            HASH   {prefix}job:{cluster}:{id}
-- KEYS[4] result         STRING {prefix}job:{cluster}:{id}:result
-- KEYS[5] queue          ZSET   {prefix}kernel:{cluster}:{kernel}:queue     (of ARGV[2])
-- KEYS[6] inflight       ZSET   {prefix}kernel:{cluster}:{kernel}:inflight  (of ARGV[2])
-- ARGV[1] job id
-- ARGV[2] the kernel the caller read from the job hash ('' when it had none)
-- ARGV[3] the result to keep: arq-serialized, JSON, a JobAborted failure
-- ARGV[4] how long to keep it, ms
-- ARGV[5] now, unix ms
-- Returns 'aborted' (nothing of the job is left but its result); 'running' (a kernel runs it);
-- 'moved' (it is on another kernel than ARGV[2], or a client is routing it now: read again);
-- 'done' (finished, or not known).
--
-- Fields read:    job(kernel, state), deferred(taken_until)
-- Fields written: none (the job's hashes are deleted)
local function aborted()
    redis.call('SET', KEYS[4], ARGV[3], 'PX', ARGV[4])
    return 'aborted'
end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    if (tonumber(redis.call('HGET', KEYS[2], 'taken_until')) or 0) > tonumber(ARGV[5]) then
        return 'moved'
    end
    redis.call('ZREM', KEYS[1], ARGV[1])
    redis.call('DEL', KEYS[2])
    return aborted()
end
local f = redis.call('HMGET', KEYS[3], 'kernel', 'state')
if not f[1] then
    return 'done'
end
if f[1] ~= ARGV[2] then
    return 'moved'
end
if f[2] ~= 'queued' then
    return 'running'
end
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('DEL', KEYS[3])
return aborted()
