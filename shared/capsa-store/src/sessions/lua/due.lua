-- Up to ARGV[1] ids whose expiry score has passed on Redis' clock (read only).
-- KEYS: expiry zset.
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
