//! Command-line and environment configuration of metering. Tests build [`Config`] values
//! directly (or parse them from argument lists); nothing here reads global state later.

use std::time::Duration;

use capsa_grpc::args::{CommonArgs, RedisUrl, listen_on};
use capsa_grpc::tls::{allowed_peers, identity};

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "capsa-metering",
    version,
    about = "Samples every leased VM's usage into Redis and appends usage records for billing.",
    mut_arg("listen", listen_on("CAPSA_METERING_LISTEN", "127.0.0.1:50054")),
    mut_arg("tls_allowed_peers", allowed_peers(identity::SESSION_MANAGER))
)]
pub struct Config {
    /// `--listen` and the telemetry flags.
    #[command(flatten)]
    pub common: CommonArgs,

    /// Redis holding the node registry, the sessions and the usage
    /// (`redis://[:password@]host:port/db`; logged with the password masked).
    #[arg(
        long,
        env = "CAPSA_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/"
    )]
    pub redis_url: RedisUrl,

    /// How often every leased VM is sampled, e.g. 2s or 500ms.
    #[arg(long, env = "CAPSA_METERING_SAMPLE_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub sample_interval: Duration,

    /// How often a long session gets an interim usage record, e.g. 5m.
    #[arg(long, env = "CAPSA_METERING_RECORD_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub record_interval: Duration,

    /// Limit on each call to a vm-pool or executor while sampling.
    #[arg(long, env = "CAPSA_METERING_RPC_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub rpc_timeout: Duration,

    /// Bound of the final sample FinalizeSession takes before it appends the record with
    /// the last stored numbers. Keep it below the caller's FinalizeSession timeout.
    #[arg(long, env = "CAPSA_METERING_FINAL_SAMPLE_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub final_sample_timeout: Duration,

    /// How long a finalized session's usage stays readable. Keep it above the session
    /// retention so a late FinalizeSession still sees the session as finalized.
    #[arg(long, env = "CAPSA_METERING_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub retention: Duration,

    /// How often the usage-record stream is trimmed below what every consumer group has
    /// acknowledged (a stream no group reads is never trimmed).
    #[arg(long, env = "CAPSA_METERING_RECORDS_TRIM_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub records_trim_interval: Duration,

    /// How often the guest of an idle VM is asked for its own figures (memory used,
    /// processes, terminals); a VM whose VMM uses a tenth of a CPU or more is asked every
    /// sample. The host-side counters are read every sample regardless.
    #[arg(long, env = "CAPSA_METERING_GUEST_IDLE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub guest_idle_interval: Duration,

    /// VMs sampled at once per node.
    #[arg(long, env = "CAPSA_METERING_SAMPLE_CONCURRENCY", default_value = "16", value_parser = clap::value_parser!(u16).range(1..))]
    pub sample_concurrency: u16,
}

/// A positive duration with a unit: `500ms`, `2s`, `5m`, `1h`, `7d`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} does not start with a number"))?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{s:?} needs a unit: ms, s, m, h or d")),
    };
    match n.checked_mul(unit_ms) {
        Some(0) => Err("must be more than zero".into()),
        Some(ms) => Ok(Duration::from_millis(ms)),
        None => Err(format!("{s:?} is too long")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn defaults_and_overrides() {
        let c = Config::try_parse_from([
            "x",
            "--sample-interval",
            "250ms",
            "--redis-url",
            "redis://r/",
        ])
        .unwrap();
        assert_eq!(c.sample_interval, Duration::from_millis(250));
        assert_eq!(c.record_interval, Duration::from_secs(300));
        assert_eq!(c.retention, Duration::from_secs(7 * 86_400));
        assert_eq!(c.redis_url.expose(), "redis://r/");
        assert_eq!(c.sample_concurrency, 16);
    }

    #[test]
    fn durations_need_a_unit_and_a_positive_value() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in [
            "",
            "2",
            "0s",
            "s",
            "-1s",
            "2 s",
            "1.5s",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Config::try_parse_from(["x", "--sample-concurrency", "0"]).is_err());
    }
}
