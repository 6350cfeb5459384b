//! The answers metering gives: a session's usage, a tenant's totals, and finalizing a
//! session (final sample, then the `final` usage record exactly once).
//!
//! Clocks: counters, `sample_ms` and the lease time come from the vm-pool that owns the VM;
//! record times and the "now" of a live session's uptime come from Redis (`TIME`), the
//! clock every replica shares. A live session's uptime is therefore Redis-now minus the
//! vm-pool lease time; the two are NTP-synchronised hosts in any real deployment.

use std::sync::Arc;
use std::time::Duration;

use capsa_store::usage::{Finalized, SessionUsage, Usage, UsageStore};
use capsa_store::{NodeRegistry, SessionRecord, SessionStore};

use crate::clients::{NodeClients, Owner};
use crate::error::Error;
use crate::metrics::Metrics;
use tracing::Instrument as _;

/// Longest accepted id (session or tenant): ids are generated, never this long.
const MAX_ID_LEN: usize = 256;

#[derive(Clone)]
pub struct Ledger {
    registry: NodeRegistry,
    sessions: SessionStore,
    usage: UsageStore,
    clients: Arc<NodeClients>,
    metrics: Metrics,
    /// Bound of the final sample: the caller (session-manager) waits only so long.
    final_sample_timeout: Duration,
}

fn check_id(field: &'static str, id: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(Error::invalid(field, "is empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(Error::invalid(field, "is longer than 256 bytes"));
    }
    if id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Error::invalid(
            field,
            "contains whitespace or control characters",
        ));
    }
    Ok(())
}

impl Ledger {
    pub fn new(
        registry: NodeRegistry,
        sessions: SessionStore,
        usage: UsageStore,
        clients: Arc<NodeClients>,
        metrics: Metrics,
        final_sample_timeout: Duration,
    ) -> Ledger {
        Ledger {
            registry,
            sessions,
            usage,
            clients,
            metrics,
            final_sample_timeout,
        }
    }

    /// The session's tenant and usage. A session that exists but was never sampled has
    /// only its uptime (since it was created). NOT_FOUND if neither is known.
    #[tracing::instrument(skip(self))]
    pub async fn session_usage(&self, session_id: &str) -> Result<(String, Usage), Error> {
        check_id("session_id", session_id)?;
        if let Some(stored) = self.usage.session(session_id).await? {
            let now = self.usage.now_ms().await?;
            let mut usage = stored.usage.clone();
            usage.uptime_ms = stored.uptime_at(now);
            return Ok((stored.tenant_id, usage));
        }
        let Some(rec) = self.sessions.get(session_id).await? else {
            return Err(Error::SessionNotFound {
                session_id: session_id.to_owned(),
            });
        };
        let until = match rec.end_ms {
            Some(end) => end,
            None => self.usage.now_ms().await?,
        };
        let usage = Usage {
            uptime_ms: u64::try_from(until - rec.create_ms).unwrap_or(0),
            ..Usage::default()
        };
        Ok((rec.tenant_id, usage))
    }

    /// The tenant's totals (zero for a tenant with no usage yet).
    #[tracing::instrument(skip(self))]
    pub async fn tenant_usage(&self, tenant_id: &str) -> Result<Usage, Error> {
        check_id("tenant_id", tenant_id)?;
        Ok(self.usage.tenant(tenant_id).await?)
    }

    /// Takes a final sample if the VM is still there (else the last stored sample stands),
    /// then appends the `final` record unless some call already did. Runs to the end even
    /// if the caller goes away meanwhile: a record half-decided is worse than a late one.
    #[tracing::instrument(skip(self))]
    pub async fn finalize(&self, session_id: &str) -> Result<Finalized, Error> {
        check_id("session_id", session_id)?;
        let this = self.clone();
        let id = session_id.to_owned();
        let task = tokio::spawn(
            async move { this.finalize_detached(&id).await }.instrument(tracing::Span::current()),
        );
        task.await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    async fn finalize_detached(&self, session_id: &str) -> Result<Finalized, Error> {
        let (rec, stored) = tokio::try_join!(
            self.sessions.get(session_id),
            self.usage.session(session_id)
        )?;
        let owner = match (&rec, &stored) {
            (Some(rec), _) => Owner {
                session_id: session_id.to_owned(),
                tenant_id: rec.tenant_id.clone(),
                fallback_lease_ms: rec.create_ms,
            },
            (None, Some(stored)) => Owner {
                session_id: session_id.to_owned(),
                tenant_id: stored.tenant_id.clone(),
                fallback_lease_ms: stored.lease_ms,
            },
            (None, None) => {
                return Err(Error::SessionNotFound {
                    session_id: session_id.to_owned(),
                });
            }
        };
        if !stored.as_ref().is_some_and(|s| s.finalized) {
            self.final_sample(&owner, rec.as_ref(), stored.as_ref())
                .await;
        }
        let done = self
            .usage
            .finalize(session_id, &owner.tenant_id, owner.fallback_lease_ms)
            .await?;
        if done.appended {
            self.metrics.record("final");
            tracing::info!(tenant = %owner.tenant_id, "final usage record appended");
        }
        Ok(done)
    }

    /// Final sample of `vm_id` (best effort, bounded like finalize's), then parks it.
    #[tracing::instrument(skip(self))]
    pub async fn park(&self, session_id: &str, vm_id: &str) -> Result<bool, Error> {
        check_id("session_id", session_id)?;
        check_id("vm_id", vm_id)?;
        let (rec, stored) = tokio::try_join!(
            self.sessions.get(session_id),
            self.usage.session(session_id)
        )?;
        let Some(rec) = rec else {
            return Err(Error::SessionNotFound {
                session_id: session_id.to_owned(),
            });
        };
        let owner = Owner {
            session_id: session_id.to_owned(),
            tenant_id: rec.tenant_id.clone(),
            fallback_lease_ms: rec.create_ms,
        };
        if rec.vm_id == vm_id {
            self.final_sample(&owner, Some(&rec), stored.as_ref()).await;
        }
        Ok(self.usage.park(session_id, &rec.tenant_id, vm_id).await?)
    }

    /// [`Ledger::sample_once`] within the final sample's bound: the caller (session-manager)
    /// waits only so long, and then the last stored sample stands.
    async fn final_sample(
        &self,
        owner: &Owner,
        rec: Option<&SessionRecord>,
        stored: Option<&SessionUsage>,
    ) {
        let sample = self.sample_once(owner, rec, stored);
        if tokio::time::timeout(self.final_sample_timeout, sample)
            .await
            .is_err()
        {
            self.metrics.error("final_sample");
            tracing::warn!("final sample timed out; the last stored sample stands");
        }
    }

    /// Best effort: any failure (node gone, VM destroyed, Redis hiccup) leaves the last
    /// stored sample as the final numbers.
    async fn sample_once(
        &self,
        owner: &Owner,
        rec: Option<&SessionRecord>,
        stored: Option<&SessionUsage>,
    ) {
        let (node_id, vm_id) = match (rec, stored) {
            (Some(r), _) if !r.vm_id.is_empty() => (r.node_id.as_str(), r.vm_id.as_str()),
            (_, Some(s)) if !s.vm_id.is_empty() => (s.node_id.as_str(), s.vm_id.as_str()),
            _ => {
                tracing::debug!("session never had a vm; nothing to sample");
                return;
            }
        };
        let result = async {
            let Some(node) = self.registry.get(node_id).await? else {
                tracing::info!(node_id, "node gone; finalizing with the last sample");
                return Ok(());
            };
            let vm = self.clients.get_vm(&node, vm_id).await?;
            if capsa_store::session_of_lease(&vm.lease_id) != owner.session_id {
                tracing::warn!(vm_id, lease = %vm.lease_id, "vm leased to someone else; not sampled");
                return Ok(());
            }
            // The last sample asks the guest whatever its pace was.
            let reading = self.clients.read(&node, &vm, owner, |_| true).await?;
            self.usage.apply_sample(&reading.sample, None).await?;
            self.metrics.sample();
            Ok::<_, Error>(())
        }
        .await;
        match result {
            Ok(()) => {}
            Err(e) if e.is_vm_gone() => {
                tracing::info!(vm_id, "vm gone; finalizing with the last sample");
            }
            Err(e) => {
                self.metrics.error("final_sample");
                tracing::warn!(vm_id, error = %capsa_grpc::error::chain(&e), "final sample failed; finalizing with the last sample");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(check_id("session_id", "sess-1").is_ok());
        for bad in ["", "a b", "a\nb", &"x".repeat(257)] {
            let err = check_id("session_id", bad).unwrap_err();
            assert!(err.to_string().contains("`session_id`"), "{err}");
        }
    }
}
