-- rebind.lua: hand jobs to a kernel incarnation (a restarted kernel takes back its own
-- in-flight jobs; the control plane moves a dead kernel's jobs to a live one).
--
-- KEYS[1] source set     ZSET  where the ids are now: the kernel's own inflight set, or
--                              {prefix}cluster:{cluster}:orphans
-- KEYS[2] target record  HASH  {prefix}kernel:{cluster}:{kernel}  (must be running or draining-with-self)
-- KEYS[3] target queue   ZSET
-- KEYS[4] target inflight ZSET
-- KEYS[5..] job hashes, one per id, in ARGV order
-- ARGV[1] target kernel name
-- ARGV[2..] job ids
-- Returns the number of jobs queued on the target; -1 when the target takes no work.
-- Jobs whose key is gone are dropped from the source set.
local f = redis.call('HMGET', KEYS[2], 'state', 'epoch')
if f[1] ~= 'running' and not (f[1] == 'draining' and KEYS[1] == KEYS[4]) then
    return -1
end
local moved = 0
for i = 2, #ARGV do
    local id = ARGV[i]
    local job = KEYS[i + 3]
    local score = redis.call('ZSCORE', KEYS[1], id)
    if score then
        if redis.call('EXISTS', job) == 1 then
            redis.call('HSET', job, 'kernel', ARGV[1], 'epoch', f[2], 'state', 'queued')
            if KEYS[1] ~= KEYS[4] then
                redis.call('ZREM', KEYS[1], id)
            end
            redis.call('ZADD', KEYS[4], score, id)
            redis.call('ZADD', KEYS[3], score, id)
            moved = moved + 1
        else
            redis.call('ZREM', KEYS[1], id)
        end
    end
end
return moved
