//! `capsa-metering`: parses its config, binds, prints `CAPSA_LISTENING=<addr>`, and samples
//! and serves until SIGINT or SIGTERM.

use std::process::ExitCode;

use capsa_grpc::process::{EXIT_BAD_CONFIG, bind_and_announce, parse_args, shutdown_signal};

#[tokio::main]
async fn main() -> ExitCode {
    let config: capsa_metering::Config = match parse_args() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let _telemetry = capsa_telemetry::init("capsa-metering", "info");
    if let Err(e) = redis::Client::open(config.redis_url.as_str()) {
        tracing::error!(error = %e, "bad --redis-url");
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    let listener = match bind_and_announce(&config.listen).await {
        Ok(listener) => listener,
        Err(code) => return code,
    };
    match capsa_metering::run(config, listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %capsa_grpc::error::chain(&e), "metering failed");
            ExitCode::FAILURE
        }
    }
}
