//! `capsa-gateway`: InstaVM's REST API over Capsa. Stateless apart from the records of async
//! executions, which live in Redis, so any number of replicas can run behind one address.
//! See `api` for the routes, `backend` for how calls reach session-manager with the caller's
//! own key, and `error` for the one mapping of failures to HTTP statuses.

pub mod api;
pub mod backend;
pub mod config;
pub mod error;
pub mod executions;
pub mod model;
mod serve;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

pub use config::{Config, Limits};

/// What every handler shares.
pub struct AppState {
    pub backend: backend::Backend,
    pub executions: executions::Executions,
    pub limits: Limits,
    /// Async executions in flight, awaited on shutdown.
    pub tasks: TaskTracker,
}

impl AppState {
    pub fn new(
        session_manager_url: &str,
        redis_url: &str,
        limits: Limits,
        tls: &capsa_grpc::tls::TlsArgs,
    ) -> Result<AppState, String> {
        Ok(AppState {
            backend: backend::Backend::new(session_manager_url, tls)?,
            executions: executions::Executions::new(redis_url.to_owned(), limits.execution_ttl),
            limits,
            tasks: TaskTracker::new(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Config(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Serves on `listener` until `shutdown`, then waits for requests and async executions in
/// flight (each bounded by its own timeout).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let limits = config.limits();
    let tls = serve::tls_acceptor(&config.public_tls).map_err(RunError::Config)?;
    // Registered now, so the gateway exports from its first interval like every service.
    std::sync::LazyLock::force(&api::REQUEST_SECONDS);
    let state = Arc::new(
        AppState::new(
            &config.session_manager_url,
            config.redis_url.expose(),
            limits,
            &config.common.tls,
        )
        .map_err(RunError::Config)?,
    );
    state.executions.connect().await?;
    tracing::info!(
        session_manager = %config.session_manager_url,
        https = tls.is_some(),
        "gateway serving"
    );
    serve::serve(
        listener,
        api::router(state.clone()),
        limits.client_idle,
        tls,
        shutdown,
    )
    .await;
    state.tasks.close();
    state.tasks.wait().await;
    Ok(())
}
