//! Proto ⇄ domain translation for the AgentService: request validation (every bad field
//! is INVALID_ARGUMENT naming it) and the conversion of events and file infos back.

use std::collections::BTreeMap;
use std::time::Duration;

use capsa_proto::agent::v1 as pb;
use capsa_proto::common::v1 as common;

use crate::error::Error;
use crate::files::{self, FileInfo, FileKind};
use crate::kernel::{Completion, Event, ExecuteRequest, Language};

use capsa_proto::limits::{
    DEFAULT_MAX_OUTPUT_BYTES, MAX_CODE_BYTES, MAX_EXEC_TIMEOUT, MAX_OUTPUT_BYTES,
};

/// Session and per-call env: names a shell can export, values without NUL.
pub fn check_env(
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    for (k, v) in env {
        let valid_name = k
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_name {
            return Err(Error::invalid(
                "env",
                format!("{k:?} is not a valid variable name"),
            ));
        }
        if v.contains('\0') {
            return Err(Error::invalid(
                "env",
                format!("the value of {k} contains a NUL byte"),
            ));
        }
        out.insert(k, v);
    }
    Ok(out)
}

pub fn execute_request(
    spec: Option<common::ExecuteSpec>,
    default_timeout: Duration,
) -> Result<ExecuteRequest, Error> {
    let spec = spec.ok_or_else(|| Error::invalid("spec", "is missing"))?;
    let language = match common::Language::try_from(spec.language) {
        Ok(common::Language::Unspecified | common::Language::Python) => Language::Python,
        Ok(common::Language::Shell) => Language::Shell,
        Err(_) => {
            return Err(Error::invalid(
                "language",
                format!("unknown value {}", spec.language),
            ));
        }
    };
    if spec.code.len() > MAX_CODE_BYTES {
        return Err(Error::invalid(
            "code",
            format!(
                "is {} bytes; the limit is {MAX_CODE_BYTES}",
                spec.code.len()
            ),
        ));
    }
    let timeout = match &spec.timeout {
        None => default_timeout,
        Some(d) => match capsa_proto::time::from_duration(d) {
            Some(t) if !t.is_zero() && t <= MAX_EXEC_TIMEOUT => t,
            _ => {
                return Err(Error::invalid(
                    "timeout",
                    format!("must be positive and at most {MAX_EXEC_TIMEOUT:?}"),
                ));
            }
        },
    };
    let max_output_bytes = match spec.max_output_bytes {
        0 => DEFAULT_MAX_OUTPUT_BYTES,
        n if n <= MAX_OUTPUT_BYTES => n,
        n => {
            return Err(Error::invalid(
                "max_output_bytes",
                format!("{n} exceeds {MAX_OUTPUT_BYTES}"),
            ));
        }
    };
    let cwd = if spec.cwd.is_empty() {
        None
    } else {
        Some(files::check_path("cwd", &spec.cwd)?)
    };
    if let Some(dir) = &cwd
        && !dir.is_dir()
    {
        return Err(Error::invalid(
            "cwd",
            format!("{} is not an existing directory", dir.display()),
        ));
    }
    Ok(ExecuteRequest {
        language,
        code: spec.code,
        timeout,
        env: check_env(spec.env)?,
        cwd: cwd.map(|p| p.to_string_lossy().into_owned()),
        max_output_bytes,
    })
}

pub fn event_to_proto(event: Event) -> pb::ExecuteResponse {
    use common::execute_event::Event as E;
    let event = match event {
        Event::Stdout(data) => E::Stdout(common::OutputChunk { data }),
        Event::Stderr(data) => E::Stderr(common::OutputChunk { data }),
        Event::Display(data) => E::Display(common::DisplayData {
            data: data.into_iter().collect(),
        }),
        Event::Result(data) => E::Result(common::ExecuteResult {
            data: data.into_iter().collect(),
        }),
        Event::Error {
            name,
            value,
            traceback,
        } => E::Error(common::ExecuteError {
            name,
            value,
            traceback,
        }),
        Event::Completion(c) => E::Completion(completion_to_proto(c)),
    };
    pb::ExecuteResponse {
        event: Some(common::ExecuteEvent { event: Some(event) }),
    }
}

fn completion_to_proto(c: Completion) -> common::Completion {
    use crate::kernel::Status as S;
    let status = match c.status {
        S::Ok => common::CompletionStatus::Ok,
        S::Error => common::CompletionStatus::Error,
        S::Timeout => common::CompletionStatus::Timeout,
        S::Interrupted => common::CompletionStatus::Interrupted,
        S::KernelDied => common::CompletionStatus::KernelDied,
    };
    let d = capsa_proto::time::duration;
    common::Completion {
        status: status as i32,
        exit_code: c.exit_code,
        wall_time: Some(d(c.wall_time)),
        cpu_time: Some(d(c.cpu_time)),
        interpreter_time: Some(d(c.interpreter_time)),
        state_lost: c.state_lost,
        output_truncated: c.output_truncated,
        output_bytes: c.output_bytes,
        message: c.message,
    }
}

pub fn info_to_proto(i: FileInfo) -> common::FileInfo {
    let kind = match i.kind {
        FileKind::Regular => common::FileType::Regular,
        FileKind::Directory => common::FileType::Directory,
        FileKind::Symlink => common::FileType::Symlink,
        FileKind::Other => common::FileType::Other,
    };
    common::FileInfo {
        path: i.path,
        name: i.name,
        r#type: kind as i32,
        size: i.size,
        mode: i.mode,
        modify_time: i.modified.map(capsa_proto::time::timestamp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(f: impl FnOnce(&mut common::ExecuteSpec)) -> Option<common::ExecuteSpec> {
        let mut s = common::ExecuteSpec {
            code: "1".into(),
            ..Default::default()
        };
        f(&mut s);
        Some(s)
    }

    fn field_of(r: Result<ExecuteRequest, Error>) -> &'static str {
        match r {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn defaults_apply() {
        let r = execute_request(spec(|_| {}), Duration::from_secs(60)).unwrap();
        assert_eq!(r.language, Language::Python);
        assert_eq!(r.timeout, Duration::from_secs(60));
        assert_eq!(r.max_output_bytes, DEFAULT_MAX_OUTPUT_BYTES);
        assert!(r.cwd.is_none());
    }

    #[test]
    fn bad_fields_are_named() {
        let d = Duration::from_secs(60);
        assert_eq!(field_of(execute_request(None, d)), "spec");
        assert_eq!(
            field_of(execute_request(
                spec(|s| s.code = "x".repeat(MAX_CODE_BYTES + 1)),
                d
            )),
            "code"
        );
        assert_eq!(
            field_of(execute_request(spec(|s| s.language = 9), d)),
            "language"
        );
        assert_eq!(
            field_of(execute_request(
                spec(|s| s.timeout = Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 0
                })),
                d
            )),
            "timeout"
        );
        assert_eq!(
            field_of(execute_request(spec(|s| s.cwd = "relative".into()), d)),
            "cwd"
        );
        assert_eq!(
            field_of(execute_request(
                spec(|s| s.cwd = "/no/such/dir/anywhere".into()),
                d
            )),
            "cwd"
        );
        assert_eq!(
            field_of(execute_request(
                spec(|s| {
                    s.env.insert("A-B".into(), "1".into());
                }),
                d
            )),
            "env"
        );
        assert_eq!(
            field_of(execute_request(
                spec(|s| s.max_output_bytes = MAX_OUTPUT_BYTES + 1),
                d
            )),
            "max_output_bytes"
        );
    }
}
