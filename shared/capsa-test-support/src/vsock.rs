//! A hybrid-vsock endpoint (the host side of Cloud Hypervisor's / vhost-device-vsock's
//! protocol) that forwards each accepted `CONNECT <port>` to a local Unix socket where an
//! agent runs as a plain process. Lets executor tests run without a VM; VM tests use the
//! real VMM.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Listens on `socket_path`; `CONNECT <port>` is forwarded to `target` and answered `OK`.
/// Stops accepting on drop.
pub struct HybridVsockProxy {
    socket_path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl HybridVsockProxy {
    pub fn start(socket_path: &Path, port: u32, target: &Path) -> HybridVsockProxy {
        let listener = UnixListener::bind(socket_path).expect("bind hybrid vsock socket");
        let target = target.to_owned();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let target = target.clone();
                tokio::spawn(async move {
                    let mut reader = BufReader::new(stream);
                    let mut line = String::new();
                    if reader.read_line(&mut line).await.is_err()
                        || line != format!("CONNECT {port}\n")
                    {
                        return;
                    }
                    let Ok(mut upstream) = UnixStream::connect(&target).await else {
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
