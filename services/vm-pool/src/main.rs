//! `capsa-vm-pool`: parses its config, binds, prints `CAPSA_LISTENING=<addr>`, and runs the
//! pool until SIGINT or SIGTERM, then destroys its VMs.

use std::process::ExitCode;

use capsa_grpc::process::{EXIT_BAD_CONFIG, bind_and_announce, parse_args, shutdown_signal};

#[tokio::main]
async fn main() -> ExitCode {
    let config: capsa_vm_pool::Config = match parse_args() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let _telemetry = capsa_telemetry::init("capsa-vm-pool", "info");
    let listener = match bind_and_announce(&config.listen).await {
        Ok(listener) => listener,
        Err(code) => return code,
    };
    match capsa_vm_pool::run(config, listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ capsa_vm_pool::Error::Config(_)) => {
            tracing::error!(error = %e, "bad configuration");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
        Err(e) => {
            tracing::error!(error = %capsa_grpc::error::chain(&e), "vm-pool failed");
            ExitCode::FAILURE
        }
    }
}
