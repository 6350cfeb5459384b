-- KEYS: session hash, expiry zset, tenant index zset, tenant active set, tenant total
-- counter, tenant limits hash.
-- ARGV: id, tenant, default max sessions, creating bound ms, template, vcpus, memory_mib,
-- env names json (never values), metadata json, lifetime ms, index horizon ms, egress
-- policy json, auto_suspend ('1'/'0'), auto_resume ('1'/'0'), source snapshot id, parent
-- session id.
local max = tonumber(redis.call('HGET', KEYS[6], 'max_sessions') or ARGV[3])
if redis.call('SCARD', KEYS[4]) >= max then
  return { 'quota', tostring(max) }
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return { 'exists' }
end
local now = now_ms()
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'tenant', ARGV[2], 'status', 'creating',
  'template', ARGV[5], 'vcpus', ARGV[6], 'memory_mib', ARGV[7], 'env_names', ARGV[8],
  'metadata', ARGV[9], 'lifetime_ms', ARGV[10], 'create_ms', now, 'last_active_ms', now,
  'egress', ARGV[12], 'auto_suspend', ARGV[13], 'auto_resume', ARGV[14],
  'source_snapshot_id', ARGV[15], 'parent_session_id', ARGV[16])
-- While creating, the expiry score is the creation deadline: a replica that dies
-- mid-create leaves a session the reaper ends.
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
-- The tenant index forgets sessions whose records have surely expired, so a tenant that
-- never lists does not grow it without bound.
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. (now - tonumber(ARGV[11])))
redis.call('ZADD', KEYS[3], now, ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('INCR', KEYS[5])
return reply('ok', KEYS[1])
