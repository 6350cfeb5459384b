-- KEYS: session hash, expiry zset, node sessions set, the nodes set.
-- ARGV: id, node id, vm id, max total ms, vcpus and memory_mib of the VM (the request's 0
-- for "template default" becomes what the node actually gave).
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return { 'missing' } end
if st ~= 'creating' then return reply('conflict', KEYS[1]) end
local now = now_ms()
local create = tonumber(redis.call('HGET', KEYS[1], 'create_ms'))
local lifetime = tonumber(redis.call('HGET', KEYS[1], 'lifetime_ms'))
-- The lifetime counts from activation, but never past the total bound from creation.
local expire = math.min(now + lifetime, create + tonumber(ARGV[4]))
redis.call('HSET', KEYS[1], 'status', 'active', 'node_id', ARGV[2], 'vm_id', ARGV[3],
  'expire_ms', expire, 'last_active_ms', now, 'vcpus', ARGV[5], 'memory_mib', ARGV[6])
redis.call('ZADD', KEYS[2], expire, ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
-- Keeps the node known even if its heartbeat lapsed since placement, so the reconciler
-- still finds this session if the node never comes back.
redis.call('SADD', KEYS[4], ARGV[2])
return reply('ok', KEYS[1])
