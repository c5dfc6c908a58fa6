-- enqueue.lua: route one job to one kernel, in one round trip.
--
-- KEYS[1] kernel record  HASH  {prefix}kernel:{cluster}:{kernel}   (read: state, epoch)
-- KEYS[2] queue          ZSET  {prefix}kernel:{cluster}:{kernel}:queue     id -> enqueue ms
-- KEYS[3] inflight       ZSET  {prefix}kernel:{cluster}:{kernel}:inflight  id -> enqueue ms
-- KEYS[4] job            HASH  {prefix}job:{cluster}:{id}
-- ARGV[1] job id
-- ARGV[2] arq-serialized job (JSON)
-- ARGV[3] reply list key of the waiting client (stored, not touched here)
-- ARGV[4] now, unix ms
-- ARGV[5] deadline, unix ms (after it nobody waits for the result)
-- ARGV[6] job key TTL, ms (safety net: a job nobody finishes still expires)
-- ARGV[7] kernel name
-- Returns {1, inflight count} when queued; {0, state} when the kernel takes no work
-- (draining, stopped, pending, gone); {-1, 'duplicate'} when the job id exists.
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'running' then
    return {0, state or 'missing'}
end
if redis.call('EXISTS', KEYS[4]) == 1 then
    return {-1, 'duplicate'}
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
redis.call('HSET', KEYS[4],
    'job', ARGV[2], 'reply', ARGV[3], 'kernel', ARGV[7], 'epoch', epoch,
    'attempt', 0, 'enqueued_ms', ARGV[4], 'deadline_ms', ARGV[5], 'state', 'queued')
redis.call('PEXPIRE', KEYS[4], ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return {1, redis.call('ZCARD', KEYS[3])}
