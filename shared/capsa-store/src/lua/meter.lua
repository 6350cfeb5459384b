-- A tenant's snapshot storage meter, `{capsa}:tenant:<t>:snapshot_meter` (a hash):
-- `bytes` held now (its ready snapshots and its suspended sessions' snapshots), `gib_ms`
-- GiB × ms held up to `since_ms`; `named_bytes` and `reserved` (estimates of snapshots being
-- written) are what its snapshot byte quota counts. The bill reads
-- gib_ms + bytes / 2^30 × (now - since_ms).
local function meter_add(key, delta, now)
  local bytes = tonumber(redis.call('HGET', key, 'bytes') or '0')
  local since = tonumber(redis.call('HGET', key, 'since_ms') or now)
  local gib_ms = tonumber(redis.call('HGET', key, 'gib_ms') or '0')
  gib_ms = gib_ms + bytes / 1073741824 * math.max(0, now - since)
  bytes = math.max(0, bytes + delta)
  redis.call('HSET', key, 'bytes', string.format('%.0f', bytes),
    'gib_ms', string.format('%.17g', gib_ms), 'since_ms', now)
end
local function meter_field_add(key, field, delta)
  local v = tonumber(redis.call('HGET', key, field) or '0')
  redis.call('HSET', key, field, string.format('%.0f', math.max(0, v + delta)))
end
local function tenant_meter_key(session_key)
  return '{capsa}:tenant:' .. redis.call('HGET', session_key, 'tenant') .. ':snapshot_meter'
end
