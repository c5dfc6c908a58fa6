-- leader.lua: take or renew the control-plane leader lease, and hand out its term.
--
-- KEYS[1] leader       STRING with TTL  {prefix}leader: the holder's token
-- KEYS[2] leader term  STRING counter   {prefix}leader:term:{{prefix}leader} (same slot)
-- ARGV[1] token of the caller
-- ARGV[2] lease TTL, ms; 0 releases the lease if the caller holds it
-- ARGV[3] the term the caller holds ('0' when it does not lead)
-- Returns the caller's term (> 0) when it leads: the held one when renewed, a new one (INCR)
-- when the lease is taken afresh, also by the same token after it lapsed, or after a term was
-- lost; 0 when another token holds the lease (or after a release).
local holder = redis.call('GET', KEYS[1])
if ARGV[2] == '0' then
    if holder == ARGV[1] then
        redis.call('DEL', KEYS[1])
    end
    return 0
end
if holder == ARGV[1] and ARGV[3] ~= '0' then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(ARGV[3])
end
if not holder or holder == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return redis.call('INCR', KEYS[2])
end
return 0
