//! Capsa's shared state in Redis. Every key lives under `{capsa}:`: the `{capsa}` hash tag puts
//! every key in one Redis Cluster slot, and every Lua script declares each key it touches
//! (`sessions/lua/common.lua` says how for the sets a session's stored fields name), so each
//! script and MULTI runs on the one shard that holds them all. A Cluster then gives Capsa failover through its replicas,
//! not sharding: the control plane's state is small (records of live sessions and nodes).
//!
//! - [`nodes`]: KVM hosts announce themselves with a TTL'd heartbeat ([`NodeRegistry`]).
//! - [`sessions`]: session records and every state transition as an atomic Lua script
//!   ([`SessionStore`]).
//! - [`snapshots`]: tenant snapshots and the snapshot storage meter ([`SnapshotStore`]).
//! - [`apikeys`]: API keys, stored only as sha256 hashes, and per-tenant limits
//!   ([`ApiKeyStore`]).
//!
//! All of them share one [`Connection`] (cheap to clone; reconnects by itself), made by
//! [`connect`] for one server, a Sentinel-watched master or a Cluster.

pub mod apikeys;

/// `now_ms()` (Redis `TIME`, the clock every replica shares) and `reply(tag, key)`, prepended
/// to every Lua script of the store.
pub(crate) const CLOCK_AND_REPLY_LUA: &str = include_str!("lua/clock_and_reply.lua");
pub mod nodes;
mod sentinel;
pub mod sessions;
pub mod snapshots;
pub mod usage;

use std::time::Duration;

pub use apikeys::{ApiKeyRecord, ApiKeyStore, CreateThrottled, KeyById, NewApiKey};
pub use nodes::{LapsedNode, NodeRecord, NodeRegistry, NodeResources, VmSize};
use redis::aio::ConnectionManager;
pub use snapshots::{
    Begun, Meter, NewSnapshot, SnapshotKind, SnapshotLimits, SnapshotRecord, SnapshotStatus,
    SnapshotStore,
};

/// The hash tag every key starts with (see the crate docs).
pub const KEY_PREFIX: &str = "{capsa}:";
pub use sessions::{
    Claimed, Created, Cursor, EgressStored, EndReason, Extended, ListFilter, ListPage,
    MAX_PAGE_BYTES, NewSession, SessionRecord, SessionStatus, SessionStore, StoreConfig, SuspendOp,
    Transition, VmShape, session_of_lease,
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

/// A connection to Capsa's Redis, whatever its deployment. Clones share it.
#[derive(Clone)]
pub struct Connection(Topology);

#[derive(Clone)]
enum Topology {
    /// One server, or the master Sentinel reported at connect time.
    Single(ConnectionManager),
    /// A master found through Sentinel, looked up again when it stops being one.
    Sentinel(std::sync::Arc<sentinel::Follower>),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match &mut self.0 {
            Topology::Single(c) => c.req_packed_command(cmd),
            Topology::Sentinel(f) => Box::pin(f.clone().command(cmd)),
            Topology::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match &mut self.0 {
            Topology::Single(c) => c.req_packed_commands(cmd, offset, count),
            Topology::Sentinel(f) => Box::pin(f.clone().pipeline(cmd, offset, count)),
            Topology::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Topology::Single(c) => c.get_db(),
            Topology::Sentinel(f) => f.db(),
            Topology::Cluster(c) => c.get_db(),
        }
    }
}

impl Connection {
    /// SCAN over Capsa's keys matching `pattern` (which starts with [`KEY_PREFIX`]), every
    /// match once or more. On a Cluster it runs on the shard that holds the `{capsa}` slot:
    /// a plain SCAN would walk a random one.
    pub async fn scan_keys(&self, pattern: &str) -> Result<Vec<String>> {
        let mut conn = self.clone();
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, batch): (u64, Vec<String>) = match &mut conn.0 {
                Topology::Cluster(c) => {
                    use redis::cluster_routing::{
                        Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
                    };
                    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                        Route::with_key(KEY_PREFIX, SlotAddr::Master),
                    ));
                    redis::from_redis_value(c.route_command(cmd, route).await?)
                        .map_err(redis::RedisError::from)?
                }
                _ => cmd.query_async(&mut conn).await?,
            };
            keys.extend(batch);
            if next == 0 {
                return Ok(keys);
            }
            cursor = next;
        }
    }
}

/// Opens a managed connection to `url`. Connection and response timeouts are bounded so a
/// dead Redis surfaces as an error within seconds instead of a hung request.
///
/// - `redis://[:password@]host:port/db`; `rediss://` for TLS, the server checked against
///   the system roots (a private CA: point `SSL_CERT_FILE` at it);
/// - `redis+sentinel://[:password@]host:port[,host:port...]/MASTER[/db]` (`rediss+sentinel`:
///   TLS to the sentinels and the master): the master's address is asked of the sentinels,
///   and asked again whenever the server stops answering or answers as a replica (a
///   failover): the calls in flight then fail, the next ones go to the new master. The
///   password is the master's.
/// - `redis+cluster://[:password@]host:port[,host:port...]` (`rediss+cluster`: TLS): a
///   Redis Cluster, found from any of the nodes given; its topology is followed as it
///   changes.
pub async fn connect(url: &str) -> Result<Connection> {
    let conn = if let Some(spec) = sentinel_spec(url) {
        Connection(Topology::Sentinel(std::sync::Arc::new(
            sentinel::Follower::connect(spec?).await?,
        )))
    } else if let Some(spec) = cluster_spec(url) {
        Connection(Topology::Cluster(spec?.connect().await?))
    } else {
        Connection(Topology::Single(manager(redis::Client::open(url)?).await?))
    };
    // Connecting sends AUTH only when the URL has a password: a command now tells a server
    // that wants one (NOAUTH) at start-up rather than on the first request.
    redis::cmd("PING")
        .query_async::<()>(&mut conn.clone())
        .await?;
    Ok(conn)
}

/// A reconnecting connection to `client`'s server, with bounded timeouts.
async fn manager(client: redis::Client) -> Result<ConnectionManager, redis::RedisError> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(3)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(3);
    ConnectionManager::new_with_config(client, config).await
}

/// A parsed `redis+sentinel://` URL.
pub(crate) struct SentinelSpec {
    tls: bool,
    sentinels: Vec<(String, u16)>,
    master: String,
    password: Option<String>,
    db: i64,
}

/// `what` (e.g. "bad redis+sentinel URL") and `detail`, never the URL itself: it may hold
/// the password.
fn bad_url(what: &'static str, detail: &str) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::InvalidClientConfig,
        what,
        detail.to_owned(),
    ))
}

/// `(tls, rest)` when `url` starts with `redis+<kind>://` (false) or `rediss+<kind>://`.
fn strip_scheme<'a>(url: &'a str, kind: &str) -> Option<(bool, &'a str)> {
    let rest = url.strip_prefix("redis")?;
    let (tls, rest) = match rest.strip_prefix('s') {
        Some(rest) => (true, rest),
        None => (false, rest),
    };
    Some((
        tls,
        rest.strip_prefix('+')?
            .strip_prefix(kind)?
            .strip_prefix("://")?,
    ))
}

/// `Some` for the sentinel schemes.
fn sentinel_spec(url: &str) -> Option<Result<SentinelSpec, redis::RedisError>> {
    let (tls, rest) = strip_scheme(url, "sentinel")?;
    let bad = |detail: &str| bad_url("bad redis+sentinel URL", detail);
    Some((|| {
        let (password, rest) = split_auth(rest);
        let (hosts, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("no /MASTER after the sentinel addresses"))?;
        let sentinels = parse_hosts(hosts, bad)?;
        let mut path = path.split('/').filter(|p| !p.is_empty());
        let master = path.next().ok_or_else(|| bad("no master name"))?.to_owned();
        let db = match path.next() {
            Some(db) => db
                .parse()
                .map_err(|_| bad("the database is not a number"))?,
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
    pub(crate) async fn master(&self) -> Result<redis::Client, redis::RedisError> {
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

/// A parsed `redis+cluster://` URL.
struct ClusterSpec {
    tls: bool,
    nodes: Vec<(String, u16)>,
    password: Option<String>,
}

/// `Some` for the cluster schemes.
fn cluster_spec(url: &str) -> Option<Result<ClusterSpec, redis::RedisError>> {
    let (tls, rest) = strip_scheme(url, "cluster")?;
    let bad = |detail: &str| bad_url("bad redis+cluster URL", detail);
    Some((|| {
        let (password, hosts) = split_auth(rest);
        let hosts = hosts.trim_end_matches('/');
        if hosts.contains('/') {
            return Err(bad(
                "a cluster has no databases: nothing may follow the addresses",
            ));
        }
        let nodes = parse_hosts(hosts, bad)?;
        Ok(ClusterSpec {
            tls,
            nodes,
            password,
        })
    })())
}

/// `[user:]password@rest` → (password, rest); the password may be empty (none).
fn split_auth(rest: &str) -> (Option<String>, &str) {
    match rest.rsplit_once('@') {
        Some((auth, rest)) => (
            Some(auth.split_once(':').map_or(auth, |(_, p)| p).to_owned())
                .filter(|p| !p.is_empty()),
            rest,
        ),
        None => (None, rest),
    }
}

/// `host:port[,host:port...]`.
fn parse_hosts(
    hosts: &str,
    bad: impl Fn(&str) -> redis::RedisError,
) -> Result<Vec<(String, u16)>, redis::RedisError> {
    hosts
        .split(',')
        .map(|h| {
            let (host, port) = h
                .rsplit_once(':')
                .ok_or_else(|| bad("an address without :port"))?;
            let port = port.parse().map_err(|_| bad("a port is not a number"))?;
            Ok((host.to_owned(), port))
        })
        .collect()
}

impl ClusterSpec {
    async fn connect(self) -> Result<redis::cluster_async::ClusterConnection, redis::RedisError> {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|(h, p)| format!("{scheme}://{h}:{p}"))
            .collect();
        let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
            .connection_timeout(Duration::from_secs(3))
            .response_timeout(Duration::from_secs(5));
        if let Some(password) = &self.password {
            builder = builder.password(password);
        }
        builder.build()?.get_async_connection().await
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
