//! `capsa-vm-pool`: parses its config, binds, prints `CAPSA_LISTENING=<addr>`, and runs the
//! pool until SIGINT or SIGTERM, then destroys its VMs. Exit codes: `capsa_grpc::process`.

use std::process::ExitCode;

use capsa_grpc::process::{Exit, bind_and_announce, exit_code, parse_args, shutdown_signal};
use capsa_vm_pool::Error;

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(serve().await)
}

async fn serve() -> Result<(), Exit> {
    let config: capsa_vm_pool::Config = parse_args()?;
    if let Some(url) = &config.redis_url {
        url.check()
            .map_err(|e| Exit::config(format!("--redis-url (CAPSA_REDIS_URL): {e}")))?;
    }
    let _telemetry = capsa_telemetry::init("capsa-vm-pool", &config.common.telemetry.settings())?;
    let shutdown = shutdown_signal();
    let listener = bind_and_announce(config.common.listen).await?;
    let redis = config.redis_url.clone();
    match capsa_vm_pool::run(config, listener, shutdown).await {
        Ok(()) => Ok(()),
        Err(e @ Error::Config(_)) => Err(Exit::config(e)),
        // The registry fails `run` only when registering at start; heartbeats log and retry.
        Err(e @ Error::Store(_)) => Err(Exit::unavailable(
            &format!(
                "redis at {}",
                redis.map(|u| u.to_string()).unwrap_or_default()
            ),
            &e,
        )),
        Err(e) => Err(Exit::failed("vm-pool failed", &e)),
    }
}
