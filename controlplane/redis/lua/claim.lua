-- claim.lua: a kernel takes the oldest job off its queue and starts it; when its own queue is
-- empty it may take the oldest queued job of a sibling instead (work stealing).
--
-- KEYS[1] inflight  ZSET  {prefix}kernel:{cluster}:{kernel}:inflight
-- KEYS[2] queue     ZSET  {prefix}kernel:{cluster}:{kernel}:queue
-- KEYS[3] wake      ZSET  {prefix}kernel:{cluster}:{kernel}:wake: one member, 'w', while jobs
--                         may be queued; idle workers block on it (BZPOPMIN). enqueue.lua and
--                         rebind.lua set it; here it is set again while jobs remain queued and
--                         deleted once none does. It only wakes: a job without a token waits
--                         for the worker's next claim (at most its blocking timeout), never lost.
-- KEYS[4] kernel    HASH  {prefix}kernel:{cluster}:{kernel}  (read: state, epoch)
-- KEYS[5] health    HASH  {prefix}kernel:{cluster}:{kernel}:health (read; with siblings only)
-- KEYS[6] stats     HASH  {prefix}cluster:{cluster}:stats (HINCRBY steals; with siblings only)
-- KEYS[7] version   STRING {prefix}cluster:{cluster}:version (read when ARGV[5] is 1; with siblings only)
-- KEYS[8+3(i-1)..+2] sibling i: kernel record HASH (read: epoch), queue ZSET, inflight ZSET
-- ARGV[1] kernel name of the caller
-- ARGV[2] fencing epoch of the caller
-- ARGV[3] now, unix ms; '' for the Redis server's clock (what kernels send: their claim is
--         written behind a blocking pop of the wake token and runs when that returns)
-- ARGV[4] job key prefix, {prefix}job:{cluster}: (the job key is this .. the popped id)
-- ARGV[5] 1: also return the cluster's version (the caller's sibling list is due a check); else 0
-- ARGV[6] 1: the claim runs behind a blocking pop of the wake token, which has taken the token
--         (or found none), so there is none to delete when nothing is left queued; else 0
-- ARGV[7+2(i-1)..+1] sibling i: its name, and the epoch the caller last saw it with (the
--         caller checked then that it runs every syscall and capability of the sibling)
-- Returns {'ok', job, reply, attempt, id, queued[, version]} to run it (queued: jobs still
--           waiting on the caller's own queue, or when none is, on its siblings' (then one
--           EXISTS for all of them, and one ZCARD each only when it finds any), so the caller
--           knows whether to claim its next job at once or to block on its wake token first;
--           version: with ARGV[5] = 1, the cluster's version, '' when it has none);
--         {'empty'[, version]} when there is nothing to take;
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
--
-- Fields read:    kernel(state, epoch), health(ejected_until, consecutive),
--                 job(kernel, epoch, job, reply, deadline_ms, attempt, strategy, state)
-- Fields written: job(kernel, epoch, stolen_from, attempt, state, started_ms), stats(steals)
local STEAL_SCAN = 4

-- set the wake token; a wake key of another type (nothing of ours writes one) is replaced
local function wake()
    local set = redis.pcall('ZADD', KEYS[3], 0, 'w')
    if type(set) == 'table' and set.err then
        redis.call('DEL', KEYS[3])
        redis.call('ZADD', KEYS[3], 0, 'w')
    end
end

local now = tonumber(ARGV[3])
if not now then
    local t = redis.call('TIME')
    now = t[1] * 1000 + math.floor(t[2] / 1000)
end

local function version(reply)
    if ARGV[5] == '1' and KEYS[7] then
        reply[#reply + 1] = redis.call('GET', KEYS[7]) or ''
    end
    return reply
end

local function steal()
    local me = redis.call('HMGET', KEYS[4], 'state', 'epoch')
    if me[1] ~= 'running' or me[2] ~= ARGV[2] then
        return nil
    end
    local health = redis.call('HMGET', KEYS[5], 'ejected_until', 'consecutive')
    if (tonumber(health[1]) or 0) > now or (tonumber(health[2]) or 0) > 0 then
        return nil
    end
    local best, best_score, best_i
    for i = 1, (#KEYS - 7) / 3 do
        local base = 7 + 3 * (i - 1)
        local name = ARGV[7 + 2 * (i - 1)]
        if redis.call('HGET', KEYS[base + 1], 'epoch') == ARGV[8 + 2 * (i - 1)] then
            local head = redis.call('ZRANGE', KEYS[base + 2], 0, STEAL_SCAN - 1, 'WITHSCORES')
            for j = 1, #head, 2 do
                local score = tonumber(head[j + 1])
                if best_score and score >= best_score then
                    break
                end
                local f = redis.call('HMGET', ARGV[4] .. head[j], 'kernel', 'strategy', 'state')
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
    local base = 7 + 3 * (best_i - 1)
    redis.call('ZREM', KEYS[base + 2], best)
    redis.call('ZREM', KEYS[base + 3], best)
    redis.call('ZADD', KEYS[1], best_score, best)
    redis.call('HSET', ARGV[4] .. best, 'kernel', ARGV[1], 'epoch', ARGV[2],
        'stolen_from', ARGV[7 + 2 * (best_i - 1)])
    redis.call('HINCRBY', KEYS[6], 'steals', 1)
    return best
end

local id
local popped = redis.call('ZPOPMIN', KEYS[2])
if #popped > 0 then
    id = popped[1]
else
    if #KEYS > 7 then
        id = steal()
    end
    if not id then
        if ARGV[6] ~= '1' then
            redis.call('DEL', KEYS[3])  -- nothing queued: the next enqueue sets the token again
        end
        return version({'empty'})
    end
end
local job = ARGV[4] .. id
local f = redis.call('HMGET', job, 'kernel', 'epoch', 'job', 'reply', 'deadline_ms', 'attempt')
if not (f[1] and f[3] and f[4] and tonumber(f[2])) or (f[6] and not tonumber(f[6])) then
    redis.call('DEL', job)
    redis.call('ZREM', KEYS[1], id)
    return {'gone', id}
end
if f[1] ~= ARGV[1] then
    return {'fenced', id}
end
if f[2] ~= ARGV[2] then
    if redis.call('HGET', KEYS[4], 'epoch') == ARGV[2] then
        -- the caller's record still names its epoch, so no newer incarnation exists: the job's
        -- epoch is stale or forged (anyone who may write jobs can), not a sign to exit; take it
        redis.call('HSET', job, 'epoch', ARGV[2])
    else
        local score = redis.call('ZSCORE', KEYS[1], id)
        if score then
            redis.call('ZADD', KEYS[2], score, id)
            wake()  -- for the incarnation the job is for
        end
        return {'zombie', id}
    end
end
local deadline = tonumber(f[5])
if not deadline or deadline < now then
    redis.call('DEL', job)
    redis.call('ZREM', KEYS[1], id)
    return {'expired', id}
end
local attempt = (tonumber(f[6]) or 0) + 1
redis.call('HSET', job, 'attempt', attempt, 'state', 'running', 'started_ms', now)
local queued = redis.call('ZCARD', KEYS[2])
if queued > 0 then
    wake()  -- more to do here: another worker blocked on it wakes too
elseif ARGV[6] ~= '1' then
    redis.call('DEL', KEYS[3])
end
if queued == 0 and #KEYS > 7 then  -- its siblings' queues only matter to a caller with none of its own
    -- one EXISTS tells whether any of them holds a job (an empty queue has no key); they are
    -- counted one by one only then
    local queues = {}
    for i = 1, (#KEYS - 7) / 3 do
        queues[i] = KEYS[7 + 3 * (i - 1) + 2]
    end
    if redis.call('EXISTS', unpack(queues)) > 0 then
        for i = 1, #queues do
            queued = queued + redis.call('ZCARD', queues[i])
        end
    end
end
return version({'ok', f[3], f[4], attempt, id, queued})
