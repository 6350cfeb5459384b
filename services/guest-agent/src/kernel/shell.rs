//! The shell kernel's side of the driver protocol (see `driver.sh`, embedded in the binary
//! and run with `bash -c`). Code goes to bash as files in the agent's private scratch
//! directory: the user's code in one, and a runner that first exports any session env set
//! since the last execute, then sources the code. A per-call env or cwd runs the code in a
//! subshell `( cd ..; export ..; source code )`, so neither can leak into the session;
//! the price is that variables it sets do not persist either.
//!
//! `exit` in user code ends the kernel's bash itself (it runs in the kernel, not in a
//! child): the execute completes as KERNEL_DIED with that exit code and the next execute
//! gets a fresh shell with the session env.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::Path;
use std::time::Duration;

use super::ExecuteRequest;
use super::run::{Done, DriverEvent, Prepared};

const DRIVER: &str = include_str!("driver.sh");

pub fn args() -> Vec<String> {
    ["--noprofile", "--norc", "-c", DRIVER, "capsa-shell"]
        .map(String::from)
        .to_vec()
}

/// Writes the code and runner files for `req`; returns the request line.
pub fn prepare(
    req: &ExecuteRequest,
    pending_env: &BTreeMap<String, String>,
    scratch: &Path,
    seq: u64,
) -> io::Result<Prepared> {
    // User code may have emptied /tmp; the directory is the agent's, so bring it back.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(scratch)?;
    let code_path = scratch.join(format!("exec-{seq}.sh"));
    let runner_path = scratch.join(format!("exec-{seq}.run.sh"));
    std::fs::write(&code_path, &req.code)?;
    let code = quote(&code_path.to_string_lossy());
    let mut runner = String::new();
    for (k, v) in pending_env {
        let _ = writeln!(runner, "export {k}={}", quote(v));
    }
    if req.env.is_empty() && req.cwd.is_none() {
        let _ = writeln!(runner, "source {code}");
    } else {
        runner.push_str("(\n");
        if let Some(cwd) = &req.cwd {
            let _ = writeln!(runner, "cd -- {} || exit 1", quote(cwd));
        }
        for (k, v) in &req.env {
            let _ = writeln!(runner, "export {k}={}", quote(v));
        }
        let _ = writeln!(runner, "source {code}\n)");
    }
    std::fs::write(&runner_path, runner)?;
    let line = format!("run {}\n", runner_path.to_string_lossy()).into_bytes();
    Ok(Prepared {
        line,
        files: vec![code_path, runner_path],
    })
}

/// Single-quotes `s` for bash.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `done <status> <start> <end>`, the times being `$EPOCHREALTIME`.
pub fn parse_event(line: &[u8]) -> Result<DriverEvent, String> {
    let text = std::str::from_utf8(line).map_err(|e| e.to_string())?;
    let mut parts = text.split(' ');
    if parts.next() != Some("done") {
        return Err(format!("unknown shell event {text:?}"));
    }
    let status: i32 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or("bad status")?;
    let start = parts.next().and_then(epoch).ok_or("bad start time")?;
    let end = parts.next().and_then(epoch).ok_or("bad end time")?;
    Ok(DriverEvent::Done(Done {
        ok: status == 0,
        exit_code: status,
        cpu: None,
        interpreter: end.saturating_sub(start),
    }))
}

/// `$EPOCHREALTIME` ("seconds.micros"; the decimal point follows the locale, so both
/// `.` and `,` are accepted). `None` past `Duration::MAX`: user code runs in the kernel's
/// bash and can change the variables the `done` line is printed from.
fn epoch(s: &str) -> Option<Duration> {
    let (secs, micros) = s.split_once(['.', ','])?;
    Duration::from_secs(secs.parse().ok()?).checked_add(Duration::from_micros(micros.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn done_lines_parse() {
        let DriverEvent::Done(d) = parse_event(b"done 3 100.250000 101.000000").unwrap() else {
            panic!("not done")
        };
        assert_eq!((d.ok, d.exit_code), (false, 3));
        assert_eq!(d.interpreter, Duration::from_millis(750));
        assert!(parse_event(b"hello").is_err());
        // Used to panic adding durations (a seed of the driver_protocol fuzz target).
        assert!(parse_event(b"done 0 18446744073709551615.1000000 0.0").is_err());
    }

    #[test]
    fn per_call_env_and_cwd_run_in_a_subshell() {
        let dir = tempfile::tempdir().unwrap();
        let req = ExecuteRequest {
            language: super::super::Language::Shell,
            code: "echo hi".into(),
            timeout: Duration::from_secs(1),
            env: BTreeMap::from([("A".to_string(), "x'y".to_string())]),
            cwd: Some("/tmp".into()),
            max_output_bytes: 1,
        };
        let session = BTreeMap::from([("S".to_string(), "1".to_string())]);
        let p = prepare(&req, &session, dir.path(), 7).unwrap();
        let runner = std::fs::read_to_string(&p.files[1]).unwrap();
        assert!(
            runner.starts_with("export S='1'\n(\ncd -- '/tmp' || exit 1\nexport A='x'\\''y'\n"),
            "{runner}"
        );
        assert_eq!(std::fs::read_to_string(&p.files[0]).unwrap(), "echo hi");
    }
}
