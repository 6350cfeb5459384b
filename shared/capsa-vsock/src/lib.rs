//! Hybrid vsock: how the host reaches a port inside a VM.
//!
//! Cloud Hypervisor (natively) and `vhost-device-vsock` (for QEMU) expose the guest's vsock
//! as one Unix socket on the host. The protocol, per connection:
//! 1. the host connects to the Unix socket and writes `CONNECT <port>\n`;
//! 2. the VMM answers `OK <host-side port>\n` once the guest accepted, or closes the
//!    connection when nothing listens on that port (the guest is still booting);
//! 3. from then on the stream is the guest connection, byte for byte.
//!
//! The other direction: a guest connecting to the host (CID 2) on port P reaches whatever
//! listens on the host's Unix socket `<socket>_P`. [`GuestPortForward`] listens there and
//! relays each connection to a TCP address (the guest agent exports telemetry this way).
//!
//! [`connect`] does the handshake; [`channel`] wraps it as a tonic connector so gRPC runs
//! over it. A handshake that fails is [`VsockError::Handshake`] or [`VsockError::Io`], both
//! transient while a VM boots: [`wait_for_port`] retries them with backoff.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

/// The guest agent's gRPC port.
pub const AGENT_PORT: u32 = 1024;

/// Where a VM's hybrid vsock socket lives on its host: `<state_dir>/vms/<vm_id>/vsock.sock`.
/// vm-pool creates it, executor connects to it; both are configured with the same state dir.
/// `None` when `vm_id` is not a VM id (ASCII letters, digits and `-`, 1 to 64 bytes), so a
/// request can never name a path outside the state dir.
pub fn vm_socket_path(state_dir: &Path, vm_id: &str) -> Option<PathBuf> {
    let valid = !vm_id.is_empty()
        && vm_id.len() <= 64
        && vm_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    valid.then(|| state_dir.join("vms").join(vm_id).join("vsock.sock"))
}

/// Longest handshake reply accepted ("OK 4294967295\n" is 14 bytes).
const MAX_REPLY: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock socket {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock handshake on {path} port {port}: {reply}")]
    Handshake {
        path: PathBuf,
        port: u32,
        reply: String,
    },
    #[error("vsock handshake on {path} port {port} timed out after {timeout:?}")]
    Timeout {
        path: PathBuf,
        port: u32,
        timeout: Duration,
    },
}

/// Connects to `port` in the guest behind the hybrid vsock socket at `path`.
pub async fn connect(path: &Path, port: u32) -> Result<UnixStream, VsockError> {
    let io_err = |source| VsockError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path).await.map_err(io_err)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(io_err)?;
    // Read byte by byte: anything after the newline already belongs to the guest stream.
    let mut reply = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        let n = stream.read(&mut byte).await.map_err(io_err)?;
        if n == 0 {
            return Err(VsockError::Handshake {
                path: path.to_owned(),
                port,
                reply: "connection closed (nothing listening on that port yet?)".into(),
            });
        }
        if byte[0] == b'\n' {
            break;
        }
        reply.push(byte[0]);
        if reply.len() > MAX_REPLY {
            break;
        }
    }
    if reply.starts_with(b"OK ") {
        Ok(stream)
    } else {
        Err(VsockError::Handshake {
            path: path.to_owned(),
            port,
            reply: String::from_utf8_lossy(&reply).into_owned(),
        })
    }
}

/// Retries [`connect`] with backoff until it succeeds or `timeout` passes; used while a VM
/// boots and its agent is not listening yet.
pub async fn wait_for_port(
    path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, VsockError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(5);
    loop {
        match tokio::time::timeout_at(deadline, connect(path, port)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) if tokio::time::Instant::now() + delay >= deadline => return Err(e),
            Ok(Err(_)) => {}
            Err(_) => {
                return Err(VsockError::Timeout {
                    path: path.to_owned(),
                    port,
                    timeout,
                });
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// A lazily connecting tonic channel to `port` behind the hybrid vsock socket at `path`.
/// Every (re)connect does the handshake again, so a channel outlives agent restarts.
pub fn channel(path: PathBuf, port: u32) -> tonic::transport::Channel {
    // The URI is required by the HTTP/2 layer but never resolved: the connector ignores it.
    tonic::transport::Endpoint::from_static("http://vsock.invalid")
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let path = path.clone();
            async move { connect(&path, port).await.map(TokioIo::new) }
        }))
}

/// Relays guest-initiated connections to host port `port` (the Unix socket
/// `<vsock socket>_<port>`) to a TCP `target`. Stops listening and removes the socket on drop.
pub struct GuestPortForward {
    socket_path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl GuestPortForward {
    /// Binds `<vsock_socket>_<port>` and relays each connection to `target`, which is
    /// resolved per connection so a restarted collector is found again.
    pub fn start(vsock_socket: &Path, port: u32, target: String) -> std::io::Result<Self> {
        let mut name = vsock_socket.as_os_str().to_owned();
        name.push(format!("_{port}"));
        let socket_path = PathBuf::from(name);
        let listener = tokio::net::UnixListener::bind(&socket_path)?;
        let task = tokio::spawn(async move {
            while let Ok((mut guest, _)) = listener.accept().await {
                let target = target.clone();
                tokio::spawn(async move {
                    match tokio::net::TcpStream::connect(&target).await {
                        Ok(mut upstream) => {
                            let _ = tokio::io::copy_bidirectional(&mut guest, &mut upstream).await;
                        }
                        Err(e) => tracing::debug!(%target, error = %e, "guest port forward"),
                    }
                });
            }
        });
        Ok(GuestPortForward { socket_path, task })
    }
}

impl Drop for GuestPortForward {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt as _, BufReader};
    use tokio::net::UnixListener;

    /// A hybrid-vsock endpoint that accepts `accept_port` and echoes, like a VMM would.
    fn fake_vmm(listener: UnixListener, accept_port: u32) {
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut reader = BufReader::new(stream);
                    let mut line = String::new();
                    reader.read_line(&mut line).await.unwrap();
                    let mut stream = reader.into_inner();
                    if line != format!("CONNECT {accept_port}\n") {
                        return; // closing is how a VMM says "nobody listens there"
                    }
                    stream.write_all(b"OK 1073741824\n").await.unwrap();
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
    }

    #[tokio::test]
    async fn handshake_then_raw_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        fake_vmm(UnixListener::bind(&path).unwrap(), AGENT_PORT);
        let mut s = connect(&path, AGENT_PORT).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn closed_port_is_a_handshake_error_and_wait_gives_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        fake_vmm(UnixListener::bind(&path).unwrap(), 9999);
        let err = connect(&path, AGENT_PORT).await.unwrap_err();
        assert!(matches!(err, VsockError::Handshake { .. }), "{err}");
        let err = wait_for_port(&path, AGENT_PORT, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            VsockError::Handshake { .. } | VsockError::Timeout { .. }
        ));
    }

    #[test]
    fn vm_ids_cannot_escape_the_state_dir() {
        let dir = Path::new("/var/lib/capsa");
        assert_eq!(
            vm_socket_path(dir, "vm-1a2b"),
            Some(PathBuf::from("/var/lib/capsa/vms/vm-1a2b/vsock.sock"))
        );
        for bad in ["", "../etc", "a/b", "x.y", &"a".repeat(65)] {
            assert_eq!(vm_socket_path(dir, bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn guest_connections_to_a_host_port_reach_the_tcp_target() {
        let dir = tempfile::tempdir().unwrap();
        let vsock = dir.path().join("vsock.sock");
        let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = target.local_addr().unwrap().to_string();
        let forward = GuestPortForward::start(&vsock, 4317, addr).unwrap();
        let side = dir.path().join("vsock.sock_4317");
        let mut guest = UnixStream::connect(&side).await.unwrap();
        let (mut host, _) = target.accept().await.unwrap();
        guest.write_all(b"span").await.unwrap();
        let mut buf = [0u8; 4];
        host.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"span");
        drop(forward);
        assert!(!side.exists(), "the socket goes with the forward");
    }

    #[tokio::test]
    async fn missing_socket_is_io_error() {
        let err = connect(Path::new("/nonexistent/capsa.vsock"), AGENT_PORT)
            .await
            .unwrap_err();
        assert!(matches!(err, VsockError::Io { .. }), "{err}");
    }
}
