//! How results look on a terminal and as JSON lines. Exec output is written as it arrives:
//! stdout and stderr chunks go byte for byte to the terminal's stdout and stderr (flushed
//! per chunk), never decoded or split into lines.

use std::io::{self, Write};
use std::path::PathBuf;

use base64::Engine as _;
use capsa_client::{Completion, Event, MimeBundle, Status};
use serde_json::{Value, json};

use crate::args::{EXIT_INTERRUPTED, EXIT_KERNEL_DIED, EXIT_TIMEOUT};

/// The exit status `capsa exec` ends with for this completion.
pub fn exit_status(c: &Completion) -> u8 {
    match c.status {
        Status::Ok => 0,
        Status::Error => u8::try_from(c.exit_code)
            .ok()
            .filter(|s| *s != 0)
            .unwrap_or(1),
        Status::Timeout => EXIT_TIMEOUT,
        Status::Interrupted => EXIT_INTERRUPTED,
        Status::KernelDied => EXIT_KERNEL_DIED,
        Status::Unknown => 1,
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

    /// Renders one event.
    pub fn event(&mut self, event: &Event) -> io::Result<()> {
        if self.json {
            return self.json_event(event);
        }
        match event {
            Event::Stdout(data) => {
                self.out.write_all(data)?;
                self.out.flush()
            }
            Event::Stderr(data) => {
                self.err.write_all(data)?;
                self.err.flush()
            }
            Event::Result(result) => {
                if let Some(text) = result.get("text/plain") {
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
                let mut mimes: Vec<_> = display.iter().collect();
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
                let note = match c.status {
                    Status::Timeout => Some("timed out"),
                    Status::Interrupted => Some("interrupted"),
                    Status::KernelDied => Some("kernel died"),
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
            Event::Stdout(data) => with_bytes(json!({"event": "stdout"}), data),
            Event::Stderr(data) => with_bytes(json!({"event": "stderr"}), data),
            Event::Result(r) => json!({"event": "result", "data": mime_map(r)}),
            Event::Error(e) => json!({
                "event": "error", "name": e.name, "value": e.value, "traceback": e.traceback,
            }),
            Event::Display(d) => {
                let mut v = json!({"event": "display", "data": mime_map(d)});
                if self.display_dir_chosen {
                    let mut files = serde_json::Map::new();
                    for (mime, data) in d {
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
pub(crate) fn with_bytes(mut v: Value, data: &[u8]) -> Value {
    match std::str::from_utf8(data) {
        Ok(text) => v["text"] = json!(text),
        Err(_) => v["base64"] = json!(base64::engine::general_purpose::STANDARD.encode(data)),
    }
    v
}

fn mime_map(data: &MimeBundle) -> Value {
    let mut map = serde_json::Map::new();
    for (mime, bytes) in data {
        map.insert(mime.clone(), with_bytes(json!({}), bytes));
    }
    Value::Object(map)
}

/// Milliseconds, or `null` when unset.
pub(crate) fn millis(d: Option<std::time::Duration>) -> Value {
    d.map_or(Value::Null, |d| json!(d.as_millis() as u64))
}

pub fn completion_json(c: &Completion) -> Value {
    json!({
        "event": "completion",
        "status": c.status.as_str(),
        "exit_code": c.exit_code,
        "wall_time_ms": millis(c.wall_time),
        "cpu_time_ms": millis(c.cpu_time),
        "interpreter_time_ms": millis(c.interpreter_time),
        "state_lost": c.state_lost,
        "output_truncated": c.output_truncated,
        "output_bytes": c.output_bytes,
        "message": c.message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use capsa_client::ExecError;

    fn render(json: bool, events: &[Event], dir: Option<PathBuf>) -> (Vec<u8>, Vec<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut r = ExecRenderer::new(&mut out, &mut err, json, dir, "s-1");
        for e in events {
            r.event(e).unwrap();
        }
        (out, err)
    }

    fn chunk(data: &[u8]) -> Bytes {
        Bytes::copy_from_slice(data)
    }

    fn completion(status: Status, exit_code: i32) -> Completion {
        Completion {
            status,
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
            Event::Result([("text/plain".into(), "42".into())].into()),
            Event::Completion(completion(Status::Ok, 0)),
        ];
        let (out, err) = render(false, &events, None);
        assert_eq!(out, b"hello\xff\n42\n");
        assert_eq!(err, b"warning\n");
    }

    #[test]
    fn errors_print_their_traceback_and_abnormal_ends_a_note() {
        let events = [
            Event::Error(ExecError {
                name: "ZeroDivisionError".into(),
                value: "division by zero".into(),
                traceback: vec![
                    "Traceback (most recent call last):\n".into(),
                    "ZeroDivisionError: division by zero".into(),
                ],
            }),
            Event::Completion(Completion {
                status: Status::Timeout,
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
        let events = [Event::Display(
            [
                ("image/png".into(), png.clone().into()),
                ("text/plain".into(), "<Figure>".into()),
            ]
            .into(),
        )];
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
            Event::Stdout(chunk(&[0xfb, 0xff])),
            Event::Completion(Completion {
                status: Status::Error,
                exit_code: 3,
                wall_time: Some(std::time::Duration::from_millis(1500)),
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
        // Standard alphabet with padding (RFC 4648).
        assert_eq!(lines[1], json!({"event": "stdout", "base64": "AJ//"}));
        assert_eq!(lines[2], json!({"event": "stdout", "base64": "+/8="}));
        assert_eq!(lines[3]["status"], "ERROR");
        assert_eq!(lines[3]["exit_code"], 3);
        assert_eq!(lines[3]["wall_time_ms"], 1500);
        assert_eq!(lines[3]["cpu_time_ms"], Value::Null);
    }

    #[test]
    fn exit_statuses() {
        assert_eq!(exit_status(&completion(Status::Ok, 0)), 0);
        assert_eq!(exit_status(&completion(Status::Error, 3)), 3);
        assert_eq!(exit_status(&completion(Status::Error, 1)), 1);
        assert_eq!(exit_status(&completion(Status::Error, 0)), 1);
        assert_eq!(exit_status(&completion(Status::Error, 300)), 1);
        assert_eq!(exit_status(&completion(Status::Timeout, 0)), EXIT_TIMEOUT);
        assert_eq!(
            exit_status(&completion(Status::Interrupted, 0)),
            EXIT_INTERRUPTED
        );
        assert_eq!(
            exit_status(&completion(Status::KernelDied, 0)),
            EXIT_KERNEL_DIED
        );
        assert_eq!(exit_status(&completion(Status::Unknown, 0)), 1);
    }
}
