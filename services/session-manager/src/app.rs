//! The state every request handler and background loop shares: the stores, the node
//! clients, the per-tenant stream slots and the config. Business logic hangs off [`App`] in
//! `sessions`, `teardown`, `proxy` and `reaper`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsa_store::{
    ApiKeyStore, Connection, NodeRegistry, SessionRecord, SessionStore, SnapshotStore,
};

use crate::clients::Clients;
use crate::config::Config;
use crate::error::Error;

pub struct App {
    pub config: Config,
    pub sessions: SessionStore,
    pub snapshots: SnapshotStore,
    pub keys: ApiKeyStore,
    pub nodes: NodeRegistry,
    pub clients: Clients,
    pub streams: StreamSlots,
    pub touches: Touches,
    /// Sessions not yet terminated (all tenants), refreshed by the reconciler and exported
    /// as the `capsa.sessions.active` gauge. Every replica reports the same global number.
    pub open_sessions: Arc<AtomicU64>,
}

impl App {
    pub fn new(config: Config, conn: Connection) -> Self {
        let open_sessions = Arc::new(AtomicU64::new(0));
        let gauge_source = open_sessions.clone();
        // The instrument lives as long as the meter provider; its callback reads the atomic.
        let _gauge = capsa_telemetry::meter()
            .u64_observable_gauge(capsa_telemetry::metrics::SESSIONS_ACTIVE)
            .with_description("sessions not yet terminated, across all tenants")
            .with_callback(move |observer| {
                observer.observe(gauge_source.load(Ordering::Relaxed), &[])
            })
            .build();
        Self {
            open_sessions,
            sessions: SessionStore::new(conn.clone(), config.store_config()),
            snapshots: SnapshotStore::new(conn.clone()),
            keys: ApiKeyStore::new(conn.clone()),
            nodes: NodeRegistry::new(conn),
            clients: Clients::new(config.metering_url.clone(), config.common.tls.clone()),
            streams: StreamSlots::new(config.max_streams_per_tenant),
            touches: Touches::default(),
            config,
        }
    }

    /// The tenant of a presented `authorization` header value (`Bearer <key>`).
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<String, Error> {
        let key = bearer_key(authorization)?;
        match self.keys.lookup(key).await? {
            Some(rec) => Ok(rec.tenant_id),
            None => Err(Error::Unauthenticated("unknown api key")),
        }
    }

    /// [`App::authenticate`] and then [`App::session`], in one Redis round trip: the
    /// caller's tenant and its session `id` (NOT_FOUND when it is another tenant's). `id`
    /// must be valid already.
    pub async fn authenticate_for_session(
        &self,
        authorization: Option<&str>,
        id: &str,
    ) -> Result<(String, SessionRecord), Error> {
        let key = bearer_key(authorization)?;
        match self.keys.lookup_with_session(key, id).await? {
            (None, _) => Err(Error::Unauthenticated("unknown api key")),
            (Some(key), Some(rec)) if rec.tenant_id == key.tenant_id => Ok((key.tenant_id, rec)),
            (Some(_), _) => Err(session_not_found(id)),
        }
    }
}

/// The key of an `authorization` header value, which must be `Bearer <key>`.
fn bearer_key(authorization: Option<&str>) -> Result<&str, Error> {
    let header = authorization.ok_or(Error::Unauthenticated(
        "missing `authorization: Bearer <api key>` metadata",
    ))?;
    let (scheme, key) = header.split_once(' ').ok_or(Error::Unauthenticated(
        "authorization must be `Bearer <api key>`",
    ))?;
    if !scheme.eq_ignore_ascii_case("bearer") || key.trim().is_empty() {
        return Err(Error::Unauthenticated(
            "authorization must be `Bearer <api key>`",
        ));
    }
    Ok(key.trim())
}

/// What a caller learns of a session that does not exist or is another tenant's.
pub fn session_not_found(id: &str) -> Error {
    Error::NotFound(format!("session {id} not found"))
}

/// How often this replica records activity on one session: `last_active_time` is kept to
/// the second. Writing it on every call was a Redis script run per Execute.
pub const TOUCH_INTERVAL: Duration = Duration::from_secs(1);

/// When each session's activity was last recorded by this replica.
#[derive(Default)]
pub struct Touches {
    last: Mutex<TouchTimes>,
}

#[derive(Default)]
struct TouchTimes {
    at: HashMap<String, Instant>,
    /// The size at which entries older than [`TOUCH_INTERVAL`] are dropped: twice what the
    /// last sweep kept, so a sweep costs at most as much as the inserts since the previous.
    sweep_at: usize,
}

impl Touches {
    /// Whether activity on `id` is due to be recorded at `now`; if so, it counts as done.
    pub fn due(&self, id: &str, now: Instant) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = last.at.get(id)
            && now.saturating_duration_since(*at) < TOUCH_INTERVAL
        {
            return false;
        }
        if last.at.len() >= last.sweep_at {
            last.at
                .retain(|_, at| now.saturating_duration_since(*at) < TOUCH_INTERVAL);
            last.sweep_at = (last.at.len() * 2).max(1024);
        }
        last.at.insert(id.to_owned(), now);
        true
    }
}

/// Streaming calls (Execute, DownloadFile, UploadFile, AttachProcess, OpenTerminal,
/// ConnectPort) open per tenant on this replica,
/// capped by `--max-streams-per-tenant`: one tenant's open streams, stalled ones included,
/// take at most that many of this replica's streams and relay buffers, whatever it does.
pub struct StreamSlots {
    max: u32,
    open: Arc<Mutex<HashMap<String, u32>>>,
}

/// One open streaming call; its slot is released when this drops, however the call ended.
pub struct StreamSlot {
    tenant: String,
    open: Arc<Mutex<HashMap<String, u32>>>,
}

impl StreamSlots {
    pub fn new(max: u32) -> Self {
        Self {
            max,
            open: Arc::default(),
        }
    }

    /// A slot for one more streaming call of `tenant`, or RESOURCE_EXHAUSTED at the cap.
    pub fn acquire(&self, tenant: &str) -> Result<StreamSlot, Error> {
        let mut open = self.open.lock().expect("stream slots lock");
        let count = open.entry(tenant.to_string()).or_default();
        if *count >= self.max {
            return Err(Error::ResourceExhausted(format!(
                "tenant {tenant} has {} streaming calls (Execute, file transfers, \
                 AttachProcess, OpenTerminal, ConnectPort) open on this server, its limit \
                 (--max-streams-per-tenant); retry when one ends",
                self.max
            )));
        }
        *count += 1;
        Ok(StreamSlot {
            tenant: tenant.to_string(),
            open: self.open.clone(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("stream slots lock");
        if let Some(count) = open.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_at_its_cap_is_refused_and_others_are_not() {
        let slots = StreamSlots::new(2);
        let a1 = slots.acquire("a").unwrap();
        let _a2 = slots.acquire("a").unwrap();
        let err = slots.acquire("a").err().unwrap();
        let status = capsa_grpc::to_status(&err);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("--max-streams-per-tenant") && status.message().contains('2'),
            "{}",
            status.message()
        );
        let _b = slots.acquire("b").unwrap();
        drop(a1);
        let _a3 = slots.acquire("a").unwrap();
        assert!(slots.acquire("a").is_err());
    }

    #[test]
    fn activity_is_recorded_at_most_once_an_interval_per_session() {
        let touches = Touches::default();
        let t0 = Instant::now();
        assert!(touches.due("a", t0));
        assert!(!touches.due("a", t0 + TOUCH_INTERVAL / 2));
        assert!(
            touches.due("b", t0 + TOUCH_INTERVAL / 2),
            "sessions are apart"
        );
        assert!(touches.due("a", t0 + TOUCH_INTERVAL));
        assert!(!touches.due("a", t0 + TOUCH_INTERVAL + TOUCH_INTERVAL / 2));
    }

    #[test]
    fn sessions_no_longer_touched_are_forgotten() {
        let touches = Touches::default();
        let t0 = Instant::now();
        for i in 0..5000 {
            touches.due(&format!("old-{i}"), t0);
        }
        let later = t0 + TOUCH_INTERVAL;
        for i in 0..5000 {
            touches.due(&format!("new-{i}"), later);
        }
        let last = touches.last.lock().unwrap();
        assert_eq!(last.at.len(), 5000, "the old entries were swept");
        assert!(last.at.keys().all(|id| id.starts_with("new-")));
    }

    #[test]
    fn released_slots_leave_no_entry_behind() {
        let slots = StreamSlots::new(1);
        drop(slots.acquire("a").unwrap());
        assert!(slots.open.lock().unwrap().is_empty());
    }
}
