//! `capsa-session-manager`: `serve` (default) binds, prints `CAPSA_LISTENING=<addr>` and
//! runs until SIGINT/SIGTERM; `create-api-key` prints a new key and nothing else;
//! `list-api-keys` and `revoke-api-key` manage keys by id (a prefix of the key's sha256).

use std::process::ExitCode;

use capsa_grpc::process::{EXIT_UNAVAILABLE, bind_and_announce, parse_args, shutdown_signal};
use capsa_session_manager::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
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
        Some(Command::ListApiKeys(args)) => {
            return match capsa_session_manager::list_api_keys(&args).await {
                Ok(lines) => {
                    for line in lines {
                        println!("{line}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    tracing::error!(error = %capsa_grpc::error::chain(&e), "list-api-keys failed");
                    ExitCode::from(EXIT_UNAVAILABLE)
                }
            };
        }
        Some(Command::RevokeApiKey(args)) => {
            return match capsa_session_manager::revoke_api_key(&args).await {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(e @ capsa_session_manager::RevokeError::Store(_)) => {
                    tracing::error!(error = %capsa_grpc::error::chain(&e), "revoke-api-key failed");
                    ExitCode::from(EXIT_UNAVAILABLE)
                }
                Err(e) => {
                    eprintln!("revoke-api-key: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Serve(config)) => config,
        None => cli.serve,
    };
    let listener = match bind_and_announce(&config.listen).await {
        Ok(listener) => listener,
        Err(code) => return code,
    };
    match capsa_session_manager::run(config, listener, shutdown_signal()).await {
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
