//! Command-line and environment configuration of the executor. Tests build [`Config`]
//! values directly; nothing here reads global state after parsing.

use std::path::PathBuf;
use std::time::Duration;

use capsa_grpc::args::{CommonArgs, listen_on};
use capsa_grpc::tls::{allowed_peers, identity};

/// How long the executor waits for the guest before it gives up on a call or a stream.
/// Separate settings because they guard different failures (see [`crate::limits`]).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "capsa-executor",
    version,
    about = "Relays code execution and file streams to the guest agents of this host's VMs.",
    mut_arg("listen", listen_on("CAPSA_EXECUTOR_LISTEN", "127.0.0.1:50053")),
    mut_arg("tls_allowed_peers", allowed_peers(identity::NODE_CALLERS))
)]
pub struct Config {
    /// `--listen` and the telemetry flags.
    #[command(flatten)]
    pub common: CommonArgs,

    /// vm-pool's state dir: a VM's hybrid vsock socket is <dir>/vms/<vm_id>/vsock.sock.
    #[arg(long, env = "CAPSA_VM_STATE_DIR", default_value = "/var/lib/capsa")]
    pub vm_state_dir: PathBuf,

    /// Execute used when a request leaves its timeout unset (milliseconds). The executor
    /// writes it into the spec it forwards, so the guest and the stream limits agree.
    #[arg(long = "default-exec-timeout-ms", env = "CAPSA_EXECUTOR_DEFAULT_EXEC_TIMEOUT_MS", default_value = "60000", value_parser = parse_millis)]
    pub default_exec_timeout: Duration,

    /// Time for the guest agent to accept a call and answer with its response headers
    /// (milliseconds); covers connecting over vsock and a lazily started kernel.
    #[arg(long = "first-event-timeout-ms", env = "CAPSA_EXECUTOR_FIRST_EVENT_TIMEOUT_MS", default_value = "30000", value_parser = parse_millis)]
    pub first_event_timeout: Duration,

    /// Longest silence between two events of a stream (milliseconds). For Execute the
    /// effective limit is max(this, spec timeout + grace): silent code is legitimate.
    #[arg(long = "idle-timeout-ms", env = "CAPSA_EXECUTOR_IDLE_TIMEOUT_MS", default_value = "60000", value_parser = parse_millis)]
    pub idle_timeout: Duration,

    /// Added to an execute's own timeout to form its total stream limit (milliseconds):
    /// room for the guest's interrupt, kill and kernel restart after its timeout fires.
    #[arg(long = "stream-grace-ms", env = "CAPSA_EXECUTOR_STREAM_GRACE_MS", default_value = "15000", value_parser = parse_millis)]
    pub stream_grace: Duration,

    /// Limit on every unary call to a guest agent (milliseconds).
    #[arg(long = "call-timeout-ms", env = "CAPSA_EXECUTOR_CALL_TIMEOUT_MS", default_value = "30000", value_parser = parse_millis)]
    pub call_timeout: Duration,

    /// Longest a stream waits for its caller to take one event or chunk (milliseconds).
    /// Past it the stream ends DEADLINE_EXCEEDED and the guest's work is interrupted, so
    /// a caller that stopped reading holds the VM's kernel and the node only this long.
    #[arg(long = "stalled-client-timeout-ms", env = "CAPSA_EXECUTOR_STALLED_CLIENT_TIMEOUT_MS", default_value = "30000", value_parser = parse_millis)]
    pub stalled_client_timeout: Duration,
}

/// A positive whole number of milliseconds.
fn parse_millis(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1 ms".into()),
        Ok(ms) => Ok(Duration::from_millis(ms)),
        Err(e) => Err(format!("not a number of milliseconds: {e}")),
    }
}

impl Config {
    /// A config for tests and embedding: `state_dir` and defaults for everything else.
    pub fn with_state_dir(vm_state_dir: PathBuf) -> Config {
        use clap::Parser as _;
        let mut config = Config::parse_from(["capsa-executor"]);
        config.vm_state_dir = vm_state_dir;
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn defaults_and_overrides() {
        let c = Config::try_parse_from(["x", "--vm-state-dir", "/s", "--idle-timeout-ms", "1500"])
            .unwrap();
        assert_eq!(c.vm_state_dir, PathBuf::from("/s"));
        assert_eq!(c.idle_timeout, Duration::from_millis(1500));
        assert_eq!(c.first_event_timeout, Duration::from_secs(30));
        assert_eq!(c.default_exec_timeout, Duration::from_secs(60));
        assert_eq!(c.stalled_client_timeout, Duration::from_secs(30));
    }

    #[test]
    fn zero_and_garbage_durations_are_rejected() {
        assert!(Config::try_parse_from(["x", "--idle-timeout-ms", "0"]).is_err());
        assert!(Config::try_parse_from(["x", "--call-timeout-ms", "5s"]).is_err());
    }
}
