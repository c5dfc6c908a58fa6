-- claim.lua: a kernel takes a job off its queue and starts it.
--
-- KEYS[1] job       HASH  {prefix}job:{cluster}:{id}; in pop mode (ARGV[1] == '') a
--                         placeholder: the job key is then ARGV[5] .. the popped id
-- KEYS[2] inflight  ZSET  {prefix}kernel:{cluster}:{kernel}:inflight
-- KEYS[3] queue     ZSET  {prefix}kernel:{cluster}:{kernel}:queue
-- KEYS[4] kernel    HASH  {prefix}kernel:{cluster}:{kernel}  (read: epoch; optional)
-- ARGV[1] job id the caller popped (BZPOPMIN), or '' to pop the oldest queued job here
-- ARGV[2] kernel name of the caller
-- ARGV[3] fencing epoch of the caller
-- ARGV[4] now, unix ms
-- ARGV[5] job key prefix, {prefix}job:{cluster}: (pop mode only)
-- Pop mode lets a busy kernel deliver one result and take its next job in one round trip.
-- Returns {'ok', job, reply, attempt, id, queued} to run it (queued: jobs still waiting, so
--           the caller knows whether to pop again or block);
--         {'empty'} in pop mode when the queue is empty;
--         {'gone', id} when the job no longer exists (cancelled, timed out, cluster destroyed);
--         {'fenced', id} when the job now belongs to another kernel;
--         {'zombie', id} when it belongs to a newer incarnation of the caller's own kernel name
--           (the caller is a stale process: the job goes back on the queue for the new one);
--         {'expired', id} when its deadline passed (the caller gave up; dropped).
-- A job hash without its payload or reply key, or whose epoch or attempt is not a number, is
-- corrupt: it is dropped ('gone'; 'expired' for a bad deadline), never run and never taken
-- as a sign that a newer incarnation exists.
local id, job = ARGV[1], KEYS[1]
if id == '' then
    local popped = redis.call('ZPOPMIN', KEYS[3])
    if #popped == 0 then
        return {'empty'}
    end
    id = popped[1]
    job = ARGV[5] .. id
end
local f = redis.call('HMGET', job, 'kernel', 'epoch', 'job', 'reply', 'deadline_ms', 'attempt')
if not (f[1] and f[3] and f[4] and tonumber(f[2])) or (f[6] and not tonumber(f[6])) then
    redis.call('DEL', job)
    redis.call('ZREM', KEYS[2], id)
    return {'gone', id}
end
if f[1] ~= ARGV[2] then
    return {'fenced', id}
end
if f[2] ~= ARGV[3] then
    if KEYS[4] and redis.call('HGET', KEYS[4], 'epoch') == ARGV[3] then
        -- the caller's record still names its epoch, so no newer incarnation exists: the job's
        -- epoch is stale or forged (anyone who may write jobs can), not a sign to exit; take it
        redis.call('HSET', job, 'epoch', ARGV[3])
    else
        local score = redis.call('ZSCORE', KEYS[2], id)
        if score then
            redis.call('ZADD', KEYS[3], score, id)
        end
        return {'zombie', id}
    end
end
local deadline = tonumber(f[5])
if not deadline or deadline < tonumber(ARGV[4]) then
    redis.call('DEL', job)
    redis.call('ZREM', KEYS[2], id)
    return {'expired', id}
end
local attempt = (tonumber(f[6]) or 0) + 1
redis.call('HSET', job, 'attempt', attempt, 'state', 'running', 'started_ms', ARGV[4])
return {'ok', f[3], f[4], attempt, id, redis.call('ZCARD', KEYS[3])}
