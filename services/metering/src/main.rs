//! `capsa-metering`: parses its config, binds, prints `CAPSA_LISTENING=<addr>`, and samples
//! and serves until SIGINT or SIGTERM. Exit codes: `capsa_grpc::process`.

use std::process::ExitCode;

use capsa_grpc::process::{Exit, bind_and_announce, exit_code, parse_args, shutdown_signal};

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(serve().await)
}

async fn serve() -> Result<(), Exit> {
    let config: capsa_metering::Config = parse_args()?;
    config
        .redis_url
        .check()
        .map_err(|e| Exit::config(format!("--redis-url (CAPSA_REDIS_URL): {e}")))?;
    let _telemetry = capsa_telemetry::init("capsa-metering", &config.common.telemetry.settings())?;
    let shutdown = shutdown_signal();
    let listener = bind_and_announce(config.common.listen).await?;
    let redis = config.redis_url.clone();
    match capsa_metering::run(config, listener, shutdown).await {
        Ok(()) => Ok(()),
        // The store fails `run` only when connecting at start: later failures are per call.
        Err(e @ capsa_metering::Error::Store(_)) => {
            Err(Exit::unavailable(&format!("redis at {redis}"), &e))
        }
        Err(e) => Err(Exit::failed("metering failed", &e)),
    }
}
