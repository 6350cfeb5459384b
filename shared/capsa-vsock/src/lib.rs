//! Hybrid vsock: how the host reaches a port inside a VM.
//!
//! Cloud Hypervisor (natively) and, for QEMU, vm-pool's [`serial::SerialBridge`] (over the
//! guest's virtio-serial port, see [`mux`]) expose the guest's ports as one Unix socket on
//! the host. The protocol, per connection:
//! 1. the host connects to the Unix socket and writes `CONNECT <port>\n`;
//! 2. the VMM answers `OK <host-side port>\n` once the guest accepted, or closes the
//!    connection when nothing listens on that port (the guest is still booting);
//! 3. from then on the stream is the guest connection, byte for byte.
//!
//! The other direction: a guest connecting to the host (CID 2) on port P reaches whatever
//! listens on the host's Unix socket `<socket>_P` ([`guest_port_path`]); the VMM connects
//! there once per guest connection and the stream is the guest's from the first byte.
//! [`GuestPortListener`] binds that socket (vm-pool serves the guest's telemetry on it).
//!
//! [`connect`] does the handshake; [`channel`] wraps it as a tonic connector so gRPC runs
//! over it. A handshake that fails is [`VsockError::Handshake`] or [`VsockError::Io`], both
//! transient while a VM boots: [`wait_for_port`] retries them with backoff.

pub mod mux;
pub mod serial;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};

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

/// Most bytes of a handshake reply, newline included ("OK 4294967295\n" is 14): a peer
/// that sends more without a newline is rejected after this many.
pub const MAX_REPLY: usize = 64;

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
    match read_reply(&mut stream).await {
        Ok(_) => Ok(stream),
        Err(ReplyError::Io(source)) => Err(io_err(source)),
        Err(ReplyError::Rejected(reply)) => Err(VsockError::Handshake {
            path: path.to_owned(),
            port,
            reply,
        }),
    }
}

/// Why a handshake reply was not `OK <port>\n`.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Rejected(String),
}

/// Reads the VMM's answer to `CONNECT <port>\n`, which must be `OK <host-side port>\n`, and
/// returns that port. Reads byte by byte, because anything after the newline already
/// belongs to the guest stream, and at most [`MAX_REPLY`] bytes, so a peer that never sends
/// a newline cannot keep it reading. Public so the fuzz target (`fuzz/`) can drive it.
pub async fn read_reply<R: AsyncRead + Unpin>(stream: &mut R) -> Result<u32, ReplyError> {
    let mut reply = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            return Err(ReplyError::Rejected(if reply.is_empty() {
                "connection closed (nothing listening on that port yet?)".into()
            } else {
                format!(
                    "connection closed after {:?}",
                    String::from_utf8_lossy(&reply)
                )
            }));
        }
        if byte[0] == b'\n' {
            break;
        }
        reply.push(byte[0]);
        if reply.len() == MAX_REPLY {
            return Err(ReplyError::Rejected(format!(
                "no newline within {MAX_REPLY} bytes: {:?}",
                String::from_utf8_lossy(&reply)
            )));
        }
    }
    parse_ok(&reply).ok_or_else(|| ReplyError::Rejected(String::from_utf8_lossy(&reply).into()))
}

/// The port of an `OK <port>` line: decimal digits only, within u32.
fn parse_ok(line: &[u8]) -> Option<u32> {
    let digits = line.strip_prefix(b"OK ")?;
    // `u32::from_str` alone would also take a leading `+`.
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
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
        // capsa_grpc's KEEPALIVE_INTERVAL and KEEPALIVE_TIMEOUT, spelt out because this
        // crate stays free of the gRPC stack's dependencies. Generous: a guest whose vCPU the
        // host starves (50 sessions' first Executes on 2 emulating cores) answered a ping
        // later than 5 s and lost its connection with every call on it; a VM that dies
        // closes the socket.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        // capsa_grpc's MAX_FRAME_BYTES: the agent's output chunks arrive one frame each.
        .max_frame_size(512 << 10)
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let path = path.clone();
            async move { connect(&path, port).await.map(TokioIo::new) }
        }))
}

/// Where the host listens for guest connections to host port `port`: `<vsock_socket>_<port>`.
pub fn guest_port_path(vsock_socket: &Path, port: u32) -> PathBuf {
    let mut name = vsock_socket.as_os_str().to_owned();
    name.push(format!("_{port}"));
    PathBuf::from(name)
}

/// Accepts the guest's connections to host port `port` of one VM. Removes its socket on drop.
#[derive(Debug)]
pub struct GuestPortListener {
    listener: UnixListener,
    path: PathBuf,
}

impl GuestPortListener {
    /// Binds [`guest_port_path`]; call it before the guest may connect (the VMM refuses the
    /// guest's connection when nothing listens).
    pub fn bind(vsock_socket: &Path, port: u32) -> std::io::Result<Self> {
        let path = guest_port_path(vsock_socket, port);
        let listener = UnixListener::bind(&path)?;
        // The VMM connects here, and it runs as another (unprivileged) user; the VM dir
        // around the socket admits only that user and root.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
        Ok(GuestPortListener { listener, path })
    }

    /// The next guest connection, as a raw stream (no handshake on this side).
    pub async fn accept(&self) -> std::io::Result<UnixStream> {
        self.listener.accept().await.map(|(stream, _)| stream)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for GuestPortListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt as _, BufReader};

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
    async fn replies_must_be_ok_and_a_port_and_leave_the_stream_alone() {
        let mut rest: &[u8] = b"OK 1073741824\nguest bytes";
        assert_eq!(read_reply(&mut rest).await.unwrap(), 1 << 30);
        assert_eq!(rest, b"guest bytes");
        for bad in [
            &b""[..],
            b"OK 5",
            b"OK \n",
            b"OK +5\n",
            b"OK -1\n",
            b"OK 4294967296\n",
            b"OK 5 \n",
            b"ok 5\n",
            b"FAILED\n",
        ] {
            let mut r = bad;
            let err = read_reply(&mut r).await.unwrap_err();
            assert!(matches!(err, ReplyError::Rejected(_)), "{bad:?}: {err}");
        }
    }

    #[tokio::test]
    async fn a_reply_without_newline_is_rejected_after_max_reply_bytes() {
        // An "OK " line that never ends used to be taken as success after 65 bytes.
        for fill in [b'x', b'5'] {
            let mut endless = (&b"OK "[..]).chain(tokio::io::repeat(fill)).take(1 << 20);
            let err = read_reply(&mut endless).await.unwrap_err();
            assert!(matches!(err, ReplyError::Rejected(_)), "{err}");
            assert_eq!((1 << 20) - endless.limit(), MAX_REPLY as u64);
        }
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
    async fn guest_connections_to_a_host_port_reach_the_listener() {
        let dir = tempfile::tempdir().unwrap();
        let vsock = dir.path().join("vsock.sock");
        let listener = GuestPortListener::bind(&vsock, 4317).unwrap();
        let side = dir.path().join("vsock.sock_4317");
        assert_eq!(listener.path(), side);
        // The VMM connects once per guest connection and passes the bytes through as is.
        let mut guest = UnixStream::connect(&side).await.unwrap();
        let mut host = listener.accept().await.unwrap();
        guest.write_all(b"span").await.unwrap();
        let mut buf = [0u8; 4];
        host.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"span");
        drop(listener);
        assert!(!side.exists(), "the socket goes with the listener");
    }

    #[tokio::test]
    async fn missing_socket_is_io_error() {
        let err = connect(Path::new("/nonexistent/capsa.vsock"), AGENT_PORT)
            .await
            .unwrap_err();
        assert!(matches!(err, VsockError::Io { .. }), "{err}");
    }
}
