-- kernel_stop.lua: a kernel drains. The first call marks it draining (enqueue.lua then
-- refuses new work); it is stopped once nothing is left in flight.
--
-- KEYS[1] kernel record  HASH  {prefix}kernel:{cluster}:{kernel}
-- KEYS[2] inflight       ZSET  {prefix}kernel:{cluster}:{kernel}:inflight
-- KEYS[3] version        STRING {prefix}cluster:{cluster}:version (INCR when the state changes)
-- ARGV[1] fencing epoch of the caller
-- Returns 1 when the kernel is now stopped, 0 while work remains,
--         -1 when another incarnation owns the record (or it is gone).
--
-- Fields read:    kernel(state, epoch)
-- Fields written: kernel(state)
local f = redis.call('HMGET', KEYS[1], 'state', 'epoch')
if not f[1] or f[2] ~= ARGV[1] then
    return -1
end
if f[1] == 'stopped' then
    return 1
end
local busy = redis.call('ZCARD', KEYS[2]) > 0
if f[1] ~= 'draining' or not busy then
    redis.call('HSET', KEYS[1], 'state', busy and 'draining' or 'stopped')
    redis.call('INCR', KEYS[3])
end
return busy and 0 or 1
