//! ConnectPort: a TCP connection to a port on the guest's loopback, so a client reaches a
//! server inside the VM through the agent's vsock, without any guest network device.
//!
//! [`Ports::connect`] connects (127.0.0.1, then [::1], each within 5 s) before the call
//! answers, so a closed port is an error at call time. [`Connection::run`] then copies both
//! ways at once (one direction never waits for the other, so an echo server cannot
//! deadlock it): data from the client goes to the socket, the end of the client's stream
//! half-closes the socket, and the socket's EOF ends the response stream.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use capsa_proto::limits::MAX_PORT_CONNECTIONS;
use futures::{Stream, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::processes::MAX_OUTPUT_CHUNK;

/// Each address gets this long to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Counts open connections against [`MAX_PORT_CONNECTIONS`].
#[derive(Default)]
pub struct Ports {
    open: Arc<AtomicUsize>,
}

/// A connection made; it counts as open until dropped.
pub struct Connection {
    socket: TcpStream,
    _slot: Slot,
}

struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Ports {
    pub async fn connect(&self, port: u16) -> Result<Connection, Error> {
        let taken = self
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_PORT_CONNECTIONS).then_some(n + 1)
            });
        if taken.is_err() {
            return Err(Error::Exhausted(format!(
                "{MAX_PORT_CONNECTIONS} port connections are open, the limit \
                 (MAX_PORT_CONNECTIONS)"
            )));
        }
        let slot = Slot(self.open.clone());
        let v4 = attempt(IpAddr::V4(Ipv4Addr::LOCALHOST), port).await;
        let socket = match v4 {
            Ok(s) => s,
            Err(first) => match attempt(IpAddr::V6(Ipv6Addr::LOCALHOST), port).await {
                Ok(s) => s,
                // The IPv4 reason: the v6 one is often "address not available".
                Err(_) => return Err(first),
            },
        };
        let _ = socket.set_nodelay(true);
        Ok(Connection {
            socket,
            _slot: slot,
        })
    }
}

async fn attempt(ip: IpAddr, port: u16) -> Result<TcpStream, Error> {
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect(SocketAddr::new(ip, port)),
    )
    .await
    {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Err(Error::Precondition(
            format!("nothing listens on port {port} in the guest (connection refused)"),
        )),
        Ok(Err(e)) => Err(Error::Precondition(format!(
            "cannot connect to port {port} in the guest: {e}"
        ))),
        Err(_) => Err(Error::Precondition(format!(
            "port {port} in the guest did not accept a connection within {}s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

impl Connection {
    /// Copies until the socket's EOF (the response stream then ends), a socket error (sent
    /// as ABORTED), an error from `input` (a bad message or a broken client stream: sent
    /// too), the client going away (`output` closed), or `stop` (the agent shutting down).
    pub async fn run(
        self,
        input: impl Stream<Item = Result<Bytes, Error>>,
        output: mpsc::Sender<Result<Bytes, Error>>,
        stop: CancellationToken,
    ) {
        let (mut reader, mut writer) = self.socket.into_split();
        let upstream = async {
            let mut input = std::pin::pin!(input);
            while let Some(item) = input.next().await {
                let data = match item {
                    Ok(data) => data,
                    Err(e) => {
                        let _ = output.send(Err(e)).await;
                        return;
                    }
                };
                if let Err(e) = writer.write_all(&data).await {
                    let _ = output
                        .send(Err(Error::Aborted(format!("write to the guest port: {e}"))))
                        .await;
                    return;
                }
            }
            // The client is done sending: half-close, and keep the other direction going.
            let _ = writer.shutdown().await;
            std::future::pending::<()>().await;
        };
        let downstream = async {
            loop {
                let mut buf = BytesMut::with_capacity(MAX_OUTPUT_CHUNK);
                match reader.read_buf(&mut buf).await {
                    Ok(0) => return,
                    Ok(_) => {
                        if output.send(Ok(buf.freeze())).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = output
                            .send(Err(Error::Aborted(format!(
                                "read from the guest port: {e}"
                            ))))
                            .await;
                        return;
                    }
                }
            }
        };
        tokio::select! {
            () = upstream => {}
            () = downstream => {}
            () = output.closed() => {}
            () = stop.cancelled() => {
                let _ = output.send(Err(Error::ShuttingDown)).await;
            }
        }
    }
}
