//! The HTTP/1.1 server loop (the SDK speaks HTTP/1.1), over TLS when configured. Its own
//! rather than `axum::serve` for one reason: a read timeout on request headers (and on the
//! TLS handshake), so a client that opens connections and sends nothing (or a byte a minute)
//! cannot hold them open. Bodies are bounded by the handlers (`api`). Shutdown: stop
//! accepting, let every connection finish its request in flight, then return.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_util::task::TaskTracker;

/// The acceptor for `--public-tls-cert`/`--public-tls-key` (TLS 1.2 and 1.3, HTTP/1.1 by
/// ALPN), or `None` for plaintext. The error names the flag at fault.
pub fn tls_acceptor(args: &capsa_grpc::tls::PublicTlsArgs) -> Result<Option<TlsAcceptor>, String> {
    let (Some(cert), Some(key)) = (&args.public_tls_cert, &args.public_tls_key) else {
        return Ok(None);
    };
    let chain = CertificateDer::pem_slice_iter(cert.bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("--public-tls-cert: {e}"))?;
    let key =
        PrivateKeyDer::from_pem_slice(key.bytes()).map_err(|e| format!("--public-tls-key: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("tls: {e}"))?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| format!("--public-tls-cert/--public-tls-key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let connections = TaskTracker::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let stopped = stopped.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let Some(tls) = tls else {
                return serve_connection(stream, service, header_timeout, stopped).await;
            };
            match tokio::time::timeout(header_timeout, tls.accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(stream, service, header_timeout, stopped).await,
                Ok(Err(e)) => tracing::debug!(%peer, "tls handshake failed: {e}"),
                Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
            }
        });
    }
    drop(listener);
    let _ = stop.send(true);
    connections.close();
    connections.wait().await;
}

async fn serve_connection<IO>(
    io: IO,
    service: TowerToHyperService<Router>,
    header_timeout: Duration,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = async { let _ = stopped.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
