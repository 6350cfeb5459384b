//! A minimal QMP (QEMU Machine Protocol) client.
//!
//! Protocol: JSON objects, one per line, over a Unix socket. On connect QEMU sends a
//! greeting `{"QMP": {...}}`; the client must send `{"execute": "qmp_capabilities"}` before
//! anything else. Each command gets exactly one reply, `{"return": ...}` or
//! `{"error": {"class", "desc"}}`, in order; asynchronous `{"event": ...}` messages may
//! arrive in between and are skipped. Commands are serialised by a mutex, so replies never
//! need ids.
//!
//! QEMU connects to us (`-qmp unix:<path>` in client mode) rather than us to it: the
//! listener exists before QEMU starts, so there is nothing to poll for.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Mutex;

use crate::VmmError;

/// Longest a single QMP command may take before it counts as hung.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest reply line accepted (query-blockstats on one disk is about 2 KiB).
const MAX_LINE: usize = 1 << 20;

pub(crate) struct Qmp {
    conn: Mutex<Conn>,
}

struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Reads the greeting and negotiates capabilities on a fresh connection from QEMU.
    pub async fn handshake(stream: UnixStream) -> Result<Qmp, VmmError> {
        let (r, writer) = stream.into_split();
        let mut conn = Conn {
            reader: BufReader::new(r),
            writer,
        };
        let greeting = tokio::time::timeout(COMMAND_TIMEOUT, conn.read_message())
            .await
            .map_err(|_| VmmError::Timeout("qmp greeting".into()))??;
        if greeting.get("QMP").is_none() {
            return Err(qmp_err(
                "greeting",
                format!("unexpected greeting {greeting}"),
            ));
        }
        let qmp = Qmp {
            conn: Mutex::new(conn),
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs `command` with optional `arguments`; returns the `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        let mut conn = self.conn.lock().await;
        let msg = match arguments {
            Some(args) => json!({ "execute": command, "arguments": args }),
            None => json!({ "execute": command }),
        };
        tokio::time::timeout(COMMAND_TIMEOUT, conn.round_trip(command, &msg))
            .await
            .map_err(|_| VmmError::Timeout(format!("qmp {command}")))?
    }
}

impl Conn {
    async fn round_trip(&mut self, command: &str, msg: &Value) -> Result<Value, VmmError> {
        let mut line = serde_json::to_vec(msg).expect("a json value serialises");
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .await
            .map_err(|e| qmp_err(command, e.to_string()))?;
        loop {
            let reply = self
                .read_message()
                .await
                .map_err(|e| qmp_err(command, e.to_string()))?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let desc = err
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                return Err(qmp_err(command, desc.to_owned()));
            }
            // An event: not ours, keep reading.
        }
    }

    async fn read_message(&mut self) -> Result<Value, VmmError> {
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .await
            .map_err(|e| qmp_err("read", e.to_string()))?;
        if n == 0 {
            return Err(qmp_err("read", "connection closed".into()));
        }
        serde_json::from_str(line.trim()).map_err(|e| qmp_err("read", format!("bad json: {e}")))
    }
}

use tokio::io::AsyncReadExt as _;

fn qmp_err(command: &str, message: String) -> VmmError {
    VmmError::Qmp {
        command: command.to_owned(),
        message,
    }
}

/// Sums `rd_bytes` / `wr_bytes` over every device in a `query-blockstats` reply.
pub(crate) fn blockstats_totals(reply: &Value) -> (u64, u64) {
    let mut read = 0;
    let mut written = 0;
    for dev in reply.as_array().into_iter().flatten() {
        let stats = &dev["stats"];
        read += stats["rd_bytes"].as_u64().unwrap_or(0);
        written += stats["wr_bytes"].as_u64().unwrap_or(0);
    }
    (read, written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake QEMU: greets, then answers each command from a script, with an event first.
    async fn fake_qemu(stream: UnixStream) {
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
            .await
            .unwrap();
        while let Ok(Some(line)) = lines.next_line().await {
            let msg: Value = serde_json::from_str(&line).unwrap();
            let reply = match msg["execute"].as_str().unwrap() {
                "qmp_capabilities" => json!({"return": {}}),
                "query-status" => json!({"return": {"status": "running", "running": true}}),
                "query-blockstats" => {
                    w.write_all(b"{\"event\": \"RTC_CHANGE\", \"data\": {}}\r\n")
                        .await
                        .unwrap();
                    json!({"return": [
                        {"device": "root", "stats": {"rd_bytes": 100, "wr_bytes": 7}},
                        {"device": "", "stats": {"rd_bytes": 1, "wr_bytes": 1}}
                    ]})
                }
                other => {
                    json!({"error": {"class": "CommandNotFound", "desc": format!("The command {other} has not been found")}})
                }
            };
            w.write_all(format!("{reply}\r\n").as_bytes())
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn commands_events_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let client = tokio::spawn(async move { UnixStream::connect(path).await.unwrap() });
        let (server, _) = listener.accept().await.unwrap();
        tokio::spawn(fake_qemu(client.await.unwrap()));
        let qmp = Qmp::handshake(server).await.unwrap();
        let status = qmp.execute("query-status", None).await.unwrap();
        assert_eq!(status["status"], "running");
        let stats = qmp.execute("query-blockstats", None).await.unwrap();
        assert_eq!(blockstats_totals(&stats), (101, 8));
        let err = qmp
            .execute("savevm", Some(json!({"name": "x"})))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("has not been found"), "{err}");
    }
}
