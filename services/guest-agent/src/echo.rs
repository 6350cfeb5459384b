//! The raw echo server on vsock port 1025: every byte read on a connection is written back
//! on it until the peer closes. No framing, no gRPC: benchmarks use it to measure the bare
//! vsock round trip and throughput, the floor under every Execute. It holds no state and
//! reads into a fixed buffer, so it costs the guest nothing while unused.

use std::future::Future;
use std::io;

use futures::{Stream, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};

/// Echoes every connection from `incoming` until `shutdown` resolves.
pub async fn serve<I, S>(incoming: I, shutdown: impl Future<Output = ()>)
where
    I: Stream<Item = io::Result<S>>,
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    tokio::pin!(incoming);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            conn = incoming.next() => match conn {
                Some(Ok(stream)) => {
                    tokio::spawn(async move {
                        let (r, mut w) = tokio::io::split(stream);
                        let mut r = BufReader::with_capacity(64 * 1024, r);
                        let _ = tokio::io::copy_buf(&mut r, &mut w).await;
                    });
                }
                Some(Err(e)) => tracing::warn!(error = %e, "echo accept failed"),
                None => return,
            }
        }
    }
}
