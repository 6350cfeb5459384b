//! Command-line and environment configuration of the agent. In a VM the defaults are right:
//! gRPC on vsock port 1024, the echo server on 1025. `--listen-unix` / `--echo-unix` are the
//! test seam that serves the same things on Unix sockets so tests run the agent as a plain
//! process; they are not a product mode.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

/// The guest agent's settings.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "capsa-agent",
    about = "Capsa guest agent: kernels, files and stats over vsock"
)]
pub struct Config {
    /// vsock port of the AgentService (with health and reflection).
    #[arg(long, env = "CAPSA_AGENT_VSOCK_PORT", default_value_t = 1024)]
    pub vsock_port: u32,

    /// vsock port of the raw echo server used by benchmarks; 0 turns it off.
    #[arg(long, env = "CAPSA_AGENT_ECHO_PORT", default_value_t = 1025)]
    pub echo_port: u32,

    /// Host vsock port (CID 2) that spans and metrics are exported to over OTLP/gRPC, if
    /// something listens there at boot; 0 turns export off. Not used with --listen-unix.
    #[arg(long, env = "CAPSA_AGENT_OTLP_VSOCK_PORT", default_value_t = 4317)]
    pub otlp_vsock_port: u32,

    /// Test seam: serve gRPC on this Unix socket instead of vsock.
    #[arg(long, env = "CAPSA_AGENT_LISTEN_UNIX")]
    pub listen_unix: Option<PathBuf>,

    /// Test seam: serve the echo server on this Unix socket (only with --listen-unix).
    #[arg(long, env = "CAPSA_AGENT_ECHO_UNIX", requires = "listen_unix")]
    pub echo_unix: Option<PathBuf>,

    /// The Python interpreter of the Python kernel.
    #[arg(long, env = "CAPSA_AGENT_PYTHON", default_value = "python3")]
    pub python: PathBuf,

    /// The shell of the shell kernel (bash 5 or later: the driver uses $EPOCHREALTIME).
    #[arg(long, env = "CAPSA_AGENT_SHELL", default_value = "bash")]
    pub shell: PathBuf,

    /// Working directory the kernels start in; the agent's own when unset.
    #[arg(long, env = "CAPSA_AGENT_WORKDIR")]
    pub workdir: Option<PathBuf>,

    /// Start the Python kernel at boot so the first execute does not wait for it.
    #[arg(long, env = "CAPSA_AGENT_PRESTART_PYTHON", default_value_t = true, action = ArgAction::Set)]
    pub prestart_python: bool,

    /// Timeout of an execute whose request sets none, in seconds.
    #[arg(long, env = "CAPSA_AGENT_DEFAULT_TIMEOUT_SECS", default_value_t = 60)]
    pub default_timeout_secs: u64,

    /// How long interrupted code gets to stop after SIGINT before the kernel is killed.
    #[arg(long, env = "CAPSA_AGENT_INTERRUPT_GRACE_MS", default_value_t = 2000)]
    pub interrupt_grace_ms: u64,

    /// `--log-filter` and `--otlp-endpoint` (the latter only with --listen-unix: in a VM,
    /// telemetry goes to the host over vsock).
    #[command(flatten)]
    pub telemetry: capsa_grpc::args::TelemetryArgs,

    /// What of the log is also written to stderr, in RUST_LOG syntax. In a VM stderr is the
    /// serial console, an emulated UART whose every byte costs the guest CPU time: one INFO
    /// line per Execute cost about 2 ms of a 13 ms Execute under TCG. So by default only
    /// warnings and errors go there; spans and INFO events still reach the host's collector
    /// over OTLP (`--log-filter`). Set it on the kernel command line
    /// (`CAPSA_AGENT_CONSOLE_LOG=info`) to see everything on the console.
    #[arg(
        long,
        env = "CAPSA_AGENT_CONSOLE_LOG",
        default_value = "warn",
        value_name = "DIRECTIVES"
    )]
    pub console_log_filter: String,
}

impl Config {
    pub fn default_timeout(&self) -> Duration {
        Duration::from_secs(self.default_timeout_secs)
    }

    pub fn interrupt_grace(&self) -> Duration {
        Duration::from_millis(self.interrupt_grace_ms)
    }

    /// Checks what clap cannot; a failure is a configuration error (exit code 64).
    pub fn validate(&self) -> Result<(), String> {
        if self.default_timeout_secs == 0 {
            return Err("--default-timeout-secs must be positive".into());
        }
        if self.listen_unix.is_none() && self.vsock_port == self.echo_port {
            return Err("--vsock-port and --echo-port must differ".into());
        }
        capsa_telemetry::check_log_filter(&self.console_log_filter).map_err(|e| {
            format!(
                "--console-log-filter (CAPSA_AGENT_CONSOLE_LOG) {:?}: {e}",
                self.console_log_filter
            )
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_vm_ports() {
        let c = Config::try_parse_from(["capsa-agent"]).unwrap();
        assert_eq!((c.vsock_port, c.echo_port), (1024, 1025));
        assert!(c.prestart_python);
        assert_eq!(c.default_timeout(), Duration::from_secs(60));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn a_malformed_console_filter_is_refused_naming_the_flag() {
        let c =
            Config::try_parse_from(["capsa-agent", "--console-log-filter", "capsa=loud"]).unwrap();
        let err = c.validate().unwrap_err();
        assert!(err.contains("--console-log-filter"), "{err}");
        let c = Config::try_parse_from(["capsa-agent", "--console-log-filter", "info"]).unwrap();
        assert!(c.validate().is_ok());
    }

    #[test]
    fn echo_unix_needs_listen_unix() {
        assert!(Config::try_parse_from(["capsa-agent", "--echo-unix", "/tmp/e"]).is_err());
        let c = Config::try_parse_from([
            "capsa-agent",
            "--listen-unix",
            "/tmp/a",
            "--echo-unix",
            "/tmp/e",
            "--prestart-python",
            "false",
        ])
        .unwrap();
        assert!(!c.prestart_python);
    }

    #[test]
    fn zero_timeout_is_rejected() {
        let c = Config::try_parse_from(["capsa-agent", "--default-timeout-secs", "0"]).unwrap();
        assert!(c.validate().is_err());
    }
}
