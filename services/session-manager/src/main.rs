//! `capsa-session-manager`: `serve` (default) binds, prints `CAPSA_LISTENING=<addr>` and
//! runs until SIGINT/SIGTERM; `create-api-key` prints a new key and nothing else;
//! `list-api-keys` and `revoke-api-key` manage keys by id (a prefix of the key's sha256);
//! `set-tenant-limits` sets a tenant's own limits; `set-tenant-egress` its default egress
//! policy. Exit codes: `capsa_grpc::process`.

use std::future::Future;
use std::process::ExitCode;

use capsa_grpc::args::RedisUrl;
use capsa_grpc::process::{Exit, bind_and_announce, exit_code, parse_args, shutdown_signal};
use capsa_session_manager as sm;
use capsa_session_manager::{AdminError, Cli, Command, RunError};

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(serve().await)
}

async fn serve() -> Result<(), Exit> {
    let cli: Cli = parse_args()?;
    let config = match cli.command {
        Some(Command::Serve(config)) => *config,
        None => cli.serve,
        Some(Command::CreateApiKey(a)) => {
            return admin("create-api-key", &a.redis_url, sm::create_api_key(&a)).await;
        }
        Some(Command::ListApiKeys(a)) => {
            return admin("list-api-keys", &a.redis_url, sm::list_api_keys(&a)).await;
        }
        Some(Command::RevokeApiKey(a)) => {
            return admin("revoke-api-key", &a.redis_url, sm::revoke_api_key(&a)).await;
        }
        Some(Command::SetTenantLimits(a)) => {
            return admin("set-tenant-limits", &a.redis_url, sm::set_tenant_limits(&a)).await;
        }
        Some(Command::SetTenantEgress(a)) => {
            return admin("set-tenant-egress", &a.redis_url, sm::set_tenant_egress(&a)).await;
        }
    };
    check_redis_url(&config.redis_url)?;
    let _telemetry =
        capsa_telemetry::init("capsa-session-manager", &config.common.telemetry.settings())?;
    let shutdown = shutdown_signal();
    let listener = bind_and_announce(config.common.listen).await?;
    let redis = config.redis_url.clone();
    match sm::run(config, listener, shutdown).await {
        Ok(()) => Ok(()),
        Err(e @ RunError::Redis(_)) => Err(Exit::unavailable(&format!("redis at {redis}"), &e)),
        Err(e) => Err(Exit::failed("session-manager failed", &e)),
    }
}

/// Runs an admin command and prints its output; a store failure exits 69 (unreachable
/// dependency), a request the command refused exits 1 with the reason.
async fn admin(
    name: &str,
    redis: &RedisUrl,
    command: impl Future<Output = Result<String, AdminError>>,
) -> Result<(), Exit> {
    check_redis_url(redis)?;
    let _telemetry = capsa_telemetry::init(
        "capsa-session-manager",
        &capsa_telemetry::Settings::from_env("info"),
    )?;
    match command.await {
        Ok(out) => {
            if !out.is_empty() {
                println!("{out}");
            }
            Ok(())
        }
        Err(e @ AdminError::Store(_)) => {
            Err(Exit::unavailable(&format!("{name}: redis at {redis}"), &e))
        }
        Err(e) => Err(Exit::Failed(format!("{name}: {e}"))),
    }
}

fn check_redis_url(url: &RedisUrl) -> Result<(), Exit> {
    url.check()
        .map_err(|e| Exit::config(format!("--redis-url (CAPSA_REDIS_URL) {url}: {e}")))
}
