//! The session record as stored in its hash, and the small enums its fields hold.

use std::collections::BTreeMap;

use capsa_egress::EgressPolicy;

use crate::{Result, StoreError};

/// Where a session is in its life: creating → active → terminating → terminated (creating
/// may skip to terminating), and from active round the suspend loop, active → suspending →
/// suspended → resuming → active (a failed suspend or resume goes back a step). Any state
/// but terminated may move to terminating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionStatus {
    Creating,
    Active,
    /// Its VM is being saved to its node's disk.
    Suspending,
    /// No VM: its state is a snapshot on its node.
    Suspended,
    /// A VM is being restored from its snapshot.
    Resuming,
    Terminating,
    Terminated,
}

impl SessionStatus {
    /// The string stored in Redis.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Creating => "creating",
            SessionStatus::Active => "active",
            SessionStatus::Suspending => "suspending",
            SessionStatus::Suspended => "suspended",
            SessionStatus::Resuming => "resuming",
            SessionStatus::Terminating => "terminating",
            SessionStatus::Terminated => "terminated",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "creating" => SessionStatus::Creating,
            "active" => SessionStatus::Active,
            "suspending" => SessionStatus::Suspending,
            "suspended" => SessionStatus::Suspended,
            "resuming" => SessionStatus::Resuming,
            "terminating" => SessionStatus::Terminating,
            "terminated" => SessionStatus::Terminated,
            _ => return None,
        })
    }

    /// Terminating or terminated.
    pub fn is_ended(self) -> bool {
        matches!(self, SessionStatus::Terminating | SessionStatus::Terminated)
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndReason {
    Deleted,
    Expired,
    VmFailed,
    CreateFailed,
}

impl EndReason {
    /// The string stored in Redis.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Deleted => "deleted",
            EndReason::Expired => "expired",
            EndReason::VmFailed => "vm_failed",
            EndReason::CreateFailed => "create_failed",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "deleted" => EndReason::Deleted,
            "expired" => EndReason::Expired,
            "vm_failed" => EndReason::VmFailed,
            "create_failed" => EndReason::CreateFailed,
            _ => return None,
        })
    }
}

/// One session, as read from `{capsa}:session:<id>`. Times are ms since the Unix epoch on
/// Redis' clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: String,
    pub tenant_id: String,
    pub status: SessionStatus,
    /// Set once terminating.
    pub end_reason: Option<EndReason>,
    pub end_message: String,
    pub template: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Names of the session's env variables. Their values are never stored: they go to the
    /// VM once at creation and may be secrets.
    pub env_names: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    /// Lifetime requested at creation; the deadline is activation + lifetime.
    pub lifetime_ms: i64,
    pub create_ms: i64,
    /// Set once active.
    pub expire_ms: Option<i64>,
    pub last_active_ms: i64,
    /// Set once terminated.
    pub end_ms: Option<i64>,
    /// Set once active.
    pub node_id: String,
    pub vm_id: String,
    /// The egress policy in force: the one given or defaulted at creation, then the last
    /// one applied on the node by an update. A record written before policies existed
    /// reads as [`EgressPolicy::none`] (its VM had no network).
    pub egress: EgressPolicy,
    /// At its deadline an active session is suspended instead of ended (and then kept for
    /// the operator's suspended retention).
    pub auto_suspend: bool,
    /// Execute and file calls on a suspended session resume it first.
    pub auto_resume: bool,
    /// How many suspends it began: the n-th writes snapshot `s<n>-<id>`, and the resume
    /// after it leases its VM as [`SessionRecord::resume_lease_id`].
    pub suspend_gen: u32,
    /// Set while suspending (the snapshot being written), suspended and resuming.
    pub snapshot_id: String,
    /// Bytes of that snapshot on its node's disk, once written.
    pub snapshot_bytes: u64,
    /// When it was last suspended.
    pub suspend_ms: Option<i64>,
    /// When it was last resumed (on a new VM).
    pub resume_ms: Option<i64>,
    /// The suspend came from its deadline (auto_suspend): the resume gives it a new lifetime.
    pub suspended_at_deadline: bool,
    /// The snapshot it was created from, if any.
    pub source_snapshot_id: String,
    /// The session it was forked from, if any.
    pub parent_session_id: String,
}

/// The session a vm-pool lease id belongs to: a session's first VM is leased under its id,
/// the VM of its n-th resume under `<id>/<n>`.
pub fn session_of_lease(lease_id: &str) -> &str {
    lease_id.split_once('/').map_or(lease_id, |(id, _)| id)
}

impl SessionRecord {
    /// Builds a record from HGETALL's flat field/value list.
    pub(crate) fn from_pairs(key: &str, flat: &[String]) -> Result<Self> {
        let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
        for pair in flat.chunks_exact(2) {
            fields.insert(pair[0].as_str(), pair[1].as_str());
        }
        let corrupt = |reason: String| StoreError::Corrupt {
            key: key.to_string(),
            reason,
        };
        let text = |name: &str| fields.get(name).copied().unwrap_or_default().to_string();
        let int = |name: &str| -> Result<Option<i64>> {
            match fields.get(name) {
                None | Some(&"") => Ok(None),
                Some(v) => v
                    .parse()
                    .map(Some)
                    .map_err(|_| corrupt(format!("{name} is {v:?}"))),
            }
        };
        let map = |name: &str| -> Result<BTreeMap<String, String>> {
            match fields.get(name) {
                None | Some(&"") => Ok(BTreeMap::new()),
                Some(v) => serde_json::from_str(v).map_err(|e| corrupt(format!("{name}: {e}"))),
            }
        };
        let status_raw = text("status");
        let status = SessionStatus::parse(&status_raw)
            .ok_or_else(|| corrupt(format!("status is {status_raw:?}")))?;
        let end_reason = match fields.get("end_reason") {
            None | Some(&"") => None,
            Some(v) => {
                Some(EndReason::parse(v).ok_or_else(|| corrupt(format!("end_reason is {v:?}")))?)
            }
        };
        let small = |name: &str| -> Result<u32> {
            let v = int(name)?.unwrap_or(0);
            u32::try_from(v).map_err(|_| corrupt(format!("{name} is {v}")))
        };
        Ok(SessionRecord {
            id: text("id"),
            tenant_id: text("tenant"),
            status,
            end_reason,
            end_message: text("end_message"),
            template: text("template"),
            vcpus: small("vcpus")?,
            memory_mib: small("memory_mib")?,
            env_names: match fields.get("env_names") {
                None | Some(&"") => Vec::new(),
                Some(v) => {
                    serde_json::from_str(v).map_err(|e| corrupt(format!("env_names: {e}")))?
                }
            },
            metadata: map("metadata")?,
            lifetime_ms: int("lifetime_ms")?.unwrap_or(0),
            create_ms: int("create_ms")?.unwrap_or(0),
            expire_ms: int("expire_ms")?,
            last_active_ms: int("last_active_ms")?.unwrap_or(0),
            end_ms: int("end_ms")?,
            node_id: text("node_id"),
            vm_id: text("vm_id"),
            egress: match fields.get("egress") {
                None | Some(&"") => EgressPolicy::none(),
                Some(v) => serde_json::from_str(v).map_err(|e| corrupt(format!("egress: {e}")))?,
            },
            auto_suspend: text("auto_suspend") == "1",
            auto_resume: text("auto_resume") == "1",
            suspend_gen: small("suspend_gen")?,
            snapshot_id: text("snapshot_id"),
            snapshot_bytes: int("snapshot_bytes")?.unwrap_or(0).max(0) as u64,
            suspend_ms: int("suspend_ms")?,
            resume_ms: int("resume_ms")?,
            suspended_at_deadline: text("suspended_at_deadline") == "1",
            source_snapshot_id: text("source_snapshot_id"),
            parent_session_id: text("parent_session_id"),
        })
    }

    /// The lease id of the VM a resume of this session restores: `<id>/<n>` after its n-th
    /// suspend (its first VM was leased as `<id>`), so no lease id is ever used twice.
    pub fn resume_lease_id(&self) -> String {
        format!("{}/{}", self.id, self.suspend_gen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(pairs: &[(&str, &str)]) -> Vec<String> {
        pairs
            .iter()
            .flat_map(|(k, v)| [k.to_string(), v.to_string()])
            .collect()
    }

    #[test]
    fn parses_a_stored_hash() {
        let rec = SessionRecord::from_pairs(
            "k",
            &flat(&[
                ("id", "s1"),
                ("tenant", "t"),
                ("status", "terminating"),
                ("end_reason", "vm_failed"),
                ("vcpus", "2"),
                ("env_names", r#"["A"]"#),
                ("create_ms", "1000"),
                ("expire_ms", "2000"),
            ]),
        )
        .unwrap();
        assert_eq!(rec.status, SessionStatus::Terminating);
        assert_eq!(rec.end_reason, Some(EndReason::VmFailed));
        assert_eq!(rec.vcpus, 2);
        assert_eq!(rec.env_names, ["A"]);
        assert_eq!(rec.expire_ms, Some(2000));
        assert_eq!(rec.end_ms, None);
        assert_eq!(rec.egress, EgressPolicy::none(), "no field: no egress");
    }

    #[test]
    fn parses_the_stored_egress_policy_and_rejects_a_corrupt_one() {
        let policy = capsa_egress::EgressPolicy::from_input(capsa_egress::PolicyInput {
            allowed_domains: vec!["*.example.com".into()],
            allow_https: Some(false),
            ..Default::default()
        })
        .unwrap();
        let json = serde_json::to_string(&policy).unwrap();
        let rec = SessionRecord::from_pairs(
            "k",
            &flat(&[("status", "active"), ("egress", json.as_str())]),
        )
        .unwrap();
        assert_eq!(rec.egress, policy);
        let bad = r#"{"deny_all":false,"allow_package_managers":false,"allow_http":true,"allow_https":true,"allowed_domains":["a..b"],"allowed_cidrs":[]}"#;
        let err = SessionRecord::from_pairs("k", &flat(&[("status", "active"), ("egress", bad)]))
            .unwrap_err();
        assert!(err.to_string().contains("egress"), "{err}");
    }

    #[test]
    fn lease_ids_name_their_session() {
        assert_eq!(session_of_lease("abc"), "abc");
        assert_eq!(session_of_lease("abc/3"), "abc");
        let rec = SessionRecord::from_pairs(
            "k",
            &flat(&[("id", "abc"), ("status", "suspended"), ("suspend_gen", "3")]),
        )
        .unwrap();
        assert_eq!(rec.resume_lease_id(), "abc/3");
        assert_eq!(session_of_lease(&rec.resume_lease_id()), "abc");
        for status in ["suspending", "suspended", "resuming"] {
            let rec = SessionRecord::from_pairs("k", &flat(&[("status", status)])).unwrap();
            assert_eq!(rec.status.as_str(), status);
            assert!(!rec.status.is_ended());
        }
    }

    #[test]
    fn rejects_unknown_status() {
        let err = SessionRecord::from_pairs("k", &flat(&[("status", "zombie")])).unwrap_err();
        assert!(err.to_string().contains("status"), "{err}");
    }
}
