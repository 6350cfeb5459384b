//! Server assembly: every Capsa server serves `grpc.health.v1` and reflection beside its own
//! services, extracts W3C trace context from incoming metadata, and shuts down as a
//! sequence: health goes NOT_SERVING, then the listener stops accepting and in-flight calls
//! drain. Binding and signal handling stay with the caller, so tests serve on `:0`.
//!
//! A server whose listener requires client certificates can also answer health checks on a
//! second, plaintext address ([`Server::health_listen`]): probes such as the kubelet's gRPC
//! probes present no certificate. That listener serves `grpc.health.v1` and nothing else,
//! from the same statuses, and closes after the main listener has drained.
//!
//! HTTP/2 flow control is set on purpose, because one connection carries many tenants'
//! streams (every session-manager replica holds one connection per node): data a stream's
//! reader has not taken stays charged to both that stream's window and the connection's.
//! With hyper's defaults (1 MiB each on a server) one upload whose reader stalls takes the
//! whole connection window, and every other call on that connection, a one-line Execute
//! request included, waits behind it. So a server accepts at most `max_concurrent_streams`
//! streams per connection and offers a connection window of that many full stream windows
//! ([`connection_window`]): all its streams stalled at once still leave the connection open.
//! The price is memory only where a reader really stalls (windows are credit, not buffers);
//! the stream cap and the services' stall timeouts bound it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::server::Connected;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

/// How often servers and the clients that set keepalives ping an idle HTTP/2 connection.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a peer may take to answer an HTTP/2 ping before the connection, and every call
/// on it, fails; servers, the session-manager's node clients and the gateway's client use
/// it. Generous on purpose: a host booting VMs on every core took more than 3 s to answer
/// (tests/tests/density.rs lost two creates to it), while a peer that dies closes its
/// connections, an error at once.
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Receive window of every HTTP/2 stream, on servers and on the clients that set theirs
/// (session-manager's node channels): one file chunk (`MAX_CHUNK_BYTES`) fits whole.
pub const STREAM_WINDOW: u32 = 1 << 20;

/// The largest HTTP/2 frame a peer may send (SETTINGS_MAX_FRAME_SIZE), on servers and on
/// the clients that stream output in: an agent's output chunk (256 KiB) in one frame.
/// HTTP/2's default of 16 KiB cut each chunk into 16 frames, each its own write and its own
/// wakeup of the reader at every hop.
pub const MAX_FRAME_BYTES: u32 = 512 << 10;

/// Concurrent streams one connection may carry (SETTINGS_MAX_CONCURRENT_STREAMS), per
/// service. Past it a client's new calls wait for a stream to end.
pub mod max_streams {
    /// The public API, per client connection; far above the per-tenant cap on streaming
    /// calls, so only many unary calls at once ever wait for it.
    pub const SESSION_MANAGER: u32 = 128;
    /// Per connection from one session-manager replica, which sends every tenant's calls
    /// to this node over it; also what the replica sizes its connection window for.
    pub const EXECUTOR: u32 = 256;
    /// vm-pool, metering and anything else: control traffic.
    pub const DEFAULT: u32 = 128;
}

/// The connection receive window for `streams` concurrent streams: every stream's full
/// window at once, so streams whose readers stall can never starve the others.
pub const fn connection_window(streams: u32) -> u32 {
    streams * STREAM_WINDOW
}

/// Why a server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("grpc server")]
    Transport(#[from] tonic::transport::Error),
    #[error("health-only listener on {addr}")]
    HealthListen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A server under assembly: add services, then [`Server::serve`].
pub struct Server {
    routes: RoutesBuilder,
    health: HealthReporter,
    names: Vec<&'static str>,
    max_streams: u32,
    tls: Option<crate::tls::ServerTls>,
    health_listen: Option<SocketAddr>,
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

impl Server {
    /// Starts with health and reflection (covering every Capsa proto) already added.
    pub fn new() -> Self {
        let (health, health_service) = tonic_health::server::health_reporter();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(capsa_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("the descriptor sets are generated at build time and always parse");
        let mut routes = RoutesBuilder::default();
        routes.add_service(health_service);
        routes.add_service(reflection);
        Self {
            routes,
            health,
            names: Vec::new(),
            max_streams: max_streams::DEFAULT,
            tls: None,
            health_listen: None,
        }
    }

    /// Concurrent streams per connection (see [`max_streams`]); the connection window
    /// follows ([`connection_window`]).
    pub fn max_concurrent_streams(mut self, streams: u32) -> Self {
        self.max_streams = streams;
        self
    }

    /// Serves TLS (`None`: plaintext): [`crate::tls::TlsArgs::server`] for the internal
    /// plane (client certificates required, allowed peers checked on every call),
    /// [`crate::tls::PublicTlsArgs::server`] for a public endpoint.
    pub fn tls(mut self, tls: Option<crate::tls::ServerTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Also serves `grpc.health.v1`, alone and in plaintext, on `addr` (`None`: not at all);
    /// see the module docs. The bound address is logged.
    pub fn health_listen(mut self, addr: Option<SocketAddr>) -> Self {
        self.health_listen = addr;
        self
    }

    /// Adds a service; it reports SERVING once [`Server::serve`] starts.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// The health reporter, for services that change their status while running.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Serves connections from `incoming` until `shutdown` resolves.
    pub async fn serve<I, IO, IE>(
        self,
        incoming: I,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError>
    where
        I: Stream<Item = Result<IO, IE>> + Send,
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
        IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Server {
            routes,
            health,
            names,
            max_streams,
            tls,
            health_listen,
        } = self;
        let health_only = match health_listen {
            Some(addr) => Some(serve_health_only(addr, health.clone()).await?),
            None => None,
        };
        for name in &names {
            health
                .set_service_status(*name, tonic_health::ServingStatus::Serving)
                .await;
        }
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let drain_signal = async move {
            shutdown.await;
            // Load balancers see NOT_SERVING before the listener closes.
            for name in &names {
                health
                    .set_service_status(*name, tonic_health::ServingStatus::NotServing)
                    .await;
            }
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        };
        let mut builder = tonic::transport::Server::builder();
        let mut allowed_peers = None;
        if let Some(tls) = tls {
            builder = builder.tls_config(tls.config)?;
            allowed_peers = tls.allowed_peers;
        }
        let served = builder
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .max_concurrent_streams(max_streams)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(connection_window(max_streams))
            .max_frame_size(MAX_FRAME_BYTES)
            .layer(capsa_telemetry::GrpcTraceLayer)
            .layer(crate::tls::PeerCheckLayer(allowed_peers))
            .add_routes(routes.routes())
            .serve_with_incoming_shutdown(incoming, drain_signal)
            .await;
        if let Some((stop, task)) = health_only {
            let _ = stop.send(());
            let _ = task.await;
        }
        Ok(served?)
    }
}

/// Binds `addr` and serves only `reporter`'s statuses there, in plaintext, until the sender
/// returned is used (or dropped).
async fn serve_health_only(
    addr: SocketAddr,
    reporter: HealthReporter,
) -> Result<
    (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    ),
    ServeError,
> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::HealthListen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServeError::HealthListen { addr, source })?;
    tracing::info!(addr = %bound, "serving grpc.health.v1 alone, in plaintext, for probes");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(HealthServer::new(HealthService::from_health_reporter(
                reporter,
            )))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move {
                    let _ = stopped.await;
                },
            ),
    );
    Ok((stop, task))
}

/// Serves `server` on an already bound TCP listener (bind `127.0.0.1:0` in tests).
pub async fn serve_tcp(
    server: Server,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    use tokio_stream::StreamExt as _;
    // Execute events are small and latency-bound: never let Nagle hold them back.
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|stream| {
            let _ = stream.set_nodelay(true);
        })
    });
    server.serve(incoming, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_connection_window_holds_all_its_streams_full() {
        for streams in [
            max_streams::SESSION_MANAGER,
            max_streams::EXECUTOR,
            max_streams::DEFAULT,
        ] {
            // Within HTTP/2's largest window (2^31 - 1), and no overflow.
            assert!(u64::from(streams) * u64::from(STREAM_WINDOW) < 1 << 31);
        }
        assert!(STREAM_WINDOW as usize >= capsa_proto::limits::MAX_CHUNK_BYTES);
    }
}
