//! A hybrid-vsock endpoint (the host side of the protocol of Cloud Hypervisor and of
//! vm-pool's serial bridge) that forwards each accepted `CONNECT <port>` to a local Unix socket where an
//! agent runs as a plain process. Lets executor tests (and the native exec benchmark) run
//! without a VM; VM tests use the real VMM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Listens on `socket_path`; `CONNECT <port>` of a forwarded port is connected to that
/// port's target and answered `OK`; any other port is closed, as a VMM does when nothing
/// in the guest listens there. Stops accepting on drop.
pub struct HybridVsockProxy {
    socket_path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl HybridVsockProxy {
    /// Forwards one vsock `port` to `target`.
    pub fn start(socket_path: &Path, port: u32, target: &Path) -> HybridVsockProxy {
        Self::start_ports(socket_path, &[(port, target)])
    }

    /// Forwards each `(vsock port, target)` of `ports`.
    pub fn start_ports(socket_path: &Path, ports: &[(u32, &Path)]) -> HybridVsockProxy {
        let listener = UnixListener::bind(socket_path).expect("bind hybrid vsock socket");
        let targets: Arc<HashMap<String, PathBuf>> = Arc::new(
            ports
                .iter()
                .map(|(port, target)| (format!("CONNECT {port}\n"), target.to_path_buf()))
                .collect(),
        );
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let targets = targets.clone();
                tokio::spawn(async move {
                    let mut reader = BufReader::new(stream);
                    let mut line = String::new();
                    if reader.read_line(&mut line).await.is_err() {
                        return;
                    }
                    let Some(target) = targets.get(&line) else {
                        return;
                    };
                    let Ok(mut upstream) = UnixStream::connect(target).await else {
                        return; // like a VMM whose guest is not listening: just close
                    };
                    let mut stream = reader.into_inner();
                    if stream.write_all(b"OK 1073741824\n").await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
                });
            }
        });
        HybridVsockProxy {
            socket_path: socket_path.to_owned(),
            task,
        }
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }
}

impl Drop for HybridVsockProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
