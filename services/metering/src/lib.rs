//! capsa-metering: samples the usage of every leased VM on every node, keeps the latest
//! sample per session and the totals per tenant in Redis, and appends usage records to the
//! `{capsa}:usage:records` stream for billing (layout and exactly-once rules:
//! `capsa_store::usage`). Replicas need no coordination: every write is an atomic script.
//!
//! - [`sampler`]: the sampling loop; [`clients`]: calls to the nodes' vm-pool and executor.
//! - [`ledger`]: session and tenant usage, FinalizeSession.
//! - [`records`]: trims the usage-record stream below what billing acknowledged.
//! - [`grpc`]: the gRPC adapter; [`config`], [`error`], [`metrics`].

pub mod clients;
pub mod config;
pub mod error;
pub mod grpc;
pub mod ledger;
pub mod metrics;
pub mod records;
pub mod sampler;

use std::future::Future;
use std::sync::Arc;

use capsa_proto::metering::v1::metering_service_server::MeteringServiceServer;
use capsa_store::usage::UsageStore;
use capsa_store::{NodeRegistry, SessionStore, StoreConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::Error;

/// Serves metering on `listener` and samples until `shutdown` resolves. Shutdown: health
/// goes NOT_SERVING, the sampler stops (every stored sample is already in Redis, so
/// there is nothing to flush), in-flight calls drain.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let conn = capsa_store::connect(config.redis_url.expose()).await?;
    let registry = NodeRegistry::new(conn.clone());
    // Metering only reads sessions; the store's bounds matter to writers alone.
    let sessions = SessionStore::new(conn.clone(), StoreConfig::default());
    let usage = UsageStore::new(conn, config.retention);
    let trimming_usage = usage.clone();
    let clients = Arc::new(clients::NodeClients::new(
        config.rpc_timeout,
        config.common.tls.clone(),
    ));
    let metrics = metrics::Metrics::new();

    let sampler = Arc::new(sampler::Sampler::new(
        registry.clone(),
        sessions.clone(),
        usage.clone(),
        clients.clone(),
        metrics.clone(),
        config.record_interval,
        usize::from(config.sample_concurrency),
        config.guest_idle_interval,
    ));
    let ledger = ledger::Ledger::new(
        registry,
        sessions,
        usage,
        clients,
        metrics,
        config.final_sample_timeout,
    );
    tracing::info!(
        sample_interval = ?config.sample_interval,
        record_interval = ?config.record_interval,
        "metering starting"
    );

    let token = CancellationToken::new();
    let sampling = tokio::spawn(sampler.run(config.sample_interval, token.clone()));
    let trimming = tokio::spawn(records::trim_loop(
        trimming_usage,
        config.records_trim_interval,
        token.clone(),
    ));
    let server = capsa_grpc::Server::new()
        .tls(config.common.tls.server())
        .health_listen(config.common.health_listen)
        .add_service(MeteringServiceServer::new(grpc::MeteringGrpc::new(ledger)));
    let drain = {
        let token = token.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: stopping the sampler");
            token.cancel();
        }
    };
    let served = capsa_grpc::serve_tcp(server, listener, drain).await;
    token.cancel();
    let _ = sampling.await;
    let _ = trimming.await;
    served.map_err(Error::Serve)
}
