-- Tenant snapshots (mod.rs has the layout). One script, one op per call, so each step is
-- atomic. KEYS: snapshot hash, the tenant's snapshot zset, the tenant's snapshot meter, the
-- tenant's limits hash, the pending zset. ARGV: op, id, then per op:
--   begin: tenant, kind ('named'/'fork'), name, session id, node id, template, vcpus,
--     memory_mib, metadata json, estimate bytes, default max count, default max bytes,
--     claim ms, env names json
--   finish: size bytes, claim ms (a fork's snapshot stays pending until removed)
--   abort, remove: nothing
--   begin_delete: tenant, claim ms
--   reclaim: claim ms (a pending snapshot this caller now settles)
local op, id = ARGV[1], ARGV[2]
local now = now_ms()
local function field(name) return redis.call('HGET', KEYS[1], name) end
local function tenant_keys_ok()
  local t = field('tenant')
  return KEYS[2] == '{capsa}:tenant:' .. t .. ':snapshots'
    and KEYS[3] == '{capsa}:tenant:' .. t .. ':snapshot_meter'
end
if op == 'begin' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return { 'exists' } end
  local kind, estimate = ARGV[4], tonumber(ARGV[12])
  if kind == 'named' then
    local max = tonumber(redis.call('HGET', KEYS[4], 'max_snapshots') or ARGV[13])
    if redis.call('ZCARD', KEYS[2]) >= max then return { 'quota_count', tostring(max) } end
    local max_bytes = tonumber(redis.call('HGET', KEYS[4], 'max_snapshot_bytes') or ARGV[14])
    local used = tonumber(redis.call('HGET', KEYS[3], 'named_bytes') or '0')
      + tonumber(redis.call('HGET', KEYS[3], 'reserved') or '0')
    if used + estimate > max_bytes then
      return { 'quota_bytes', string.format('%.0f', max_bytes), string.format('%.0f', used) }
    end
    meter_field_add(KEYS[3], 'reserved', estimate)
    redis.call('ZADD', KEYS[2], now, id)
  end
  redis.call('HSET', KEYS[1], 'id', id, 'tenant', ARGV[3], 'kind', kind, 'name', ARGV[5],
    'session_id', ARGV[6], 'node_id', ARGV[7], 'template', ARGV[8], 'vcpus', ARGV[9],
    'memory_mib', ARGV[10], 'metadata', ARGV[11], 'estimate', ARGV[12], 'status', 'creating',
    'size_bytes', '0', 'create_ms', now, 'env_names', ARGV[16])
  redis.call('ZADD', KEYS[5], now + tonumber(ARGV[15]), id)
  return reply('ok', KEYS[1])
end
local st = field('status')
if not st then
  redis.call('ZREM', KEYS[5], id)
  return { 'missing' }
end
if not tenant_keys_ok() then return { 'stale' } end
local named = field('kind') == 'named'
if op == 'finish' then
  if st ~= 'creating' then return reply('conflict', KEYS[1]) end
  local size = tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], 'status', 'ready', 'size_bytes', ARGV[3])
  if named then
    meter_field_add(KEYS[3], 'reserved', -tonumber(field('estimate')))
    meter_field_add(KEYS[3], 'named_bytes', size)
    meter_add(KEYS[3], size, now)
    redis.call('ZREM', KEYS[5], id)
  else
    redis.call('ZADD', KEYS[5], now + tonumber(ARGV[4]), id)
  end
  return reply('ok', KEYS[1])
elseif op == 'abort' or op == 'remove' then
  if op == 'abort' and st ~= 'creating' then return reply('conflict', KEYS[1]) end
  if named then
    if st == 'creating' then
      meter_field_add(KEYS[3], 'reserved', -tonumber(field('estimate')))
    else
      local size = tonumber(field('size_bytes'))
      meter_field_add(KEYS[3], 'named_bytes', -size)
      meter_add(KEYS[3], -size, now)
    end
  end
  local out = reply('ok', KEYS[1])
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[5], id)
  return out
elseif op == 'begin_delete' then
  if field('tenant') ~= ARGV[3] or not named then return { 'missing' } end
  if st == 'creating' then return reply('conflict', KEYS[1]) end
  redis.call('HSET', KEYS[1], 'status', 'deleting')
  redis.call('ZADD', KEYS[5], now + tonumber(ARGV[4]), id)
  return reply('ok', KEYS[1])
elseif op == 'reclaim' then
  local score = redis.call('ZSCORE', KEYS[5], id)
  if not score or tonumber(score) > now then return {} end
  redis.call('ZADD', KEYS[5], now + tonumber(ARGV[3]), id)
  return reply('ok', KEYS[1])
end
return { 'bad_op' }
