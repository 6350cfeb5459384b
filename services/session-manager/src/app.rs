//! The state every request handler and background loop shares: the stores, the node
//! clients and the config. Business logic hangs off [`App`] in `sessions`, `teardown`,
//! `proxy` and `reaper`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use capsa_store::{ApiKeyStore, ConnectionManager, NodeRegistry, SessionStore};

use crate::clients::Clients;
use crate::config::Config;
use crate::error::Error;

pub struct App {
    pub config: Config,
    pub sessions: SessionStore,
    pub keys: ApiKeyStore,
    pub nodes: NodeRegistry,
    pub clients: Clients,
    /// Sessions not yet terminated (all tenants), refreshed by the reconciler and exported
    /// as the `capsa.sessions.active` gauge. Every replica reports the same global number.
    pub open_sessions: Arc<AtomicU64>,
}

impl App {
    pub fn new(config: Config, conn: ConnectionManager) -> Self {
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
            keys: ApiKeyStore::new(conn.clone()),
            nodes: NodeRegistry::new(conn),
            clients: Clients::new(config.metering_url.clone()),
            config,
        }
    }

    /// The tenant of a presented `authorization` header value (`Bearer <key>`).
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<String, Error> {
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
        match self.keys.lookup(key.trim()).await? {
            Some(rec) => Ok(rec.tenant_id),
            None => Err(Error::Unauthenticated("unknown api key")),
        }
    }
}
