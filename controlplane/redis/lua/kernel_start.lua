-- kernel_start.lua: a kernel process comes up and takes a new fencing epoch.
--
-- KEYS[1] kernel record  HASH    {prefix}kernel:{cluster}:{kernel}
-- KEYS[2] epoch counter  STRING  {prefix}cluster:{cluster}:epoch (per cluster: one slot with the rest)
-- KEYS[3] version        STRING  {prefix}cluster:{cluster}:version (INCR: the kernel's epoch and
--                                state changed, so routing views and sibling lists are re-read)
-- ARGV[1] agent name the process runs under
-- ARGV[2] pid
-- ARGV[3] host
-- ARGV[4] now, unix seconds
-- ARGV[5] syscalls (space-separated)
-- ARGV[6] capabilities (space-separated)
-- Returns {epoch, state} or {0, reason} when the kernel is not (any more) assigned to this agent.
-- A record that already had a process (pid set) is restarted: its `restarts` counter grows by one
-- (a placement writes a fresh record without a pid, so a new placement counts from 0).
--
-- Fields read:    kernel(agent, state, pid)
-- Fields written: kernel(epoch, pid, host, started_at, syscalls, capabilities, state, restarts)
local f = redis.call('HMGET', KEYS[1], 'agent', 'state', 'pid')
if not f[1] then
    return {0, 'missing'}
end
if f[1] ~= ARGV[1] then
    return {0, 'assigned to ' .. f[1]}
end
if f[2] == 'stopped' then
    return {0, 'stopped'}
end
local epoch = redis.call('INCR', KEYS[2])
if f[3] and f[3] ~= '0' and f[3] ~= '' then
    redis.call('HINCRBY', KEYS[1], 'restarts', 1)
end
local state = f[2]
if state == 'pending' then
    state = 'running'
end
redis.call('HSET', KEYS[1], 'epoch', epoch, 'pid', ARGV[2], 'host', ARGV[3], 'started_at', ARGV[4],
    'syscalls', ARGV[5], 'capabilities', ARGV[6], 'state', state)
redis.call('INCR', KEYS[3])
return {epoch, state}
