//! capsa-store against a real redis-server: node heartbeats and expiry, session
//! transitions (one winner each), claiming due sessions across concurrent callers,
//! paging, quotas, extensions and API keys.

type Redis = capsa_test_support::RedisServer;

include!("common/store_tests.rs");
