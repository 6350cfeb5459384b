//! The host end of a VM's agent channel on a virtio-serial port ([`crate::mux`]), served as
//! the hybrid vsock socket everything on the host already speaks.
//!
//! QEMU exposes the port as a Unix socket it listens on (the "carrier"). The bridge connects
//! to it, runs the host side of the multiplexer, and
//! - listens on the VM's hybrid vsock socket: `CONNECT <port>\n` opens a mux connection to
//!   the guest's port and answers `OK <port>\n`, or closes the connection when the guest
//!   is not up yet or nothing listens there (as Cloud Hypervisor does);
//! - hands each connection the guest opens to host port P to `<socket>_P`
//!   ([`crate::guest_port_path`]), refusing it when nothing listens there.
//!
//! When the carrier ends (QEMU stopped, the guest broke the protocol) the bridge connects
//! again; a VM restored from a snapshot gets a fresh link, and its agent sees the host
//! reconnect. The bridge lives as long as its [`SerialBridge`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::mux::{IncomingStream, Limits, Mux, Side};

/// How long a client may take to send its `CONNECT` line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest may take to accept or refuse a connection.
const GUEST_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts to reach the carrier.
const RECONNECT_DELAY: Duration = Duration::from_millis(20);

/// A running bridge; dropping it stops it, closes every connection and removes the socket.
pub struct SerialBridge {
    tasks: JoinSet<()>,
    socket: PathBuf,
    link: watch::Receiver<Option<Arc<Mux>>>,
}

impl SerialBridge {
    /// Binds the hybrid vsock socket `socket` and starts bridging it to the carrier socket
    /// `carrier`, which need not exist yet (QEMU creates it as it starts).
    pub fn start(socket: &Path, carrier: &Path) -> std::io::Result<SerialBridge> {
        let listener = UnixListener::bind(socket)?;
        let (link_tx, link_rx) = watch::channel(None::<Arc<Mux>>);
        let mut tasks = JoinSet::new();
        tasks.spawn(keep_linked(carrier.to_owned(), socket.to_owned(), link_tx));
        tasks.spawn(serve_clients(listener, link_rx.clone()));
        Ok(SerialBridge {
            tasks,
            socket: socket.to_owned(),
            link: link_rx,
        })
    }

    /// Waits until the guest has answered on the current link (its agent is up).
    pub async fn guest_up(&self, timeout: Duration) -> bool {
        let mut link = self.link.clone();
        tokio::time::timeout(timeout, async move {
            loop {
                let current = link.borrow_and_update().clone();
                if let Some(mux) = current
                    && mux.hello().await.is_ok()
                {
                    return;
                }
                if link.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await
        .is_ok()
    }
}

impl Drop for SerialBridge {
    fn drop(&mut self) {
        self.tasks.abort_all();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Connects to the carrier, runs a link over it until it ends, and again.
async fn keep_linked(carrier: PathBuf, socket: PathBuf, link: watch::Sender<Option<Arc<Mux>>>) {
    loop {
        let stream = match UnixStream::connect(&carrier).await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(RECONNECT_DELAY).await;
                continue;
            }
        };
        let (reader, writer) = stream.into_split();
        let (mux, incoming) = Mux::start(Side::Host, Limits::HOST, Bytes::new(), reader, writer);
        let mux = Arc::new(mux);
        link.send_replace(Some(mux.clone()));
        let guest_connections = tokio::spawn(serve_guest(incoming, socket.clone()));
        let why = mux.closed().await;
        tracing::debug!(carrier = %carrier.display(), error = %why, "agent link closed");
        link.send_replace(None);
        guest_connections.abort();
        drop(mux);
        tokio::time::sleep(RECONNECT_DELAY).await;
    }
}

/// Connections the guest opens to host ports.
async fn serve_guest(mut incoming: tokio::sync::mpsc::Receiver<IncomingStream>, socket: PathBuf) {
    while let Some(request) = incoming.recv().await {
        let target = crate::guest_port_path(&socket, request.port);
        tokio::spawn(async move {
            // Dropping the request refuses it.
            let Ok(mut host) = UnixStream::connect(&target).await else {
                return;
            };
            let mut guest = request.accept();
            let _ = tokio::io::copy_bidirectional(&mut host, &mut guest).await;
        });
    }
}

/// Clients of the hybrid vsock socket.
async fn serve_clients(listener: UnixListener, link: watch::Receiver<Option<Arc<Mux>>>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(RECONNECT_DELAY).await;
            continue;
        };
        let mux = link.borrow().clone();
        tokio::spawn(async move {
            let Some(mux) = mux else { return }; // no guest yet: close, the client retries
            let _ = serve_client(client, &mux).await;
        });
    }
}

async fn serve_client(mut client: UnixStream, mux: &Mux) -> Result<(), ()> {
    let port = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_connect(&mut client))
        .await
        .map_err(drop)??;
    if !mux.is_up() {
        return Err(()); // the guest is still booting: closing says "not listening yet"
    }
    let mut guest = tokio::time::timeout(GUEST_ANSWER_TIMEOUT, mux.connect(port))
        .await
        .map_err(drop)?
        .map_err(drop)?;
    client
        .write_all(format!("OK {port}\n").as_bytes())
        .await
        .map_err(drop)?;
    let _ = tokio::io::copy_bidirectional(&mut client, &mut guest).await;
    Ok(())
}

/// Reads `CONNECT <port>\n`, byte by byte: what follows the newline is the client's stream.
async fn read_connect(client: &mut UnixStream) -> Result<u32, ()> {
    let mut line = Vec::with_capacity(24);
    loop {
        let byte = client.read_u8().await.map_err(drop)?;
        if byte == b'\n' {
            break;
        }
        line.push(byte);
        if line.len() > crate::MAX_REPLY {
            return Err(());
        }
    }
    let line = std::str::from_utf8(&line).map_err(drop)?;
    let port = line.strip_prefix("CONNECT ").ok_or(())?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(());
    }
    port.parse().map_err(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mux::MuxStream;
    use tokio::sync::mpsc;

    /// A stand-in for QEMU's side of the port: the carrier socket, and behind it a guest mux
    /// that echoes on `port`.
    async fn fake_guest(carrier: &Path, port: u32) -> tokio::task::JoinHandle<Mux> {
        let listener = UnixListener::bind(carrier).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, w) = stream.into_split();
            let (mux, mut incoming) = Mux::start(Side::Guest, Limits::GUEST, Bytes::new(), r, w);
            tokio::spawn(async move {
                while let Some(req) = incoming.recv().await {
                    if req.port == port {
                        let s: MuxStream = req.accept();
                        tokio::spawn(async move {
                            let (mut r, mut w) = tokio::io::split(s);
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        });
                    }
                }
            });
            mux
        })
    }

    #[tokio::test]
    async fn hybrid_clients_reach_the_guest_and_the_guest_reaches_host_ports() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, carrier) = (dir.path().join("vsock.sock"), dir.path().join("agent.sock"));
        let bridge = SerialBridge::start(&socket, &carrier).unwrap();
        let guest = fake_guest(&carrier, 1024).await;
        assert!(bridge.guest_up(Duration::from_secs(10)).await);
        let guest = guest.await.unwrap();

        let mut s = crate::connect(&socket, 1024).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        // Nothing listens on 9: the connection is closed, as by a VMM.
        assert!(crate::connect(&socket, 9).await.is_err());
        // Bad handshakes are closed too.
        for bad in [
            &b"CONNECT\n"[..],
            b"CONNECT -1\n",
            b"connect 5\n",
            b"CONNECT 99999999999\n",
        ] {
            let mut c = UnixStream::connect(&socket).await.unwrap();
            c.write_all(bad).await.unwrap();
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "{bad:?}");
        }

        // The guest's connection to host port 4317 reaches <socket>_4317, and is refused
        // once nothing listens there.
        let listener = crate::GuestPortListener::bind(&socket, 4317).unwrap();
        let mut from_guest = guest.connect(4317).await.unwrap();
        let mut at_host = listener.accept().await.unwrap();
        from_guest.write_all(b"span").await.unwrap();
        at_host.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"span");
        drop(listener);
        assert!(guest.connect(4317).await.is_err());
        drop(bridge);
        assert!(!socket.exists());
    }

    #[tokio::test]
    async fn a_new_carrier_connection_is_a_new_link() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, carrier) = (dir.path().join("vsock.sock"), dir.path().join("agent.sock"));
        let bridge = SerialBridge::start(&socket, &carrier).unwrap();
        let listener = UnixListener::bind(&carrier).unwrap();
        let (tx, mut links) = mpsc::unbounded_channel();
        // Each accepted carrier connection gets its own echoing guest mux; the first ends
        // after one connection, like a VM that was suspended.
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (r, w) = stream.into_split();
                let (mux, mut incoming) =
                    Mux::start(Side::Guest, Limits::GUEST, Bytes::new(), r, w);
                tokio::spawn(async move {
                    while let Some(req) = incoming.recv().await {
                        let s = req.accept();
                        tokio::spawn(async move {
                            let (mut r, mut w) = tokio::io::split(s);
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        });
                    }
                });
                tx.send(mux).unwrap();
            }
        });
        let first = links.recv().await.unwrap();
        assert!(bridge.guest_up(Duration::from_secs(10)).await);
        let mut s = crate::wait_for_port(&socket, 1024, Duration::from_secs(10))
            .await
            .unwrap();
        drop(first); // the link goes
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        let _second = links.recv().await.unwrap();
        let mut s = crate::wait_for_port(&socket, 1024, Duration::from_secs(10))
            .await
            .unwrap();
        s.write_all(b"again").await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"again");
    }
}
