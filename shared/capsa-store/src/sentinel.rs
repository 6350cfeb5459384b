//! Following a Sentinel-watched master across failovers. The connection goes to the master the
//! sentinels name; when that server stops answering, or answers as a replica (READONLY: it
//! was demoted), the sentinels are asked again and later calls go to the master they name
//! then. The call that met the failure fails (it may have run), except on READONLY: a replica
//! ran nothing, so that call is sent again, once, to the new master.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike as _, ConnectionManager};
use redis::{Cmd, Pipeline, RedisError, RedisResult, Value};

use crate::SentinelSpec;

/// Look-ups after a failure are this far apart at least, however many calls fail meanwhile.
const LOOKUP_INTERVAL: Duration = Duration::from_millis(500);

pub(crate) struct Follower {
    spec: SentinelSpec,
    /// The connection to the master as last looked up, and how many look-ups replaced it.
    current: Mutex<(u64, ConnectionManager)>,
    /// One look-up at a time; when the last one started.
    lookup: tokio::sync::Mutex<Option<Instant>>,
}

impl Follower {
    pub(crate) async fn connect(spec: SentinelSpec) -> Result<Follower, RedisError> {
        let conn = crate::manager(spec.master().await?).await?;
        Ok(Follower {
            spec,
            current: Mutex::new((0, conn)),
            lookup: tokio::sync::Mutex::new(None),
        })
    }

    pub(crate) fn db(&self) -> i64 {
        self.spec.db
    }

    fn current(&self) -> (u64, ConnectionManager) {
        self.current.lock().expect("never poisoned").clone()
    }

    pub(crate) async fn command(self: std::sync::Arc<Self>, cmd: &Cmd) -> RedisResult<Value> {
        self.send(|mut conn| async move { conn.req_packed_command(cmd).await })
            .await
    }

    pub(crate) async fn pipeline(
        self: std::sync::Arc<Self>,
        pipe: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        self.send(|mut conn| async move { conn.req_packed_commands(pipe, offset, count).await })
            .await
    }

    /// Runs `op` on the current master; a failure that says the master is lost triggers a
    /// look-up, and on READONLY (nothing ran) `op` runs once more on the new master.
    async fn send<T, F>(&self, op: impl Fn(ConnectionManager) -> F) -> RedisResult<T>
    where
        F: std::future::Future<Output = RedisResult<T>>,
    {
        let (generation, conn) = self.current();
        match op(conn).await {
            Err(e) if lost_master(&e) => {
                let replaced = self.look_up(generation).await;
                if replaced && is_readonly(&e) {
                    return op(self.current().1).await;
                }
                Err(e)
            }
            other => other,
        }
    }

    /// Asks the sentinels for the master again, unless a look-up since `generation` already
    /// did (or one ran within [`LOOKUP_INTERVAL`]). True if the connection was replaced.
    async fn look_up(&self, generation: u64) -> bool {
        let mut last = self.lookup.lock().await;
        if self.current().0 != generation {
            return true;
        }
        if last.is_some_and(|at| at.elapsed() < LOOKUP_INTERVAL) {
            return false;
        }
        *last = Some(Instant::now());
        let found = async { crate::manager(self.spec.master().await?).await };
        match tokio::time::timeout(Duration::from_secs(10), found).await {
            Ok(Ok(conn)) => {
                let mut current = self.current.lock().expect("never poisoned");
                *current = (generation + 1, conn);
                tracing::info!(master = %self.spec.master, "redis master looked up again through sentinel");
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(master = %self.spec.master, error = %e, "sentinel look-up failed");
                false
            }
            Err(_) => {
                tracing::warn!(master = %self.spec.master, "sentinel look-up timed out");
                false
            }
        }
    }
}

fn is_readonly(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
    )
}

/// Whether `e` says the server is gone or no longer the master.
fn lost_master(e: &RedisError) -> bool {
    is_readonly(e)
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
}
