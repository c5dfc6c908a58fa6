-- take_replies.lua: a client's reply listener acknowledges the replies it delivered and takes
-- the next ones, without losing any to a crash: a reply leaves the reply list only into the
-- `taken` list, and leaves that only here (or by the listener's DEL), after the listener
-- delivered it. After an outage the
-- listener first reads `taken` again (its last take may have been executed and logged, but its
-- answer lost with the connection). One call takes from one kcp cluster's lists (one slot);
-- idle, the listener blocks on its bell ({prefix}reply:{client}:bell, in the client's slot),
-- which names the clusters to take from.
--
-- KEYS[1] reply list  LIST  {prefix}reply:{cluster}:{client}
-- KEYS[2] taken list  LIST  {prefix}reply:{cluster}:{client}:taken
-- ARGV[1] how many replies to take at most
-- ARGV[2] TTL of the taken list, ms (a client that dies leaves nothing behind for long)
-- Returns the replies taken (oldest first), now in the taken list; an empty list when none wait.
--
-- Fields read:    none (lists of results)
-- Fields written: none
local count = tonumber(ARGV[1])
local batch = redis.call('LRANGE', KEYS[1], 0, count - 1)
if #batch == 0 then
    redis.call('DEL', KEYS[2])
elseif #batch < count then
    -- all of the list: it becomes the taken list, which drops the one taken last time (3 commands
    -- where DEL, LTRIM and RPUSH would be 4 and a copy)
    redis.call('RENAME', KEYS[1], KEYS[2])
    redis.call('PEXPIRE', KEYS[2], ARGV[2])
else
    redis.call('DEL', KEYS[2])
    redis.call('LTRIM', KEYS[1], #batch, -1)
    redis.call('RPUSH', KEYS[2], unpack(batch))
    redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return batch
