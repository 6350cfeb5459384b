//! capsa-session-manager: the public `SessionService`. Stateless; any number of replicas
//! share Redis. [`run`] serves on a bound listener until `shutdown` resolves, with the
//! reaper and reconciler running beside the server (see `reaper`). On shutdown health goes
//! NOT_SERVING, the listener closes and in-flight calls finish; sessions are not ended
//! (another replica, or this one restarted, carries on from Redis).

mod app;
mod clients;
pub mod config;
pub mod error;
mod grpc;
mod proxy;
mod reaper;
mod sessions;
mod teardown;
pub mod validate;

use std::future::Future;
use std::sync::Arc;

use capsa_proto::session::v1::session_service_server::SessionServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{Cli, Command, Config, CreateApiKey};
pub use error::Error;

/// Everything [`run`] can fail with before or while serving.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot connect to redis")]
    Redis(#[source] capsa_store::StoreError),
    #[error("grpc server failed")]
    Serve(#[source] tonic::transport::Error),
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let conn = capsa_store::connect(&config.redis_url.0)
        .await
        .map_err(RunError::Redis)?;
    let app = Arc::new(app::App::new(config, conn));
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    tokio::spawn(reaper::reaper(app.clone(), stop.clone()));
    tokio::spawn(reaper::reconciler(app.clone(), stop.clone()));
    let service = SessionServiceServer::new(grpc::SessionApi::new(app))
        .max_decoding_message_size(8 << 20)
        .max_encoding_message_size(8 << 20);
    let server = capsa_grpc::Server::new().add_service(service);
    tracing::info!("session-manager serving");
    capsa_grpc::serve_tcp(server, listener, shutdown)
        .await
        .map_err(RunError::Serve)
}

/// `create-api-key`: creates the key (and the tenant's session cap, if given) and returns
/// the plaintext for the caller to print.
pub async fn create_api_key(args: &CreateApiKey) -> Result<String, capsa_store::StoreError> {
    let conn = capsa_store::connect(&args.redis_url.0).await?;
    let keys = capsa_store::ApiKeyStore::new(conn);
    if let Some(max) = args.max_sessions {
        keys.set_max_sessions(&args.tenant, max).await?;
    }
    Ok(keys.create(&args.tenant, &args.name).await?.plaintext)
}
