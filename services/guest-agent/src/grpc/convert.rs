//! Proto ⇄ domain translation for the AgentService: request validation (every bad field
//! is INVALID_ARGUMENT naming it) and the conversion of events, file infos and process
//! infos back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use capsa_proto::agent::v1 as pb;
use capsa_proto::common::v1 as common;

use crate::error::Error;
use crate::files::{self, FileInfo, FileKind};
use crate::identity;
use crate::kernel::{Completion, Event, ExecuteRequest, Language};
use crate::processes::{self, ExitInfo, Info, Kind, ProcessSpec, Stream};
use crate::terminal::{Size, TerminalSpec};

use capsa_proto::limits::{
    DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_PROCESS_OUTPUT_BUFFER_BYTES, DEFAULT_WAIT_TIMEOUT,
    MAX_CODE_BYTES, MAX_EXEC_TIMEOUT, MAX_OUTPUT_BYTES, MAX_PROCESS_ARGS,
    MAX_PROCESS_OUTPUT_BUFFER_BYTES, MAX_PROCESS_SPEC_BYTES, MAX_STREAM_DATA_BYTES,
    MAX_TERMINAL_DIMENSION, MAX_WAIT_TIMEOUT,
};

/// Longest TERM value.
const MAX_TERM_BYTES: usize = 256;

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
    let cwd = check_cwd(&spec.cwd)?;
    Ok(ExecuteRequest {
        language,
        code: spec.code,
        timeout,
        env: check_env(spec.env)?,
        cwd: cwd.map(|p| p.to_string_lossy().into_owned()),
        max_output_bytes,
    })
}

/// An absolute, existing directory; empty means none.
fn check_cwd(cwd: &str) -> Result<Option<PathBuf>, Error> {
    if cwd.is_empty() {
        return Ok(None);
    }
    let dir = files::check_path("cwd", cwd)?;
    if !dir.is_dir() {
        return Err(Error::invalid(
            "cwd",
            format!("{} is not an existing directory", dir.display()),
        ));
    }
    Ok(Some(dir))
}

/// A program and its arguments: a command, no NUL anywhere, at most MAX_PROCESS_ARGS.
fn check_command(command: &str, args: &[String]) -> Result<(), Error> {
    if command.contains('\0') {
        return Err(Error::invalid("command", "contains a NUL byte"));
    }
    if args.len() > MAX_PROCESS_ARGS {
        return Err(Error::invalid(
            "args",
            format!(
                "has {} entries; the limit is {MAX_PROCESS_ARGS}",
                args.len()
            ),
        ));
    }
    if args.iter().any(|a| a.contains('\0')) {
        return Err(Error::invalid("args", "an argument contains a NUL byte"));
    }
    Ok(())
}

pub fn process_spec(spec: Option<common::ProcessSpec>) -> Result<ProcessSpec, Error> {
    let spec = spec.ok_or_else(|| Error::invalid("spec", "is missing"))?;
    if spec.command.is_empty() {
        return Err(Error::invalid("command", "is empty"));
    }
    check_command(&spec.command, &spec.args)?;
    let args_bytes: usize = spec.args.iter().map(String::len).sum();
    let total = spec.command.len() + args_bytes + spec.stdin.len();
    if total > MAX_PROCESS_SPEC_BYTES {
        let field = if spec.stdin.len() > args_bytes {
            "stdin"
        } else {
            "args"
        };
        return Err(Error::invalid(
            field,
            format!(
                "command, args and stdin are {total} bytes together; the limit is \
                 {MAX_PROCESS_SPEC_BYTES}"
            ),
        ));
    }
    let output_buffer_bytes = match spec.output_buffer_bytes {
        0 => DEFAULT_PROCESS_OUTPUT_BUFFER_BYTES,
        n if n <= MAX_PROCESS_OUTPUT_BUFFER_BYTES => n,
        n => {
            return Err(Error::invalid(
                "output_buffer_bytes",
                format!("{n} exceeds {MAX_PROCESS_OUTPUT_BUFFER_BYTES}"),
            ));
        }
    };
    Ok(ProcessSpec {
        cwd: check_cwd(&spec.cwd)?,
        env: check_env(spec.env)?,
        command: spec.command,
        args: spec.args,
        stdin: spec.stdin,
        keep_stdin_open: spec.keep_stdin_open,
        output_buffer_bytes: output_buffer_bytes as usize,
    })
}

/// Rows and columns in 1..=MAX_TERMINAL_DIMENSION; `field` is `size` or `resize`.
pub fn terminal_size(
    field: &'static str,
    size: Option<common::TerminalSize>,
) -> Result<Size, Error> {
    let size = size.ok_or_else(|| Error::invalid(field, "is missing"))?;
    let ok = |n: u32| (1..=MAX_TERMINAL_DIMENSION).contains(&n);
    if !ok(size.rows) || !ok(size.cols) {
        return Err(Error::invalid(
            field,
            format!(
                "{}x{} (rows x cols): each must be 1..={MAX_TERMINAL_DIMENSION}",
                size.rows, size.cols
            ),
        ));
    }
    Ok(Size {
        rows: size.rows as u16,
        cols: size.cols as u16,
    })
}

pub fn terminal_spec(open: common::TerminalOpen) -> Result<TerminalSpec, Error> {
    check_command(&open.command, &open.args)?;
    let term = match open.term.as_str() {
        "" => "xterm-256color".to_string(),
        t if t.len() > MAX_TERM_BYTES || t.contains('\0') => {
            return Err(Error::invalid(
                "term",
                format!("must be at most {MAX_TERM_BYTES} bytes, without NUL"),
            ));
        }
        t => t.to_string(),
    };
    Ok(TerminalSpec {
        size: terminal_size("size", open.size)?,
        cwd: check_cwd(&open.cwd)?,
        env: check_env(open.env)?,
        command: open.command,
        args: open.args,
        term,
    })
}

/// Stdin, keystrokes and port data: at most MAX_STREAM_DATA_BYTES a message.
pub fn stream_data(data: &[u8]) -> Result<(), Error> {
    if data.len() > MAX_STREAM_DATA_BYTES {
        return Err(Error::invalid(
            "data",
            format!(
                "is {} bytes; the limit is {MAX_STREAM_DATA_BYTES} a message",
                data.len()
            ),
        ));
    }
    Ok(())
}

pub fn wait_timeout(timeout: Option<prost_types::Duration>) -> Result<Duration, Error> {
    match &timeout {
        None => Ok(DEFAULT_WAIT_TIMEOUT),
        Some(d) => match capsa_proto::time::from_duration(d) {
            Some(t) if !t.is_zero() && t <= MAX_WAIT_TIMEOUT => Ok(t),
            _ => Err(Error::invalid(
                "timeout",
                format!("must be positive and at most {MAX_WAIT_TIMEOUT:?}"),
            )),
        },
    }
}

pub fn signal(value: i32) -> Result<nix::sys::signal::Signal, Error> {
    use nix::sys::signal::Signal as S;
    match common::Signal::try_from(value) {
        Ok(common::Signal::Term) => Ok(S::SIGTERM),
        Ok(common::Signal::Kill) => Ok(S::SIGKILL),
        Ok(common::Signal::Int) => Ok(S::SIGINT),
        Ok(common::Signal::Hup) => Ok(S::SIGHUP),
        Ok(common::Signal::Unspecified) => Err(Error::invalid("signal", "is unspecified")),
        Err(_) => Err(Error::invalid("signal", format!("unknown value {value}"))),
    }
}

pub fn port(port: u32) -> Result<u16, Error> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(Error::invalid(
            "port",
            format!("{port} is not a TCP port (1..=65535)"),
        )),
    }
}

/// Reidentify's fields, checked in the order the proto declares them.
pub fn reidentify_request(r: pb::ReidentifyRequest) -> Result<identity::Request, Error> {
    let network = identity::Network::parse(&r.address, &r.gateway, &r.mac)?;
    identity::check_entropy(&r.entropy)?;
    let host_time = match r.host_time {
        None => return Err(Error::invalid("host_time", "is missing")),
        Some(t) => SystemTime::try_from(t)
            .ok()
            .filter(|t| *t > SystemTime::UNIX_EPOCH)
            .ok_or_else(|| Error::invalid("host_time", "must be a time after the Unix epoch"))?,
    };
    Ok(identity::Request {
        network,
        entropy: r.entropy.to_vec(),
        host_time,
    })
}

/// A signed number of nanoseconds as `google.protobuf.Duration` (seconds and nanos share
/// the sign).
pub fn signed_duration(nanos: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: nanos / 1_000_000_000,
        nanos: (nanos % 1_000_000_000) as i32,
    }
}

pub fn process_info_to_proto(i: Info) -> common::ProcessInfo {
    let kind = match i.kind {
        Kind::Background => common::ProcessKind::Background,
        Kind::Terminal => common::ProcessKind::Terminal,
    };
    let state = match i.exit {
        None => common::ProcessState::Running,
        Some(_) => common::ProcessState::Exited,
    };
    common::ProcessInfo {
        process_id: i.id,
        kind: kind as i32,
        pid: i.pid,
        command: i.command,
        args: i.args,
        state: state as i32,
        exit_code: i.exit.map_or(0, |e| e.code),
        signal: i.exit.map_or(0, |e| e.signal),
        start_time: Some(capsa_proto::time::timestamp(i.start_time)),
        end_time: i.exit.map(|e| capsa_proto::time::timestamp(e.end_time)),
        output_offset: i.output_offset,
        stdin_open: i.stdin_open,
    }
}

pub fn exit_to_proto(e: ExitInfo) -> common::ProcessExit {
    common::ProcessExit {
        exit_code: e.code,
        signal: e.signal,
    }
}

pub fn process_event_to_proto(event: processes::Event) -> pb::AttachProcessResponse {
    use common::process_event::Event as E;
    let event = match event {
        processes::Event::Output {
            stream,
            offset,
            data,
        } => {
            let stream = match stream {
                Stream::Stdout => common::OutputStream::Stdout,
                Stream::Stderr => common::OutputStream::Stderr,
            };
            E::Output(common::ProcessOutputChunk {
                stream: stream as i32,
                offset,
                data,
            })
        }
        processes::Event::Dropped { from, to } => E::Dropped(common::OutputDropped {
            from_offset: from,
            to_offset: to,
        }),
        processes::Event::Exit(e) => E::Exit(exit_to_proto(e)),
    };
    pb::AttachProcessResponse {
        event: Some(common::ProcessEvent { event: Some(event) }),
    }
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

    fn process(f: impl FnOnce(&mut common::ProcessSpec)) -> Option<common::ProcessSpec> {
        let mut s = common::ProcessSpec {
            command: "sleep".into(),
            args: vec!["1".into()],
            ..Default::default()
        };
        f(&mut s);
        Some(s)
    }

    fn field<T: std::fmt::Debug>(r: Result<T, Error>) -> &'static str {
        match r {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn process_specs_are_checked_and_defaulted() {
        let s = process_spec(process(|_| {})).unwrap();
        assert_eq!(
            s.output_buffer_bytes as u64,
            DEFAULT_PROCESS_OUTPUT_BUFFER_BYTES
        );
        assert!(s.cwd.is_none() && !s.keep_stdin_open);
        assert_eq!(field(process_spec(None)), "spec");
        assert_eq!(
            field(process_spec(process(|s| s.command.clear()))),
            "command"
        );
        assert_eq!(
            field(process_spec(process(|s| s.command = "a\0b".into()))),
            "command"
        );
        assert_eq!(
            field(process_spec(process(
                |s| s.args = vec!["x".into(); MAX_PROCESS_ARGS + 1]
            ))),
            "args"
        );
        assert_eq!(
            field(process_spec(process(
                |s| s.stdin = vec![0u8; MAX_PROCESS_SPEC_BYTES].into()
            ))),
            "stdin"
        );
        assert_eq!(
            field(process_spec(process(
                |s| s.args = vec!["x".repeat(MAX_PROCESS_SPEC_BYTES / 2); 3]
            ))),
            "args"
        );
        assert_eq!(
            field(process_spec(process(
                |s| s.output_buffer_bytes = MAX_PROCESS_OUTPUT_BUFFER_BYTES + 1
            ))),
            "output_buffer_bytes"
        );
        assert_eq!(
            field(process_spec(process(|s| s.cwd = "rel".into()))),
            "cwd"
        );
        assert_eq!(
            field(process_spec(process(|s| {
                s.env.insert("1X".into(), "v".into());
            }))),
            "env"
        );
    }

    #[test]
    fn terminal_fields_are_checked() {
        let open = |f: &dyn Fn(&mut common::TerminalOpen)| {
            let mut o = common::TerminalOpen {
                size: Some(common::TerminalSize { rows: 24, cols: 80 }),
                ..Default::default()
            };
            f(&mut o);
            terminal_spec(o)
        };
        let s = open(&|_| {}).unwrap();
        assert_eq!(
            (s.term.as_str(), s.size),
            ("xterm-256color", Size { rows: 24, cols: 80 })
        );
        assert_eq!(field(open(&|o| o.size = None)), "size");
        assert_eq!(
            field(open(
                &|o| o.size = Some(common::TerminalSize { rows: 0, cols: 80 })
            )),
            "size"
        );
        assert_eq!(
            field(open(&|o| o.size = Some(common::TerminalSize {
                rows: 24,
                cols: MAX_TERMINAL_DIMENSION + 1
            }))),
            "size"
        );
        assert_eq!(field(open(&|o| o.term = "x\0".into())), "term");
        assert_eq!(field(open(&|o| o.cwd = "/no/such/dir/x".into())), "cwd");
        assert_eq!(
            field(terminal_size(
                "resize",
                Some(common::TerminalSize { rows: 1, cols: 0 })
            )),
            "resize"
        );
        assert!(
            terminal_size(
                "resize",
                Some(common::TerminalSize {
                    rows: 1000,
                    cols: 1
                })
            )
            .is_ok()
        );
    }

    #[test]
    fn small_fields_are_checked() {
        assert_eq!(field(port(0)), "port");
        assert_eq!(field(port(65536)), "port");
        assert_eq!(port(65535).unwrap(), 65535);
        assert_eq!(field(signal(0)), "signal");
        assert_eq!(field(signal(99)), "signal");
        assert_eq!(
            signal(common::Signal::Int as i32).unwrap(),
            nix::sys::signal::Signal::SIGINT
        );
        assert_eq!(wait_timeout(None).unwrap(), DEFAULT_WAIT_TIMEOUT);
        let secs = |s| {
            Some(prost_types::Duration {
                seconds: s,
                nanos: 0,
            })
        };
        assert_eq!(field(wait_timeout(secs(0))), "timeout");
        assert_eq!(field(wait_timeout(secs(301))), "timeout");
        assert_eq!(
            field(stream_data(&vec![0u8; MAX_STREAM_DATA_BYTES + 1])),
            "data"
        );
        assert!(stream_data(&vec![0u8; MAX_STREAM_DATA_BYTES]).is_ok());
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

    #[test]
    fn reidentify_fields_are_checked_and_named() {
        let ok = || pb::ReidentifyRequest {
            address: "10.0.0.2/30".into(),
            gateway: "10.0.0.1".into(),
            mac: "52:54:00:0a:0b:0c".into(),
            entropy: vec![5u8; 32].into(),
            host_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
        };
        let r = reidentify_request(ok()).unwrap();
        assert!(r.network.is_some());
        assert_eq!(r.entropy, vec![5u8; 32]);
        assert_eq!(
            r.host_time,
            SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5)
        );
        let without_network = pb::ReidentifyRequest {
            address: String::new(),
            gateway: String::new(),
            mac: String::new(),
            ..ok()
        };
        assert!(
            reidentify_request(without_network)
                .unwrap()
                .network
                .is_none()
        );
        let bad = |f: fn(&mut pb::ReidentifyRequest)| {
            let mut r = ok();
            f(&mut r);
            field(reidentify_request(r))
        };
        assert_eq!(bad(|r| r.address = "10.0.0.2".into()), "address");
        assert_eq!(bad(|r| r.gateway = "10.0.1.1".into()), "gateway");
        assert_eq!(bad(|r| r.mac = "52:54:00:0A:0B:0C".into()), "mac");
        assert_eq!(bad(|r| r.entropy = vec![1u8; 31].into()), "entropy");
        assert_eq!(bad(|r| r.entropy = vec![1u8; 513].into()), "entropy");
        assert_eq!(bad(|r| r.host_time = None), "host_time");
        assert_eq!(
            bad(|r| r.host_time = Some(prost_types::Timestamp {
                seconds: -1,
                nanos: 0
            })),
            "host_time"
        );
    }

    #[test]
    fn a_negative_offset_is_negative_in_both_parts() {
        let d = signed_duration(-1_500_000_000);
        assert_eq!((d.seconds, d.nanos), (-1, -500_000_000));
        let d = signed_duration(60_000_000_001);
        assert_eq!((d.seconds, d.nanos), (60, 1));
        assert_eq!(signed_duration(0), prost_types::Duration::default());
    }
}
