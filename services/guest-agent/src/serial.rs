//! The agent's channel to the host on a virtio-serial port, used in QEMU VMs.
//!
//! QEMU cannot migrate a vhost-user vsock device, so a QEMU VM (which must survive suspend,
//! snapshot and fork) carries the agent's connections on the virtio-serial port named
//! [`PORT_NAME`], multiplexed by [`capsa_vsock::mux`]; the host's bridge turns them back
//! into hybrid vsock. Cloud Hypervisor VMs have no such port and keep native vsock.
//!
//! The port is one byte stream that the host side may drop and re-open at any time: read
//! returns 0 while nothing is connected on the host (the VM was just restored into a new
//! QEMU, or the bridge restarted). [`Link`] runs one multiplexer per connection of the host:
//! when the host goes, every connection of that link ends; when it is back, the new link
//! starts with its greeting, which carries the host's wall clock, and the agent puts the
//! guest clock right (a restored VM's clock stopped while it was saved).

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use capsa_vsock::mux::{Limits, Mux, MuxStream, Side};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, watch};

use crate::clock;

/// The name QEMU gives the agent's port (`virtserialport,name=...`).
pub const PORT_NAME: &str = "org.capsa.agent";
/// Where the kernel lists virtio-serial ports, each with a `name` file.
pub const SYS_PORTS: &str = "/sys/class/virtio-ports";
/// How often to look for the host while it is not connected.
const HOST_POLL: Duration = Duration::from_millis(20);
/// Connections accepted but not yet taken by a server.
const ACCEPT_BACKLOG: usize = 128;

/// The device of the agent's port (`/dev/vportNpM`), if this VM has one.
pub fn find_port(sys_ports: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sys_ports).ok()?;
    entries.flatten().find_map(|entry| {
        let name = std::fs::read_to_string(entry.path().join("name")).ok()?;
        (name.trim_end() == PORT_NAME).then(|| Path::new("/dev").join(entry.file_name()))
    })
}

/// The running channel: connections to the agent's ports, and the current link for
/// connections the agent opens to the host.
pub struct Link {
    pub grpc: mpsc::Receiver<MuxStream>,
    pub echo: Option<mpsc::Receiver<MuxStream>>,
    pub current: watch::Receiver<Option<Arc<Mux>>>,
}

impl Link {
    /// Opens `device` and serves links on it for the rest of the process. Connections to
    /// `grpc_port` and `echo_port` (0: none) arrive on the receivers; others are refused.
    pub fn start(device: &Path, grpc_port: u32, echo_port: u32) -> io::Result<Link> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(device)?;
        // SAFETY: the File owns its descriptor, and nothing else closes or replaces it while
        // the AsyncFd holds it.
        let port = Arc::new(unsafe { AsyncFd::register(file)? });
        let (grpc_tx, grpc) = mpsc::channel(ACCEPT_BACKLOG);
        let (echo_tx, echo) = match echo_port {
            0 => (None, None),
            _ => {
                let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
                (Some(tx), Some(rx))
            }
        };
        let (current_tx, current) = watch::channel(None);
        let routes = Routes {
            grpc_port,
            grpc: grpc_tx,
            echo_port,
            echo: echo_tx,
        };
        tokio::spawn(async move {
            let e = serve_links(port, routes, current_tx).await;
            tracing::error!(error = %e, "the agent's serial port failed");
        });
        Ok(Link {
            grpc,
            echo,
            current,
        })
    }
}

struct Routes {
    grpc_port: u32,
    grpc: mpsc::Sender<MuxStream>,
    echo_port: u32,
    echo: Option<mpsc::Sender<MuxStream>>,
}

impl Routes {
    fn route(&self, port: u32) -> Option<&mpsc::Sender<MuxStream>> {
        if port == self.grpc_port {
            Some(&self.grpc)
        } else if port == self.echo_port {
            self.echo.as_ref()
        } else {
            None
        }
    }
}

async fn serve_links(
    port: Arc<AsyncFd<File>>,
    routes: Routes,
    current: watch::Sender<Option<Arc<Mux>>>,
) -> io::Error {
    loop {
        let first = match wait_for_host(&port).await {
            Ok(bytes) => bytes,
            Err(e) => return e,
        };
        let (mux, mut incoming) = Mux::start(
            Side::Guest,
            Limits::GUEST,
            first,
            PortReader(port.clone()),
            PortWriter(port.clone()),
        );
        let mux = Arc::new(mux);
        current.send_replace(Some(mux.clone()));
        // The host sends its clock each time the link gets in step (once per link, and again
        // whenever it starts over, as after a restore).
        let mut host_clock = mux.peer_clock();
        host_clock.mark_changed();
        let clock = tokio::spawn(async move {
            while host_clock.changed().await.is_ok() {
                let sent = *host_clock.borrow_and_update();
                if let Some(unix_nanos) = sent {
                    tracing::info!("host in step on the serial port");
                    let host = UNIX_EPOCH + Duration::from_nanos(unix_nanos);
                    if let Err(e) = clock::step_to(host) {
                        tracing::warn!(error = %e, "cannot set the guest clock");
                    }
                }
            }
        });
        loop {
            tokio::select! {
                request = incoming.recv() => {
                    let Some(request) = request else { break };
                    if let Some(server) = routes.route(request.port) {
                        // A server that is not keeping up refuses new connections rather
                        // than stalling the link.
                        if let Ok(permit) = server.try_reserve() {
                            permit.send(request.accept());
                        }
                    }
                }
                why = mux.closed() => {
                    tracing::info!(reason = %why, "host disconnected from the serial port");
                    break;
                }
            }
        }
        clock.abort();
        current.send_replace(None);
    }
}

/// Waits until the host is connected and has sent something; returns those bytes.
async fn wait_for_host(port: &AsyncFd<File>) -> io::Result<Bytes> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match port.get_ref().read(&mut buf) {
            Ok(0) => tokio::time::sleep(HOST_POLL).await, // nobody on the host side yet
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf.into());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Connected, nothing sent yet.
                let mut guard = port.readable().await?;
                guard.clear_ready();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reads of the port; EOF means the host went away.
struct PortReader(Arc<AsyncFd<File>>);

impl AsyncRead for PortReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| fd.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

struct PortWriter(Arc<AsyncFd<File>>);

impl AsyncWrite for PortWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|fd| fd.get_ref().write(data)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_found_by_its_name() {
        let sys = tempfile::tempdir().unwrap();
        for (dir, name) in [
            ("vport0p0", "org.other\n"),
            ("vport0p1", "org.capsa.agent\n"),
        ] {
            std::fs::create_dir(sys.path().join(dir)).unwrap();
            std::fs::write(sys.path().join(dir).join("name"), name).unwrap();
        }
        assert_eq!(find_port(sys.path()), Some(PathBuf::from("/dev/vport0p1")));
        std::fs::write(sys.path().join("vport0p1/name"), "org.capsa.agentX\n").unwrap();
        assert_eq!(find_port(sys.path()), None);
        assert_eq!(find_port(Path::new("/nonexistent")), None);
    }

    #[test]
    fn routes_send_each_port_to_its_server_and_nothing_else() {
        let (grpc, _g) = mpsc::channel(1);
        let (echo, _e) = mpsc::channel(1);
        let routes = Routes {
            grpc_port: 1024,
            grpc,
            echo_port: 1025,
            echo: Some(echo),
        };
        assert!(
            routes
                .route(1024)
                .is_some_and(|s| s.same_channel(&routes.grpc))
        );
        assert!(routes.route(1025).is_some());
        assert!(routes.route(22).is_none());
    }
}
