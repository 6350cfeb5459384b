//! Request validation: every bound the public contract states (session.proto), checked
//! before anything else happens, each failure INVALID_ARGUMENT naming its field.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use capsa_egress::EgressPolicy;
use capsa_proto::common::v1::{
    ExecuteSpec, Language, ProcessSpec, Signal, TerminalOpen, TerminalSize,
};
use capsa_proto::limits::{
    DEFAULT_EXEC_TIMEOUT, DEFAULT_WAIT_TIMEOUT, MAX_CHUNK_BYTES, MAX_CODE_BYTES, MAX_ENV_ENTRIES,
    MAX_ENV_NAME_BYTES, MAX_ENV_VALUE_BYTES, MAX_EXEC_TIMEOUT, MAX_OUTPUT_BYTES, MAX_PATH_BYTES,
    MAX_PROCESS_ARGS, MAX_PROCESS_OUTPUT_BUFFER_BYTES, MAX_PROCESS_SPEC_BYTES,
    MAX_STREAM_DATA_BYTES, MAX_TERMINAL_DIMENSION, MAX_WAIT_TIMEOUT,
};
use capsa_proto::session::v1 as pb;
use capsa_store::{Cursor, ListFilter, SessionStatus};

use crate::error::Error;

type Result<T> = std::result::Result<T, Error>;

pub const MIN_LIFETIME: Duration = Duration::from_secs(10);
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
const MAX_METADATA_ENTRIES: usize = 64;
const MAX_METADATA_KEY_BYTES: usize = 63;
const MAX_METADATA_VALUE_BYTES: usize = 256;
const MAX_SESSION_ID_BYTES: usize = 128;
/// Process ids are the agent's ("p-12", "t-3"); anything longer or stranger is no id.
const MAX_PROCESS_ID_BYTES: usize = 64;
/// TERM values are short names ("xterm-256color").
const MAX_TERM_BYTES: usize = 128;

/// A validated CreateSession, defaults applied.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub template: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub lifetime: Duration,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    /// `None`: the tenant's default, else the deployment's, else none.
    pub egress: Option<EgressPolicy>,
    pub auto_suspend: bool,
    pub auto_resume: bool,
    /// Start from this snapshot of the tenant.
    pub snapshot_id: Option<String>,
}

pub fn create(req: &pb::CreateSessionRequest) -> Result<CreateSpec> {
    let template = if req.template.is_empty() {
        "default".to_string()
    } else {
        req.template.clone()
    };
    if template.len() > 63
        || !template
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(Error::field("template", "must be 1 to 63 of [a-z0-9-]"));
    }
    if req.vcpus > 8 {
        return Err(Error::field(
            "vcpus",
            format!("{} is not 1 to 8 (0 = default)", req.vcpus),
        ));
    }
    if req.memory_mib != 0 && !(128..=8192).contains(&req.memory_mib) {
        return Err(Error::field(
            "memory_mib",
            format!("{} is not 128 to 8192 (0 = default)", req.memory_mib),
        ));
    }
    let lifetime = match &req.lifetime {
        None => DEFAULT_LIFETIME,
        Some(d) => duration("lifetime", d, MIN_LIFETIME, MAX_LIFETIME)?,
    };
    let env = env("env", &req.env)?;
    let egress = req.egress.clone().map(egress).transpose()?;
    let metadata = metadata("metadata", &req.metadata)?;
    let snapshot_id = if req.snapshot_id.is_empty() {
        None
    } else {
        snapshot_id("snapshot_id", &req.snapshot_id)?;
        Some(req.snapshot_id.clone())
    };
    Ok(CreateSpec {
        template,
        vcpus: req.vcpus,
        memory_mib: req.memory_mib,
        lifetime,
        env,
        metadata,
        egress,
        auto_suspend: req.auto_suspend,
        auto_resume: req.auto_resume,
        snapshot_id,
    })
}

/// Labels of a session or snapshot; errors name `field`.
fn metadata(field: &str, map: &HashMap<String, String>) -> Result<BTreeMap<String, String>> {
    if map.len() > MAX_METADATA_ENTRIES {
        return Err(Error::field(
            field,
            format!("at most {MAX_METADATA_ENTRIES} entries"),
        ));
    }
    for (k, v) in map {
        if k.is_empty() || k.len() > MAX_METADATA_KEY_BYTES {
            return Err(Error::field(
                field,
                format!("key {k:?} must be 1 to 63 bytes"),
            ));
        }
        if v.len() > MAX_METADATA_VALUE_BYTES {
            return Err(Error::field(
                field,
                format!("value of {k:?} is over 256 bytes"),
            ));
        }
        if k.contains('\0') || v.contains('\0') {
            return Err(Error::field(field, format!("entry {k:?} contains NUL")));
        }
    }
    Ok(map.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// Snapshot ids are `snap-` and 32 lowercase hex digits (what SnapshotSession returns).
pub fn snapshot_id(field: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::field(field, "is empty"));
    }
    let ok = id.strip_prefix("snap-").is_some_and(|hex| {
        hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    });
    if !ok {
        return Err(Error::field(field, format!("{id:?} is not a snapshot id")));
    }
    Ok(())
}

/// A validated SnapshotSession.
#[derive(Debug)]
pub struct SnapshotSpec {
    pub name: String,
    pub metadata: BTreeMap<String, String>,
}

const MAX_SNAPSHOT_NAME_CHARS: usize = 128;

pub fn snapshot(req: &pb::SnapshotSessionRequest) -> Result<SnapshotSpec> {
    session_id(&req.session_id)?;
    let chars = req.name.chars().count();
    if chars == 0 || chars > MAX_SNAPSHOT_NAME_CHARS {
        return Err(Error::field(
            "name",
            format!("must be 1 to {MAX_SNAPSHOT_NAME_CHARS} characters (is {chars})"),
        ));
    }
    if req.name.chars().any(char::is_control) {
        return Err(Error::field("name", "contains a control character"));
    }
    Ok(SnapshotSpec {
        name: req.name.clone(),
        metadata: metadata("metadata", &req.metadata)?,
    })
}

/// ListSnapshots' page size and the id after which the page starts.
pub fn list_snapshots(req: &pb::ListSnapshotsRequest) -> Result<(usize, Option<String>)> {
    let page_size = match req.page_size {
        0 => 100,
        n @ 1..=1000 => n as usize,
        n => {
            return Err(Error::field(
                "page_size",
                format!("{n} is not 1 to 1000 (0 = 100)"),
            ));
        }
    };
    let after = if req.page_token.is_empty() {
        None
    } else {
        snapshot_id("page_token", &req.page_token)
            .map_err(|_| Error::field("page_token", "is not a token this API returned"))?;
        Some(req.page_token.clone())
    };
    Ok((page_size, after))
}

/// Most forks one ForkSession makes.
pub const MAX_FORKS: u32 = 8;

/// A validated ForkSession.
#[derive(Debug)]
pub struct ForkSpec {
    pub count: u32,
    /// `None`: the parent's.
    pub lifetime: Option<Duration>,
    /// `None`: the parent's.
    pub metadata: Option<BTreeMap<String, String>>,
}

pub fn fork(req: &pb::ForkSessionRequest) -> Result<ForkSpec> {
    session_id(&req.session_id)?;
    if !(1..=MAX_FORKS).contains(&req.count) {
        return Err(Error::field(
            "count",
            format!("{} is not 1 to {MAX_FORKS}", req.count),
        ));
    }
    let lifetime = req
        .lifetime
        .as_ref()
        .map(|d| duration("lifetime", d, MIN_LIFETIME, MAX_LIFETIME))
        .transpose()?;
    let metadata = if req.metadata.is_empty() {
        None
    } else {
        Some(metadata("metadata", &req.metadata)?)
    };
    Ok(ForkSpec {
        count: req.count,
        lifetime,
        metadata,
    })
}

/// A policy from a request; errors name the field (`egress.allowed_domains[2]`).
pub fn egress(message: capsa_proto::common::v1::EgressPolicy) -> Result<EgressPolicy> {
    Ok(capsa_egress::proto::from_proto(message)?)
}

/// UpdateEgressPolicy's policy: the whole new one, required.
pub fn egress_required(
    message: Option<&capsa_proto::common::v1::EgressPolicy>,
) -> Result<EgressPolicy> {
    let message = message.ok_or_else(|| {
        Error::field(
            "egress",
            "is required: give the whole new policy (deny_all for no egress)",
        )
    })?;
    egress(message.clone())
}

/// Environment maps (session env and per-execute env share the rules).
pub fn env(field: &str, env: &HashMap<String, String>) -> Result<BTreeMap<String, String>> {
    if env.len() > MAX_ENV_ENTRIES {
        return Err(Error::field(
            field,
            format!("at most {MAX_ENV_ENTRIES} entries"),
        ));
    }
    for (k, v) in env {
        let mut bytes = k.bytes();
        let valid_name = bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_name || k.len() > MAX_ENV_NAME_BYTES {
            return Err(Error::field(
                field,
                format!(
                    "name {k:?} must match [A-Za-z_][A-Za-z0-9_]* within {MAX_ENV_NAME_BYTES} bytes"
                ),
            ));
        }
        if v.len() > MAX_ENV_VALUE_BYTES {
            return Err(Error::field(
                field,
                format!("value of {k} is over {MAX_ENV_VALUE_BYTES} bytes"),
            ));
        }
        if v.contains('\0') {
            return Err(Error::field(field, format!("value of {k} contains NUL")));
        }
    }
    Ok(env.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

fn duration(
    field: &str,
    d: &prost_types::Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration> {
    let d = capsa_proto::time::from_duration(d)
        .ok_or_else(|| Error::field(field, "is negative or malformed"))?;
    if d < min || d > max {
        return Err(Error::field(
            field,
            format!("{d:?} is not within {min:?} to {max:?}"),
        ));
    }
    Ok(d)
}

pub fn session_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::field("session_id", "is empty"));
    }
    if id.len() > MAX_SESSION_ID_BYTES
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Error::field("session_id", "is not a session id"));
    }
    Ok(())
}

/// A validated ListSessions: filter, page size and where to start.
pub fn list(req: &pb::ListSessionsRequest) -> Result<(ListFilter, usize, Option<Cursor>)> {
    let page_size = match req.page_size {
        0 => 100,
        n @ 1..=1000 => n as usize,
        n => {
            return Err(Error::field(
                "page_size",
                format!("{n} is not 1 to 1000 (0 = 100)"),
            ));
        }
    };
    let after = if req.page_token.is_empty() {
        None
    } else {
        Some(
            Cursor::from_token(&req.page_token)
                .ok_or_else(|| Error::field("page_token", "is not a token this API returned"))?,
        )
    };
    let status = match pb::SessionStatus::try_from(req.status) {
        Ok(pb::SessionStatus::Unspecified) => None,
        Ok(pb::SessionStatus::Creating) => Some(SessionStatus::Creating),
        Ok(pb::SessionStatus::Active) => Some(SessionStatus::Active),
        Ok(pb::SessionStatus::Suspending) => Some(SessionStatus::Suspending),
        Ok(pb::SessionStatus::Suspended) => Some(SessionStatus::Suspended),
        Ok(pb::SessionStatus::Resuming) => Some(SessionStatus::Resuming),
        Ok(pb::SessionStatus::Terminating) => Some(SessionStatus::Terminating),
        Ok(pb::SessionStatus::Terminated) => Some(SessionStatus::Terminated),
        Err(_) => {
            return Err(Error::field(
                "status",
                format!("{} is not a status", req.status),
            ));
        }
    };
    if req.metadata.len() > MAX_METADATA_ENTRIES {
        return Err(Error::field(
            "metadata",
            format!("at most {MAX_METADATA_ENTRIES} entries"),
        ));
    }
    let metadata = req
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok((ListFilter { status, metadata }, page_size, after))
}

pub fn extend_by(d: Option<&prost_types::Duration>) -> Result<Duration> {
    let d = d.ok_or_else(|| Error::field("extend_by", "is required"))?;
    duration("extend_by", d, Duration::from_secs(1), MAX_LIFETIME)
}

/// A validated Execute as the spec the node receives (defaults filled in).
pub fn execute(req: &pb::ExecuteRequest) -> Result<ExecuteSpec> {
    session_id(&req.session_id)?;
    let language = match Language::try_from(req.language) {
        Ok(Language::Unspecified) | Ok(Language::Python) => Language::Python,
        Ok(Language::Shell) => Language::Shell,
        Err(_) => {
            return Err(Error::field(
                "language",
                format!("{} is unknown", req.language),
            ));
        }
    };
    if req.code.len() > MAX_CODE_BYTES {
        return Err(Error::field(
            "code",
            format!("{} bytes is over {MAX_CODE_BYTES}", req.code.len()),
        ));
    }
    let timeout = match &req.timeout {
        None => DEFAULT_EXEC_TIMEOUT,
        Some(d) => duration("timeout", d, Duration::from_millis(1), MAX_EXEC_TIMEOUT)?,
    };
    if req.max_output_bytes > MAX_OUTPUT_BYTES {
        return Err(Error::field(
            "max_output_bytes",
            format!("is over {MAX_OUTPUT_BYTES}"),
        ));
    }
    let env = env("env", &req.env)?;
    if !req.cwd.is_empty() {
        path("cwd", &req.cwd)?;
    }
    Ok(ExecuteSpec {
        language: language as i32,
        code: req.code.clone(),
        timeout: Some(capsa_proto::time::duration(timeout)),
        env: env.into_iter().collect(),
        cwd: req.cwd.clone(),
        max_output_bytes: req.max_output_bytes,
    })
}

/// A guest path: absolute, at most [`MAX_PATH_BYTES`], no NUL.
pub fn path(field: &str, p: &str) -> Result<()> {
    if !p.starts_with('/') {
        return Err(Error::field(field, "must be an absolute path"));
    }
    if p.len() > MAX_PATH_BYTES {
        return Err(Error::field(
            field,
            format!("is over {MAX_PATH_BYTES} bytes"),
        ));
    }
    if p.contains('\0') {
        return Err(Error::field(field, "contains NUL"));
    }
    Ok(())
}

/// Permission bits (0 = the default).
pub fn mode(field: &str, m: u32) -> Result<()> {
    if m > 0o7777 {
        return Err(Error::field(
            field,
            format!("{m:#o} has bits beyond 0o7777"),
        ));
    }
    Ok(())
}

/// The first message of an upload.
pub fn upload_header(h: &pb::UploadFileHeader) -> Result<()> {
    session_id(&h.session_id)?;
    let file = h
        .file
        .as_ref()
        .ok_or_else(|| Error::field("header.file", "is required"))?;
    path("file.path", &file.path)?;
    mode("file.mode", file.mode)
}

/// A StartProcess spec: required, a command, bounded arguments and sizes, an env like
/// Execute's, an absolute cwd (or none: the agent's working directory).
pub fn process_spec(spec: Option<&ProcessSpec>) -> Result<ProcessSpec> {
    let spec = spec.ok_or_else(|| Error::field("spec", "is required"))?;
    command("spec", &spec.command, &spec.args, false)?;
    let bytes =
        spec.command.len() + spec.args.iter().map(String::len).sum::<usize>() + spec.stdin.len();
    if bytes > MAX_PROCESS_SPEC_BYTES {
        return Err(Error::field(
            "spec",
            format!(
                "command, args and stdin are {bytes} bytes together; the limit is \
                 {MAX_PROCESS_SPEC_BYTES}"
            ),
        ));
    }
    env("spec.env", &spec.env)?;
    if !spec.cwd.is_empty() {
        path("spec.cwd", &spec.cwd)?;
    }
    if spec.output_buffer_bytes > MAX_PROCESS_OUTPUT_BUFFER_BYTES {
        return Err(Error::field(
            "spec.output_buffer_bytes",
            format!(
                "{} is over {MAX_PROCESS_OUTPUT_BUFFER_BYTES} (0 = the default)",
                spec.output_buffer_bytes
            ),
        ));
    }
    Ok(spec.clone())
}

/// A program and its arguments (`<parent>.command`, `<parent>.args`). A terminal's may be
/// empty (bash); a process's may not.
fn command(parent: &str, command: &str, args: &[String], may_be_empty: bool) -> Result<()> {
    let field = format!("{parent}.command");
    if command.is_empty() && !may_be_empty {
        return Err(Error::field(&field, "is required"));
    }
    if command.len() > MAX_PATH_BYTES || command.contains('\0') {
        return Err(Error::field(
            &field,
            format!("must be at most {MAX_PATH_BYTES} bytes without NUL"),
        ));
    }
    if args.len() > MAX_PROCESS_ARGS {
        return Err(Error::field(
            &format!("{parent}.args"),
            format!("{} arguments is over {MAX_PROCESS_ARGS}", args.len()),
        ));
    }
    if let Some(i) = args.iter().position(|a| a.contains('\0')) {
        return Err(Error::field(&format!("{parent}.args[{i}]"), "contains NUL"));
    }
    Ok(())
}

/// A process id as the agent hands them out.
pub fn process_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::field("process_id", "is empty"));
    }
    if id.len() > MAX_PROCESS_ID_BYTES
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Error::field("process_id", "is not a process id"));
    }
    Ok(())
}

/// WaitProcess's timeout: unset is the default; 1 ms to the maximum.
pub fn wait_timeout(d: Option<&prost_types::Duration>) -> Result<Duration> {
    match d {
        None => Ok(DEFAULT_WAIT_TIMEOUT),
        Some(d) => duration("timeout", d, Duration::from_millis(1), MAX_WAIT_TIMEOUT),
    }
}

/// SignalProcess's signal: one of the named ones.
pub fn signal(value: i32) -> Result<Signal> {
    match Signal::try_from(value) {
        Ok(Signal::Unspecified) => Err(Error::field(
            "signal",
            "is required (TERM, KILL, INT or HUP)",
        )),
        Ok(signal) => Ok(signal),
        Err(_) => Err(Error::field("signal", format!("{value} is not a signal"))),
    }
}

/// Stdin data, keystrokes and port data: at most [`MAX_STREAM_DATA_BYTES`] a message.
pub fn stream_data(len: usize) -> Result<()> {
    if len > MAX_STREAM_DATA_BYTES {
        return Err(Error::field(
            "data",
            format!("{len} bytes is over {MAX_STREAM_DATA_BYTES} a message"),
        ));
    }
    Ok(())
}

/// A terminal size: required, each side 1 to [`MAX_TERMINAL_DIMENSION`].
pub fn terminal_size(field: &str, size: Option<&TerminalSize>) -> Result<()> {
    let size = size.ok_or_else(|| Error::field(field, "is required (rows and cols)"))?;
    let range = 1..=MAX_TERMINAL_DIMENSION;
    if !range.contains(&size.rows) || !range.contains(&size.cols) {
        return Err(Error::field(
            field,
            format!(
                "{}x{} is not 1 to {MAX_TERMINAL_DIMENSION} rows and cols",
                size.rows, size.cols
            ),
        ));
    }
    Ok(())
}

/// The `open` message of a terminal: its session and what to run, how.
pub fn terminal_open(header: &pb::OpenTerminalHeader) -> Result<TerminalOpen> {
    session_id(&header.session_id)?;
    let open = header
        .terminal
        .as_ref()
        .ok_or_else(|| Error::field("open.terminal", "is required"))?;
    command("terminal", &open.command, &open.args, true)?;
    env("terminal.env", &open.env)?;
    if !open.cwd.is_empty() {
        path("terminal.cwd", &open.cwd)?;
    }
    terminal_size("size", open.size.as_ref())?;
    if open.term.len() > MAX_TERM_BYTES || !open.term.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::field(
            "terminal.term",
            format!("must be at most {MAX_TERM_BYTES} printable ASCII characters"),
        ));
    }
    Ok(open.clone())
}

/// The `open` message of a port connection.
pub fn port_open(header: &pb::ConnectPortHeader) -> Result<u32> {
    session_id(&header.session_id)?;
    if !(1..=65535).contains(&header.port) {
        return Err(Error::field(
            "port",
            format!("{} is not 1 to 65535", header.port),
        ));
    }
    Ok(header.port)
}

/// A data chunk of an upload or download.
pub fn chunk(len: usize) -> Result<()> {
    if len > MAX_CHUNK_BYTES {
        return Err(Error::field(
            "data",
            format!("chunk of {len} bytes is over {MAX_CHUNK_BYTES}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn egress_is_optional_at_create_required_at_update_and_errors_name_the_entry() {
        use capsa_proto::common::v1::EgressPolicy as Msg;
        assert_eq!(
            create(&pb::CreateSessionRequest::default()).unwrap().egress,
            None
        );
        let req = pb::CreateSessionRequest {
            egress: Some(Msg {
                allowed_domains: vec!["pypi.org".into(), "ok.example".into(), "bad name".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(field_of(create(&req)).starts_with("invalid `egress.allowed_domains[2]`"));
        let req = pb::CreateSessionRequest {
            egress: Some(Msg {
                deny_all: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(create(&req).unwrap().egress, Some(EgressPolicy::none()));
        assert!(field_of(egress_required(None)).starts_with("invalid `egress`: is required"));
        let too_many = Msg {
            allowed_cidrs: (0..=capsa_egress::MAX_CIDRS)
                .map(|i| format!("198.18.{i}.0/24"))
                .collect(),
            ..Default::default()
        };
        assert!(
            field_of(egress_required(Some(&too_many)))
                .starts_with("invalid `egress.allowed_cidrs`")
        );
    }

    #[test]
    fn create_defaults_and_bounds() {
        let ok = create(&pb::CreateSessionRequest::default()).unwrap();
        assert_eq!(
            (ok.template.as_str(), ok.lifetime),
            ("default", DEFAULT_LIFETIME)
        );
        let base = pb::CreateSessionRequest::default;
        let cases: Vec<(pb::CreateSessionRequest, &str)> = vec![
            (
                pb::CreateSessionRequest {
                    template: "Bad".into(),
                    ..base()
                },
                "`template`",
            ),
            (
                pb::CreateSessionRequest {
                    template: "a".repeat(64),
                    ..base()
                },
                "`template`",
            ),
            (pb::CreateSessionRequest { vcpus: 9, ..base() }, "`vcpus`"),
            (
                pb::CreateSessionRequest {
                    memory_mib: 127,
                    ..base()
                },
                "`memory_mib`",
            ),
            (
                pb::CreateSessionRequest {
                    memory_mib: 8193,
                    ..base()
                },
                "`memory_mib`",
            ),
            (
                pb::CreateSessionRequest {
                    lifetime: Some(prost_types::Duration {
                        seconds: 9,
                        nanos: 0,
                    }),
                    ..base()
                },
                "`lifetime`",
            ),
            (
                pb::CreateSessionRequest {
                    lifetime: Some(prost_types::Duration {
                        seconds: 86401,
                        nanos: 0,
                    }),
                    ..base()
                },
                "`lifetime`",
            ),
            (
                pb::CreateSessionRequest {
                    env: [("1A".to_string(), String::new())].into(),
                    ..base()
                },
                "`env`",
            ),
            (
                pb::CreateSessionRequest {
                    env: [("A".to_string(), "x".repeat(32 * 1024 + 1))].into(),
                    ..base()
                },
                "`env`",
            ),
            (
                pb::CreateSessionRequest {
                    env: (0..129).map(|i| (format!("K{i}"), String::new())).collect(),
                    ..base()
                },
                "`env`",
            ),
            (
                pb::CreateSessionRequest {
                    metadata: [("k".repeat(64), String::new())].into(),
                    ..base()
                },
                "`metadata`",
            ),
        ];
        for (req, field) in cases {
            let msg = field_of(create(&req));
            assert!(msg.contains(field), "{msg} should name {field}");
        }
    }

    #[test]
    fn execute_bounds() {
        let base = || pb::ExecuteRequest {
            session_id: "s".into(),
            ..Default::default()
        };
        let spec = execute(&base()).unwrap();
        assert_eq!(spec.language, Language::Python as i32);
        assert_eq!(
            spec.timeout,
            Some(capsa_proto::time::duration(DEFAULT_EXEC_TIMEOUT))
        );
        let cases: Vec<(pb::ExecuteRequest, &str)> = vec![
            (
                pb::ExecuteRequest {
                    session_id: String::new(),
                    ..base()
                },
                "`session_id`",
            ),
            (
                pb::ExecuteRequest {
                    code: "x".repeat(MAX_CODE_BYTES + 1),
                    ..base()
                },
                "`code`",
            ),
            (
                pb::ExecuteRequest {
                    language: 7,
                    ..base()
                },
                "`language`",
            ),
            (
                pb::ExecuteRequest {
                    timeout: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 0,
                    }),
                    ..base()
                },
                "`timeout`",
            ),
            (
                pb::ExecuteRequest {
                    max_output_bytes: MAX_OUTPUT_BYTES + 1,
                    ..base()
                },
                "`max_output_bytes`",
            ),
            (
                pb::ExecuteRequest {
                    cwd: "rel".into(),
                    ..base()
                },
                "`cwd`",
            ),
        ];
        for (req, field) in cases {
            let msg = field_of(execute(&req));
            assert!(msg.contains(field), "{msg} should name {field}");
        }
    }

    #[test]
    fn process_specs() {
        let base = || ProcessSpec {
            command: "sleep".into(),
            args: vec!["1".into()],
            ..Default::default()
        };
        assert_eq!(process_spec(Some(&base())).unwrap(), base());
        let cases: Vec<(Option<ProcessSpec>, &str)> = vec![
            (None, "`spec`"),
            (
                Some(ProcessSpec {
                    command: String::new(),
                    ..base()
                }),
                "`spec.command`",
            ),
            (
                Some(ProcessSpec {
                    command: "a\0b".into(),
                    ..base()
                }),
                "`spec.command`",
            ),
            (
                Some(ProcessSpec {
                    args: vec![String::new(); MAX_PROCESS_ARGS + 1],
                    ..base()
                }),
                "`spec.args`",
            ),
            (
                Some(ProcessSpec {
                    args: vec!["ok".into(), "b\0".into()],
                    ..base()
                }),
                "`spec.args[1]`",
            ),
            (
                Some(ProcessSpec {
                    stdin: vec![0; MAX_PROCESS_SPEC_BYTES].into(),
                    ..base()
                }),
                "`spec`",
            ),
            (
                Some(ProcessSpec {
                    env: [("1A".to_string(), String::new())].into(),
                    ..base()
                }),
                "`spec.env`",
            ),
            (
                Some(ProcessSpec {
                    cwd: "tmp".into(),
                    ..base()
                }),
                "`spec.cwd`",
            ),
            (
                Some(ProcessSpec {
                    output_buffer_bytes: MAX_PROCESS_OUTPUT_BUFFER_BYTES + 1,
                    ..base()
                }),
                "`spec.output_buffer_bytes`",
            ),
        ];
        for (spec, field) in cases {
            let msg = field_of(process_spec(spec.as_ref()));
            assert!(msg.contains(field), "{msg} should name {field}");
        }
        let at_limit = ProcessSpec {
            output_buffer_bytes: MAX_PROCESS_OUTPUT_BUFFER_BYTES,
            ..base()
        };
        assert!(process_spec(Some(&at_limit)).is_ok());
    }

    #[test]
    fn process_calls() {
        assert!(process_id("p-12").is_ok());
        for bad in ["", "p 1", &"p".repeat(65)] {
            assert!(field_of(process_id(bad)).contains("`process_id`"));
        }
        assert_eq!(wait_timeout(None).unwrap(), DEFAULT_WAIT_TIMEOUT);
        let secs = |s| prost_types::Duration {
            seconds: s,
            nanos: 0,
        };
        assert_eq!(wait_timeout(Some(&secs(300))).unwrap(), MAX_WAIT_TIMEOUT);
        for bad in [0, 301, -1] {
            assert!(field_of(wait_timeout(Some(&secs(bad)))).contains("`timeout`"));
        }
        assert_eq!(signal(Signal::Kill as i32).unwrap(), Signal::Kill);
        for bad in [0, 99] {
            assert!(field_of(signal(bad)).contains("`signal`"));
        }
        assert!(stream_data(MAX_STREAM_DATA_BYTES).is_ok());
        assert!(field_of(stream_data(MAX_STREAM_DATA_BYTES + 1)).contains("`data`"));
    }

    #[test]
    fn terminals_and_ports() {
        let size = |rows, cols| Some(TerminalSize { rows, cols });
        let header = |terminal: Option<TerminalOpen>| pb::OpenTerminalHeader {
            session_id: "s".into(),
            terminal,
        };
        let ok = TerminalOpen {
            size: size(24, 80),
            ..Default::default()
        };
        assert_eq!(terminal_open(&header(Some(ok.clone()))).unwrap(), ok);
        let cases: Vec<(pb::OpenTerminalHeader, &str)> = vec![
            (
                pb::OpenTerminalHeader {
                    session_id: String::new(),
                    ..header(Some(ok.clone()))
                },
                "`session_id`",
            ),
            (header(None), "`open.terminal`"),
            (
                header(Some(TerminalOpen {
                    size: None,
                    ..ok.clone()
                })),
                "`size`",
            ),
            (
                header(Some(TerminalOpen {
                    size: size(0, 80),
                    ..ok.clone()
                })),
                "`size`",
            ),
            (
                header(Some(TerminalOpen {
                    size: size(24, MAX_TERMINAL_DIMENSION + 1),
                    ..ok.clone()
                })),
                "`size`",
            ),
            (
                header(Some(TerminalOpen {
                    cwd: "rel".into(),
                    ..ok.clone()
                })),
                "`terminal.cwd`",
            ),
            (
                header(Some(TerminalOpen {
                    env: [("A-B".to_string(), String::new())].into(),
                    ..ok.clone()
                })),
                "`terminal.env`",
            ),
            (
                header(Some(TerminalOpen {
                    term: "xterm 256".into(),
                    ..ok.clone()
                })),
                "`terminal.term`",
            ),
            (
                header(Some(TerminalOpen {
                    args: vec![String::new(); MAX_PROCESS_ARGS + 1],
                    ..ok.clone()
                })),
                "`terminal.args`",
            ),
        ];
        for (h, field) in cases {
            let msg = field_of(terminal_open(&h));
            assert!(msg.contains(field), "{msg} should name {field}");
        }
        assert!(field_of(terminal_size("resize", size(1001, 1).as_ref())).contains("`resize`"));
        let port = |port| pb::ConnectPortHeader {
            session_id: "s".into(),
            port,
        };
        assert_eq!(port_open(&port(8000)).unwrap(), 8000);
        for bad in [0, 65536] {
            assert!(field_of(port_open(&port(bad))).contains("`port`"));
        }
    }

    #[test]
    fn paths_and_pages() {
        assert!(path("path", "/a").is_ok());
        for bad in ["", "a", "/a\0b"] {
            assert!(field_of(path("path", bad)).contains("`path`"));
        }
        assert!(field_of(path("path", &format!("/{}", "a".repeat(4096)))).contains("`path`"));
        let req = |page_size, page_token: &str| pb::ListSessionsRequest {
            page_size,
            page_token: page_token.into(),
            ..Default::default()
        };
        assert_eq!(list(&req(0, "")).unwrap().1, 100);
        assert!(field_of(list(&req(1001, ""))).contains("`page_size`"));
        assert!(field_of(list(&req(-1, ""))).contains("`page_size`"));
        assert!(field_of(list(&req(10, "garbage"))).contains("`page_token`"));
    }
}
