//! Command line and environment: `serve` (the default: the flags below at top level run the
//! server) and `create-api-key` (admin: prints a new key and nothing else on stdout).

use std::time::Duration;

use capsa_grpc::args::{CommonArgs, RedisUrl, listen_on};
use clap::{Args, Parser, Subcommand};

/// The session-manager command line.
#[derive(Debug, Parser)]
#[command(
    name = "capsa-session-manager",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the server (also what no subcommand does).
    Serve(Config),
    /// Creates an API key for a tenant and prints it (shown only this once).
    CreateApiKey(CreateApiKey),
    /// Lists API keys (id, tenant, name, creation time; never the key itself).
    ListApiKeys(ListApiKeys),
    /// Revokes an API key by the id `list-api-keys` prints; calls with it fail at once.
    RevokeApiKey(RevokeApiKey),
    /// Sets a tenant's own limits (overriding the server defaults) and prints them.
    SetTenantLimits(SetTenantLimits),
}

/// `set-tenant-limits` arguments: each given limit replaces the tenant's; others stay.
#[derive(Debug, Clone, Args)]
pub struct SetTenantLimits {
    #[arg(long, env = "CAPSA_REDIS_URL")]
    pub redis_url: RedisUrl,
    #[arg(long)]
    pub tenant: String,
    /// Cap on concurrent (creating + active) sessions.
    #[arg(long)]
    pub max_sessions: Option<u32>,
    /// Session creates per second (refill of the tenant's token bucket); needs --create-burst.
    #[arg(long, requires = "create_burst", value_parser = positive_rate)]
    pub create_rate: Option<f64>,
    /// Most creates at once after an idle spell; needs --create-rate.
    #[arg(long, requires = "create_rate", value_parser = clap::value_parser!(u32).range(1..))]
    pub create_burst: Option<u32>,
}

/// `list-api-keys` arguments.
#[derive(Debug, Clone, Args)]
pub struct ListApiKeys {
    #[arg(long, env = "CAPSA_REDIS_URL")]
    pub redis_url: RedisUrl,
    /// Only this tenant's keys.
    #[arg(long)]
    pub tenant: Option<String>,
}

/// `revoke-api-key` arguments.
#[derive(Debug, Clone, Args)]
pub struct RevokeApiKey {
    #[arg(long, env = "CAPSA_REDIS_URL")]
    pub redis_url: RedisUrl,
    /// Key id: the start (at least 8 hex digits) of the key's sha256, as listed.
    #[arg(long)]
    pub id: String,
}

/// `create-api-key` arguments.
#[derive(Debug, Clone, Args)]
pub struct CreateApiKey {
    #[arg(long, env = "CAPSA_REDIS_URL")]
    pub redis_url: RedisUrl,
    /// Tenant the key acts for.
    #[arg(long)]
    pub tenant: String,
    /// Free-form label of the key (who or what uses it).
    #[arg(long, default_value = "")]
    pub name: String,
    /// Sets the tenant's cap on concurrent sessions (overrides the server default).
    #[arg(long)]
    pub max_sessions: Option<u32>,
}

/// Server configuration. Tests build it with [`Config::for_redis`] and adjust fields.
#[derive(Debug, Clone, Args)]
#[command(mut_arg("listen", listen_on("CAPSA_LISTEN", "127.0.0.1:50051")))]
pub struct Config {
    /// `--listen` and the telemetry flags.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Redis holding sessions, keys and nodes (`redis://[:password@]host:port/db`; logged
    /// with the password masked).
    #[arg(
        long,
        env = "CAPSA_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/"
    )]
    pub redis_url: RedisUrl,
    /// MeteringService URL; without it FinalizeSession is skipped and usage calls fail
    /// with UNAVAILABLE.
    #[arg(long, env = "CAPSA_METERING_URL")]
    pub metering_url: Option<String>,
    /// Default cap on a tenant's concurrent (creating + active) sessions.
    #[arg(long, env = "CAPSA_MAX_SESSIONS_PER_TENANT", default_value_t = 20)]
    pub max_sessions_per_tenant: u32,
    /// Session creates a tenant may make per second, sustained (RESOURCE_EXHAUSTED with
    /// RetryInfo past it). Each tenant has its own budget.
    #[arg(long, env = "CAPSA_CREATE_RATE_PER_SEC", default_value_t = 2.0, value_parser = positive_rate)]
    pub create_rate_per_sec: f64,
    /// Creates a tenant may make at once before the rate applies.
    #[arg(long, env = "CAPSA_CREATE_BURST", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub create_burst: u32,
    /// How long AcquireVm may take (cold boots under software emulation are slow).
    #[arg(long, env = "CAPSA_ACQUIRE_TIMEOUT_SECS", default_value_t = 120)]
    pub acquire_timeout_secs: u64,
    /// How long ended sessions stay readable (their record, end reason and final usage).
    #[arg(long, env = "CAPSA_RETENTION_SECS", default_value_t = 3600)]
    pub retention_secs: u64,
    /// How long a replica owns a teardown before another may take it over.
    #[arg(long, env = "CAPSA_CLAIM_TTL_SECS", default_value_t = 30)]
    pub claim_ttl_secs: u64,
    /// Longest sleep of the expiry reaper between polls.
    #[arg(long, env = "CAPSA_REAPER_INTERVAL_MS", default_value_t = 250)]
    pub reaper_interval_ms: u64,
    /// Period of the reconciler (orphan VMs, failed VMs).
    #[arg(long, env = "CAPSA_RECONCILE_INTERVAL_MS", default_value_t = 2000)]
    pub reconcile_interval_ms: u64,
    /// How long a node may miss heartbeats, while it does not answer either, before its
    /// sessions end as VM_FAILED. A node that answers is never judged by its heartbeat; a
    /// stopped or CPU-starved one gets this long to come back (a graceful remove gets none).
    #[arg(long, env = "CAPSA_NODE_GRACE_SECS", default_value_t = 30)]
    pub node_grace_secs: u64,
    /// Longest a relayed stream (Execute, DownloadFile) waits for its client to take one
    /// event or chunk, in milliseconds. Past it the stream ends DEADLINE_EXCEEDED ("client
    /// stopped reading") and its call to the node is dropped, which interrupts the code.
    #[arg(long, env = "CAPSA_STALLED_CLIENT_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub stalled_client_timeout_ms: u64,
    /// Streaming calls (Execute, DownloadFile, UploadFile) a tenant may have open at once
    /// on this replica; past it RESOURCE_EXHAUSTED.
    #[arg(long, env = "CAPSA_MAX_STREAMS_PER_TENANT", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_tenant: u32,
    /// Bound of the best-effort FinalizeSession call while ending a session.
    #[arg(long, env = "CAPSA_FINALIZE_TIMEOUT_MS", default_value_t = 2000)]
    pub finalize_timeout_ms: u64,
}

impl Config {
    /// Defaults with the given Redis URL (for tests and embedding).
    pub fn for_redis(redis_url: &str) -> Self {
        let cli = Cli::parse_from(["capsa-session-manager", "--redis-url", redis_url]);
        cli.serve
    }

    pub fn acquire_timeout(&self) -> Duration {
        Duration::from_secs(self.acquire_timeout_secs)
    }

    pub fn stalled_client_timeout(&self) -> Duration {
        Duration::from_millis(self.stalled_client_timeout_ms)
    }

    pub fn store_config(&self) -> capsa_store::StoreConfig {
        capsa_store::StoreConfig {
            retention: Duration::from_secs(self.retention_secs),
            claim_ttl: Duration::from_secs(self.claim_ttl_secs),
            // A live creator always gives up (acquire timeout) before the reaper steps in.
            creating_bound: self.acquire_timeout() + Duration::from_secs(60),
            max_total_lifetime: crate::validate::MAX_LIFETIME,
        }
    }
}

fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a positive number of creates per second"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_level_flags_mean_serve_and_subcommands_parse() {
        let cli = Cli::parse_from(["x", "--listen", "127.0.0.1:0", "--redis-url", "redis://h/"]);
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.common.listen, "127.0.0.1:0".parse().unwrap());
        let cli = Cli::parse_from(["x", "serve"]);
        let Some(Command::Serve(config)) = cli.command else {
            panic!()
        };
        assert_eq!(config.common.listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(cli.serve.max_sessions_per_tenant, 20);
        assert_eq!(cli.serve.max_streams_per_tenant, 16);
        assert_eq!(cli.serve.stalled_client_timeout(), Duration::from_secs(30));
        let cli = Cli::parse_from(["x", "create-api-key", "--redis-url", "r", "--tenant", "t"]);
        let Some(Command::CreateApiKey(k)) = cli.command else {
            panic!()
        };
        assert_eq!(k.tenant, "t");
        assert!(!format!("{k:?}").contains("\"r\""));
    }
}
