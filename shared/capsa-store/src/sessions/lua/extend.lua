-- Pushes an ACTIVE or SUSPENDED session's deadline out, keeping expire - create within the bound.
-- KEYS: session hash, expiry zset. ARGV: id, extend ms, max total ms.
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return { 'missing' } end
if st ~= 'active' and st ~= 'suspended' then return reply('conflict', KEYS[1]) end
local create = tonumber(redis.call('HGET', KEYS[1], 'create_ms'))
local expire = tonumber(redis.call('HGET', KEYS[1], 'expire_ms'))
local new = expire + tonumber(ARGV[2])
if new - create > tonumber(ARGV[3]) then
  return { 'too_long', tostring(math.max(0, create + tonumber(ARGV[3]) - expire)) }
end
redis.call('HSET', KEYS[1], 'expire_ms', new)
redis.call('ZADD', KEYS[2], new, ARGV[1])
return reply('ok', KEYS[1])
