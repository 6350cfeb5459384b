//! Server assembly: every Capsa server serves `grpc.health.v1` and reflection beside its own
//! services, extracts W3C trace context from incoming metadata, and shuts down as a
//! sequence: health goes NOT_SERVING, then the listener stops accepting and in-flight calls
//! drain. Binding and signal handling stay with the caller, so tests serve on `:0`.

use std::convert::Infallible;
use std::future::Future;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::server::Connected;
use tonic_health::server::HealthReporter;

/// A server under assembly: add services, then [`Server::serve`].
pub struct Server {
    routes: RoutesBuilder,
    health: HealthReporter,
    names: Vec<&'static str>,
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
        }
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
    ) -> Result<(), tonic::transport::Error>
    where
        I: Stream<Item = Result<IO, IE>> + Send,
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
        IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Server {
            routes,
            health,
            names,
        } = self;
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
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
            .layer(capsa_telemetry::GrpcTraceLayer)
            .add_routes(routes.routes())
            .serve_with_incoming_shutdown(incoming, drain_signal)
            .await
    }
}

/// Serves `server` on an already bound TCP listener (bind `127.0.0.1:0` in tests).
pub async fn serve_tcp(
    server: Server,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    use tokio_stream::StreamExt as _;
    // Execute events are small and latency-bound: never let Nagle hold them back.
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|stream| {
            let _ = stream.set_nodelay(true);
        })
    });
    server.serve(incoming, shutdown).await
}
