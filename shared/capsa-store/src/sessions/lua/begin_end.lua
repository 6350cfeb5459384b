-- Any state but TERMINATING/TERMINATED -> TERMINATING (a suspend or resume in flight then
-- finds it ended and undoes its own work). Exactly one caller wins; it then owns the teardown until
-- the claim deadline, after which the reaper may re-claim it.
-- KEYS: session hash, expiry zset, the tenant's active set. ARGV: id, reason, message,
-- claim ms, required status ('' = any not ended).
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return { 'missing' } end
if tenant_active_key(KEYS[1]) ~= KEYS[3] then return { 'stale' } end
if st == 'terminating' or st == 'terminated' or (ARGV[5] ~= '' and st ~= ARGV[5]) then
  return reply('conflict', KEYS[1])
end
local now = now_ms()
redis.call('HSET', KEYS[1], 'status', 'terminating', 'end_reason', ARGV[2],
  'end_message', ARGV[3], 'claim_ms', now + tonumber(ARGV[4]))
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
return reply('ok', KEYS[1])
