-- bus_trim.lua: trim one bus stream below its slowest consumer group, then enforce a hard cap.
--
-- Safe trim: an entry may go once every group has read and acknowledged it, i.e. it is older
-- than every group's smallest pending id and than every group's last-delivered id. That trim
-- is approximate (XTRIM MINID ~, whole macro nodes) and only runs past `keep` entries; with no
-- group at all the stream keeps about `keep` recent entries (for `kcp bus tail`/XRANGE).
-- Hard cap: if more than `cap` entries remain (a dead or stuck subscriber), the oldest are
-- dropped exactly, and every group that had not read some of them gets the number it lost
-- added to field `gaps:{label}:{group}` of the stream's own counters (counted, never hidden;
-- the group's consumer marks what it has been told in `gaps:{label}:{group}:seen`). Both keys
-- share the stream's hash tag: one slot on a Redis Cluster (`get_stats()` sums the streams').
--
-- KEYS[1]  STREAM  the bus stream                           (kcp:bus:topic:{topic} | kcp:bus:inbox:{kernel})
-- KEYS[2]  HASH    the stream's cap counters                (<KEYS[1]>:gaps)
-- ARGV[1]  keep: entries below which no safe trim is done
-- ARGV[2]  cap: hard maximum length
-- ARGV[3]  label for the counters (topic name, or "inbox")
--
-- Returns {removed_safely, removed_by_cap}.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0}
end
local keep = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local label = ARGV[3]

local function parse_id(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end

local function older(a, b)
  local ams, aseq = parse_id(a)
  local bms, bseq = parse_id(b)
  return ams < bms or (ams == bms and aseq < bseq)
end

local groups = {}
for _, info in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local g = {}
  for i = 1, #info, 2 do
    g[info[i]] = info[i + 1]
  end
  groups[#groups + 1] = g
end

local removed_safe = 0
if redis.call('XLEN', KEYS[1]) > keep then
  if #groups == 0 then
    removed_safe = redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', keep)
  else
    local minid = nil
    for _, g in ipairs(groups) do
      local need = g['last-delivered-id']
      if tonumber(g['pending']) > 0 then
        local oldest = redis.call('XPENDING', KEYS[1], g['name'])[2]
        if older(oldest, need) then
          need = oldest
        end
      end
      if minid == nil or older(need, minid) then
        minid = need
      end
    end
    if minid ~= '0-0' then
      removed_safe = redis.call('XTRIM', KEYS[1], 'MINID', '~', minid)
    end
  end
end

local removed_cap = 0
local len = redis.call('XLEN', KEYS[1])
if len > cap then
  -- before trimming: the sequence number of each group's first unread entry
  local unread = {}
  for _, g in ipairs(groups) do
    local nxt = redis.call('XRANGE', KEYS[1], '(' .. g['last-delivered-id'], '+', 'COUNT', 1)[1]
    if nxt then
      for i = 1, #nxt[2], 2 do
        if nxt[2][i] == 'seq' then
          unread[g['name']] = tonumber(nxt[2][i + 1])
        end
      end
    end
  end
  removed_cap = redis.call('XTRIM', KEYS[1], 'MAXLEN', cap)
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
  local first_seq = nil
  for i = 1, #first[2], 2 do
    if first[2][i] == 'seq' then
      first_seq = tonumber(first[2][i + 1])
    end
  end
  if first_seq then
    for name, seq in pairs(unread) do
      if seq < first_seq then
        redis.call('HINCRBY', KEYS[2], 'gaps:' .. label .. ':' .. name, first_seq - seq)
      end
    end
  end
  redis.call('HINCRBY', KEYS[2], 'capped:' .. label, removed_cap)
end
return {removed_safe, removed_cap}
