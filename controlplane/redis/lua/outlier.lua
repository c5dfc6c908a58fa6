-- outlier.lua: record what a client saw of one kernel; eject it when it is an outlier.
-- Every client of a cluster shares this state, so one kernel failing for everybody is
-- ejected once, for everybody (docs/routing.md, "Outlier ejection").
--
-- KEYS[1] health   HASH  {prefix}kernel:{cluster}:{kernel}:health
--                        consecutive, ejections, ejected_until (ms), last_ejected (ms)
-- KEYS[2] ejected  ZSET  {prefix}cluster:{cluster}:ejected   kernel -> ejected-until ms; an entry
--                        stays through its slow start after readmission (enqueue.lua reads it)
-- KEYS[3] version  STRING {prefix}cluster:{cluster}:version (INCR on an ejection: views re-read)
-- ARGV[1] now, unix ms
-- ARGV[2] event: 'ok' (a success: the failure streak ends), 'fail' (a failure or timeout),
--         'rate' (the caller found the kernel's failure rate well above its peers': eject)
-- ARGV[3] consecutive failures that eject
-- ARGV[4] first ejection, ms (doubled for each further one)
-- ARGV[5] longest ejection, ms
-- ARGV[6] most kernels of the cluster ejected at once (the caller computes it from the share)
-- ARGV[7] kernel name
-- ARGV[8] slow start after readmission, ms (how long the records must outlive an ejection)
-- Returns {ejected now or still (0/1), ejected-until ms or 0, consecutive failures}.
--
-- Fields read:    health(consecutive, ejections, ejected_until)
-- Fields written: health(consecutive, ejections, ejected_until, last_ejected)
local now = tonumber(ARGV[1])
local event = ARGV[2]
local f = redis.call('HMGET', KEYS[1], 'consecutive', 'ejections', 'ejected_until')
local consecutive = tonumber(f[1]) or 0
local ejections = tonumber(f[2]) or 0
local until_ms = tonumber(f[3]) or 0
local max_ms = tonumber(ARGV[5])
local keep_ms = 4 * max_ms + tonumber(ARGV[8])

if event == 'ok' then
    if consecutive > 0 then
        redis.call('HSET', KEYS[1], 'consecutive', 0)
    end
    return {0, 0, 0}
end
if until_ms > now then
    return {1, until_ms, consecutive}  -- already out: late failures of its old work don't count
end
if event == 'fail' then
    consecutive = redis.call('HINCRBY', KEYS[1], 'consecutive', 1)
    redis.call('PEXPIRE', KEYS[1], keep_ms)
    if consecutive < tonumber(ARGV[3]) then
        return {0, 0, consecutive}
    end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[8]))  -- past their slow start
if redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf') >= tonumber(ARGV[6]) then
    return {0, 0, consecutive}  -- panic threshold: enough kernels are out already
end
if until_ms > 0 and now - until_ms > max_ms then
    ejections = 0  -- healthy for a long while since the last ejection: start over
end
ejections = ejections + 1
local duration = math.floor(math.min(tonumber(ARGV[4]) * 2 ^ (ejections - 1), max_ms))
until_ms = now + duration
redis.call('HSET', KEYS[1], 'consecutive', 0, 'ejections', ejections,
    'ejected_until', string.format('%d', until_ms), 'last_ejected', ARGV[1])
redis.call('PEXPIRE', KEYS[1], keep_ms)
redis.call('ZADD', KEYS[2], string.format('%d', until_ms), ARGV[7])
redis.call('INCR', KEYS[3])
local keep_set = duration + tonumber(ARGV[8])
if redis.call('PTTL', KEYS[2]) < keep_set then
    redis.call('PEXPIRE', KEYS[2], keep_set)
end
return {1, until_ms, 0}
