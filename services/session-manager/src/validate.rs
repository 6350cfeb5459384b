//! Request validation: every bound the public contract states (session.proto), checked
//! before anything else happens, each failure INVALID_ARGUMENT naming its field.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use capsa_egress::EgressPolicy;
use capsa_proto::common::v1::{ExecuteSpec, Language};
use capsa_proto::limits::{
    DEFAULT_EXEC_TIMEOUT, MAX_CHUNK_BYTES, MAX_CODE_BYTES, MAX_ENV_ENTRIES, MAX_ENV_NAME_BYTES,
    MAX_ENV_VALUE_BYTES, MAX_EXEC_TIMEOUT, MAX_OUTPUT_BYTES, MAX_PATH_BYTES,
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
    if req.metadata.len() > MAX_METADATA_ENTRIES {
        return Err(Error::field(
            "metadata",
            format!("at most {MAX_METADATA_ENTRIES} entries"),
        ));
    }
    for (k, v) in &req.metadata {
        if k.is_empty() || k.len() > MAX_METADATA_KEY_BYTES {
            return Err(Error::field(
                "metadata",
                format!("key {k:?} must be 1 to 63 bytes"),
            ));
        }
        if v.len() > MAX_METADATA_VALUE_BYTES {
            return Err(Error::field(
                "metadata",
                format!("value of {k:?} is over 256 bytes"),
            ));
        }
        if k.contains('\0') || v.contains('\0') {
            return Err(Error::field(
                "metadata",
                format!("entry {k:?} contains NUL"),
            ));
        }
    }
    Ok(CreateSpec {
        template,
        vcpus: req.vcpus,
        memory_mib: req.memory_mib,
        lifetime,
        env,
        metadata: req
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        egress,
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
