//! `capsa-gateway`: binds, prints `CAPSA_LISTENING=<addr>` and serves InstaVM's REST API
//! until SIGINT/SIGTERM. Exit codes: `capsa_grpc::process`.

use std::process::ExitCode;

use capsa_gateway::{Config, RunError};
use capsa_grpc::process::{Exit, bind_and_announce, exit_code, parse_args, shutdown_signal};

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(serve().await)
}

async fn serve() -> Result<(), Exit> {
    let config: Config = parse_args()?;
    let redis = config.redis_url.clone();
    redis
        .check()
        .map_err(|e| Exit::config(format!("--redis-url (CAPSA_REDIS_URL) {redis}: {e}")))?;
    let _telemetry = capsa_telemetry::init("capsa-gateway", &config.common.telemetry.settings())?;
    let shutdown = shutdown_signal();
    let listener = bind_and_announce(config.common.listen).await?;
    match capsa_gateway::run(config, listener, shutdown).await {
        Ok(()) => Ok(()),
        Err(RunError::Config(m)) => Err(Exit::config(m)),
        Err(e @ RunError::Redis(_)) => Err(Exit::unavailable(&format!("redis at {redis}"), &e)),
    }
}
