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
pub use nodes::{LapsedNode, NodeRecord, NodeRegistry, NodeResources, VmSize};
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

/// Opens a managed connection to `url`. Connection and response timeouts are bounded so a
/// dead Redis surfaces as an error within seconds instead of a hung request.
///
/// - `redis://[:password@]host:port/db`; `rediss://` for TLS, the server checked against
///   the system roots (a private CA: point `SSL_CERT_FILE` at it);
/// - `redis+sentinel://[:password@]host:port[,host:port...]/MASTER[/db]` (`rediss+sentinel`:
///   TLS to the sentinels and the master): the master's address is asked of the sentinels
///   here, once; the connection manager then reconnects to that address, so a failover is
///   followed only by a new `connect` (a restart). The password is the master's.
///
/// Redis Cluster is not supported by this client.
pub async fn connect(url: &str) -> Result<ConnectionManager> {
    let client = match sentinel_spec(url) {
        Some(spec) => spec?.master().await?,
        None => redis::Client::open(url)?,
    };
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(3)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(3);
    let mut conn = ConnectionManager::new_with_config(client, config).await?;
    // Connecting sends AUTH only when the URL has a password: a command now tells a server
    // that wants one (NOAUTH) at start-up rather than on the first request.
    redis::cmd("PING").query_async::<()>(&mut conn).await?;
    Ok(conn)
}

/// A parsed `redis+sentinel://` URL.
struct SentinelSpec {
    tls: bool,
    sentinels: Vec<(String, u16)>,
    master: String,
    password: Option<String>,
    db: i64,
}

fn bad_url(detail: &str) -> redis::RedisError {
    // Never the URL itself: it may hold the password.
    redis::RedisError::from((
        redis::ErrorKind::InvalidClientConfig,
        "bad redis+sentinel URL",
        detail.to_owned(),
    ))
}

/// `Some` for the sentinel schemes.
fn sentinel_spec(url: &str) -> Option<Result<SentinelSpec, redis::RedisError>> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("redis+sentinel://") {
        (false, rest)
    } else {
        (true, url.strip_prefix("rediss+sentinel://")?)
    };
    Some((|| {
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((auth, rest)) => (Some(auth), rest),
            None => (None, rest),
        };
        let password = auth
            .map(|a| a.split_once(':').map_or(a, |(_, p)| p).to_owned())
            .filter(|p| !p.is_empty());
        let (hosts, path) = rest
            .split_once('/')
            .ok_or_else(|| bad_url("no /MASTER after the sentinel addresses"))?;
        let sentinels = hosts
            .split(',')
            .map(|h| {
                let (host, port) = h
                    .rsplit_once(':')
                    .ok_or_else(|| bad_url("a sentinel address without :port"))?;
                let port = port
                    .parse()
                    .map_err(|_| bad_url("a sentinel port is not a number"))?;
                Ok((host.to_owned(), port))
            })
            .collect::<Result<Vec<_>, redis::RedisError>>()?;
        let mut path = path.split('/').filter(|p| !p.is_empty());
        let master = path
            .next()
            .ok_or_else(|| bad_url("no master name"))?
            .to_owned();
        let db = match path.next() {
            Some(db) => db
                .parse()
                .map_err(|_| bad_url("the database is not a number"))?,
            None => 0,
        };
        Ok(SentinelSpec {
            tls,
            sentinels,
            master,
            password,
            db,
        })
    })())
}

impl SentinelSpec {
    /// A client of the current master, as the sentinels report it.
    async fn master(self) -> Result<redis::Client, redis::RedisError> {
        let addr = |host: String, port: u16| {
            if self.tls {
                redis::ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                redis::ConnectionAddr::Tcp(host, port)
            }
        };
        let sentinels: Vec<redis::ConnectionInfo> = self
            .sentinels
            .iter()
            .map(|(h, p)| redis::IntoConnectionInfo::into_connection_info(addr(h.clone(), *p)))
            .collect::<Result<_, _>>()?;
        let mut info = redis::RedisConnectionInfo::default().set_db(self.db);
        if let Some(password) = &self.password {
            info = info.set_password(password);
        }
        let mut node =
            redis::sentinel::SentinelNodeConnectionInfo::default().set_redis_connection_info(info);
        if self.tls {
            node = node.set_tls_mode(redis::TlsMode::Secure);
        }
        redis::sentinel::SentinelClient::build(
            sentinels,
            self.master.clone(),
            Some(node),
            redis::sentinel::SentinelServerType::Master,
        )?
        .async_get_client()
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_parse_and_errors_never_show_the_password() {
        let spec = sentinel_spec("redis+sentinel://:pw@s1:26379,s2:26380/mymaster/3")
            .unwrap()
            .unwrap();
        assert!(!spec.tls);
        assert_eq!(
            spec.sentinels,
            [("s1".to_owned(), 26379), ("s2".to_owned(), 26380)]
        );
        assert_eq!(spec.master, "mymaster");
        assert_eq!(spec.password.as_deref(), Some("pw"));
        assert_eq!(spec.db, 3);
        let spec = sentinel_spec("rediss+sentinel://h:1/m").unwrap().unwrap();
        assert!(spec.tls && spec.password.is_none() && spec.db == 0);
        assert!(sentinel_spec("redis://h:1/").is_none());
        for bad in [
            "redis+sentinel://:hunter2@h/m",
            "redis+sentinel://:hunter2@h:1",
            "redis+sentinel://:hunter2@h:x/m",
            "redis+sentinel://:hunter2@h:1/m/db",
        ] {
            let err = sentinel_spec(bad).unwrap().err().expect(bad);
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }
}
