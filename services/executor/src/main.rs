//! `capsa-executor`: parses its config, binds, prints `CAPSA_LISTENING=<addr>`, and runs
//! the relay until SIGINT or SIGTERM. Exit codes: `capsa_grpc::process`.

use std::process::ExitCode;

use capsa_grpc::process::{Exit, bind_and_announce, exit_code, parse_args, shutdown_signal};

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(serve().await)
}

async fn serve() -> Result<(), Exit> {
    let config: capsa_executor::Config = parse_args()?;
    let _telemetry = capsa_telemetry::init("capsa-executor", &config.common.telemetry.settings())?;
    let shutdown = shutdown_signal();
    let listener = bind_and_announce(config.common.listen).await?;
    capsa_executor::run(config, listener, shutdown)
        .await
        .map_err(|e| Exit::failed("executor failed", &e))
}
