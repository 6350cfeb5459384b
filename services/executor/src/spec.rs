//! Validation of what a caller asks the guest to run, before anything reaches the VM.
//! session-manager enforces the public bounds; these are the executor's own, so a bad
//! request from any caller is refused here with a message naming the field.

use std::collections::HashMap;
use std::time::Duration;

use capsa_proto::common::v1::{ExecuteSpec, Language};
use capsa_proto::limits::{
    MAX_CODE_BYTES, MAX_ENV_ENTRIES, MAX_ENV_NAME_BYTES, MAX_ENV_VALUE_BYTES, MAX_EXEC_TIMEOUT,
    MAX_OUTPUT_BYTES, MAX_PATH_BYTES,
};

use crate::error::Error;

/// An execute the executor accepted: the spec to forward (with its timeout filled in) and
/// the facts the stream limits and the kernel gate need.
#[derive(Debug)]
pub struct CheckedSpec {
    pub spec: ExecuteSpec,
    pub language: Language,
    pub timeout: Duration,
}

/// Checks `spec` and fills an unset timeout with `default_timeout`, so the guest and the
/// executor's stream limits use the same number.
pub fn check(spec: Option<ExecuteSpec>, default_timeout: Duration) -> Result<CheckedSpec, Error> {
    let mut spec = spec.ok_or_else(|| Error::invalid("spec", "is required"))?;
    let language = Language::try_from(spec.language)
        .map_err(|_| Error::invalid("spec.language", format!("unknown value {}", spec.language)))?;
    if spec.code.len() > MAX_CODE_BYTES {
        return Err(Error::invalid(
            "spec.code",
            format!(
                "is {} bytes; the limit is {MAX_CODE_BYTES}",
                spec.code.len()
            ),
        ));
    }
    let timeout = match &spec.timeout {
        None => default_timeout,
        Some(d) => capsa_proto::time::from_duration(d)
            .filter(|t| !t.is_zero() && *t <= MAX_EXEC_TIMEOUT)
            .ok_or_else(|| {
                Error::invalid(
                    "spec.timeout",
                    format!("must be between 1 ms and {MAX_EXEC_TIMEOUT:?}"),
                )
            })?,
    };
    spec.timeout = Some(capsa_proto::time::duration(timeout));
    if spec.max_output_bytes > MAX_OUTPUT_BYTES {
        return Err(Error::invalid(
            "spec.max_output_bytes",
            format!("must be at most {MAX_OUTPUT_BYTES}"),
        ));
    }
    check_env("spec.env", &spec.env)?;
    if spec.cwd.len() > MAX_PATH_BYTES || spec.cwd.contains('\0') {
        return Err(Error::invalid(
            "spec.cwd",
            format!("must be at most {MAX_PATH_BYTES} bytes without NUL"),
        ));
    }
    Ok(CheckedSpec {
        spec,
        language,
        timeout,
    })
}

/// Environment maps: bounded, and every entry something `setenv` accepts.
pub fn check_env(field: &'static str, env: &HashMap<String, String>) -> Result<(), Error> {
    if env.len() > MAX_ENV_ENTRIES {
        return Err(Error::invalid(
            field,
            format!("has more than {MAX_ENV_ENTRIES} entries"),
        ));
    }
    for (key, value) in env {
        if key.is_empty() || key.len() > MAX_ENV_NAME_BYTES || key.contains(['=', '\0']) {
            return Err(Error::invalid(
                field,
                format!(
                    "has an invalid name {key:?} (1 to {MAX_ENV_NAME_BYTES} bytes, no '=' or NUL)"
                ),
            ));
        }
        if value.len() > MAX_ENV_VALUE_BYTES || value.contains('\0') {
            return Err(Error::invalid(
                field,
                format!("value of {key} must be at most {MAX_ENV_VALUE_BYTES} bytes without NUL"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(r: Result<CheckedSpec, Error>) -> &'static str {
        match r {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    fn spec() -> ExecuteSpec {
        ExecuteSpec {
            code: "print(1)".into(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_fill_in() {
        let c = check(Some(spec()), Duration::from_secs(60)).unwrap();
        assert_eq!(c.language, Language::Unspecified);
        assert_eq!(c.timeout, Duration::from_secs(60));
        assert_eq!(
            c.spec.timeout,
            Some(capsa_proto::time::duration(Duration::from_secs(60)))
        );
    }

    #[test]
    fn every_bad_field_is_named() {
        let d = Duration::from_secs(60);
        assert_eq!(field_of(check(None, d)), "spec");
        let s = ExecuteSpec {
            language: 7,
            ..spec()
        };
        assert_eq!(field_of(check(Some(s), d)), "spec.language");
        let s = ExecuteSpec {
            code: "x".repeat(MAX_CODE_BYTES + 1),
            ..spec()
        };
        assert_eq!(field_of(check(Some(s), d)), "spec.code");
        for t in [Duration::ZERO, Duration::from_secs(3601)] {
            let s = ExecuteSpec {
                timeout: Some(capsa_proto::time::duration(t)),
                ..spec()
            };
            assert_eq!(field_of(check(Some(s), d)), "spec.timeout");
        }
        let s = ExecuteSpec {
            max_output_bytes: MAX_OUTPUT_BYTES + 1,
            ..spec()
        };
        assert_eq!(field_of(check(Some(s), d)), "spec.max_output_bytes");
        let s = ExecuteSpec {
            env: [("A=B".into(), "1".into())].into(),
            ..spec()
        };
        assert_eq!(field_of(check(Some(s), d)), "spec.env");
        let s = ExecuteSpec {
            cwd: "/tmp\0".into(),
            ..spec()
        };
        assert_eq!(field_of(check(Some(s), d)), "spec.cwd");
    }

    #[test]
    fn code_of_exactly_the_limit_is_accepted() {
        let s = ExecuteSpec {
            code: "x".repeat(MAX_CODE_BYTES),
            ..spec()
        };
        assert!(check(Some(s), Duration::from_secs(1)).is_ok());
    }
}
