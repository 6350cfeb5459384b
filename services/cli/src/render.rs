//! How results look on a terminal and as JSON lines. Exec output is written as it arrives:
//! stdout and stderr chunks go byte for byte to the terminal's stdout and stderr (flushed
//! per chunk), never decoded or split into lines.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use capsa_proto::common::v1::{
    Completion, CompletionStatus, FileInfo, FileType, Usage, execute_event::Event,
};
use capsa_proto::session::v1::Session;
use serde_json::{Value, json};

use crate::args::{EXIT_INTERRUPTED, EXIT_KERNEL_DIED, EXIT_TIMEOUT};

/// The exit status `capsa exec` ends with for this completion.
pub fn exit_status(c: &Completion) -> u8 {
    match c.status() {
        CompletionStatus::Ok => 0,
        CompletionStatus::Error => u8::try_from(c.exit_code)
            .ok()
            .filter(|s| *s != 0)
            .unwrap_or(1),
        CompletionStatus::Timeout => EXIT_TIMEOUT,
        CompletionStatus::Interrupted => EXIT_INTERRUPTED,
        CompletionStatus::KernelDied => EXIT_KERNEL_DIED,
        CompletionStatus::Unspecified => 1,
    }
}

/// Writes one execute's events to `out` / `err`, as text or JSON lines.
pub struct ExecRenderer<O: Write, E: Write> {
    out: O,
    err: E,
    json: bool,
    display_dir: PathBuf,
    /// Whether display files go to a directory the user chose (JSON then names the files).
    display_dir_chosen: bool,
    file_prefix: String,
    displays: usize,
}

impl<O: Write, E: Write> ExecRenderer<O, E> {
    pub fn new(out: O, err: E, json: bool, display_dir: Option<PathBuf>, session: &str) -> Self {
        let display_dir_chosen = display_dir.is_some();
        let safe: String = session
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        ExecRenderer {
            out,
            err,
            json,
            display_dir: display_dir.unwrap_or_else(std::env::temp_dir),
            display_dir_chosen,
            file_prefix: format!("capsa-{safe}-{}", std::process::id()),
            displays: 0,
        }
    }

    /// Renders one event; returns the completion when this was it.
    pub fn event(&mut self, event: &Event) -> io::Result<()> {
        if self.json {
            return self.json_event(event);
        }
        match event {
            Event::Stdout(chunk) => {
                self.out.write_all(&chunk.data)?;
                self.out.flush()
            }
            Event::Stderr(chunk) => {
                self.err.write_all(&chunk.data)?;
                self.err.flush()
            }
            Event::Result(result) => {
                if let Some(text) = result.data.get("text/plain") {
                    self.out.write_all(text)?;
                    if !text.ends_with(b"\n") {
                        self.out.write_all(b"\n")?;
                    }
                }
                self.out.flush()
            }
            Event::Error(error) => {
                for line in &error.traceback {
                    self.err.write_all(line.as_bytes())?;
                    if !line.ends_with('\n') {
                        self.err.write_all(b"\n")?;
                    }
                }
                if error.traceback.is_empty() {
                    writeln!(self.err, "{}: {}", error.name, error.value)?;
                }
                self.err.flush()
            }
            Event::Display(display) => {
                let mut mimes: Vec<_> = display.data.iter().collect();
                mimes.sort_by(|a, b| a.0.cmp(b.0));
                // One file per display: the richest representation, text/plain as fallback.
                let chosen = mimes
                    .iter()
                    .find(|(m, _)| *m != "text/plain")
                    .or(mimes.first());
                if let Some((mime, data)) = chosen {
                    let path = self.save_display(mime, data)?;
                    writeln!(self.err, "capsa: {mime} saved to {}", path.display())?;
                }
                self.err.flush()
            }
            Event::Completion(c) => {
                let note = match c.status() {
                    CompletionStatus::Timeout => Some("timed out"),
                    CompletionStatus::Interrupted => Some("interrupted"),
                    CompletionStatus::KernelDied => Some("kernel died"),
                    _ => None,
                };
                if let Some(note) = note {
                    let detail = if c.message.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", c.message)
                    };
                    writeln!(self.err, "capsa: {note}{detail}")?;
                }
                if c.state_lost {
                    writeln!(
                        self.err,
                        "capsa: the kernel was restarted; its state is lost"
                    )?;
                }
                if c.output_truncated {
                    writeln!(
                        self.err,
                        "capsa: output truncated ({} bytes produced)",
                        c.output_bytes
                    )?;
                }
                self.err.flush()
            }
        }
    }

    fn save_display(&mut self, mime: &str, data: &[u8]) -> io::Result<PathBuf> {
        self.displays += 1;
        let name = format!("{}-{}.{}", self.file_prefix, self.displays, extension(mime));
        let path = self.display_dir.join(name);
        std::fs::write(&path, data)?;
        Ok(path)
    }

    fn json_event(&mut self, event: &Event) -> io::Result<()> {
        let value = match event {
            Event::Stdout(c) => with_bytes(json!({"event": "stdout"}), &c.data),
            Event::Stderr(c) => with_bytes(json!({"event": "stderr"}), &c.data),
            Event::Result(r) => json!({"event": "result", "data": mime_map(&r.data)}),
            Event::Error(e) => json!({
                "event": "error", "name": e.name, "value": e.value, "traceback": e.traceback,
            }),
            Event::Display(d) => {
                let mut v = json!({"event": "display", "data": mime_map(&d.data)});
                if self.display_dir_chosen {
                    let mut files = serde_json::Map::new();
                    for (mime, data) in &d.data {
                        let path = self.save_display(mime, data)?;
                        files.insert(mime.clone(), json!(path.display().to_string()));
                    }
                    v["files"] = Value::Object(files);
                }
                v
            }
            Event::Completion(c) => completion_json(c),
        };
        writeln!(self.out, "{value}")?;
        self.out.flush()
    }
}

fn extension(mime: &str) -> &'static str {
    match mime {
        "image/png" => "png",
        "image/jpeg" => "jpg",
        "image/svg+xml" => "svg",
        "image/gif" => "gif",
        "text/html" => "html",
        "application/json" => "json",
        "text/plain" => "txt",
        _ => "bin",
    }
}

/// Adds raw bytes to a JSON object: `"text"` when they are UTF-8, else `"base64"`.
fn with_bytes(mut v: Value, data: &[u8]) -> Value {
    match std::str::from_utf8(data) {
        Ok(text) => v["text"] = json!(text),
        Err(_) => v["base64"] = json!(base64(data)),
    }
    v
}

fn mime_map(data: &std::collections::HashMap<String, bytes::Bytes>) -> Value {
    let mut map = serde_json::Map::new();
    for (mime, bytes) in data {
        map.insert(mime.clone(), with_bytes(json!({}), bytes));
    }
    Value::Object(map)
}

fn millis(d: &Option<prost_types::Duration>) -> Value {
    match d.as_ref().and_then(capsa_proto::time::from_duration) {
        Some(d) => json!(d.as_millis() as u64),
        None => Value::Null,
    }
}

pub fn completion_json(c: &Completion) -> Value {
    let status = c
        .status()
        .as_str_name()
        .trim_start_matches("COMPLETION_STATUS_");
    json!({
        "event": "completion",
        "status": status,
        "exit_code": c.exit_code,
        "wall_time_ms": millis(&c.wall_time),
        "cpu_time_ms": millis(&c.cpu_time),
        "interpreter_time_ms": millis(&c.interpreter_time),
        "state_lost": c.state_lost,
        "output_truncated": c.output_truncated,
        "output_bytes": c.output_bytes,
        "message": c.message,
    })
}

/// Standard base64 with padding (RFC 4648).
pub fn base64(data: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(TABLE[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// RFC 3339 in UTC, e.g. `2026-11-28T13:45:00Z`; empty when unset.
pub fn timestamp(t: &Option<prost_types::Timestamp>) -> String {
    let Some(t) = t else { return String::new() };
    let days = t.seconds.div_euclid(86_400);
    let secs = t.seconds.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn name_of<T: AsRef<str>>(s: T, prefix: &str) -> String {
    s.as_ref().trim_start_matches(prefix).to_string()
}

pub fn session_json(s: &Session) -> Value {
    json!({
        "id": s.id,
        "status": name_of(s.status().as_str_name(), "SESSION_STATUS_"),
        "end_reason": name_of(s.end_reason().as_str_name(), "END_REASON_"),
        "end_message": s.end_message,
        "template": s.template,
        "vcpus": s.vcpus,
        "memory_mib": s.memory_mib,
        "env": s.env,
        "labels": s.metadata,
        "create_time": timestamp(&s.create_time),
        "expire_time": timestamp(&s.expire_time),
        "last_active_time": timestamp(&s.last_active_time),
        "end_time": timestamp(&s.end_time),
        "node_id": s.node_id,
        "vm_id": s.vm_id,
    })
}

/// `key: value` lines for a human.
pub fn session_text(s: &Session) -> String {
    let v = session_json(s);
    let mut out = String::new();
    for key in [
        "id",
        "status",
        "template",
        "vcpus",
        "memory_mib",
        "create_time",
        "expire_time",
        "last_active_time",
        "node_id",
        "vm_id",
    ] {
        out += &format!("{key:<17} {}\n", plain(&v[key]));
    }
    if s.end_reason() != capsa_proto::session::v1::EndReason::Unspecified {
        out += &format!("{:<17} {}\n", "end_reason", plain(&v["end_reason"]));
        out += &format!("{:<17} {}\n", "end_time", plain(&v["end_time"]));
        if !s.end_message.is_empty() {
            out += &format!("{:<17} {}\n", "end_message", s.end_message);
        }
    }
    for (title, map) in [("env", &s.env), ("labels", &s.metadata)] {
        let mut pairs: Vec<_> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
        pairs.sort();
        out += &format!("{title:<17} {}\n", pairs.join(" "));
    }
    out
}

/// One table row for `capsa list`.
pub fn session_row(s: &Session) -> String {
    let mut labels: Vec<_> = s.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!(
        "{:<38} {:<12} {:<10} {:>5} {:>7}  {:<20}  {:<20}  {}",
        s.id,
        name_of(s.status().as_str_name(), "SESSION_STATUS_"),
        s.template,
        s.vcpus,
        s.memory_mib,
        timestamp(&s.create_time),
        timestamp(&s.expire_time),
        labels.join(",")
    )
}

pub const SESSION_HEADER: &str = "ID                                     STATUS       TEMPLATE   VCPUS  MEM_MIB  CREATED               EXPIRES               LABELS";

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn usage_json(u: &Usage) -> Value {
    json!({
        "cpu_time_ms": millis(&u.cpu_time),
        "memory_used_bytes": u.memory_used_bytes,
        "memory_peak_bytes": u.memory_peak_bytes,
        "vmm_resident_bytes": u.vmm_resident_bytes,
        "network_rx_bytes": u.network_rx_bytes,
        "network_tx_bytes": u.network_tx_bytes,
        "disk_read_bytes": u.disk_read_bytes,
        "disk_write_bytes": u.disk_write_bytes,
        "uptime_ms": millis(&u.uptime),
        "sample_time": timestamp(&u.sample_time),
    })
}

pub fn usage_text(u: &Usage) -> String {
    let d = |d: &Option<prost_types::Duration>| {
        d.as_ref()
            .and_then(capsa_proto::time::from_duration)
            .map_or("-".into(), crate::duration::format)
    };
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / 1048576.0);
    [
        ("cpu_time", d(&u.cpu_time)),
        ("memory_used", mib(u.memory_used_bytes)),
        ("memory_peak", mib(u.memory_peak_bytes)),
        ("vmm_resident", mib(u.vmm_resident_bytes)),
        ("network_rx", format!("{} B", u.network_rx_bytes)),
        ("network_tx", format!("{} B", u.network_tx_bytes)),
        ("disk_read", format!("{} B", u.disk_read_bytes)),
        ("disk_write", format!("{} B", u.disk_write_bytes)),
        ("uptime", d(&u.uptime)),
        ("sampled_at", timestamp(&u.sample_time)),
    ]
    .iter()
    .map(|(k, v)| format!("{k:<14} {v}\n"))
    .collect()
}

pub fn file_json(f: &FileInfo) -> Value {
    json!({
        "path": f.path,
        "name": f.name,
        "type": name_of(f.r#type().as_str_name(), "FILE_TYPE_").to_lowercase(),
        "size": f.size,
        "mode": format!("{:o}", f.mode),
        "modify_time": timestamp(&f.modify_time),
    })
}

/// An `ls -l`-like line.
pub fn file_row(f: &FileInfo) -> String {
    let kind = match f.r#type() {
        FileType::Directory => 'd',
        FileType::Symlink => 'l',
        FileType::Regular => '-',
        _ => '?',
    };
    let suffix = if f.r#type() == FileType::Directory {
        "/"
    } else {
        ""
    };
    format!(
        "{kind}{:04o} {:>12}  {:<20}  {}{suffix}",
        f.mode,
        f.size,
        timestamp(&f.modify_time),
        f.name
    )
}

/// A note for humans on stderr, e.g. after an upload.
pub fn bytes_note(path: &Path, size: u64, sha256: &str, elapsed: Duration) -> String {
    format!(
        "{} ({size} bytes, sha256 {sha256}) in {}",
        path.display(),
        crate::duration::format(elapsed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsa_proto::common::v1::{DisplayData, ExecuteError, ExecuteResult, OutputChunk};

    fn render(json: bool, events: &[Event], dir: Option<PathBuf>) -> (Vec<u8>, Vec<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut r = ExecRenderer::new(&mut out, &mut err, json, dir, "s-1");
        for e in events {
            r.event(e).unwrap();
        }
        (out, err)
    }

    fn chunk(data: &[u8]) -> OutputChunk {
        OutputChunk {
            data: bytes::Bytes::copy_from_slice(data),
        }
    }

    fn completion(status: CompletionStatus, exit_code: i32) -> Completion {
        Completion {
            status: status as i32,
            exit_code,
            ..Default::default()
        }
    }

    #[test]
    fn text_output_is_raw_bytes_and_the_result_is_printed_like_a_repl() {
        let events = [
            Event::Stdout(chunk(b"hel")),
            Event::Stdout(chunk(&[b'l', b'o', 0xff, b'\n'])),
            Event::Stderr(chunk(b"warning\n")),
            Event::Result(ExecuteResult {
                data: [("text/plain".into(), "42".into())].into(),
            }),
            Event::Completion(completion(CompletionStatus::Ok, 0)),
        ];
        let (out, err) = render(false, &events, None);
        assert_eq!(out, b"hello\xff\n42\n");
        assert_eq!(err, b"warning\n");
    }

    #[test]
    fn errors_print_their_traceback_and_abnormal_ends_a_note() {
        let events = [
            Event::Error(ExecuteError {
                name: "ZeroDivisionError".into(),
                value: "division by zero".into(),
                traceback: vec![
                    "Traceback (most recent call last):\n".into(),
                    "ZeroDivisionError: division by zero".into(),
                ],
            }),
            Event::Completion(Completion {
                status: CompletionStatus::Timeout as i32,
                message: "timed out after 1s".into(),
                state_lost: true,
                ..Default::default()
            }),
        ];
        let (out, err) = render(false, &events, None);
        assert!(out.is_empty());
        let err = String::from_utf8(err).unwrap();
        assert!(
            err.starts_with(
                "Traceback (most recent call last):\nZeroDivisionError: division by zero\n"
            ),
            "{err}"
        );
        assert!(
            err.contains("capsa: timed out: timed out after 1s"),
            "{err}"
        );
        assert!(err.contains("state is lost"), "{err}");
    }

    #[test]
    fn display_data_is_saved_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let png = b"\x89PNG\r\n\x1a\nfake".to_vec();
        let events = [Event::Display(DisplayData {
            data: [
                ("image/png".into(), png.clone().into()),
                ("text/plain".into(), "<Figure>".into()),
            ]
            .into(),
        })];
        let (_, err) = render(false, &events, Some(dir.path().to_owned()));
        let err = String::from_utf8(err).unwrap();
        let path = err
            .trim()
            .strip_prefix("capsa: image/png saved to ")
            .unwrap();
        assert!(path.ends_with(".png"), "{path}");
        assert_eq!(std::fs::read(path).unwrap(), png);
    }

    #[test]
    fn json_lines_carry_text_or_base64() {
        let events = [
            Event::Stdout(chunk(b"hi\n")),
            Event::Stdout(chunk(&[0, 159, 255])),
            Event::Completion(Completion {
                status: CompletionStatus::Error as i32,
                exit_code: 3,
                wall_time: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 500_000_000,
                }),
                ..Default::default()
            }),
        ];
        let (out, err) = render(true, &events, None);
        assert!(err.is_empty());
        let lines: Vec<Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0], json!({"event": "stdout", "text": "hi\n"}));
        assert_eq!(lines[1], json!({"event": "stdout", "base64": "AJ//"}));
        assert_eq!(lines[2]["status"], "ERROR");
        assert_eq!(lines[2]["exit_code"], 3);
        assert_eq!(lines[2]["wall_time_ms"], 1500);
    }

    #[test]
    fn exit_statuses() {
        assert_eq!(exit_status(&completion(CompletionStatus::Ok, 0)), 0);
        assert_eq!(exit_status(&completion(CompletionStatus::Error, 3)), 3);
        assert_eq!(exit_status(&completion(CompletionStatus::Error, 1)), 1);
        assert_eq!(exit_status(&completion(CompletionStatus::Error, 0)), 1);
        assert_eq!(exit_status(&completion(CompletionStatus::Error, 300)), 1);
        assert_eq!(
            exit_status(&completion(CompletionStatus::Timeout, 0)),
            EXIT_TIMEOUT
        );
        assert_eq!(
            exit_status(&completion(CompletionStatus::Interrupted, 0)),
            EXIT_INTERRUPTED
        );
        assert_eq!(
            exit_status(&completion(CompletionStatus::KernelDied, 0)),
            EXIT_KERNEL_DIED
        );
    }

    #[test]
    fn base64_and_timestamps() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        let t = Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        });
        assert_eq!(timestamp(&t), "2023-11-14T22:13:20Z");
        assert_eq!(
            timestamp(&Some(prost_types::Timestamp {
                seconds: 951_782_400,
                nanos: 0
            })),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(timestamp(&None), "");
    }
}
