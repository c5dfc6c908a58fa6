-- enqueue.lua: route one job to a kernel, in one round trip. With more than 5 KEYS the
-- script also *chooses* the kernel among candidates (docs/routing.md), so a routing
-- decision made on fresh in-flight counts costs no extra round trip.
--
-- KEYS[1] kernel record  HASH  {prefix}kernel:{cluster}:{kernel}   (read: state, epoch)
-- KEYS[2] queue          ZSET  {prefix}kernel:{cluster}:{kernel}:queue     id -> enqueue ms
-- KEYS[3] inflight       ZSET  {prefix}kernel:{cluster}:{kernel}:inflight  id -> enqueue ms
-- KEYS[4] job            HASH  {prefix}job:{cluster}:{id}
-- KEYS[5] wake           ZSET  {prefix}kernel:{cluster}:{kernel}:wake  (the token 'w' the
--                              kernel's idle workers block on; see claim.lua)
-- ARGV[1] job id
-- ARGV[2] arq-serialized job (JSON)
-- ARGV[3] reply list key of the waiting client (stored, not touched here)
-- ARGV[4] now, unix ms
-- ARGV[5] deadline, unix ms (after it nobody waits for the result)
-- ARGV[6] job key TTL, ms (safety net: a job nobody finishes still expires)
-- ARGV[7] the strategy that routed the job (counted by finish.lua), or 'pinned' when the request
--         names its kernel (then no sibling may steal it, claim.lua)
-- ARGV[8] kernel name
-- ARGV[9] (plain form, optional) the kernel incarnation (epoch) the request is pinned to
-- Returns {1, inflight count} when queued; {0, state} when the kernel takes no work
-- (draining, stopped, pending, gone); {0, 'epoch=<current epoch>'} when it is not (any more) the
-- incarnation of ARGV[9] ('epoch=' when the kernel is gone); {-1, 'duplicate'} when the job id
-- exists. Without ARGV[9] the job is bound to the incarnation running now (its epoch).
--
-- Routed form (more than 5 KEYS): the candidates' per-kernel keys are built here from ARGV[8]
-- (Keys.kernel(cluster, '') .. name, and that .. ':queue', ':inflight', ':wake', ':health', the
-- suffixes of protocol/keys.py), so a call costs a bounded number of commands whatever the
-- cluster's size: round robin reads the kernel at the shared position (and the next ones only
-- while they take no work), 'first' reads candidates in order until one runs, p2c reads each of
-- its (few) candidates' in-flight count and load record once, plus one ZMSCORE for all.
-- KEYS[1..5] are then unused placeholders (the first candidate's, for the plain form's layout).
-- KEYS[6]            round-robin counter  STRING {prefix}cluster:{cluster}:rr (mode rr; SET once queued)
-- KEYS[7]            ejected              ZSET   {prefix}cluster:{cluster}:ejected (p2c: ZMSCORE)
-- KEYS[7+i]          p2c: candidate i's load record HASH {prefix}agent:{a}:load:{c}:{k} (read)
-- ARGV[8]  the kernel key prefix, {prefix}kernel:{cluster}:
-- ARGV[9]  mode: 'first' (first running candidate), 'rr' (start at the shared counter),
--          'p2c' (lowest expected delay, see score() below)
-- ARGV[10] p2c: a uniform draw in [0, 1) that picks among near-tied candidates (the
--          caller draws it); rr: how far the candidate list is rotated from the cluster's canonical order
-- ARGV[11] load report expiry, ms (older reports are unknown, not idle)
-- ARGV[12] slow start after a kernel's start or readmission, ms
-- ARGV[13] round-robin counter TTL, ms
-- ARGV[14] 1: return the chosen kernel's consecutive failures (outlier detection on), 0: not read
-- ARGV[15+4(i-1)..+3] candidate i: kernel name, client's service-time estimate ms (0: none),
--          client's failure-rate estimate (-1: none), its start (the record's started_at, unix s,
--          as the caller's view has it: slow start only)
-- Returns {1, inflight count, chosen candidate (1-based), its consecutive failures (0 unless
--          ARGV[14] is 1), 'name=until_ms ...' of candidates seen ejected}; {0, 'name=state ...'}
--          when no candidate takes work; {-1, 'duplicate'}.
-- The chosen kernel's record is read (state, epoch) before the job is written: a candidate that
-- no longer runs is passed over, whatever the caller's view said.
--
-- Fields read:    kernel(state, epoch), load(latency_ms, error_rate, cpu, inflight, updated_at),
--                 health(consecutive)
-- Fields written: job(job, reply, kernel, epoch, attempt, enqueued_ms, deadline_ms, state, strategy)

local function write_job(kernel_key, queue_key, inflight_key, wake_key, name, epoch)
    redis.call('HSET', KEYS[4],
        'job', ARGV[2], 'reply', ARGV[3], 'kernel', name, 'epoch', epoch,
        'attempt', 0, 'enqueued_ms', ARGV[4], 'deadline_ms', ARGV[5], 'state', 'queued',
        'strategy', ARGV[7])
    redis.call('PEXPIRE', KEYS[4], ARGV[6])
    redis.call('ZADD', inflight_key, ARGV[4], ARGV[1])
    redis.call('ZADD', queue_key, ARGV[4], ARGV[1])
    redis.pcall('ZADD', wake_key, 0, 'w')  -- a wake key of another type: claim.lua replaces it
end

if #KEYS <= 5 then
    local k = redis.call('HMGET', KEYS[1], 'state', 'epoch')
    local state = k[1]
    if ARGV[9] and k[2] ~= ARGV[9] then
        return {0, 'epoch=' .. (k[2] or '')}
    end
    if state ~= 'running' then
        return {0, state or 'missing'}
    end
    if redis.call('EXISTS', KEYS[4]) == 1 then
        return {-1, 'duplicate'}
    end
    write_job(KEYS[1], KEYS[2], KEYS[3], KEYS[5], ARGV[8], k[2])
    return {1, redis.call('ZCARD', KEYS[3])}
end

if redis.call('EXISTS', KEYS[4]) == 1 then
    return {-1, 'duplicate'}
end

local STALL_FACTOR = 3
local TIE_MARGIN = 0.75     -- expected delays this many mean service times apart are a tie
local SLOW_START_MIN = 0.1  -- a warming kernel's ramp starts here (Envoy's min_weight_percent)
local now = tonumber(ARGV[4])
local mode = ARGV[9]
local n = (#ARGV - 14) / 4
local prefix = ARGV[8]
local refused = {}
local ejected = {}

local function name(i) return ARGV[15 + 4 * (i - 1)] end
local function kernel_key(i) return prefix .. name(i) end
local function sub_key(i, suffix) return prefix .. name(i) .. suffix end

-- the kernel's epoch when it takes work, else false (and it is counted as refused)
local function running(i)
    local k = redis.call('HMGET', kernel_key(i), 'state', 'epoch')
    if k[1] ~= 'running' then
        refused[#refused + 1] = name(i) .. '=' .. (k[1] or 'missing')
        return false
    end
    return k[2]
end

-- queue the job on candidate i (whose record said `epoch`); the reply
local function take(i, epoch, count)
    write_job(kernel_key(i), sub_key(i, ':queue'), sub_key(i, ':inflight'), sub_key(i, ':wake'), name(i), epoch)
    local consecutive = 0
    if ARGV[14] == '1' then
        consecutive = tonumber(redis.call('HGET', sub_key(i, ':health'), 'consecutive')) or 0
    end
    return {1, count or redis.call('ZCARD', sub_key(i, ':inflight')), i, consecutive, table.concat(ejected, ' ')}
end

if mode == 'rr' then
    local c = (tonumber(redis.call('GET', KEYS[6])) or 0) + 1  -- advanced only when a job is queued
    -- candidates come rotated by ARGV[10]; position c of the shared rotation is list index c - offset
    local offset = tonumber(ARGV[10]) or 0
    for j = 0, n - 1 do
        local i = ((c - 1 - offset + j) % n) + 1
        local epoch = running(i)
        if epoch then  -- the next job starts after the kernel that took this one
            redis.call('SET', KEYS[6], c + j, 'PX', ARGV[13])
            return take(i, epoch)
        end
    end
    return {0, table.concat(refused, ' ')}
end

if mode ~= 'p2c' then
    for i = 1, n do
        local epoch = running(i)
        if epoch then
            return take(i, epoch)
        end
    end
    return {0, table.concat(refused, ' ')}
end

-- p2c: expected delay of a new job on each candidate, in ms
local expiry, slow_start = tonumber(ARGV[11]), tonumber(ARGV[12])
local names = {}
for i = 1, n do names[i] = name(i) end
local until_all = redis.call('ZMSCORE', KEYS[7], unpack(names))
local est, info = {}, {}
local known_sum, known_n, known_min = 0, 0, nil
for i = 1, n do
    local inflight = redis.call('ZCARD', sub_key(i, ':inflight'))
    local age = 0
    if inflight > 0 then
        local oldest = redis.call('ZRANGE', sub_key(i, ':inflight'), 0, 0, 'WITHSCORES')
        if oldest[2] then age = math.max(now - tonumber(oldest[2]), 0) end
    end
    local until_ms = tonumber(until_all[i]) or 0
    local l = redis.call('HMGET', KEYS[7 + i], 'latency_ms', 'error_rate', 'cpu', 'inflight', 'updated_at')
    local fresh = l[5] and (now - tonumber(l[5]) * 1000) <= expiry
    local own = tonumber(ARGV[16 + 4 * (i - 1)]) or 0
    local s = own
    local busy = tonumber(l[4]) or 0
    if s <= 0 and fresh and busy > 0 and (tonumber(l[1]) or 0) > 0 then
        -- the reported latency includes waiting behind the jobs in flight at report time;
        -- a kernel idle at report time reports history (it may have been avoided since)
        s = tonumber(l[1]) / (1 + busy)
    end
    if s > 0 then
        known_sum, known_n = known_sum + s, known_n + 1
        if known_min == nil or s < known_min then known_min = s end
    end
    local err = math.max(tonumber(ARGV[17 + 4 * (i - 1)]) or -1, 0)
    local cpu = 0
    if fresh then
        err = math.max(err, tonumber(l[2]) or 0)
        cpu = tonumber(l[3]) or 0
    end
    -- slow start: since the kernel started (scale-up, restart) or was readmitted
    local started = tonumber(ARGV[18 + 4 * (i - 1)]) or 0
    local ramp = 1
    local since = math.max(started * 1000, until_ms)
    if slow_start > 0 and until_ms <= now and now - since < slow_start then
        ramp = math.max((now - since) / slow_start, SLOW_START_MIN)
    end
    if until_ms > now then
        ejected[#ejected + 1] = name(i) .. '=' .. string.format('%d', until_ms)
    end
    est[i] = s
    info[i] = {inflight, age, until_ms, err, cpu, ramp, own <= 0}
end
-- unknown: optimistic, the fastest known candidate's estimate (so it is explored)
local prior, mean = known_min or 1, 1
if known_n > 0 then mean = known_sum / known_n end
local scores = {}
for i = 1, n do
    local inflight, age, until_ms, err, cpu, ramp = unpack(info[i])
    local s = est[i]
    -- a warming kernel's jobs count 1/ramp times: idle, it competes like any idle
    -- kernel; busy, its queue may grow to only ramp times its peers'
    local queue = inflight / ramp
    local score
    if s <= 0 then
        score = (queue + 1) * prior
    else
        score = (queue + 1) * s
        -- a job in flight STALL_FACTOR times longer than the whole queue should take:
        -- stalled (less would flag healthy kernels that just drew a long job)
        if age > STALL_FACTOR * inflight * s then
            score = math.max(score, age + s)
        end
    end
    score = score / math.max(1 - err, 0.05) ^ 2
    if cpu > 0.9 then score = score * (1 + (cpu - 0.9) * 5) end
    if until_ms > now then
        score = score + 1e15
    end
    scores[i] = score
end
-- the best candidate that takes work; a candidate whose record says it does not is passed over
-- and the choice made again among the others (the caller's view of the states may be stale)
while true do
    local best, best_score = nil, nil
    for i = 1, n do
        if scores[i] and (best_score == nil or scores[i] < best_score) then best, best_score = i, scores[i] end
    end
    if best == nil then
        return {0, table.concat(refused, ' ')}
    end
    -- near-ties (within TIE_MARGIN mean service times of the best, with no more jobs in
    -- flight than it: estimates are noisy, queues are not) go to the caller's uniform
    -- draw, kernels it has not measured yet first
    local ties, unmeasured = {}, {}
    local best_queue = info[best][1]
    for i = 1, n do
        if scores[i] and scores[i] <= best_score + TIE_MARGIN * mean and info[i][1] <= best_queue then
            ties[#ties + 1] = i
            if info[i][7] then unmeasured[#unmeasured + 1] = i end
        end
    end
    if #unmeasured > 0 then ties = unmeasured end
    local u = tonumber(ARGV[10]) or 0
    local i = ties[math.max(math.min(math.floor(u * #ties), #ties - 1), 0) + 1]
    local epoch = running(i)
    if epoch then
        return take(i, epoch, info[i][1] + 1)
    end
    scores[i] = nil
end
