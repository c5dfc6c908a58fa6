-- claim.lua: a kernel takes a job off its queue and starts it; in pop mode, when its own queue
-- is empty, it may take the oldest queued job of a sibling instead (work stealing).
--
-- KEYS[1] job       HASH  {prefix}job:{cluster}:{id}; in pop mode (ARGV[1] == '') a
--                         placeholder: the job key is then ARGV[5] .. the popped id
-- KEYS[2] inflight  ZSET  {prefix}kernel:{cluster}:{kernel}:inflight
-- KEYS[3] queue     ZSET  {prefix}kernel:{cluster}:{kernel}:queue
-- KEYS[4] kernel    HASH  {prefix}kernel:{cluster}:{kernel}  (read: state, epoch; optional)
-- KEYS[5] health    HASH  {prefix}kernel:{cluster}:{kernel}:health (read; with siblings only)
-- KEYS[6] stats     HASH  {prefix}cluster:{cluster}:stats (HINCRBY steals; with siblings only)
-- KEYS[7+3(i-1)..+2] sibling i: kernel record HASH (read: epoch), queue ZSET, inflight ZSET
--                    (counted in both modes; taken from in pop mode only)
-- ARGV[1] job id the caller popped (BZPOPMIN), or '' to pop the oldest queued job here
-- ARGV[2] kernel name of the caller
-- ARGV[3] fencing epoch of the caller
-- ARGV[4] now, unix ms
-- ARGV[5] job key prefix, {prefix}job:{cluster}: (pop mode only)
-- ARGV[6+2(i-1)..+1] sibling i: its name, and the epoch the caller last saw it with (the
--         caller checked then that it runs every syscall and capability of the sibling)
-- Pop mode lets a busy kernel deliver one result and take its next job in one round trip.
-- Returns {'ok', job, reply, attempt, id, queued} to run it (queued: jobs still waiting on the
--           caller's own queue and its siblings', so the caller knows whether to look for its
--           next job in pop mode or to block);
--         {'empty'} in pop mode when there is nothing to take;
--         {'gone', id} when the job no longer exists (cancelled, timed out, cluster destroyed);
--         {'fenced', id} when the job now belongs to another kernel;
--         {'zombie', id} when it belongs to a newer incarnation of the caller's own kernel name
--           (the caller is a stale process: the job goes back on the queue for the new one);
--         {'expired', id} when its deadline passed (the caller gave up; dropped).
-- A job hash without its payload or reply key, or whose epoch or attempt is not a number, is
-- corrupt: it is dropped ('gone'; 'expired' for a bad deadline), never run and never taken
-- as a sign that a newer incarnation exists.
--
-- Stealing: only a caller that is the current incarnation, running, not ejected and without a
-- failure streak steals, and only from a sibling still at the epoch the caller saw. It takes
-- the oldest queued job among the first STEAL_SCAN of each sibling's queue that is still
-- 'queued', owned by that sibling and not pinned (a request for one kernel by name), moves it
-- to its own inflight set and claims it as its own (kernel and epoch rewritten).
local STEAL_SCAN = 4

local function steal()
    local me = redis.call('HMGET', KEYS[4], 'state', 'epoch')
    if me[1] ~= 'running' or me[2] ~= ARGV[3] then
        return nil
    end
    local health = redis.call('HMGET', KEYS[5], 'ejected_until', 'consecutive')
    if (tonumber(health[1]) or 0) > tonumber(ARGV[4]) or (tonumber(health[2]) or 0) > 0 then
        return nil
    end
    local best, best_score, best_i
    for i = 1, (#KEYS - 6) / 3 do
        local base = 6 + 3 * (i - 1)
        local name = ARGV[6 + 2 * (i - 1)]
        if redis.call('HGET', KEYS[base + 1], 'epoch') == ARGV[7 + 2 * (i - 1)] then
            local head = redis.call('ZRANGE', KEYS[base + 2], 0, STEAL_SCAN - 1, 'WITHSCORES')
            for j = 1, #head, 2 do
                local score = tonumber(head[j + 1])
                if best_score and score >= best_score then
                    break
                end
                local f = redis.call('HMGET', ARGV[5] .. head[j], 'kernel', 'strategy', 'state')
                if f[1] == name and f[2] ~= 'pinned' and f[3] == 'queued' then
                    best, best_score, best_i = head[j], score, i
                    break
                end
            end
        end
    end
    if not best then
        return nil
    end
    local base = 6 + 3 * (best_i - 1)
    redis.call('ZREM', KEYS[base + 2], best)
    redis.call('ZREM', KEYS[base + 3], best)
    redis.call('ZADD', KEYS[2], best_score, best)
    redis.call('HSET', ARGV[5] .. best, 'kernel', ARGV[2], 'epoch', ARGV[3],
        'stolen_from', ARGV[6 + 2 * (best_i - 1)])
    redis.call('HINCRBY', KEYS[6], 'steals', 1)
    return best
end

local id, job = ARGV[1], KEYS[1]
if id == '' then
    local popped = redis.call('ZPOPMIN', KEYS[3])
    if #popped > 0 then
        id = popped[1]
    elseif #KEYS > 6 then
        id = steal()
    end
    if not id or id == '' then
        return {'empty'}
    end
    job = ARGV[5] .. id
end
local f = redis.call('HMGET', job, 'kernel', 'epoch', 'job', 'reply', 'deadline_ms', 'attempt')
if not (f[1] and f[3] and f[4] and tonumber(f[2])) or (f[6] and not tonumber(f[6])) then
    redis.call('DEL', job)
    redis.call('ZREM', KEYS[2], id)
    return {'gone', id}
end
if f[1] ~= ARGV[2] then
    return {'fenced', id}
end
if f[2] ~= ARGV[3] then
    if KEYS[4] and redis.call('HGET', KEYS[4], 'epoch') == ARGV[3] then
        -- the caller's record still names its epoch, so no newer incarnation exists: the job's
        -- epoch is stale or forged (anyone who may write jobs can), not a sign to exit; take it
        redis.call('HSET', job, 'epoch', ARGV[3])
    else
        local score = redis.call('ZSCORE', KEYS[2], id)
        if score then
            redis.call('ZADD', KEYS[3], score, id)
        end
        return {'zombie', id}
    end
end
local deadline = tonumber(f[5])
if not deadline or deadline < tonumber(ARGV[4]) then
    redis.call('DEL', job)
    redis.call('ZREM', KEYS[2], id)
    return {'expired', id}
end
local attempt = (tonumber(f[6]) or 0) + 1
redis.call('HSET', job, 'attempt', attempt, 'state', 'running', 'started_ms', ARGV[4])
local queued = redis.call('ZCARD', KEYS[3])
for i = 1, (#KEYS - 6) / 3 do
    queued = queued + redis.call('ZCARD', KEYS[6 + 3 * (i - 1) + 2])
end
return {'ok', f[3], f[4], attempt, id, queued}
