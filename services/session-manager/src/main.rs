//! `capsa-session-manager`: `serve` (default) binds, prints `CAPSA_LISTENING=<addr>` and
//! runs until SIGINT/SIGTERM; `create-api-key` prints a new key and nothing else;
//! `list-api-keys` and `revoke-api-key` manage keys by id (a prefix of the key's sha256).

use std::process::ExitCode;

use capsa_grpc::process::{EXIT_UNAVAILABLE, bind_and_announce, parse_args, shutdown_signal};
use capsa_session_manager::{AdminError, Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let _telemetry = capsa_telemetry::init("capsa-session-manager", "info");
    let config = match cli.command {
        Some(Command::CreateApiKey(args)) => {
            return admin(
                "create-api-key",
                capsa_session_manager::create_api_key(&args).await,
            );
        }
        Some(Command::ListApiKeys(args)) => {
            return admin(
                "list-api-keys",
                capsa_session_manager::list_api_keys(&args).await,
            );
        }
        Some(Command::RevokeApiKey(args)) => {
            return admin(
                "revoke-api-key",
                capsa_session_manager::revoke_api_key(&args).await,
            );
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

/// Prints an admin command's output; a store failure exits 69 (unreachable dependency), a
/// request the command refused exits 1 with the reason on stderr.
fn admin(command: &str, result: Result<String, AdminError>) -> ExitCode {
    match result {
        Ok(out) => {
            if !out.is_empty() {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err(e @ AdminError::Store(_)) => {
            tracing::error!(error = %capsa_grpc::error::chain(&e), "{command} failed");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
        Err(e) => {
            eprintln!("{command}: {e}");
            ExitCode::FAILURE
        }
    }
}
