//! Sessions' egress policies: the default a session gets when its create names none, and
//! GetEgressPolicy / UpdateEgressPolicy. Policies arrive validated (`grpc` converts them).
//!
//! An update is applied on the session's node first (vm-pool's SetEgressPolicy, in force
//! when it returns) and stored only then, so the stored policy is what the node enforces.
//! Updates of one session are serialized by a lock in Redis (held from before the node call
//! until the store) rather than raced: a second update while one is in flight is ABORTED at
//! once, so a tenant has at most one node call in flight per session (its session cap bounds
//! the rest), and whichever update stored last is the one the node applied last. The locked
//! part runs in a task of its own, so a caller that goes away cannot leave the node and the
//! store disagreeing.

use std::sync::Arc;
use std::time::Duration;

use capsa_egress::EgressPolicy;
use capsa_proto::vmpool::v1::SetEgressPolicyRequest;
use capsa_store::{EgressStored, NodeRecord};
use tracing::Instrument as _;

use crate::app::App;
use crate::clients::with_timeout;
use crate::error::Error;

/// Bound of one SetEgressPolicy call on a node.
const SET_EGRESS_TIMEOUT: Duration = Duration::from_secs(10);
/// Outlives an update's node calls (the new policy, then after a failure the old one back)
/// with room to spare, so a live update never loses its lock; a replica that dies holding it
/// blocks that session's updates this long at most.
const EGRESS_LOCK_TTL: Duration = Duration::from_secs(30);

impl App {
    /// The policy of a session created without one: its tenant's default
    /// (`set-tenant-egress`), else the deployment's (`--default-egress`), else no egress.
    pub async fn default_egress(&self, tenant: &str) -> Result<EgressPolicy, Error> {
        if let Some(policy) = self.keys.tenant_egress(tenant).await? {
            return Ok(policy);
        }
        Ok(self
            .config
            .default_egress
            .clone()
            .unwrap_or_else(EgressPolicy::none))
    }

    /// The session's policy as stored: the one its node enforces.
    pub async fn egress_policy(&self, tenant: &str, id: &str) -> Result<EgressPolicy, Error> {
        Ok(self.session(tenant, id).await?.egress)
    }

    /// Replaces an ACTIVE session's policy on its node, then in the store.
    #[tracing::instrument(skip_all, fields(tenant = %tenant, session_id = %id))]
    pub async fn update_egress_policy(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
        policy: EgressPolicy,
    ) -> Result<EgressPolicy, Error> {
        // Tenant first: another tenant's id must not even take the lock.
        self.session(tenant, id).await?;
        let Some(token) = self.sessions.lock_egress(id, EGRESS_LOCK_TTL).await? else {
            return Err(Error::Aborted(format!(
                "another UpdateEgressPolicy of session {id} is in progress; retry when it has \
                 returned"
            )));
        };
        let app = self.clone();
        let (tenant, id) = (tenant.to_string(), id.to_string());
        tokio::spawn(
            async move {
                let updated = app.update_locked(&tenant, &id, &token, policy).await;
                if updated.is_err() {
                    // Storing released it on success; a failed update leaves it to the TTL
                    // only if Redis is down too.
                    if let Err(e) = app.sessions.unlock_egress(&id, &token).await {
                        tracing::warn!(session_id = %id, error = %e, "cannot release egress lock");
                    }
                }
                updated
            }
            .in_current_span(),
        )
        .await
        .map_err(|_| Error::Internal("the egress update task failed".into()))?
    }

    async fn update_locked(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
        token: &str,
        policy: EgressPolicy,
    ) -> Result<EgressPolicy, Error> {
        // Read under the lock: the status, and the policy to put back, are current.
        let target = self.target(tenant, id).await?;
        let (session, node) = (&target.session, &target.node);
        if let Err(err) = self.set_on_node(node, &session.vm_id, &policy).await {
            // The node may have applied it before failing (a timeout): the stored policy goes
            // back so the node enforces what the store says.
            if let Err(e) = self
                .set_on_node(node, &session.vm_id, &session.egress)
                .await
            {
                tracing::warn!(
                    node = %node.node_id,
                    error = %e,
                    "cannot put the stored egress policy back after a failed update"
                );
            }
            return Err(err);
        }
        match self.sessions.set_egress(id, token, &policy).await? {
            EgressStored::Ok(rec) => {
                tracing::info!(node = %node.node_id, "egress policy updated");
                Ok(rec.egress)
            }
            EgressStored::LockLost => {
                tracing::warn!(node = %node.node_id, "egress update outlived its lock");
                Err(Error::Aborted(format!(
                    "the update of session {id} took too long and another may have run since; \
                     send it again"
                )))
            }
            EgressStored::Missing => Err(crate::app::session_not_found(id)),
        }
    }

    /// vm-pool's SetEgressPolicy, bounded; the node's own status comes back with its code.
    async fn set_on_node(
        &self,
        node: &NodeRecord,
        vm_id: &str,
        policy: &EgressPolicy,
    ) -> Result<(), Error> {
        let req = SetEgressPolicyRequest {
            vm_id: vm_id.to_string(),
            egress: Some(capsa_egress::proto::to_proto(policy)),
        };
        let mut client = self.clients.vmpool(&node.vmpool_url)?;
        match tokio::time::timeout(
            SET_EGRESS_TIMEOUT,
            client.set_egress_policy(with_timeout(req, SET_EGRESS_TIMEOUT)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(Error::Upstream(tonic::Status::new(
                status.code(),
                format!(
                    "node {} could not apply the egress policy: {}",
                    node.node_id,
                    status.message()
                ),
            ))),
            Err(_) => Err(Error::Unavailable(format!(
                "node {} did not apply the egress policy within {SET_EGRESS_TIMEOUT:?}",
                node.node_id
            ))),
        }
    }
}
