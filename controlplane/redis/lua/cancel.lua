-- cancel.lua: the waiting client gives up on a job (timeout); a late result is then rejected.
--
-- KEYS[1] job       HASH  {prefix}job:{cluster}:{id}
-- KEYS[2] queue     ZSET  {prefix}kernel:{cluster}:{kernel}:queue
-- KEYS[3] inflight  ZSET  {prefix}kernel:{cluster}:{kernel}:inflight
-- ARGV[1] job id
-- Returns 1 when the job was still pending (now cancelled), 0 when it had already finished.
--
-- Fields read:    none (the job hash is deleted)
-- Fields written: none
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return redis.call('DEL', KEYS[1])
