//! `capsa-session-manager`: `serve` (default) binds, prints `CAPSA_LISTENING=<addr>` and
//! runs until SIGINT/SIGTERM; `create-api-key` prints a new key and nothing else.

use std::io::Write as _;
use std::process::ExitCode;

use capsa_session_manager::{Cli, Command};
use clap::Parser as _;
use tokio::signal::unix::{SignalKind, signal};

/// Configuration the server cannot run with (EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;
/// A dependency (Redis) is unreachable (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let _telemetry = capsa_telemetry::init("capsa-session-manager", "info");
    let config = match cli.command {
        Some(Command::CreateApiKey(args)) => {
            return match capsa_session_manager::create_api_key(&args).await {
                Ok(key) => {
                    println!("{key}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    tracing::error!(error = %capsa_grpc::error::chain(&e), "create-api-key failed");
                    ExitCode::from(EXIT_UNAVAILABLE)
                }
            };
        }
        Some(Command::Serve(config)) => config,
        None => cli.serve,
    };
    let listener = match tokio::net::TcpListener::bind(&config.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %config.listen, error = %e, "cannot bind");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    match listener.local_addr() {
        Ok(addr) => println!("CAPSA_LISTENING={addr}"),
        Err(e) => {
            tracing::error!(error = %e, "no local address");
            return ExitCode::FAILURE;
        }
    }
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
        tracing::info!("shutting down");
    };
    match capsa_session_manager::run(config, listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ capsa_session_manager::RunError::Redis(_)) => {
            tracing::error!(error = %capsa_grpc::error::chain(&e), "session-manager failed");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
        Err(e) => {
            tracing::error!(error = %capsa_grpc::error::chain(&e), "session-manager failed");
            ExitCode::FAILURE
        }
    }
}
