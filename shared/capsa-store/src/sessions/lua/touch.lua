-- Records activity on an ACTIVE session (never recreates an expired hash).
-- KEYS: session hash.
if redis.call('HGET', KEYS[1], 'status') == 'active' then
  redis.call('HSET', KEYS[1], 'last_active_ms', now_ms())
  return 1
end
return 0
