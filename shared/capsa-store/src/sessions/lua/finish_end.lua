-- TERMINATING -> TERMINATED; the record is kept for the retention period, then expires.
-- KEYS: session hash, expiry zset, its node's session set ('{capsa}:nodesessions:' if it
-- has no node), the tenant's snapshot meter (a suspended session's snapshot, deleted by
-- the teardown, leaves it). ARGV: id, retention ms, note appended to end_message.
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return { 'missing' } end
local node = redis.call('HGET', KEYS[1], 'node_id') or ''
if node_sessions_key(node) ~= KEYS[3] then return { 'stale' } end
if tenant_meter_key(KEYS[1]) ~= KEYS[4] then return { 'stale' } end
if st ~= 'terminating' then return reply('conflict', KEYS[1]) end
local now = now_ms()
local metered = tonumber(redis.call('HGET', KEYS[1], 'metered_bytes') or '0')
if metered > 0 then
  meter_add(KEYS[4], -metered, now)
  redis.call('HSET', KEYS[1], 'metered_bytes', '0')
end
redis.call('HSET', KEYS[1], 'status', 'terminated', 'end_ms', now)
if ARGV[3] ~= '' then
  local msg = redis.call('HGET', KEYS[1], 'end_message') or ''
  if msg ~= '' then msg = msg .. '; ' end
  redis.call('HSET', KEYS[1], 'end_message', msg .. ARGV[3])
end
redis.call('HDEL', KEYS[1], 'claim_ms')
redis.call('ZREM', KEYS[2], ARGV[1])
if node ~= '' then redis.call('SREM', KEYS[3], ARGV[1]) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return reply('ok', KEYS[1])
