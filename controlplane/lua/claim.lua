-- claim.lua: a kernel takes a job it popped from its queue (BZPOPMIN) and starts it.
--
-- KEYS[1] job       HASH  {prefix}job:{cluster}:{id}
-- KEYS[2] inflight  ZSET  {prefix}kernel:{cluster}:{kernel}:inflight
-- KEYS[3] queue     ZSET  {prefix}kernel:{cluster}:{kernel}:queue
-- ARGV[1] job id
-- ARGV[2] kernel name of the caller
-- ARGV[3] fencing epoch of the caller
-- ARGV[4] now, unix ms
-- Returns {'ok', job, reply, attempt} to run it;
--         {'gone'} when the job no longer exists (cancelled, timed out, cluster destroyed);
--         {'fenced'} when the job now belongs to another kernel;
--         {'zombie'} when it belongs to a newer incarnation of the caller's own kernel name
--           (the caller is a stale process: the job goes back on the queue for the new one);
--         {'expired', reply} when its deadline passed (the caller gave up; dropped).
local f = redis.call('HMGET', KEYS[1], 'kernel', 'epoch', 'job', 'reply', 'deadline_ms')
if not f[1] then
    redis.call('ZREM', KEYS[2], ARGV[1])
    return {'gone'}
end
if f[1] ~= ARGV[2] then
    return {'fenced'}
end
if f[2] ~= ARGV[3] then
    local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
    if score then
        redis.call('ZADD', KEYS[3], score, ARGV[1])
    end
    return {'zombie'}
end
if tonumber(f[5]) < tonumber(ARGV[4]) then
    redis.call('DEL', KEYS[1])
    redis.call('ZREM', KEYS[2], ARGV[1])
    return {'expired', f[4]}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'started_ms', ARGV[4])
return {'ok', f[3], f[4], attempt}
