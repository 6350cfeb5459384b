//! Capsa's shared state in Redis. Every key lives under `capsa:`.
//!
//! - [`nodes`]: KVM hosts announce themselves with a TTL'd heartbeat ([`NodeRegistry`]).
//! - [`sessions`]: session records and every state transition as an atomic Lua script
//!   ([`SessionStore`]).
//! - [`apikeys`]: API keys, stored only as sha256 hashes, and per-tenant limits
//!   ([`ApiKeyStore`]).
//!
//! All of them share one [`redis::aio::ConnectionManager`] (cheap to clone; reconnects by
//! itself), made by [`connect`].

pub mod apikeys;

/// `now_ms()` (Redis `TIME`, the clock every replica shares) and `reply(tag, key)`, prepended
/// to every Lua script of the store.
pub(crate) const CLOCK_AND_REPLY_LUA: &str = include_str!("lua/clock_and_reply.lua");
pub mod nodes;
pub mod sessions;
pub mod usage;

use std::time::Duration;

pub use apikeys::{ApiKeyRecord, ApiKeyStore, CreateThrottled, KeyById, NewApiKey};
pub use nodes::{LapsedNode, NodeRecord, NodeRegistry};
pub use redis::aio::ConnectionManager;
pub use sessions::{
    Claimed, Created, Cursor, EgressStored, EndReason, Extended, ListFilter, ListPage,
    MAX_PAGE_BYTES, NewSession, SessionRecord, SessionStatus, SessionStore, StoreConfig,
    Transition, VmShape,
};

/// Errors of the store layer. Redis failures keep their cause as the source.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis command failed")]
    Redis(#[from] redis::RedisError),
    /// A value in Redis that this code did not write the way it reads it.
    #[error("corrupt record at {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

/// Result alias for store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Opens a managed connection to `url` (`redis://host:port/db`). Connection and response
/// timeouts are bounded so a dead Redis surfaces as an error within seconds instead of a
/// hung request.
pub async fn connect(url: &str) -> Result<ConnectionManager> {
    let client = redis::Client::open(url)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(3)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(3);
    Ok(ConnectionManager::new_with_config(client, config).await?)
}
