-- bus_publish.lua: append a batch of messages to one bus stream, numbering them with the
-- stream's own dense sequence (so a subscriber can tell a gap or a duplicate).
-- The batch is one JSON argument (cheap to send); the entries get flat fields. Both keys share
-- the stream's hash tag: one slot on a Redis Cluster.
--
-- KEYS[1]  STREAM  the topic stream or a kernel's inbox      (kcp:bus:topic:{topic} | kcp:bus:inbox:{kernel})
-- KEYS[2]  STRING  the stream's sequence counter             (<KEYS[1]>:seq)
-- ARGV[1]  target kernel that must be registered (direct messages), or "" (topics). A kernel is
--          registered while its inbox exists: `register()` creates it with its consumer group
--          (XGROUP CREATE ... MKSTREAM) and `unregister()` deletes it; nothing else creates it,
--          since this script refuses to append to an inbox that is not there.
-- ARGV[2]  topic (the `topic` field of every entry)
-- ARGV[3]  JSON array of messages, each an array of strings:
--          [from, ts, payload (JSON text), to ("" for none), field, value, ...]
--          (the trailing pairs: corr, reply_to, deadline, kind of requests and replies)
--
-- Each entry: seq, from, topic, ts, payload[, to][, extra fields].
-- Returns {first_seq, id_1, ..., id_n}: message i got sequence first_seq + i - 1;
-- {-1} (nothing written) if the target kernel is not registered.
if ARGV[1] ~= '' and redis.call('EXISTS', KEYS[1]) == 0 then
  return {-1}
end
local rows = cjson.decode(ARGV[3])
local n = #rows
local topic = ARGV[2]
local seq = redis.call('INCRBY', KEYS[2], n) - n
local out = {seq + 1}
for i = 1, n do
  local row = rows[i]
  seq = seq + 1
  if #row == 4 and row[4] == '' then
    out[i + 1] = redis.call('XADD', KEYS[1], '*', 'seq', seq, 'from', row[1], 'topic', topic,
      'ts', row[2], 'payload', row[3])
  else
    local args = {'XADD', KEYS[1], '*', 'seq', seq, 'from', row[1], 'topic', topic,
      'ts', row[2], 'payload', row[3]}
    if row[4] ~= '' then
      args[#args + 1] = 'to'
      args[#args + 1] = row[4]
    end
    for j = 5, #row do
      args[#args + 1] = row[j]
    end
    out[i + 1] = redis.call(unpack(args))
  end
end
return out
