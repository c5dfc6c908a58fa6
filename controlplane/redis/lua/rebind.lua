-- rebind.lua: hand jobs to a kernel incarnation (a restarted kernel takes back its own
-- in-flight jobs; the control plane moves a dead kernel's jobs to a live one).
--
-- KEYS[1] source set     ZSET  where the ids are now: the kernel's own inflight set, or
--                              {prefix}cluster:{cluster}:orphans
-- KEYS[2] target record  HASH  {prefix}kernel:{cluster}:{kernel}  (must be running or draining-with-self;
--                              read: state, epoch, max_deliveries)
-- KEYS[3] target queue   ZSET
-- KEYS[4] target inflight ZSET
-- KEYS[5] target wake    ZSET  (its token is set when a job is queued: see claim.lua)
-- KEYS[6..5+n] job hashes, one per id, in ARGV order (n = #ARGV - 1)
-- KEYS[6+n..] reply lists LIST {prefix}reply:{cluster}:{client}: the distinct `reply` fields of
--                              those jobs, as the caller read them (an error answer goes there)
-- ARGV[1] target kernel name
-- ARGV[2..] job ids
-- Returns {moved, reply list...}: the number of jobs queued on the target (-1 when the target
-- takes no work), then each reply list an error answer was pushed to (the caller rings their
-- clients' bells, {prefix}reply:{client}:bell, another slot).
-- Jobs whose key is gone are dropped from the source set.
--
-- Pinned jobs (strategy 'pinned': the request named its kernel) never move to another kernel,
-- nor to another incarnation of theirs: one whose kernel or epoch differs from the target's is
-- answered with a `KernelGone` error (the kernel died, or was restarted and its memory is gone)
-- and deleted, like an exhausted one.
--
-- Redelivery budget: a job already claimed `max_deliveries` times (field `attempt`; default 3)
-- whose kernel then lost it is not handed out again. It is answered with a
-- `RedeliveryExhausted` error and deleted, so a request that kills every kernel it touches
-- ends in a clear error instead of a crash loop. The error goes to the reply list named in the
-- job hash (the same list finish.lua pushes to), when the caller declared it: a job whose list
-- was not declared (its field changed after the caller read it) is answered by no push.
--
-- Fields read:    kernel(state, epoch, max_deliveries),
--                 job(attempt, reply, enqueued_ms, job, kernel, epoch, strategy)
-- Fields written: job(kernel, epoch, state)
local f = redis.call('HMGET', KEYS[2], 'state', 'epoch', 'max_deliveries')
if f[1] ~= 'running' and not (f[1] == 'draining' and KEYS[1] == KEYS[4]) then
    return {-1}
end
local budget = tonumber(f[3]) or 3
local declared = {}  -- reply list -> false (declared), true (pushed to)
for i = #ARGV + 5, #KEYS do
    declared[KEYS[i]] = false
end

-- answer job `id` with an error and drop it from every set (the reply list is read from data and
-- pushed to when declared)
local function answer(id, key, j, error_type, message)
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[3], id)
    redis.call('ZREM', KEYS[4], id)
    redis.call('DEL', key)
    if j[2] and declared[j[2]] ~= nil then
        local t = redis.call('TIME')
        local now = t[1] * 1000 + math.floor(t[2] / 1000)
        local body = cjson.encode({kernel = j[5] or '', epoch = tonumber(j[6]) or 0,
                                   error = message, error_type = error_type})
        local result = '{"t":' .. (tonumber(j[1]) or 0) .. ',"f":"?","a":[],"k":{},"et":'
            .. (tonumber(j[3]) or now) .. ',"s":false,"r":' .. body .. ',"st":' .. now .. ',"ft":' .. now
            .. ',"q":' .. cjson.encode(KEYS[1]) .. ',"id":' .. cjson.encode(id) .. '}'
        redis.call('RPUSH', j[2], result)
        redis.call('PEXPIRE', j[2], 60000)
        declared[j[2]] = true
    end
end

local moved = 0
for i = 2, #ARGV do
    local id = ARGV[i]
    local job = KEYS[i + 4]
    local score = redis.call('ZSCORE', KEYS[1], id)
    if score then
        local j = redis.call('HMGET', job, 'attempt', 'reply', 'enqueued_ms', 'job', 'kernel', 'epoch', 'strategy')
        if not j[4] then
            redis.call('ZREM', KEYS[1], id)
        elseif j[7] == 'pinned' and (j[5] ~= ARGV[1] or j[6] ~= f[2]) then
            local was = (j[5] or '?') .. '@' .. (j[6] or '?')
            local why = 'is gone'
            if j[5] == ARGV[1] then
                why = 'was replaced by ' .. ARGV[1] .. '@' .. f[2] .. ', which starts with empty memory'
            end
            answer(id, job, j, 'KernelGone', 'job ' .. id .. ' is pinned to kernel ' .. was .. ', which '
                .. why .. '; a pinned job does not run on another kernel or incarnation')
        elseif (tonumber(j[1]) or 0) >= budget then
            answer(id, job, j, 'RedeliveryExhausted',
                'job ' .. id .. ' was delivered ' .. j[1] .. ' times and its kernel died each time')
        else
            redis.call('HSET', job, 'kernel', ARGV[1], 'epoch', f[2], 'state', 'queued')
            if KEYS[1] ~= KEYS[4] then
                redis.call('ZREM', KEYS[1], id)
            end
            redis.call('ZADD', KEYS[4], score, id)
            redis.call('ZADD', KEYS[3], score, id)
            moved = moved + 1
        end
    end
end
if moved > 0 then
    redis.pcall('ZADD', KEYS[5], 0, 'w')  -- a wake key of another type: claim.lua replaces it
end
local out = {moved}
for i = #ARGV + 5, #KEYS do
    if declared[KEYS[i]] then
        out[#out + 1] = KEYS[i]
        declared[KEYS[i]] = false
    end
end
return out
