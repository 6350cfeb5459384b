//! Command line and environment.

use std::time::Duration;

use capsa_grpc::args::{CommonArgs, RedisUrl, listen_on};
use clap::Parser;

/// The gateway's flags; each also reads the variable it names.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "capsa-gateway",
    version,
    about = "InstaVM-compatible HTTP API over Capsa's session-manager.",
    mut_arg("listen", listen_on("CAPSA_GATEWAY_LISTEN", "127.0.0.1:8080"))
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// HTTPS for the API (`--public-tls-cert`, `--public-tls-key`); plaintext without them.
    #[command(flatten)]
    pub public_tls: capsa_grpc::tls::PublicTlsArgs,

    /// session-manager's public gRPC endpoint.
    #[arg(
        long,
        env = "CAPSA_SESSION_MANAGER_URL",
        default_value = "http://127.0.0.1:50051",
        value_name = "URL"
    )]
    pub session_manager_url: String,

    /// Redis for the records of `/execute_async` (any replica answers any poll).
    #[arg(long, env = "CAPSA_REDIS_URL", value_name = "URL")]
    pub redis_url: RedisUrl,

    /// How long an async execution's record (and its output) stays readable.
    #[arg(long, env = "CAPSA_GATEWAY_EXECUTION_TTL_SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(60..=7 * 24 * 3600))]
    pub execution_ttl_secs: u64,

    /// Largest JSON or form body (execute, sessions, ...). A command is at most 1 MiB
    /// whatever this says; the room above it is for JSON escapes.
    #[arg(long, env = "CAPSA_GATEWAY_MAX_BODY_BYTES", default_value_t = 8 << 20,
          value_parser = clap::value_parser!(u64).range(4096..=64 << 20))]
    pub max_body_bytes: u64,

    /// Largest file `/upload` accepts (spooled to a temporary file, then sent with its size).
    #[arg(long, env = "CAPSA_GATEWAY_MAX_UPLOAD_BYTES", default_value_t = 256 << 20,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_upload_bytes: u64,

    /// Largest file `/download` returns (held in memory and sent base64-encoded).
    #[arg(long, env = "CAPSA_GATEWAY_MAX_DOWNLOAD_BYTES", default_value_t = 64 << 20,
          value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    pub max_download_bytes: u64,

    /// A client that sends no request bytes (headers or body) for this long is cut off.
    #[arg(long, env = "CAPSA_GATEWAY_CLIENT_IDLE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub client_idle_secs: u64,

    /// Bound on each session-manager call but execute and those `--create-timeout-secs`
    /// bounds.
    #[arg(long, env = "CAPSA_GATEWAY_CALL_TIMEOUT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub call_timeout_secs: u64,

    /// Bound on creating, suspending, resuming, snapshotting and cloning a session (a cold VM
    /// boot under software emulation takes minutes).
    #[arg(long, env = "CAPSA_GATEWAY_CREATE_TIMEOUT_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub create_timeout_secs: u64,
}

/// The limits the handlers enforce, from [`Config`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: u64,
    pub max_upload_bytes: u64,
    pub max_download_bytes: u64,
    pub client_idle: Duration,
    pub call_timeout: Duration,
    pub create_timeout: Duration,
    pub execution_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 8 << 20,
            max_upload_bytes: 256 << 20,
            max_download_bytes: 64 << 20,
            client_idle: Duration::from_secs(30),
            call_timeout: Duration::from_secs(60),
            create_timeout: Duration::from_secs(300),
            execution_ttl: Duration::from_secs(3600),
        }
    }
}

impl Config {
    pub fn limits(&self) -> Limits {
        Limits {
            max_body_bytes: self.max_body_bytes,
            max_upload_bytes: self.max_upload_bytes,
            max_download_bytes: self.max_download_bytes,
            client_idle: Duration::from_secs(self.client_idle_secs),
            call_timeout: Duration::from_secs(self.call_timeout_secs),
            create_timeout: Duration::from_secs(self.create_timeout_secs),
            execution_ttl: Duration::from_secs(self.execution_ttl_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_ranges() {
        let c = Config::try_parse_from(["x", "--redis-url", "redis://127.0.0.1/"]).unwrap();
        assert_eq!(c.common.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.session_manager_url, "http://127.0.0.1:50051");
        let l = c.limits();
        assert_eq!(l.max_body_bytes, Limits::default().max_body_bytes);
        assert_eq!(l.create_timeout, Limits::default().create_timeout);
        assert!(
            Config::try_parse_from(["x", "--redis-url", "redis://h/", "--max-body-bytes", "10"])
                .is_err()
        );
    }
}
