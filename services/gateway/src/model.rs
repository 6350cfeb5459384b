//! InstaVM's request and response bodies, and their translation to and from Capsa's
//! messages. Names follow the `instavm` SDK (0.26); a VM is a session here, so `vm_id` is
//! the session id wherever it appears.

use std::collections::HashMap;
use std::time::Duration;

use capsa_proto::common::v1 as common;
use capsa_proto::common::v1::{CompletionStatus, Language, execute_event::Event};
use capsa_proto::session::v1 as pb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;

/// `POST /v1/sessions/session` and `POST /v1/vms`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CreateSessionBody {
    /// The API key, when not in the `X-API-Key` header.
    pub api_key: Option<String>,
    /// Lifetime of the session (10 s to 24 h); 300 s when absent.
    pub vm_lifetime_seconds: Option<u64>,
    /// vCPUs (1 to 8).
    pub vcpu_count: Option<u32>,
    /// Memory in MiB (128 to 8192).
    pub memory_mb: Option<u32>,
    /// Environment of every kernel; non-string values are sent as their JSON text.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub env: HashMap<String, serde_json::Value>,
    /// Labels; non-string values are sent as their JSON text.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub metadata: HashMap<String, serde_json::Value>,
    /// Start from this snapshot (`POST /v1/vms/{id}/snapshot`) instead of a fresh VM: its
    /// memory, files and packages, its template, vCPUs and memory.
    pub snapshot_id: Option<String>,
    /// At its deadline the VM is suspended instead of ended (see `/v1/vms/{id}/resume`).
    pub auto_suspend: Option<bool>,
    /// Executes and file calls resume a suspended VM first.
    pub auto_resume: Option<bool>,
}

fn text(value: serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s,
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

impl CreateSessionBody {
    pub fn to_request(self) -> pb::CreateSessionRequest {
        pb::CreateSessionRequest {
            vcpus: self.vcpu_count.unwrap_or(0),
            memory_mib: self.memory_mb.unwrap_or(0),
            lifetime: lifetime(self.vm_lifetime_seconds),
            env: self.env.into_iter().map(|(k, v)| (k, text(v))).collect(),
            metadata: labels(self.metadata),
            snapshot_id: self.snapshot_id.unwrap_or_default(),
            auto_suspend: self.auto_suspend.unwrap_or(false),
            auto_resume: self.auto_resume.unwrap_or(false),
            ..Default::default()
        }
    }
}

/// Labels as Capsa keeps them: non-string values as their JSON text.
fn labels(map: HashMap<String, serde_json::Value>) -> HashMap<String, String> {
    map.into_iter().map(|(k, v)| (k, text(v))).collect()
}

fn lifetime(seconds: Option<u64>) -> Option<prost_types::Duration> {
    seconds.map(|s| prost_types::Duration {
        seconds: i64::try_from(s).unwrap_or(i64::MAX),
        nanos: 0,
    })
}

/// A session as InstaVM shows one.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    pub session_id: String,
    /// The same as `session_id`: a VM is addressed by its session.
    pub vm_id: String,
    /// `creating`, `active`, `suspending`, `suspended`, `resuming`, `terminating` or
    /// `terminated`.
    pub status: String,
    pub vcpu_count: u32,
    pub memory_mb: u32,
    pub template: String,
    pub metadata: HashMap<String, String>,
    /// Names of the environment variables set at creation (never their values).
    pub env_names: Vec<String>,
    pub created_at: Option<String>,
    pub expires_at: Option<String>,
    pub last_active_at: Option<String>,
    pub ended_at: Option<String>,
    /// Why it ended: `deleted`, `expired`, `vm_failed`, `create_failed`.
    pub end_reason: Option<String>,
    pub end_message: Option<String>,
    /// At its deadline it is suspended instead of ended.
    pub auto_suspend: bool,
    /// Executes and file calls resume it when suspended.
    pub auto_resume: bool,
    /// When it was last suspended.
    pub suspended_at: Option<String>,
    /// The snapshot it was created from (`snapshot_id` at creation), if any.
    pub source_snapshot_id: Option<String>,
    /// The VM it was cloned from (`POST /v1/vms/{id}/clone`), if any.
    pub parent_vm_id: Option<String>,
}

pub fn status_name(status: i32) -> &'static str {
    match pb::SessionStatus::try_from(status) {
        Ok(pb::SessionStatus::Creating) => "creating",
        Ok(pb::SessionStatus::Active) => "active",
        Ok(pb::SessionStatus::Terminating) => "terminating",
        Ok(pb::SessionStatus::Terminated) => "terminated",
        Ok(pb::SessionStatus::Suspending) => "suspending",
        Ok(pb::SessionStatus::Suspended) => "suspended",
        Ok(pb::SessionStatus::Resuming) => "resuming",
        _ => "unknown",
    }
}

fn end_reason_name(reason: i32) -> Option<&'static str> {
    match pb::EndReason::try_from(reason) {
        Ok(pb::EndReason::Deleted) => Some("deleted"),
        Ok(pb::EndReason::Expired) => Some("expired"),
        Ok(pb::EndReason::VmFailed) => Some("vm_failed"),
        Ok(pb::EndReason::CreateFailed) => Some("create_failed"),
        _ => None,
    }
}

fn time(t: &Option<prost_types::Timestamp>) -> Option<String> {
    // prost's Display is RFC 3339.
    t.as_ref().map(ToString::to_string)
}

fn seconds(d: &Option<prost_types::Duration>) -> f64 {
    d.as_ref()
        .and_then(capsa_proto::time::from_duration)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl From<pb::Session> for SessionView {
    fn from(s: pb::Session) -> Self {
        SessionView {
            vm_id: s.id.clone(),
            session_id: s.id,
            status: status_name(s.status).to_owned(),
            vcpu_count: s.vcpus,
            memory_mb: s.memory_mib,
            template: s.template,
            metadata: s.metadata.into_iter().collect(),
            env_names: s.env_names,
            created_at: time(&s.create_time),
            expires_at: time(&s.expire_time),
            last_active_at: time(&s.last_active_time),
            ended_at: time(&s.end_time),
            end_reason: end_reason_name(s.end_reason).map(str::to_owned),
            end_message: non_empty(s.end_message),
            auto_suspend: s.auto_suspend,
            auto_resume: s.auto_resume,
            suspended_at: time(&s.suspend_time),
            source_snapshot_id: non_empty(s.source_snapshot_id),
            parent_vm_id: non_empty(s.parent_session_id),
        }
    }
}

fn non_empty(s: String) -> Option<String> {
    Some(s).filter(|s| !s.is_empty())
}

/// `POST /v1/vms/{id}/snapshot`. Other fields the SDK may send are ignored.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct SnapshotBody {
    /// 1 to 128 characters, no control characters; need not be unique. `"snapshot"` when
    /// absent (the SDK's `name` is optional).
    pub name: Option<String>,
    /// Labels; non-string values are sent as their JSON text.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub metadata: HashMap<String, serde_json::Value>,
}

/// The name of a snapshot taken without one.
pub const DEFAULT_SNAPSHOT_NAME: &str = "snapshot";

impl SnapshotBody {
    pub fn to_request(self, session_id: String) -> pb::SnapshotSessionRequest {
        pb::SnapshotSessionRequest {
            session_id,
            // Absent means the default; a given name (even empty) goes as it is, so a bad
            // one is session-manager's 422 naming `name`.
            name: self
                .name
                .unwrap_or_else(|| DEFAULT_SNAPSHOT_NAME.to_owned()),
            metadata: labels(self.metadata),
        }
    }
}

/// `POST /v1/vms/{id}/clone`: one new VM from the running one's state at this moment.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CloneBody {
    /// Accepted and ignored: a clone is made directly, not through a kept snapshot (take
    /// one with `POST /v1/vms/{id}/snapshot`).
    pub snapshot_name: Option<String>,
    /// The clone's lifetime (10 s to 24 h); the source VM's when absent.
    pub vm_lifetime_seconds: Option<u64>,
    /// The clone's labels; the source VM's when absent or empty.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub metadata: HashMap<String, serde_json::Value>,
}

impl CloneBody {
    pub fn to_request(self, session_id: String) -> pb::ForkSessionRequest {
        pb::ForkSessionRequest {
            session_id,
            count: 1,
            lifetime: lifetime(self.vm_lifetime_seconds),
            metadata: labels(self.metadata),
        }
    }
}

/// A snapshot: a VM's saved memory, files and packages, which new VMs start from
/// (`POST /v1/vms` with `snapshot_id`).
#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotView {
    /// `snap-` and 32 hex digits.
    pub id: String,
    /// The same as `id`.
    pub snapshot_id: String,
    pub name: String,
    /// `creating` or `ready`.
    pub status: String,
    /// The VM (session) it was taken of.
    pub vm_id: String,
    pub template: String,
    pub vcpu_count: u32,
    pub memory_mb: u32,
    /// Bytes on disk, once ready.
    pub size_bytes: u64,
    pub created_at: Option<String>,
    pub metadata: HashMap<String, String>,
}

pub fn snapshot_status_name(status: i32) -> &'static str {
    match pb::SnapshotStatus::try_from(status) {
        Ok(pb::SnapshotStatus::Creating) => "creating",
        Ok(pb::SnapshotStatus::Ready) => "ready",
        _ => "unknown",
    }
}

impl From<pb::Snapshot> for SnapshotView {
    fn from(s: pb::Snapshot) -> Self {
        SnapshotView {
            snapshot_id: s.id.clone(),
            id: s.id,
            name: s.name,
            status: snapshot_status_name(s.status).to_owned(),
            vm_id: s.session_id,
            template: s.template,
            vcpu_count: s.vcpus,
            memory_mb: s.memory_mib,
            size_bytes: s.size_bytes,
            created_at: time(&s.create_time),
            metadata: s.metadata.into_iter().collect(),
        }
    }
}

/// `GET /v1/sessions/status/{id}`: the SDK's `is_session_active()` reads `vm_status`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionStatusView {
    pub session_id: String,
    pub vm_id: String,
    pub exists: bool,
    pub vm_assigned: bool,
    pub vm_alive: bool,
    /// `active` while the session is ACTIVE.
    pub vm_status: String,
}

impl From<pb::Session> for SessionStatusView {
    fn from(s: pb::Session) -> Self {
        let active = s.status == pb::SessionStatus::Active as i32;
        SessionStatusView {
            vm_id: s.id.clone(),
            session_id: s.id,
            exists: true,
            vm_assigned: !s.vm_id.is_empty(),
            vm_alive: active,
            vm_status: status_name(s.status).to_owned(),
        }
    }
}

/// `GET /v1/sessions/usage/{id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageView {
    pub session_id: String,
    /// CPU seconds of the VM (every vCPU and VMM thread).
    pub cpu_time: f64,
    /// Bytes of memory in use, as the guest reports it.
    pub memory_used: u64,
    pub memory_peak: u64,
    /// Resident memory of the VMM on the host (what is billed).
    pub memory_resident: u64,
    /// Network bytes, received plus sent.
    pub network_io: u64,
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    /// Seconds since the VM was handed to the session.
    pub uptime: f64,
}

impl UsageView {
    pub fn new(session_id: String, u: common::Usage) -> Self {
        UsageView {
            session_id,
            cpu_time: seconds(&u.cpu_time),
            memory_used: u.memory_used_bytes,
            memory_peak: u.memory_peak_bytes,
            memory_resident: u.vmm_resident_bytes,
            network_io: u.network_rx_bytes.saturating_add(u.network_tx_bytes),
            network_rx_bytes: u.network_rx_bytes,
            network_tx_bytes: u.network_tx_bytes,
            disk_read_bytes: u.disk_read_bytes,
            disk_write_bytes: u.disk_write_bytes,
            uptime: seconds(&u.uptime),
        }
    }
}

/// `POST /execute`, `/execute_async` and `/v1/execute/stream`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ExecuteBody {
    pub session_id: String,
    /// The code; at most 1 MiB.
    pub command: String,
    /// `python` (the default) or `bash` (also `shell`, `sh`).
    pub language: Option<String>,
    /// Seconds (up to 3600); 60 when absent.
    pub timeout: Option<f64>,
}

impl ExecuteBody {
    /// The execute request, checked: the code's size, the language, the timeout.
    pub fn to_request(&self) -> Result<(pb::ExecuteRequest, Duration), ApiError> {
        use capsa_proto::limits::{DEFAULT_EXEC_TIMEOUT, MAX_CODE_BYTES, MAX_EXEC_TIMEOUT};
        if self.session_id.is_empty() {
            return Err(ApiError::invalid("session_id", "is required"));
        }
        if self.command.len() > MAX_CODE_BYTES {
            return Err(ApiError::TooLarge {
                what: "command",
                size: self.command.len() as u64,
                limit: MAX_CODE_BYTES as u64,
            });
        }
        let language = language(self.language.as_deref())?;
        let timeout = match self.timeout {
            None => DEFAULT_EXEC_TIMEOUT,
            Some(t) if t.is_finite() && t > 0.0 && t <= MAX_EXEC_TIMEOUT.as_secs_f64() => {
                Duration::from_secs_f64(t)
            }
            Some(t) => {
                return Err(ApiError::invalid(
                    "timeout",
                    format!(
                        "{t} is not between 0 and {} seconds",
                        MAX_EXEC_TIMEOUT.as_secs()
                    ),
                ));
            }
        };
        let request = pb::ExecuteRequest {
            session_id: self.session_id.clone(),
            language: language as i32,
            code: self.command.clone(),
            timeout: Some(capsa_proto::time::duration(timeout)),
            ..Default::default()
        };
        Ok((request, timeout))
    }
}

/// InstaVM's language names to Capsa's kernels.
pub fn language(name: Option<&str>) -> Result<Language, ApiError> {
    match name.map(|n| n.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("python") | Some("python3") | Some("py") => Ok(Language::Python),
        Some("bash") | Some("shell") | Some("sh") => Ok(Language::Shell),
        Some(other) => Err(ApiError::invalid(
            "language",
            format!("unsupported {other:?} (python or bash)"),
        )),
    }
}

pub fn language_name(language: i32) -> &'static str {
    match Language::try_from(language) {
        Ok(Language::Shell) => "bash",
        _ => "python",
    }
}

/// An uncaught exception.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorView {
    pub name: String,
    pub value: String,
    pub traceback: Vec<String>,
}

/// The outcome of an execute, as `/execute` returns it and async records keep it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ExecutionView {
    pub stdout: String,
    pub stderr: String,
    /// stdout followed by the text of the trailing expression's value, if any.
    pub output: String,
    pub exit_code: i32,
    /// Wall seconds in the guest.
    pub execution_time: f64,
    /// CPU seconds of the kernel and its children.
    pub cpu_time: f64,
    /// `ok`, `error`, `timeout`, `interrupted`, `kernel_died`.
    pub status: String,
    pub success: bool,
    pub error: Option<ErrorView>,
    /// Values of trailing expressions and rich displays, by MIME type (text as is, other
    /// types base64).
    #[schema(value_type = Vec<Object>)]
    pub results: Vec<HashMap<String, String>>,
    /// The kernel had to be restarted: variables and imports are gone.
    pub state_lost: bool,
    pub output_truncated: bool,
    pub message: Option<String>,
}

/// Text MIME types are sent as text, anything else base64.
pub fn mime_bundle(data: HashMap<String, bytes::Bytes>) -> HashMap<String, String> {
    use base64::Engine as _;
    data.into_iter()
        .map(|(mime, value)| {
            let textual = mime.starts_with("text/") || mime.ends_with("json");
            let shown = match (textual, std::str::from_utf8(&value)) {
                (true, Ok(s)) => s.to_owned(),
                _ => base64::engine::general_purpose::STANDARD.encode(&value),
            };
            (mime, shown)
        })
        .collect()
}

pub fn completion_name(status: i32) -> &'static str {
    match CompletionStatus::try_from(status) {
        Ok(CompletionStatus::Ok) => "ok",
        Ok(CompletionStatus::Error) => "error",
        Ok(CompletionStatus::Timeout) => "timeout",
        Ok(CompletionStatus::Interrupted) => "interrupted",
        Ok(CompletionStatus::KernelDied) => "kernel_died",
        _ => "unknown",
    }
}

/// Folds an Execute stream's events into an [`ExecutionView`].
#[derive(Default)]
pub struct Collector {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    result_text: String,
    view: ExecutionView,
    done: bool,
}

impl Collector {
    pub fn push(&mut self, event: Event) {
        match event {
            Event::Stdout(c) => self.stdout.extend_from_slice(&c.data),
            Event::Stderr(c) => self.stderr.extend_from_slice(&c.data),
            Event::Result(r) => {
                if let Some(text) = r.data.get("text/plain") {
                    self.result_text.push_str(&String::from_utf8_lossy(text));
                    self.result_text.push('\n');
                }
                self.view.results.push(mime_bundle(r.data));
            }
            Event::Display(d) => self.view.results.push(mime_bundle(d.data)),
            Event::Error(e) => {
                self.view.error = Some(ErrorView {
                    name: e.name,
                    value: e.value,
                    traceback: e.traceback,
                })
            }
            Event::Completion(c) => {
                self.view.exit_code = c.exit_code;
                self.view.execution_time = seconds(&c.wall_time);
                self.view.cpu_time = seconds(&c.cpu_time);
                self.view.status = completion_name(c.status).to_owned();
                self.view.success = c.status == CompletionStatus::Ok as i32;
                self.view.state_lost = c.state_lost;
                self.view.output_truncated = c.output_truncated;
                self.view.message = Some(c.message).filter(|m| !m.is_empty());
                self.done = true;
            }
        }
    }

    /// The view, once the Completion event came; `None` if the stream ended without one.
    pub fn finish(self) -> Option<ExecutionView> {
        if !self.done {
            return None;
        }
        let mut view = self.view;
        view.stdout = String::from_utf8_lossy(&self.stdout).into_owned();
        view.stderr = String::from_utf8_lossy(&self.stderr).into_owned();
        view.output = view.stdout.clone() + &self.result_text;
        Some(view)
    }
}

/// Decodes output chunks to text for the event stream without breaking a character that
/// spans two chunks: an incomplete sequence at the end waits for the next chunk.
#[derive(Default)]
pub struct Utf8Carry {
    pending: Vec<u8>,
}

impl Utf8Carry {
    pub fn push(&mut self, chunk: &[u8]) -> String {
        self.pending.extend_from_slice(chunk);
        let keep = match std::str::from_utf8(&self.pending) {
            Ok(_) => 0,
            // An incomplete character at the end (at most 3 bytes): keep it for later.
            Err(e) if e.error_len().is_none() => self.pending.len() - e.valid_up_to(),
            Err(_) => 0,
        };
        let rest = self.pending.split_off(self.pending.len() - keep);
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = rest;
        out
    }
}

/// `POST /kill`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct KillBody {
    pub session_id: String,
}

/// `POST /download` (the SDK sends it form-encoded).
#[derive(Debug, Deserialize, ToSchema)]
pub struct DownloadBody {
    pub session_id: String,
    /// Absolute path in the VM.
    pub filename: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DownloadView {
    pub status: String,
    pub filename: String,
    pub size: u64,
    /// The file, base64.
    pub content: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UploadView {
    pub success: bool,
    pub status: String,
    pub remote_path: String,
    pub size: u64,
    pub sha256: String,
}

/// InstaVM's egress body (`allow_public_repos` is Capsa's `allow_package_managers`).
#[derive(Debug, Deserialize, ToSchema)]
pub struct EgressBody {
    #[serde(alias = "allow_package_managers")]
    pub allow_public_repos: Option<bool>,
    pub allow_http: Option<bool>,
    pub allow_https: Option<bool>,
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    #[serde(default)]
    pub allowed_cidrs: Vec<String>,
    /// Capsa's extension: no egress at all.
    #[serde(default)]
    pub deny_all: bool,
}

impl EgressBody {
    pub fn to_policy(self) -> common::EgressPolicy {
        common::EgressPolicy {
            deny_all: self.deny_all,
            allow_package_managers: self.allow_public_repos.unwrap_or(false),
            allow_http: self.allow_http,
            allow_https: self.allow_https,
            allowed_domains: self.allowed_domains,
            allowed_cidrs: self.allowed_cidrs,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EgressView {
    pub session_id: String,
    pub allow_public_repos: bool,
    pub allow_package_managers: bool,
    pub allow_http: bool,
    pub allow_https: bool,
    pub allowed_domains: Vec<String>,
    pub allowed_cidrs: Vec<String>,
    pub deny_all: bool,
}

impl EgressView {
    pub fn new(session_id: String, p: common::EgressPolicy) -> Self {
        EgressView {
            session_id,
            allow_public_repos: p.allow_package_managers,
            allow_package_managers: p.allow_package_managers,
            allow_http: p.allow_http.unwrap_or(true),
            allow_https: p.allow_https.unwrap_or(true),
            allowed_domains: p.allowed_domains,
            allowed_cidrs: p.allowed_cidrs,
            deny_all: p.deny_all,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_maps_instavm_names_onto_capsa_fields() {
        let body: CreateSessionBody = serde_json::from_value(serde_json::json!({
            "api_key": "k", "vm_lifetime_seconds": 600, "vcpu_count": 2, "memory_mb": 1024,
            "env": {"A": "1", "N": 5}, "metadata": {"team": "ml", "on": true},
            "some_future_field": 1
        }))
        .unwrap();
        let req = body.to_request();
        assert_eq!(req.vcpus, 2);
        assert_eq!(req.memory_mib, 1024);
        assert_eq!(req.lifetime.unwrap().seconds, 600);
        assert_eq!(req.env["N"], "5");
        assert_eq!(req.metadata["on"], "true");
        let req = CreateSessionBody::default().to_request();
        assert!(req.lifetime.is_none());
        assert_eq!((req.vcpus, req.memory_mib), (0, 0), "server defaults apply");
        assert!(req.snapshot_id.is_empty() && !req.auto_suspend && !req.auto_resume);
    }

    #[test]
    fn create_from_a_snapshot_with_auto_suspend() {
        // What `client.vms.create(snapshot_id=..., auto_suspend=True, auto_resume=True)` sends.
        let body: CreateSessionBody = serde_json::from_value(serde_json::json!({
            "snapshot_id": "snap-0123", "auto_suspend": true, "auto_resume": true,
            "volumes": []
        }))
        .unwrap();
        let req = body.to_request();
        assert_eq!(req.snapshot_id, "snap-0123");
        assert!(req.auto_suspend && req.auto_resume);
    }

    #[test]
    fn snapshot_and_clone_bodies() {
        let req = SnapshotBody::default().to_request("s1".into());
        assert_eq!(
            (req.session_id.as_str(), req.name.as_str()),
            ("s1", "snapshot")
        );
        let body: SnapshotBody = serde_json::from_value(serde_json::json!({
            "name": "", "metadata": {"step": 3}, "description": "ignored"
        }))
        .unwrap();
        let req = body.to_request("s1".into());
        assert_eq!(
            req.name, "",
            "a given name goes as it is, for the server to judge"
        );
        assert_eq!(req.metadata["step"], "3");

        let req = CloneBody::default().to_request("s1".into());
        assert_eq!((req.count, req.lifetime, req.metadata.len()), (1, None, 0));
        let body: CloneBody = serde_json::from_value(serde_json::json!({
            "snapshot_name": "x", "vm_lifetime_seconds": 120, "metadata": {"k": "v"}
        }))
        .unwrap();
        let req = body.to_request("s1".into());
        assert_eq!(req.lifetime.unwrap().seconds, 120);
        assert_eq!(req.metadata["k"], "v");
    }

    #[test]
    fn snapshots_show_as_instavm_does() {
        let v = SnapshotView::from(pb::Snapshot {
            id: "snap-1".into(),
            name: "base".into(),
            status: pb::SnapshotStatus::Ready as i32,
            session_id: "s1".into(),
            template: "default".into(),
            vcpus: 1,
            memory_mib: 512,
            size_bytes: 99,
            create_time: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            node_id: "node-a".into(),
            metadata: [("k".to_owned(), "v".to_owned())].into(),
        });
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["id"], "snap-1");
        assert_eq!(json["snapshot_id"], "snap-1");
        assert_eq!(json["status"], "ready");
        assert_eq!(json["vm_id"], "s1");
        assert_eq!(
            (json["vcpu_count"].clone(), json["memory_mb"].clone()),
            (1.into(), 512.into())
        );
        assert_eq!(json["size_bytes"], 99);
        assert_eq!(json["created_at"], "1970-01-01T00:00:00Z");
        assert_eq!(json["metadata"]["k"], "v");
        assert!(json.get("node_id").is_none(), "nodes are not shown");
        assert_eq!(
            snapshot_status_name(pb::SnapshotStatus::Creating as i32),
            "creating"
        );
    }

    #[test]
    fn languages_map_to_kernels() {
        assert_eq!(language(None).unwrap(), Language::Python);
        assert_eq!(language(Some("Python")).unwrap(), Language::Python);
        assert_eq!(language(Some("bash")).unwrap(), Language::Shell);
        assert_eq!(language(Some("sh")).unwrap(), Language::Shell);
        let err = language(Some("ruby")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "language: unsupported \"ruby\" (python or bash)"
        );
    }

    fn execute(command: String, timeout: Option<f64>) -> ExecuteBody {
        ExecuteBody {
            session_id: "s".into(),
            command,
            language: Some("bash".into()),
            timeout,
        }
    }

    #[test]
    fn execute_checks_size_and_timeout() {
        let (req, t) = execute("echo hi".into(), Some(5.0)).to_request().unwrap();
        assert_eq!(req.language, Language::Shell as i32);
        assert_eq!(t, Duration::from_secs(5));
        assert_eq!(req.timeout.unwrap().seconds, 5);
        let err = execute("x".repeat((1 << 20) + 1), None)
            .to_request()
            .unwrap_err();
        assert_eq!(err.status(), 413);
        for bad in [0.0, -1.0, 3601.0, f64::NAN] {
            let err = execute("1".into(), Some(bad)).to_request().unwrap_err();
            assert_eq!(err.status(), 422, "{bad}");
            assert!(err.to_string().starts_with("timeout: "), "{err}");
        }
    }

    #[test]
    fn events_fold_into_the_instavm_result() {
        let mut c = Collector::default();
        c.push(Event::Stdout(common::OutputChunk { data: "4".into() }));
        c.push(Event::Stdout(common::OutputChunk { data: "2\n".into() }));
        c.push(Event::Stderr(common::OutputChunk {
            data: "warn\n".into(),
        }));
        c.push(Event::Result(common::ExecuteResult {
            data: [("text/plain".to_owned(), bytes::Bytes::from("84"))].into(),
        }));
        c.push(Event::Completion(common::Completion {
            status: CompletionStatus::Ok as i32,
            exit_code: 0,
            wall_time: Some(prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000,
            }),
            cpu_time: Some(prost_types::Duration {
                seconds: 0,
                nanos: 250_000_000,
            }),
            ..Default::default()
        }));
        let v = c.finish().unwrap();
        assert_eq!(v.stdout, "42\n");
        assert_eq!(v.stderr, "warn\n");
        assert_eq!(v.output, "42\n84\n");
        assert_eq!((v.execution_time, v.cpu_time), (1.5, 0.25));
        assert!(v.success);
        assert_eq!(v.status, "ok");
        assert_eq!(v.results[0]["text/plain"], "84");
        assert!(Collector::default().finish().is_none(), "no completion");
    }

    #[test]
    fn rich_data_that_is_not_text_is_base64() {
        let m = mime_bundle(
            [
                (
                    "image/png".to_owned(),
                    bytes::Bytes::from_static(&[0x89, b'P']),
                ),
                ("application/json".to_owned(), bytes::Bytes::from("{}")),
            ]
            .into(),
        );
        assert_eq!(m["image/png"], "iVA=");
        assert_eq!(m["application/json"], "{}");
    }

    #[test]
    fn utf8_split_across_chunks_is_kept_whole() {
        let mut d = Utf8Carry::default();
        let e = "é".as_bytes();
        assert_eq!(d.push(&[b'a', e[0]]), "a");
        assert_eq!(d.push(&[e[1], b'b']), "éb");
        assert_eq!(
            d.push(&[0xff, b'c']),
            "\u{fffd}c",
            "invalid bytes are replaced"
        );
    }

    #[test]
    fn session_status_reads_active_like_the_sdk_expects() {
        let s = pb::Session {
            id: "s1".into(),
            status: pb::SessionStatus::Active as i32,
            vm_id: "vm-9".into(),
            ..Default::default()
        };
        let v = SessionStatusView::from(s.clone());
        assert_eq!(v.vm_status, "active");
        assert!(v.vm_alive && v.vm_assigned && v.exists);
        let info = SessionView::from(pb::Session {
            status: pb::SessionStatus::Terminated as i32,
            end_reason: pb::EndReason::Deleted as i32,
            ..s
        });
        assert_eq!(info.vm_id, "s1", "a VM is addressed by its session id");
        assert_eq!(info.status, "terminated");
        assert_eq!(info.end_reason.as_deref(), Some("deleted"));
        assert_eq!((info.source_snapshot_id, info.parent_vm_id), (None, None));
    }

    #[test]
    fn suspended_sessions_and_their_origins_are_shown() {
        for (status, name) in [
            (pb::SessionStatus::Suspending, "suspending"),
            (pb::SessionStatus::Suspended, "suspended"),
            (pb::SessionStatus::Resuming, "resuming"),
        ] {
            assert_eq!(status_name(status as i32), name);
        }
        let v = SessionView::from(pb::Session {
            id: "s2".into(),
            status: pb::SessionStatus::Suspended as i32,
            auto_resume: true,
            suspend_time: Some(prost_types::Timestamp {
                seconds: 60,
                nanos: 0,
            }),
            source_snapshot_id: "snap-1".into(),
            parent_session_id: "s1".into(),
            ..Default::default()
        });
        assert_eq!(v.status, "suspended");
        assert!(v.auto_resume && !v.auto_suspend);
        assert_eq!(v.suspended_at.as_deref(), Some("1970-01-01T00:01:00Z"));
        assert_eq!(v.source_snapshot_id.as_deref(), Some("snap-1"));
        assert_eq!(v.parent_vm_id.as_deref(), Some("s1"));
    }

    #[test]
    fn egress_maps_public_repos_to_package_managers() {
        let body: EgressBody = serde_json::from_value(serde_json::json!({
            "allow_public_repos": true, "allow_http": false, "allow_https": true,
            "allowed_domains": ["example.com"], "allowed_cidrs": []
        }))
        .unwrap();
        let p = body.to_policy();
        assert!(p.allow_package_managers);
        assert_eq!(p.allow_http, Some(false));
        let v = EgressView::new("s".into(), p);
        assert!(v.allow_public_repos && !v.allow_http && v.allow_https);
    }
}
