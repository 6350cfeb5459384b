//! capsa-executor: one per KVM host, beside vm-pool. Relays Execute, file, process,
//! terminal and port streams between the control plane and the guest agents of this host's
//! VMs over hybrid vsock, with bounded buffers, stream limits, and client disconnects
//! turned into interrupts.
//!
//! - [`agents`]: one cached, lazily connecting channel per VM, and per-kernel gates.
//! - [`relay`]: the bounded, cancellable relay with idle, total and stalled-client limits.
//! - [`executor`], [`files`], [`processes`]: the operations; [`spec`]: request validation.
//! - [`grpc`]: the gRPC adapter; [`config`], [`error`].

pub mod agents;
pub mod config;
pub mod error;
pub mod executor;
pub mod files;
pub mod grpc;
pub mod processes;
pub mod relay;
pub mod spec;

use std::future::Future;
use std::time::Duration;

use capsa_proto::executor::v1::executor_service_server::ExecutorServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::Error;
pub use executor::Executor;

/// How often VMs whose socket disappeared are forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// Serves the executor on `listener` until `shutdown` resolves. Shutdown: health goes
/// NOT_SERVING, running relays end with UNAVAILABLE (dropping their agent calls, which
/// interrupts the code in the guests), then in-flight calls drain.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let token = CancellationToken::new();
    let executor = Executor::new(&config, token.clone());
    tracing::info!(state_dir = %config.vm_state_dir.display(), limits = ?executor.limits, "executor starting");

    let sweeper = {
        let executor = executor.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let left = executor.agents().sweep();
                        tracing::debug!(vms = left, "swept agent channels");
                    }
                    () = token.cancelled() => return,
                }
            }
        })
    };

    let service = ExecutorServiceServer::new(grpc::ExecutorGrpc::new(executor))
        .max_decoding_message_size(capsa_proto::limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(capsa_proto::limits::MAX_MESSAGE_BYTES);
    let server = capsa_grpc::Server::new()
        .tls(config.common.tls.server())
        .health_listen(config.common.health_listen)
        .max_concurrent_streams(capsa_grpc::server::max_streams::EXECUTOR)
        .add_service(service);
    let drain = {
        let token = token.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: cancelling relays");
            token.cancel();
        }
    };
    let served = capsa_grpc::serve_tcp(server, listener, drain).await;
    token.cancel();
    let _ = sweeper.await;
    served.map_err(Error::Serve)
}
