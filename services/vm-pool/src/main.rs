//! `capsa-vm-pool`: parses its config, binds, prints `CAPSA_LISTENING=<addr>`, and runs the
//! pool until SIGINT or SIGTERM, then destroys its VMs.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;
use tokio::signal::unix::{SignalKind, signal};

/// Exit code for a configuration vm-pool cannot run with (EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match capsa_vm_pool::Config::try_parse() {
        Ok(config) => config,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let _telemetry = capsa_telemetry::init("capsa-vm-pool", "info");
    let listener = match tokio::net::TcpListener::bind(&config.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %config.listen, error = %e, "cannot bind");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "no local address");
            return ExitCode::FAILURE;
        }
    };
    println!("CAPSA_LISTENING={addr}");
    let _ = std::io::stdout().flush();

    let shutdown = async {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    match capsa_vm_pool::run(config, listener, shutdown).await {
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
