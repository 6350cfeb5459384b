//! Byte streams to TCP ports inside the guest (ConnectPort), through the guest agent over
//! vsock: no guest network device is involved.
//!
//! The call answers once the guest side is connected, so [`Session::connect_port`]
//! fails at once with [`Error::FailedPrecondition`] when nothing listens there. Then it is a
//! TCP connection with half-close: [`PortSender`] writes, dropping it shuts the guest
//! socket's write side; [`PortReceiver`] reads until the guest side closes.
//! [`PortConnection::pipe`] joins it to any local `AsyncRead + AsyncWrite` (a `TcpStream`
//! accepted by a port forwarder).
//!
//! [`Session::connect_port`]: crate::Session::connect_port

use bytes::{Bytes, BytesMut};
use capsa_proto::limits::MAX_STREAM_DATA_BYTES;
use capsa_proto::session::v1 as pb;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::RawClient;
use crate::error::{Error, Result};

/// Messages queued ahead of the call; a full queue makes [`PortSender::send`] wait.
const SEND_QUEUE: usize = 4;

/// What [`PortConnection::pipe`] reads from the local side at once: the guest agent's own
/// chunk size, so a message is never split on its way.
const PIPE_CHUNK: usize = 64 << 10;

/// An open connection to a guest port.
#[derive(Debug)]
pub struct PortConnection {
    pub sender: PortSender,
    pub receiver: PortReceiver,
}

/// Bytes each way through a finished [`PortConnection::pipe`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Piped {
    /// From the local side to the guest.
    pub sent: u64,
    /// From the guest to the local side.
    pub received: u64,
}

impl PortConnection {
    pub(crate) async fn connect(
        mut raw: RawClient,
        session_id: String,
        port: u16,
    ) -> Result<PortConnection> {
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        let open = pb::ConnectPortRequest {
            part: Some(pb::connect_port_request::Part::Open(
                pb::ConnectPortHeader {
                    session_id,
                    port: u32::from(port),
                },
            )),
        };
        tx.send(open)
            .await
            .map_err(|_| Error::Ended("the port connection".into()))?;
        let stream = raw
            .connect_port(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(PortConnection {
            sender: PortSender { tx },
            receiver: PortReceiver { stream },
        })
    }

    /// Copies between `io` and the guest both ways until both sides are done: local EOF
    /// half-closes the guest socket, the guest's EOF shuts `io`'s write side. An error on
    /// either side ends it (dropping the call cancels the guest connection).
    pub async fn pipe<S: AsyncRead + AsyncWrite>(self, io: S) -> Result<Piped> {
        let (mut reader, mut writer) = tokio::io::split(io);
        let PortConnection {
            sender,
            mut receiver,
        } = self;
        let upstream = async move {
            let mut sent = 0u64;
            let mut buf = BytesMut::new();
            loop {
                buf.reserve(PIPE_CHUNK);
                let n = reader
                    .read_buf(&mut buf)
                    .await
                    .map_err(|e| Error::io("reading the local connection", e))?;
                if n == 0 {
                    break;
                }
                sent += n as u64;
                if sender.send(buf.split().freeze()).await.is_err() {
                    // The call has ended: the downstream side reports how.
                    break;
                }
            }
            // Dropping the sender ends the request stream: the guest socket half-closes.
            drop(sender);
            Ok::<_, Error>(sent)
        };
        let downstream = async move {
            let mut received = 0u64;
            while let Some(data) = receiver.recv().await? {
                received += data.len() as u64;
                writer
                    .write_all(&data)
                    .await
                    .map_err(|e| Error::io("writing the local connection", e))?;
            }
            // The local peer may be gone already; there is nothing left to tell it then.
            let _ = writer.shutdown().await;
            Ok::<_, Error>(received)
        };
        let (sent, received) = tokio::try_join!(upstream, downstream)?;
        Ok(Piped { sent, received })
    }
}

/// Writes to the guest port. Dropping it half-closes the connection (the guest reads EOF).
#[derive(Debug)]
pub struct PortSender {
    tx: mpsc::Sender<pb::ConnectPortRequest>,
}

impl PortSender {
    /// Sends `data` (split into messages of at most 1 MiB). Fails with [`Error::Ended`] once
    /// the call has ended; the receiver says how.
    pub async fn send(&self, data: impl Into<Bytes>) -> Result<()> {
        let mut data: Bytes = data.into();
        while !data.is_empty() {
            let part = data.split_to(data.len().min(MAX_STREAM_DATA_BYTES));
            let message = pb::ConnectPortRequest {
                part: Some(pb::connect_port_request::Part::Data(part)),
            };
            self.tx
                .send(message)
                .await
                .map_err(|_| Error::Ended("the port connection".into()))?;
        }
        Ok(())
    }
}

/// Reads from the guest port.
#[derive(Debug)]
pub struct PortReceiver {
    stream: tonic::Streaming<pb::ConnectPortResponse>,
}

impl PortReceiver {
    /// The next bytes from the guest; `None` once the guest side has closed. A connection
    /// cut by an error (e.g. the guest socket reset: ABORTED) is an error.
    pub async fn recv(&mut self) -> Result<Option<Bytes>> {
        loop {
            match self.stream.message().await? {
                // An empty message carries nothing; the guest side closing ends the stream.
                Some(m) if m.data.is_empty() => continue,
                Some(m) => return Ok(Some(m.data)),
                None => return Ok(None),
            }
        }
    }
}
