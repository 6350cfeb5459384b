//! The guest's serial console. The VMM writes it to its stdout (a pipe); one task drains
//! the pipe into `console.log`, keeping at most [`CONSOLE_CAP`] bytes so a chatty guest
//! cannot fill the disk, and never stops draining so the guest never blocks on the UART.
//! Waiters for a console marker (the benchmark floor's "ready" line) look at the log each
//! time it grows.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::ChildStdout;
use tokio::sync::watch;

use crate::VmmError;

/// Bytes of console output kept per VM.
pub(crate) const CONSOLE_CAP: u64 = 1 << 20;

/// Handle on a VM's console log.
pub(crate) struct Console {
    path: PathBuf,
    /// Bytes written so far; `closed` once the pipe hit EOF (the VMM exited).
    progress: watch::Receiver<(u64, bool)>,
}

impl Console {
    /// Starts draining `stdout` into `path`.
    pub fn start(stdout: ChildStdout, path: &Path) -> Result<Console, VmmError> {
        let file =
            std::fs::File::create(path).map_err(|e| VmmError::io("create console log", path, e))?;
        let (tx, progress) = watch::channel((0u64, false));
        tokio::spawn(drain(stdout, tokio::fs::File::from_std(file), tx));
        Ok(Console {
            path: path.to_owned(),
            progress,
        })
    }

    /// Resolves once `marker` is in the log; errors if the console closes without it.
    pub async fn wait_for(&self, marker: &str) -> Result<(), VmmError> {
        let mut rx = self.progress.clone();
        loop {
            let closed = rx.borrow_and_update().1;
            let text = tokio::fs::read(&self.path).await.unwrap_or_default();
            if contains(&text, marker.as_bytes()) {
                return Ok(());
            }
            if closed || rx.changed().await.is_err() {
                return Err(VmmError::Exited(format!(
                    "console closed before {marker:?} appeared"
                )));
            }
        }
    }
}

async fn drain(mut stdout: ChildStdout, mut file: tokio::fs::File, tx: watch::Sender<(u64, bool)>) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut written = 0u64;
    loop {
        let n = match stdout.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let keep = (CONSOLE_CAP.saturating_sub(written) as usize).min(n);
        if keep > 0 && file.write_all(&buf[..keep]).await.is_ok() {
            let _ = file.flush().await;
            written += keep as u64;
            tx.send_replace((written, false));
        }
    }
    tx.send_replace((written, true));
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    #[tokio::test]
    async fn marker_is_found_and_output_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        // More than the cap, then the marker: the marker is dropped by the cap, so the
        // waiter must fail once the pipe closes instead of hanging.
        let mut child = tokio::process::Command::new("sh")
            .args([
                "-c",
                "echo booting; echo ready-1; head -c 2000000 /dev/zero; echo ready-2",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let console = Console::start(child.stdout.take().unwrap(), &log).unwrap();
        console.wait_for("ready-1").await.unwrap();
        let err = console.wait_for("ready-2").await.unwrap_err();
        assert!(err.to_string().contains("ready-2"), "{err}");
        child.wait().await.unwrap();
        assert_eq!(std::fs::metadata(&log).unwrap().len(), CONSOLE_CAP);
    }
}
