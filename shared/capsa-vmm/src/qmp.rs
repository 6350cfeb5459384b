//! A minimal QMP (QEMU Machine Protocol) client.
//!
//! Protocol: JSON objects, one per line, over a Unix socket. On connect QEMU sends a
//! greeting `{"QMP": {...}}`; the client must send `{"execute": "qmp_capabilities"}` before
//! anything else. Each command gets exactly one reply, `{"return": ...}` or
//! `{"error": {"class", "desc"}}`, in order; asynchronous `{"event": ...}` messages may
//! arrive in between and are skipped. Commands are serialised by a mutex. Each carries an
//! `id`, which QEMU echoes: a caller that gives up on a command (a timeout, a `select!`)
//! leaves its reply unread, and the next command skips it by its id instead of taking it
//! for its own. Partly read lines are kept for the same reason.
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
    /// The id of the last command sent.
    last_id: u64,
    /// A line read in part by a call that was cancelled (`read_until` keeps what it read;
    /// `read_line` would drop it).
    partial: Vec<u8>,
}

impl Qmp {
    /// Reads the greeting and negotiates capabilities on a fresh connection from QEMU.
    pub async fn handshake(stream: UnixStream) -> Result<Qmp, VmmError> {
        let (r, writer) = stream.into_split();
        let mut conn = Conn {
            reader: BufReader::new(r),
            writer,
            last_id: 0,
            partial: Vec::new(),
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
        conn.last_id += 1;
        let id = conn.last_id;
        let msg = match arguments {
            Some(args) => json!({ "execute": command, "arguments": args, "id": id }),
            None => json!({ "execute": command, "id": id }),
        };
        tokio::time::timeout(COMMAND_TIMEOUT, conn.round_trip(command, id, &msg))
            .await
            .map_err(|_| VmmError::Timeout(format!("qmp {command}")))?
    }
}

impl Conn {
    async fn round_trip(&mut self, command: &str, id: u64, msg: &Value) -> Result<Value, VmmError> {
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
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                // An event, or the reply to a command whose caller gave up: not ours.
                continue;
            }
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
        }
    }

    async fn read_message(&mut self) -> Result<Value, VmmError> {
        let n = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut self.partial)
            .await
            .map_err(|e| qmp_err("read", e.to_string()))?;
        if n == 0 {
            return Err(qmp_err("read", "connection closed".into()));
        }
        let line = std::mem::take(&mut self.partial);
        serde_json::from_slice(line.trim_ascii())
            .map_err(|e| qmp_err("read", format!("bad json: {e}")))
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

    /// A fake QEMU: greets, then answers each command from a script, with an event first.
    async fn fake_qemu(stream: UnixStream) {
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
            .await
            .unwrap();
        while let Ok(Some(line)) = lines.next_line().await {
            let msg: Value = serde_json::from_str(&line).unwrap();
            let mut reply = match msg["execute"].as_str().unwrap() {
                "qmp_capabilities" => json!({"return": {}}),
                "query-status" => json!({"return": {"status": "running", "running": true}}),
                "query-blockstats" => {
                    // An event, and the late reply to a command its caller gave up on.
                    w.write_all(b"{\"event\": \"RTC_CHANGE\", \"data\": {}}\r\n{\"return\": {}, \"id\": 1}\r\n")
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
            reply["id"] = msg["id"].clone();
            w.write_all(format!("{reply}\r\n").as_bytes())
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn commands_events_and_errors() {
        let (client, server) = UnixStream::pair().unwrap();
        tokio::spawn(fake_qemu(client));
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

    /// A caller that gives up mid-reply (here: half a line read) leaves the connection in
    /// step: the next command skips the late reply by its id and gets its own.
    #[tokio::test]
    async fn a_command_given_up_on_leaves_the_next_its_own_reply() {
        let (client, server) = UnixStream::pair().unwrap();
        tokio::spawn(async move {
            let (r, mut w) = client.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"{\"QMP\": {}}\n").await.unwrap();
            let caps: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            w.write_all(format!("{}\n", json!({"return": {}, "id": caps["id"]})).as_bytes())
                .await
                .unwrap();
            let slow: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            let late = format!("{}\n", json!({"return": "late", "id": slow["id"]}));
            let (head, tail) = late.split_at(10);
            w.write_all(head.as_bytes()).await.unwrap();
            let next: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            w.write_all(tail.as_bytes()).await.unwrap();
            w.write_all(format!("{}\n", json!({"return": "mine", "id": next["id"]})).as_bytes())
                .await
                .unwrap();
            // Keep the connection open until the client is done.
            let _ = lines.next_line().await;
        });
        let qmp = Qmp::handshake(server).await.unwrap();
        let gave_up =
            tokio::time::timeout(Duration::from_millis(300), qmp.execute("slow", None)).await;
        assert!(gave_up.is_err(), "{gave_up:?}");
        assert_eq!(qmp.execute("next", None).await.unwrap(), json!("mine"));
    }
}
