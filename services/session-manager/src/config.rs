//! Command line and environment: `serve` (the default: the flags below at top level run the
//! server) and `create-api-key` (admin: prints a new key and nothing else on stdout).

use std::time::Duration;

use capsa_egress::{EgressPolicy, PolicyInput};
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
    /// Runs the server (also what no subcommand does). Boxed: far larger than the others.
    Serve(Box<Config>),
    /// Creates an API key for a tenant and prints it (shown only this once).
    CreateApiKey(CreateApiKey),
    /// Lists API keys (id, tenant, name, creation time; never the key itself).
    ListApiKeys(ListApiKeys),
    /// Revokes an API key by the id `list-api-keys` prints; calls with it fail at once.
    RevokeApiKey(RevokeApiKey),
    /// Sets a tenant's own limits (overriding the server defaults) and prints them.
    SetTenantLimits(SetTenantLimits),
    /// Sets (or clears) a tenant's default egress policy and prints the one now in force.
    SetTenantEgress(SetTenantEgress),
}

/// `set-tenant-egress` arguments: the flags make the whole policy (it replaces the tenant's
/// previous default); `--clear` removes it so the deployment default applies again.
#[derive(Debug, Clone, Args)]
pub struct SetTenantEgress {
    #[arg(long, env = "CAPSA_REDIS_URL")]
    pub redis_url: RedisUrl,
    #[arg(long)]
    pub tenant: String,
    #[command(flatten)]
    pub policy: EgressFlags,
    /// Removes the tenant's default (the deployment's `--default-egress` applies).
    #[arg(long, conflicts_with_all = [
        "allow_domains", "allow_cidrs", "allow_package_managers", "no_http", "no_https", "deny_all"
    ])]
    pub clear: bool,
}

/// An egress policy as flags (the same flags as `capsa create`); none at all means a policy
/// that admits nothing.
#[derive(Debug, Clone, Default, Args)]
pub struct EgressFlags {
    /// Admit this name (`example.com`) or every name below a domain (`*.example.com`);
    /// repeatable.
    #[arg(long = "allow-domain", value_name = "DOMAIN")]
    pub allow_domains: Vec<String>,
    /// Admit this network (`198.51.100.0/24`) or address; repeatable.
    #[arg(long = "allow-cidr", value_name = "CIDR")]
    pub allow_cidrs: Vec<String>,
    /// Admit the Python, npm, Debian and crates registries.
    #[arg(long)]
    pub allow_package_managers: bool,
    /// Take TCP port 80 away from every admitted destination.
    #[arg(long)]
    pub no_http: bool,
    /// Take TCP port 443 away from every admitted destination.
    #[arg(long)]
    pub no_https: bool,
    /// No egress at all (overrides the other flags).
    #[arg(long)]
    pub deny_all: bool,
}

impl EgressFlags {
    /// The policy the flags describe, validated; the error names the offending flag value.
    pub fn policy(&self) -> Result<EgressPolicy, capsa_egress::PolicyError> {
        EgressPolicy::from_input(PolicyInput {
            deny_all: self.deny_all,
            allow_package_managers: self.allow_package_managers,
            allow_http: self.no_http.then_some(false),
            allow_https: self.no_https.then_some(false),
            allowed_domains: self.allow_domains.clone(),
            allowed_cidrs: self.allow_cidrs.clone(),
        })
    }
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
    /// Cap on the tenant's named snapshots (0: none may be taken).
    #[arg(long)]
    pub max_snapshots: Option<u32>,
    /// Cap on the disk the tenant's snapshots take, in bytes (suspended sessions' count too).
    #[arg(long)]
    pub max_snapshot_bytes: Option<u64>,
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
    /// TLS of the public API (server certificate only; clients authenticate with API keys).
    #[command(flatten)]
    pub public_tls: capsa_grpc::tls::PublicTlsArgs,
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
    /// Longest a relayed stream (Execute, DownloadFile, AttachProcess, OpenTerminal,
    /// ConnectPort) waits for its client to take one event or chunk, in milliseconds. Past it the stream ends DEADLINE_EXCEEDED ("client
    /// stopped reading") and its call to the node is dropped, which interrupts the code.
    #[arg(long, env = "CAPSA_STALLED_CLIENT_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub stalled_client_timeout_ms: u64,
    /// Streaming calls (Execute, DownloadFile, UploadFile, AttachProcess, OpenTerminal,
    /// ConnectPort) a tenant may have open at once on this replica; past it
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "CAPSA_MAX_STREAMS_PER_TENANT", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_tenant: u32,
    /// Egress policy of sessions created without one whose tenant has no default
    /// (`set-tenant-egress`), as JSON with the fields of `capsa.common.v1.EgressPolicy`, all
    /// optional: e.g. `{"allow_package_managers": true}` or
    /// `{"allowed_domains": ["*.example.com"], "allow_http": false}`. Unset: no egress.
    #[arg(long, env = "CAPSA_DEFAULT_EGRESS", value_parser = policy_json)]
    pub default_egress: Option<EgressPolicy>,
    /// How long a node may take to suspend a session's VM to its disk, or to resume it
    /// (SuspendVm, ResumeVm). A replica that dies mid-step has it redone by another after
    /// this plus `--claim-ttl-secs`.
    #[arg(long, env = "CAPSA_SUSPEND_TIMEOUT_SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub suspend_timeout_secs: u64,
    /// How long a session created with auto_suspend is kept suspended once its deadline
    /// parked it; then it ends (EXPIRED) and its snapshot is deleted. The operator's bound
    /// on what idle sessions may hold on the nodes' disks.
    #[arg(long, env = "CAPSA_SUSPENDED_RETENTION_SECS", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    pub suspended_retention_secs: u64,
    /// Default cap on a tenant's snapshots (SnapshotSession); a tenant's limits hash
    /// (`max_snapshots`) overrides it.
    #[arg(long, env = "CAPSA_MAX_SNAPSHOTS_PER_TENANT", default_value_t = 20)]
    pub max_snapshots_per_tenant: u32,
    /// Default cap on the bytes a tenant's snapshots take on the nodes' disks (10 GiB); a
    /// tenant's limits hash (`max_snapshot_bytes`) overrides it.
    #[arg(long, env = "CAPSA_MAX_SNAPSHOT_BYTES_PER_TENANT", default_value_t = 10 << 30)]
    pub max_snapshot_bytes_per_tenant: u64,
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

    pub fn suspend_timeout(&self) -> Duration {
        Duration::from_secs(self.suspend_timeout_secs)
    }

    pub fn claim_ttl(&self) -> Duration {
        Duration::from_secs(self.claim_ttl_secs)
    }

    pub fn suspended_retention(&self) -> Duration {
        Duration::from_secs(self.suspended_retention_secs)
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
            // A replica that died mid-step is taken over once its node call surely ended.
            step_claim_ttl: self.suspend_timeout() + Duration::from_secs(self.claim_ttl_secs),
        }
    }
}

/// `--default-egress`: the policy message's fields as JSON, each optional, unknown ones
/// refused, validated like a request's.
fn policy_json(s: &str) -> Result<EgressPolicy, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Json {
        #[serde(default)]
        deny_all: bool,
        #[serde(default)]
        allow_package_managers: bool,
        allow_http: Option<bool>,
        allow_https: Option<bool>,
        #[serde(default)]
        allowed_domains: Vec<String>,
        #[serde(default)]
        allowed_cidrs: Vec<String>,
    }
    let j: Json = serde_json::from_str(s).map_err(|e| format!("not a policy object: {e}"))?;
    EgressPolicy::from_input(PolicyInput {
        deny_all: j.deny_all,
        allow_package_managers: j.allow_package_managers,
        allow_http: j.allow_http,
        allow_https: j.allow_https,
        allowed_domains: j.allowed_domains,
        allowed_cidrs: j.allowed_cidrs,
    })
    .map_err(|e| e.to_string())
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

    #[test]
    fn the_default_egress_is_policy_json_validated_like_a_request() {
        assert_eq!(Cli::parse_from(["x"]).serve.default_egress, None);
        let cli = Cli::parse_from([
            "x",
            "--default-egress",
            r#"{"allow_package_managers":true}"#,
        ]);
        let policy = cli.serve.default_egress.unwrap();
        assert!(policy.allow_package_managers && policy.allow_http && !policy.deny_all);
        let cli = Cli::parse_from([
            "x",
            "--default-egress",
            r#"{"allowed_domains":["*.example.com"],"allow_http":false}"#,
        ]);
        let policy = cli.serve.default_egress.unwrap();
        assert!(policy.allows_name("a.example.com") && !policy.allow_http);
        for (bad, says) in [
            (r#"{"allowed_cidrs":["10.0.0.1/8"]}"#, "`allowed_cidrs[0]`"),
            (r#"{"allow_pkg":true}"#, "unknown field"),
            ("allow everything", "not a policy object"),
        ] {
            let err = Cli::try_parse_from(["x", "--default-egress", bad]).unwrap_err();
            assert!(err.to_string().contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn set_tenant_egress_takes_the_policy_as_flags_or_clear() {
        let parse = |extra: &[&str]| {
            let args = [
                "x",
                "set-tenant-egress",
                "--redis-url",
                "r",
                "--tenant",
                "t",
            ];
            Cli::try_parse_from(args.iter().chain(extra)).map(|cli| match cli.command {
                Some(Command::SetTenantEgress(a)) => a,
                other => panic!("{other:?}"),
            })
        };
        let a = parse(&[
            "--allow-domain",
            "pypi.org",
            "--allow-domain",
            "*.example.com",
            "--allow-cidr",
            "198.51.100.0/24",
            "--allow-package-managers",
            "--no-http",
        ])
        .unwrap();
        let policy = a.policy.policy().unwrap();
        assert_eq!(policy.allowed_domains.len(), 2);
        assert_eq!(policy.allowed_cidrs[0].to_string(), "198.51.100.0/24");
        assert!(policy.allow_package_managers && !policy.allow_http && policy.allow_https);
        assert!(!a.clear);
        let a = parse(&["--deny-all", "--no-https"]).unwrap();
        let policy = a.policy.policy().unwrap();
        assert!(policy.deny_all && !policy.allow_https);
        assert!(parse(&["--clear"]).unwrap().clear);
        assert!(parse(&["--clear", "--allow-domain", "a.example"]).is_err());
        let err = parse(&["--allow-domain", "not a name"])
            .unwrap()
            .policy
            .policy()
            .unwrap_err();
        assert_eq!(err.field, "allowed_domains[0]");
    }
}
