-- Stores the egress policy an update applied on the node, and releases the update's lock,
-- only while the caller still holds that lock (so the stored policy is the one applied
-- last); never recreates a record whose retention ran out.
-- KEYS: session hash, the session's egress lock. ARGV: lock token, policy json.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return { 'lost' } end
redis.call('DEL', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 0 then return { 'missing' } end
redis.call('HSET', KEYS[1], 'egress', ARGV[2])
return reply('ok', KEYS[1])
