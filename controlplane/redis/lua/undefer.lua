-- undefer.lua: a client takes a due arq job out of its cluster's deferred set to route it (with
-- enqueue.lua, by the job's strategy, to a kernel chosen now), then marks it moved. Between the
-- two the job's score is pushed on by a lease, so a client that dies mid-move leaves it to the
-- next one; a job that already reached a kernel is not moved twice.
--
-- KEYS[1] deferred set   ZSET   {prefix}cluster:{cluster}:deferred  id -> due unix ms
-- KEYS[2] deferred job   HASH   {prefix}job:{cluster}:{id}:deferred
-- KEYS[3] job            HASH   {prefix}job:{cluster}:{id}
-- KEYS[4] result         STRING {prefix}job:{cluster}:{id}:result
-- ARGV[1] job id
-- ARGV[2] now, unix ms
-- ARGV[3] 'take': lease length, ms;  'done': the lease score 'take' returned
-- ARGV[4] 'take' | 'done'
-- Returns, for 'take':
--   {'due', job, reply, enqueued_ms, deadline_ms, strategy, lease score}: route it now;
--   {'later', due ms}: not due yet (or another client holds its lease);
--   {'moved'}: it is queued, running or finished already (a mover died after routing it);
--              the deferred entry is cleaned up;
--   {'expired'}: its deadline passed (arq drops such a job): deleted;
--   {'gone'}: not deferred (aborted, or moved by another client).
-- For 'done': 1 when the entry still held our lease and was deleted, 0 when it changed since
-- (the job raised Retry and is deferred again: left alone).
--
-- Fields read:    deferred(job, reply, enqueued_ms, deadline_ms, strategy)
-- Fields written: deferred(taken_until)
local now = tonumber(ARGV[2])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if ARGV[4] == 'done' then
    if score and tonumber(score) == tonumber(ARGV[3]) then
        redis.call('ZREM', KEYS[1], ARGV[1])
        redis.call('DEL', KEYS[2])
        return 1
    end
    return 0
end
if not score then
    return {'gone'}
end
if tonumber(score) > now then
    return {'later', score}
end
if redis.call('EXISTS', KEYS[3], KEYS[4]) > 0 then
    redis.call('ZREM', KEYS[1], ARGV[1])
    redis.call('DEL', KEYS[2])
    return {'moved'}
end
local f = redis.call('HMGET', KEYS[2], 'job', 'reply', 'enqueued_ms', 'deadline_ms', 'strategy')
if not f[1] then
    redis.call('ZREM', KEYS[1], ARGV[1])
    return {'gone'}
end
if (tonumber(f[4]) or 0) < now then
    redis.call('ZREM', KEYS[1], ARGV[1])
    redis.call('DEL', KEYS[2])
    return {'expired'}
end
local lease = now + tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], lease, ARGV[1])
redis.call('HSET', KEYS[2], 'taken_until', lease)
return {'due', f[1], f[2] or '', f[3] or '0', f[4], f[5] or '', lease}
