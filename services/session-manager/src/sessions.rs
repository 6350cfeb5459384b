//! Session lifecycle calls: create (place on a node, acquire a VM, activate, configure),
//! get, list, delete, extend, and usage. Every call is scoped to the caller's tenant: a
//! session of another tenant is NOT_FOUND, exactly like one that does not exist.

use std::sync::Arc;
use std::time::Duration;

use capsa_proto::common::v1::Usage;
use capsa_proto::executor::v1::ConfigureVmRequest;
use capsa_proto::metering::v1::{GetSessionUsageRequest, GetTenantUsageRequest};
use capsa_proto::vmpool::v1::{AcquireVmRequest, ResumeVmRequest};
use capsa_store::{
    Created, Cursor, EndReason, Extended, ListFilter, NewSession, NodeRecord, SessionRecord,
    SessionStatus, Transition,
};
use tracing::Instrument as _;

use crate::app::App;
use crate::clients::with_timeout;
use crate::error::Error;
use crate::validate::CreateSpec;

const CONFIGURE_TIMEOUT: Duration = Duration::from_secs(30);
const USAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a new session's VM comes from.
pub(crate) enum Origin {
    /// A VM of the pool (warm, or booted for it).
    Fresh,
    /// A restore of the tenant's READY snapshot.
    Snapshot(capsa_store::SnapshotRecord),
    /// A restore of a fork's snapshot of session `parent`.
    Fork {
        snap: capsa_store::SnapshotRecord,
        parent: String,
    },
}

/// Usage numbers of a tenant, with its session counts.
pub struct TenantUsage {
    pub total: Option<Usage>,
    pub active_sessions: u32,
    pub total_sessions: u64,
    pub snapshots: capsa_store::Meter,
    pub snapshot_limits: capsa_store::SnapshotLimits,
}

impl App {
    /// The live node of session `rec`.
    pub(crate) async fn session_node(&self, rec: &SessionRecord) -> Result<NodeRecord, Error> {
        self.nodes
            .get(&rec.node_id)
            .await?
            .ok_or_else(|| node_not_heartbeating(rec))
    }

    /// [`App::create_session`] in a task of its own, so the creation finishes or rolls back
    /// whatever the caller does. A caller that goes away first (its deadline, a disconnect)
    /// never learnt the session's id: the session is ended CREATE_FAILED and its VM released,
    /// instead of a CREATING session holding the tenant's quota and a leased VM until the
    /// creation bound, or an ACTIVE one nobody knows of.
    pub async fn create_session_for_caller(
        self: &Arc<Self>,
        tenant: &str,
        spec: CreateSpec,
    ) -> Result<SessionRecord, Error> {
        let (answer, caller) = tokio::sync::oneshot::channel();
        let app = self.clone();
        let tenant = tenant.to_string();
        tokio::spawn(
            async move {
                let created = app.create_session(&tenant, spec).await;
                if let Err(Ok(rec)) = answer.send(created) {
                    app.abandon_create(rec).await;
                }
            }
            .in_current_span(),
        );
        caller
            .await
            .map_err(|_| Error::Internal("the session creation task failed".into()))?
    }

    /// Ends a session created for a caller that went away before the answer.
    async fn abandon_create(&self, rec: SessionRecord) {
        tracing::warn!(session_id = %rec.id, "caller went away during create; rolling back");
        match self
            .sessions
            .begin_end(
                &rec.id,
                EndReason::CreateFailed,
                "the caller went away before the create finished",
                None,
            )
            .await
        {
            Ok(Transition::Won(rec)) => {
                let _ = self.teardown(rec).await;
            }
            Ok(_) => {}
            // The session keeps its lifetime; the reaper ends it then.
            Err(e) => tracing::warn!(session_id = %rec.id, error = %e, "cannot roll back create"),
        }
    }

    /// Creates a session and returns it ACTIVE, or ends it CREATE_FAILED and says why.
    #[tracing::instrument(skip_all, fields(tenant = %tenant, session_id))]
    pub async fn create_session(
        &self,
        tenant: &str,
        mut spec: CreateSpec,
    ) -> Result<SessionRecord, Error> {
        self.take_create_token(tenant).await?;
        let origin = match spec.snapshot_id.take() {
            None => Origin::Fresh,
            Some(id) => Origin::Snapshot(self.template_snapshot(tenant, &id, &mut spec).await?),
        };
        self.create_from(tenant, spec, origin).await
    }

    /// The tenant's create rate limit: RESOURCE_EXHAUSTED with the wait when it is spent.
    pub(crate) async fn take_create_token(&self, tenant: &str) -> Result<(), Error> {
        if let Some(throttled) = self
            .keys
            .take_create_token(
                tenant,
                self.config.create_rate_per_sec,
                self.config.create_burst,
            )
            .await?
        {
            return Err(Error::RateLimited(
                format!(
                    "tenant {tenant} is creating sessions faster than its limit ({} per second, bursts of {}); retry in {} ms",
                    throttled.per_sec,
                    throttled.burst,
                    throttled.retry_after.as_millis()
                ),
                throttled.retry_after,
            ));
        }
        Ok(())
    }

    /// Creates a session from `origin` (a fresh VM, a snapshot, a fork's snapshot); the
    /// rate limit was taken.
    pub(crate) async fn create_from(
        &self,
        tenant: &str,
        spec: CreateSpec,
        origin: Origin,
    ) -> Result<SessionRecord, Error> {
        // Refused before anything is stored: an unknown template, or a snapshot whose node
        // is gone, leaves no record behind.
        let nodes = match &origin {
            Origin::Fresh => self.nodes_offering(&spec.template).await?,
            Origin::Snapshot(snap) | Origin::Fork { snap, .. } => {
                vec![self.snapshot_node(snap).await?]
            }
        };
        let egress = match spec.egress.clone() {
            Some(policy) => policy,
            None => self.default_egress(tenant).await?,
        };
        let id = uuid::Uuid::new_v4().simple().to_string();
        tracing::Span::current().record("session_id", id.as_str());
        let new = NewSession {
            id: id.clone(),
            tenant_id: tenant.to_string(),
            template: spec.template.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            env_names: env_names(&origin, &spec),
            metadata: spec.metadata.clone(),
            lifetime: spec.lifetime,
            egress: egress.clone(),
            auto_suspend: spec.auto_suspend,
            auto_resume: spec.auto_resume,
            source_snapshot_id: match &origin {
                Origin::Snapshot(snap) => snap.id.clone(),
                _ => String::new(),
            },
            parent_session_id: match &origin {
                Origin::Fork { parent, .. } => parent.clone(),
                _ => String::new(),
            },
        };
        match self
            .sessions
            .create(&new, self.config.max_sessions_per_tenant)
            .await?
        {
            Created::Ok(_) => {}
            Created::QuotaExceeded { limit } => {
                return Err(Error::ResourceExhausted(format!(
                    "tenant {tenant} already has its limit of {limit} concurrent sessions"
                )));
            }
            Created::IdTaken => return Err(Error::Internal(format!("session id {id} collided"))),
        }
        let wanted = crate::placement::Wanted {
            template: &spec.template,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
        };
        let node = match &origin {
            Origin::Fresh => match crate::placement::place(nodes, wanted) {
                Ok(node) => node,
                Err(err) => return Err(self.fail_create(&id, err).await),
            },
            // The snapshot's files are on its node alone.
            _ => nodes.into_iter().next().expect("the snapshot's node"),
        };
        // In force on the node before the VM is handed over, so before this returns.
        let egress_proto = Some(capsa_egress::proto::to_proto(&egress));
        let timeout = match &origin {
            Origin::Fresh => self.config.acquire_timeout(),
            _ => self.config.suspend_timeout(),
        };
        let acquired = async {
            let mut client = self.clients.vmpool(&node.vmpool_url)?;
            let answer = match &origin {
                Origin::Fresh => {
                    let acquire = AcquireVmRequest {
                        template: spec.template.clone(),
                        vcpus: spec.vcpus,
                        memory_mib: spec.memory_mib,
                        lease_id: id.clone(),
                        egress: egress_proto,
                    };
                    tokio::time::timeout(timeout, client.acquire_vm(with_timeout(acquire, timeout)))
                        .await
                        .map(|r| r.map(|resp| resp.into_inner().vm))
                }
                Origin::Snapshot(snap) | Origin::Fork { snap, .. } => {
                    let resume = ResumeVmRequest {
                        snapshot_id: snap.id.clone(),
                        lease_id: id.clone(),
                        egress: egress_proto,
                    };
                    tokio::time::timeout(timeout, client.resume_vm(with_timeout(resume, timeout)))
                        .await
                        .map(|r| r.map(|resp| resp.into_inner().vm))
                }
            };
            match answer {
                Ok(Ok(vm)) => vm.ok_or_else(|| Error::Unavailable("vm-pool returned no vm".into())),
                Ok(Err(status)) => Err(Error::Unavailable(format!(
                    "node {} could not provide a vm: {}",
                    node.node_id,
                    status.message()
                ))),
                Err(_) => Err(Error::Unavailable(format!(
                    "node {} did not provide a vm within {timeout:?}",
                    node.node_id
                ))),
            }
        }
        .instrument(tracing::info_span!("acquire_vm", node = %node.node_id))
        .await;
        let vm = match acquired {
            Ok(vm) => vm,
            Err(err) => return Err(self.fail_create(&id, err).await),
        };
        let rec = match self
            .sessions
            .activate(
                &id,
                &node.node_id,
                &capsa_store::VmShape {
                    id: &vm.id,
                    vcpus: vm.vcpus,
                    memory_mib: vm.memory_mib,
                },
            )
            .await?
        {
            Transition::Won(rec) => rec,
            Transition::Conflict(rec) => {
                // Ended meanwhile (deleted, or reaped): the VM is ours alone to give back.
                self.release_vm(&node.node_id, &vm.id).await;
                return Err(Error::FailedPrecondition(format!(
                    "session {id} was ended while it was being created: {}",
                    describe_end(&rec)
                )));
            }
            Transition::Missing => {
                self.release_vm(&node.node_id, &vm.id).await;
                return Err(Error::Internal(format!(
                    "session {id} vanished while creating"
                )));
            }
        };
        if !spec.env.is_empty() {
            let req = ConfigureVmRequest {
                vm_id: vm.id.clone(),
                env: spec.env.into_iter().collect(),
            };
            let configured = async {
                let mut client = self.clients.executor(&node.executor_url)?;
                match tokio::time::timeout(
                    CONFIGURE_TIMEOUT,
                    client.configure_vm(with_timeout(req, CONFIGURE_TIMEOUT)),
                )
                .await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(status)) => Err(Error::Unavailable(format!(
                        "node {} could not configure the vm: {}",
                        node.node_id,
                        status.message()
                    ))),
                    Err(_) => Err(Error::Unavailable(format!(
                        "node {} did not configure the vm within {CONFIGURE_TIMEOUT:?}",
                        node.node_id
                    ))),
                }
            }
            .await;
            if let Err(err) = configured {
                if let Transition::Won(rec) = self
                    .sessions
                    .begin_end(&id, EndReason::CreateFailed, &err.to_string(), None)
                    .await?
                {
                    let _ = self.teardown(rec).await;
                }
                return Err(err);
            }
        }
        tracing::info!(node = %node.node_id, vm = %vm.id, "session active");
        Ok(rec)
    }

    /// The live nodes that can boot `template`; INVALID_ARGUMENT when nodes are up but none
    /// offers it, UNAVAILABLE when no node is up at all.
    async fn nodes_offering(&self, template: &str) -> Result<Vec<NodeRecord>, Error> {
        let nodes = self.nodes.live_nodes().await?;
        if nodes.is_empty() {
            return Err(Error::Unavailable(
                "no node is registered to run sessions".into(),
            ));
        }
        let mut offered: Vec<&str> = nodes
            .iter()
            .flat_map(|n| n.templates.iter().map(String::as_str))
            .collect();
        offered.sort_unstable();
        offered.dedup();
        if !offered.contains(&template) {
            return Err(Error::field(
                "template",
                format!(
                    "{template:?} is not offered by any node (offered: {})",
                    offered.join(", ")
                ),
            ));
        }
        Ok(nodes
            .into_iter()
            .filter(|n| n.templates.iter().any(|t| t == template))
            .collect())
    }

    /// Ends a session that never got a VM as CREATE_FAILED; returns `err` for the client.
    async fn fail_create(&self, id: &str, err: Error) -> Error {
        let message = err.to_string();
        tracing::warn!(session_id = id, error = %message, "create failed");
        match self
            .sessions
            .begin_end(id, EndReason::CreateFailed, &message, None)
            .await
        {
            Ok(Transition::Won(_)) => {
                if let Err(e) = self.sessions.finish_end(id, "").await {
                    tracing::warn!(session_id = id, error = %e, "cannot finish failed create");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(session_id = id, error = %e, "cannot end failed create"),
        }
        err
    }

    /// The tenant's session, or NOT_FOUND (also for another tenant's).
    pub async fn session(&self, tenant: &str, id: &str) -> Result<SessionRecord, Error> {
        match self.sessions.get(id).await? {
            Some(rec) if rec.tenant_id == tenant => Ok(rec),
            _ => Err(crate::app::session_not_found(id)),
        }
    }

    pub async fn list_sessions(
        &self,
        tenant: &str,
        filter: &ListFilter,
        page_size: usize,
        after: Option<&Cursor>,
    ) -> Result<(Vec<SessionRecord>, Option<Cursor>), Error> {
        let page = self.sessions.list(tenant, filter, page_size, after).await?;
        Ok((page.sessions, page.next))
    }

    /// Ends the session (idempotent: an ended session comes back as it is).
    #[tracing::instrument(skip_all, fields(tenant = %tenant, session_id = %id))]
    pub async fn delete_session(&self, tenant: &str, id: &str) -> Result<SessionRecord, Error> {
        let rec = self.session(tenant, id).await?;
        if rec.status.is_ended() {
            return Ok(rec);
        }
        match self
            .sessions
            .begin_end(id, EndReason::Deleted, "deleted by the client", None)
            .await?
        {
            Transition::Won(rec) => {
                // The teardown runs inline so the reply shows TERMINATED; if it fails the
                // session stays TERMINATING and the reaper finishes it after the claim.
                let _ = self.teardown(rec).await;
            }
            Transition::Conflict(_) | Transition::Missing => {}
        }
        self.session(tenant, id).await
    }

    pub async fn extend_session(
        &self,
        tenant: &str,
        id: &str,
        by: Duration,
    ) -> Result<SessionRecord, Error> {
        self.session(tenant, id).await?;
        match self.sessions.extend(id, by).await? {
            Extended::Ok(rec) => Ok(rec),
            Extended::NotActive(rec) => Err(not_active(&rec)),
            Extended::TooLong { max_extend_ms } => Err(Error::field(
                "extend_by",
                format!(
                    "would take the session past its 24 h total lifetime; at most {}s more is allowed",
                    max_extend_ms / 1000
                ),
            )),
            Extended::Missing => Err(crate::app::session_not_found(id)),
        }
    }

    pub async fn session_usage(&self, tenant: &str, id: &str) -> Result<Option<Usage>, Error> {
        self.session(tenant, id).await?;
        let mut client = self.clients.metering()?;
        let req = GetSessionUsageRequest {
            session_id: id.to_string(),
        };
        let resp = tokio::time::timeout(USAGE_TIMEOUT, client.get_session_usage(req))
            .await
            .map_err(|_| Error::Unavailable("metering did not answer in time".into()))?
            .map_err(Error::Upstream)?;
        Ok(resp.into_inner().usage)
    }

    pub async fn tenant_usage(&self, tenant: &str) -> Result<TenantUsage, Error> {
        let (active_sessions, total_sessions) = self.sessions.counts(tenant).await?;
        let mut client = self.clients.metering()?;
        let req = GetTenantUsageRequest {
            tenant_id: tenant.to_string(),
        };
        let resp = tokio::time::timeout(USAGE_TIMEOUT, client.get_tenant_usage(req))
            .await
            .map_err(|_| Error::Unavailable("metering did not answer in time".into()))?
            .map_err(Error::Upstream)?;
        let meter = self.snapshots.meter(tenant).await?;
        let limits = self
            .snapshots
            .limits(tenant, self.snapshot_limits())
            .await?;
        Ok(TenantUsage {
            total: resp.into_inner().total,
            active_sessions,
            total_sessions,
            snapshots: meter,
            snapshot_limits: limits,
        })
    }
}

/// UNAVAILABLE for a call on `rec` whose node is not heartbeating (stalled, CPU-starved,
/// or its record expired while Redis restarted): that is not a lost VM, so the caller may
/// try again, and the reconciler asks the node before it ends any session.
pub fn node_not_heartbeating(rec: &SessionRecord) -> Error {
    Error::Unavailable(format!(
        "node {} of session {} is not heartbeating; try again",
        rec.node_id, rec.id
    ))
}

/// FAILED_PRECONDITION for a session that is not ACTIVE, naming its status and end.
pub fn not_active(rec: &SessionRecord) -> Error {
    match rec.status {
        SessionStatus::Creating => {
            Error::FailedPrecondition(format!("session {} is CREATING, not ACTIVE", rec.id))
        }
        SessionStatus::Suspending | SessionStatus::Suspended | SessionStatus::Resuming => {
            Error::FailedPrecondition(format!(
                "session {} is {}, not ACTIVE: ResumeSession brings it back (a session \
                 created with auto_resume is resumed by Execute and the file calls)",
                rec.id,
                rec.status.as_str().to_uppercase()
            ))
        }
        _ => Error::FailedPrecondition(format!(
            "session {} is {}, not ACTIVE: {}",
            rec.id,
            rec.status.as_str().to_uppercase(),
            describe_end(rec)
        )),
    }
}

/// "ended: EXPIRED (the session lifetime ran out)".
pub fn describe_end(rec: &SessionRecord) -> String {
    let reason = rec
        .end_reason
        .map(|r| r.as_str().to_uppercase())
        .unwrap_or_default();
    if rec.end_message.is_empty() {
        format!("ended: {reason}")
    } else {
        format!("ended: {reason} ({})", rec.end_message)
    }
}

/// The env names a new session lists: those of the session a snapshot or fork was taken
/// of (their values are in the restored memory) and those the request sets.
fn env_names(origin: &Origin, spec: &CreateSpec) -> Vec<String> {
    let inherited = match origin {
        Origin::Fresh => &[][..],
        Origin::Snapshot(snap) | Origin::Fork { snap, .. } => &snap.env_names[..],
    };
    let mut names: Vec<String> = inherited.iter().chain(spec.env.keys()).cloned().collect();
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_session_lists_its_snapshots_env_names_and_its_own() {
        let snap = capsa_store::SnapshotRecord {
            env_names: vec!["TOKEN".into(), "REGION".into()],
            ..test_snapshot()
        };
        let spec = spec_with_env(&[("REGION", "eu"), ("DEBUG", "1")]);
        assert_eq!(
            env_names(&Origin::Snapshot(snap.clone()), &spec),
            ["DEBUG", "REGION", "TOKEN"]
        );
        assert_eq!(
            env_names(
                &Origin::Fork {
                    snap,
                    parent: "p".into()
                },
                &spec_with_env(&[])
            ),
            ["REGION", "TOKEN"]
        );
        assert_eq!(env_names(&Origin::Fresh, &spec), ["DEBUG", "REGION"]);
    }

    fn spec_with_env(env: &[(&str, &str)]) -> CreateSpec {
        let request = capsa_proto::session::v1::CreateSessionRequest {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        crate::validate::create(&request).expect("a valid request")
    }

    fn test_snapshot() -> capsa_store::SnapshotRecord {
        capsa_store::SnapshotRecord {
            id: "snap-1".into(),
            tenant_id: "t".into(),
            kind: capsa_store::SnapshotKind::Named,
            name: "n".into(),
            status: capsa_store::SnapshotStatus::Ready,
            session_id: "s".into(),
            node_id: "node".into(),
            template: "default".into(),
            vcpus: 1,
            memory_mib: 512,
            metadata: Default::default(),
            env_names: Vec::new(),
            size_bytes: 0,
            create_ms: 0,
        }
    }
}
