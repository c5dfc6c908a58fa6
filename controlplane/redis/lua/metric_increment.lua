-- metric_increment.lua: ClusterMetricsCollector.increment, atomic across processes.
-- Refuses (changing nothing) when the metric holds a non-numeric value.
--
-- KEYS[1] values   HASH  {prefix}metrics:{cluster}:values   "{kernel}/{metric}" -> JSON value
-- KEYS[2] kernels  ZSET  {prefix}metrics:{cluster}:kernels  kernel -> last update, unix s
-- KEYS[3] types    HASH  {prefix}metrics:{cluster}:types    metric -> counter | gauge
-- ARGV[1] field "{kernel}/{metric}"
-- ARGV[2] amount (a number; negative makes the metric a gauge)
-- ARGV[3] kernel name
-- ARGV[4] metric name
-- ARGV[5] now, unix seconds
-- Returns the new value (a string), or the error NOTNUM.
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and not tonumber(current) then
    return redis.error_reply('NOTNUM metric holds a non-numeric value')
end
local value = redis.call('HINCRBYFLOAT', KEYS[1], ARGV[1], ARGV[2])
if tonumber(ARGV[2]) < 0 then
    redis.call('HSET', KEYS[3], ARGV[4], 'gauge')
else
    redis.call('HSETNX', KEYS[3], ARGV[4], 'counter')
end
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[3])
return value
