-- Claims every session whose expiry score has passed, up to a limit, and returns only the
-- ids this caller won with why: 'expired' (ACTIVE past its deadline), 'creating' (stuck in
-- CREATING past the creation bound) or 'reclaimed' (TERMINATING past its claim deadline:
-- the replica tearing it down died). Each moves (or stays) in TERMINATING with a fresh
-- claim deadline, so a concurrent caller sees a future score and skips it.
-- KEYS: expiry zset. ARGV: limit, claim ms.
local now = now_ms()
local claim = now + tonumber(ARGV[2])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
for _, id in ipairs(ids) do
  local key = '{capsa}:session:' .. id
  local st = redis.call('HGET', key, 'status')
  if not st or st == 'terminated' then
    redis.call('ZREM', KEYS[1], id)
  else
    local kind = 'reclaimed'
    if st == 'creating' then
      kind = 'creating'
      redis.call('HSET', key, 'status', 'terminating', 'end_reason', 'create_failed',
        'end_message', 'the session was still being created when its creation deadline passed')
      redis.call('SREM', tenant_active_key(key), id)
    elseif st == 'active' then
      kind = 'expired'
      redis.call('HSET', key, 'status', 'terminating', 'end_reason', 'expired',
        'end_message', 'the session lifetime ran out')
      redis.call('SREM', tenant_active_key(key), id)
    end
    redis.call('HSET', key, 'claim_ms', claim)
    redis.call('ZADD', KEYS[1], claim, id)
    out[#out + 1] = id
    out[#out + 1] = kind
  end
end
return out
