-- leader.lua: take or renew the control-plane leader lease.
--
-- KEYS[1] leader  STRING with TTL  {prefix}leader
-- ARGV[1] token of the caller
-- ARGV[2] lease TTL, ms; 0 releases the lease if the caller holds it
-- Returns 1 when the caller leads (newly or renewed), 0 when another token holds the lease
-- (or after a release).
local holder = redis.call('GET', KEYS[1])
if ARGV[2] == '0' then
    if holder == ARGV[1] then
        redis.call('DEL', KEYS[1])
    end
    return 0
end
if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
if not holder then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
