//! Flags every service shares, flattened into each one's clap config: the listen address
//! and the telemetry settings ([`CommonArgs`]), and [`RedisUrl`], the Redis URL type that
//! keeps its password out of logs and errors.
//!
//! Each service gives `--listen` its own default and variable with [`listen_on`]:
//!
//! ```
//! use capsa_grpc::args::listen_on;
//!
//! #[derive(clap::Parser)]
//! #[command(mut_arg("listen", listen_on("CAPSA_EXAMPLE_LISTEN", "127.0.0.1:50059")))]
//! struct Config {
//!     #[command(flatten)]
//!     common: capsa_grpc::args::CommonArgs,
//! }
//! ```

use std::fmt;
use std::net::SocketAddr;

/// `--listen`, the telemetry flags and mTLS of the internal plane.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Address to serve gRPC on; port 0 picks a free one. The bound address is printed on
    /// stdout as CAPSA_LISTENING=<addr>.
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,

    /// A second address serving only grpc.health.v1, in plaintext, for probes that present
    /// no client certificate (the kubelet's) when --tls-* makes the main one mTLS. Port 0
    /// picks a free one (logged).
    #[arg(long, env = "CAPSA_HEALTH_LISTEN", value_name = "ADDR")]
    pub health_listen: Option<SocketAddr>,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,

    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

/// Gives `--listen` a service's variable and default address (for `mut_arg("listen", ..)`).
pub fn listen_on(env: &'static str, default: &'static str) -> impl FnOnce(clap::Arg) -> clap::Arg {
    move |arg| arg.env(env).default_value(default).required(false)
}

/// Logging and OTLP export.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// What to log, in RUST_LOG syntax (e.g. `info,capsa_vm_pool=debug`).
    #[arg(
        long,
        env = "RUST_LOG",
        default_value = "info",
        value_name = "DIRECTIVES"
    )]
    pub log_filter: String,

    /// OTLP/gRPC collector for spans and metrics, e.g. http://otel-collector:4317. Without
    /// it the standard OTEL_EXPORTER_OTLP_* variables apply; with neither, logs only.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

impl TelemetryArgs {
    pub fn settings(&self) -> capsa_telemetry::Settings {
        capsa_telemetry::Settings {
            log_filter: self.log_filter.clone(),
            stderr_filter: None,
            otlp_endpoint: self.otlp_endpoint.clone(),
        }
    }
}

/// A Redis URL (`redis://[user:password@]host[:port][/db]`, `rediss://`, `unix:///path`,
/// ...). `Debug` and `Display` show it with the password replaced by `****`
/// (`redis://:****@host:6379/0`), so it can go in logs and errors; only
/// [`RedisUrl::expose`] gives the real one, to connect with.
///
/// Parsing accepts any string so that clap, which echoes rejected values, never prints a
/// password: call [`RedisUrl::check`] after parsing.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

/// The schemes the `redis` crate connects to.
const TCP_SCHEMES: &[&str] = &["redis", "rediss", "valkey", "valkeys"];
/// `redis+sentinel://[:password@]host:port[,host:port...]/MASTER[/db]` (capsa-store's).
const SENTINEL_SCHEMES: &[&str] = &["redis+sentinel://", "rediss+sentinel://"];
/// `redis+cluster://[:password@]host:port[,host:port...]` (capsa-store's).
const CLUSTER_SCHEMES: &[&str] = &["redis+cluster://", "rediss+cluster://"];
const UNIX_SCHEMES: &[&str] = &["unix", "redis+unix", "valkey+unix"];

impl RedisUrl {
    /// The URL with its password, for connecting; never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the `redis` crate can connect to it (not whether Redis answers); the error
    /// says why, without the URL's secrets.
    pub fn check(&self) -> Result<(), String> {
        if let Some(rest) = self.sentinel_rest() {
            let hosts = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            return match hosts.split_once('/') {
                Some((hosts, master)) if !master.trim_matches('/').is_empty() => hosts
                    .split(',')
                    .all(|h| {
                        h.rsplit_once(':')
                            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
                    })
                    .then_some(())
                    .ok_or_else(|| "every sentinel needs host:port".into()),
                _ => Err("a sentinel URL needs /MASTER after the addresses".into()),
            };
        }
        if let Some(rest) = self.cluster_rest() {
            let hosts = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            let hosts = hosts.trim_end_matches('/');
            if hosts.contains('/') {
                return Err("a cluster URL has nothing after the addresses (no database)".into());
            }
            return hosts
                .split(',')
                .all(|h| {
                    h.rsplit_once(':')
                        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
                })
                .then_some(())
                .ok_or_else(|| "every cluster node needs host:port".into());
        }
        let url = url::Url::parse(&self.0).map_err(|e| format!("not a URL: {e}"))?;
        let scheme = url.scheme();
        if UNIX_SCHEMES.contains(&scheme) {
            return match url.to_file_path() {
                Ok(_) => Ok(()),
                Err(()) => Err(format!("{scheme}:// needs an absolute socket path")),
            };
        }
        if !TCP_SCHEMES.contains(&scheme) {
            return Err(format!(
                "scheme {scheme:?} is not one of {}",
                [TCP_SCHEMES, UNIX_SCHEMES].concat().join(", ")
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err("no host".into());
        }
        let db = url.path().trim_matches('/');
        if !db.is_empty() && db.parse::<i64>().is_err() {
            return Err(format!("database {db:?} is not a number"));
        }
        Ok(())
    }

    /// What follows the scheme of a sentinel URL.
    fn sentinel_rest(&self) -> Option<&str> {
        SENTINEL_SCHEMES
            .iter()
            .find_map(|scheme| self.0.strip_prefix(scheme))
    }

    /// What follows the scheme of a cluster URL.
    fn cluster_rest(&self) -> Option<&str> {
        CLUSTER_SCHEMES
            .iter()
            .find_map(|scheme| self.0.strip_prefix(scheme))
    }

    /// The URL with the password (in the user part or a `pass` query parameter) masked.
    fn redacted(&self) -> String {
        if let Some(rest) = self.sentinel_rest().or_else(|| self.cluster_rest()) {
            let scheme = &self.0[..self.0.len() - rest.len()];
            return match rest.rsplit_once('@') {
                Some((_, hosts)) => format!("{scheme}:****@{hosts}"),
                None => self.0.clone(),
            };
        }
        let Ok(mut url) = url::Url::parse(&self.0) else {
            return "<malformed redis URL>".into();
        };
        if url.password().is_some() && url.set_password(Some("****")).is_err() {
            return "<redis URL>".into();
        }
        if url
            .query_pairs()
            .any(|(k, _)| k == "pass" || k == "password")
        {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k == "pass" || k == "password" {
                        "****".to_owned()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            url.query_pairs_mut().clear().extend_pairs(pairs);
        }
        url.into()
    }
}

impl std::str::FromStr for RedisUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(RedisUrl(s.to_owned()))
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({:?})", self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(Debug, clap::Parser)]
    #[command(mut_arg("listen", listen_on("CAPSA_TEST_ONLY_LISTEN", "127.0.0.1:50059")))]
    struct Demo {
        #[command(flatten)]
        common: CommonArgs,
        #[arg(long, default_value = "redis://127.0.0.1:6379/")]
        redis_url: RedisUrl,
    }

    fn url(s: &str) -> RedisUrl {
        s.parse().unwrap()
    }

    #[test]
    fn each_service_gives_listen_its_default_and_bad_addresses_are_rejected() {
        let d = Demo::try_parse_from(["x"]).unwrap();
        assert_eq!(d.common.listen, "127.0.0.1:50059".parse().unwrap());
        assert_eq!(d.common.telemetry.otlp_endpoint, None);
        let d =
            Demo::try_parse_from(["x", "--listen", "0.0.0.0:0", "--log-filter", "debug"]).unwrap();
        assert_eq!(d.common.listen.port(), 0);
        assert_eq!(d.common.telemetry.settings().log_filter, "debug");
        assert!(Demo::try_parse_from(["x", "--listen", "localhost"]).is_err());
    }

    #[test]
    fn passwords_are_redacted_in_display_and_debug() {
        let cases = [
            (
                "redis://:hunter2@10.0.0.7:6379/3",
                "redis://:****@10.0.0.7:6379/3",
            ),
            (
                "rediss://app:hunter2@cache.internal/0",
                "rediss://app:****@cache.internal/0",
            ),
            (
                "unix:///run/redis.sock?db=1&pass=hunter2",
                "unix:///run/redis.sock?db=1&pass=****",
            ),
            ("redis://127.0.0.1:6379/", "redis://127.0.0.1:6379/"),
            ("redis://:hunter2@[bad", "<malformed redis URL>"),
            (
                "redis+sentinel://:hunter2@s1:26379,s2:26379/mymaster",
                "redis+sentinel://:****@s1:26379,s2:26379/mymaster",
            ),
            (
                "rediss+cluster://:hunter2@c1:7000,c2:7001",
                "rediss+cluster://:****@c1:7000,c2:7001",
            ),
        ];
        for (raw, shown) in cases {
            let u = url(raw);
            assert_eq!(u.to_string(), shown);
            assert_eq!(format!("{u:?}"), format!("RedisUrl({shown:?})"));
            assert_eq!(u.expose(), raw);
        }
        let d = Demo::try_parse_from(["x", "--redis-url", "redis://:hunter2@h/"]).unwrap();
        assert!(!format!("{d:?}").contains("hunter2"));
    }

    #[test]
    fn check_accepts_what_redis_connects_to_and_hides_secrets_in_errors() {
        for ok in [
            "redis://127.0.0.1:6379/",
            "redis://:p@h:1/15",
            "rediss://h",
            "unix:///run/redis.sock",
            "redis+unix:///run/redis.sock?db=2",
            "redis+sentinel://:p@s1:26379,s2:26380/mymaster/2",
            "rediss+sentinel://s1:26379/m",
            "redis+cluster://:p@c1:7000,c2:7001",
            "rediss+cluster://c1:7000/",
        ] {
            assert_eq!(url(ok).check(), Ok(()), "{ok}");
        }
        for bad in [
            "127.0.0.1:6379",
            "http://h:6379/",
            "redis://:hunter2@h:notaport/",
            "redis://:hunter2@h/db",
            "redis://",
            "not a url",
            "redis+sentinel://:hunter2@s1:26379",
            "redis+sentinel://:hunter2@s1/m",
            "redis+cluster://:hunter2@c1",
            "redis+cluster://:hunter2@c1:7000/0",
        ] {
            let err = url(bad).check().expect_err(bad);
            assert!(!err.contains("hunter2"), "{bad}: {err}");
        }
    }
}
