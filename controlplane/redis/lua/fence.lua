-- fence.lua: the leader's writes to one cluster, refused when a newer leader took over.
--
-- KEYS[1]  cluster term  STRING  {prefix}cluster:{c}:term
-- KEYS[2..] the keys the writes name (all in the cluster's slot)
-- ARGV[1] the caller's leader term (> 0)
-- ARGV[2] guard: index into KEYS of a hash, 0 for none; ARGV[3] its field; ARGV[4] a
--         forbidden value: nothing is written when the field is absent or holds it
-- ARGV[5..] the writes, one after the other: command, n, then n (kind, value) pairs, kind
--         'k' for KEYS[value], 'a' for the literal value. Commands: HSET HDEL DEL SADD SREM
--         INCR ZREM ZUNIONSTORE RPUSH PEXPIRE, and HFOLD src dst: add every counter of hash
--         src to the same field of hash dst (HINCRBY, HINCRBYFLOAT for a fractional value)
--         and delete src (a removed kernel's stats go to its cluster's, protocol/stats.py)
-- Returns 'ok' (all written, the cluster's term now the caller's), 'fenced' (the stored term
-- is greater: a newer leader wrote here; nothing written) or 'guarded' (the guard refused;
-- nothing written).
--
-- Fields read:    none; the guard's hash and field are the caller's
-- Fields written: none; the writes are the caller's, built by FencedWrite
local ALLOWED = {HSET = 1, HDEL = 1, DEL = 1, SADD = 1, SREM = 1, INCR = 1, ZREM = 1,
                 ZUNIONSTORE = 1, RPUSH = 1, PEXPIRE = 1, HFOLD = 1}

-- a field that is no number, or whose sum would not be one Redis can store, is dropped
local function hfold(src, dst)
    local fields = redis.call('HGETALL', src)
    for j = 1, #fields, 2 do
        local value = fields[j + 1]
        if string.match(value, '^-?%d+$') then
            redis.pcall('HINCRBY', dst, fields[j], value)
        elseif tonumber(value) then
            redis.pcall('HINCRBYFLOAT', dst, fields[j], value)
        end
    end
    redis.call('DEL', src)
end
local term = tonumber(ARGV[1])
local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
if stored > term then
    return 'fenced'
end
local guard = tonumber(ARGV[2])
if guard > 0 then
    local value = redis.call('HGET', KEYS[guard], ARGV[3])
    if not value or value == ARGV[4] then
        return 'guarded'
    end
end
if stored < term then
    redis.call('SET', KEYS[1], ARGV[1])
end
local i = 5
while i <= #ARGV do
    local command, n = ARGV[i], tonumber(ARGV[i + 1])
    if not ALLOWED[command] then
        return redis.error_reply('fence.lua: command not allowed: ' .. tostring(command))
    end
    local args = {}
    for j = 1, n do
        local kind, value = ARGV[i + 2 * j], ARGV[i + 2 * j + 1]
        args[j] = kind == 'k' and KEYS[tonumber(value)] or value
    end
    if command == 'HFOLD' then
        hfold(args[1], args[2])
    else
        redis.call(command, unpack(args))
    end
    i = i + 2 + 2 * n
end
return 'ok'
