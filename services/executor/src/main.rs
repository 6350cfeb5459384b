//! `capsa-executor`: parses its config, binds, prints `CAPSA_LISTENING=<addr>`, and runs
//! the relay until SIGINT or SIGTERM.

use std::process::ExitCode;

use capsa_grpc::process::{bind_and_announce, parse_args, shutdown_signal};

#[tokio::main]
async fn main() -> ExitCode {
    let config: capsa_executor::Config = match parse_args() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let _telemetry = capsa_telemetry::init("capsa-executor", "info");
    let listener = match bind_and_announce(&config.listen).await {
        Ok(listener) => listener,
        Err(code) => return code,
    };
    match capsa_executor::run(config, listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %capsa_grpc::error::chain(&e), "executor failed");
            ExitCode::FAILURE
        }
    }
}
