//! What every service binary's `main` does around `lib::run`: parse flags, bind the
//! listener and announce it as `CAPSA_LISTENING=<addr>` on stdout (how scripts and tests
//! learn a `:0` port), turn SIGINT/SIGTERM into the shutdown future, and end with the exit
//! code of the one policy every service follows ([`sysexits`] semantics):
//!
//! | code | meaning |
//! |------|---------|
//! | 0    | clean shutdown, `--help`, `--version` |
//! | 64   | bad configuration: a flag clap rejects, a malformed variable (`OTEL_EXPORTER_OTLP_*`, `RUST_LOG`, a Redis URL), an address that cannot be bound |
//! | 69   | a dependency unreachable at start (Redis) |
//! | 1    | any other failure |
//!
//! clap's own exit code for usage errors (2) is not used: every configuration error is 64,
//! whether clap or the service found it.
//!
//! [`sysexits`]: https://man.freebsd.org/cgi/man.cgi?query=sysexits

use std::error::Error as StdError;
use std::fmt::Display;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

/// Configuration the process cannot run with (EX_USAGE).
pub const EXIT_BAD_CONFIG: u8 = 64;
/// A dependency such as Redis is unreachable (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// Why a service process ends other than by a clean shutdown.
#[derive(Debug)]
pub enum Exit {
    /// clap already printed help, the version (code 0) or a usage error (code 64).
    Printed(u8),
    /// Bad configuration: exit 64.
    Config(String),
    /// A dependency unreachable at start: exit 69.
    Unavailable(String),
    /// Anything else: exit 1.
    Failed(String),
}

impl Exit {
    /// A configuration error; `what` names the flag or variable.
    pub fn config(what: impl Display) -> Exit {
        Exit::Config(what.to_string())
    }

    /// `context: <err and its sources>`, exit 69.
    pub fn unavailable<E: StdError + ?Sized>(context: &str, err: &E) -> Exit {
        Exit::Unavailable(format!("{context}: {}", crate::error::chain(err)))
    }

    /// `context: <err and its sources>`, exit 1.
    pub fn failed<E: StdError + ?Sized>(context: &str, err: &E) -> Exit {
        Exit::Failed(format!("{context}: {}", crate::error::chain(err)))
    }

    pub fn code(&self) -> u8 {
        match self {
            Exit::Printed(code) => *code,
            Exit::Config(_) => EXIT_BAD_CONFIG,
            Exit::Unavailable(_) => EXIT_UNAVAILABLE,
            Exit::Failed(_) => 1,
        }
    }

    fn message(&self) -> Option<&str> {
        match self {
            Exit::Printed(_) => None,
            Exit::Config(m) | Exit::Unavailable(m) | Exit::Failed(m) => Some(m),
        }
    }
}

impl From<capsa_telemetry::ConfigError> for Exit {
    fn from(e: capsa_telemetry::ConfigError) -> Exit {
        Exit::config(e)
    }
}

/// The process's exit code for `result`; an error is reported first, through `tracing`
/// once telemetry is set up, else straight to stderr.
pub fn exit_code(result: Result<(), Exit>) -> ExitCode {
    let Err(exit) = result else {
        return ExitCode::SUCCESS;
    };
    if let Some(message) = exit.message() {
        if tracing::dispatcher::has_been_set() {
            tracing::error!(code = exit.code(), "{message}");
        } else {
            let program = std::env::args().next().unwrap_or_default();
            let program = program.rsplit('/').next().unwrap_or_default();
            eprintln!("{program}: {message}");
        }
    }
    ExitCode::from(exit.code())
}

/// Parses `C` from the command line and environment; on `--help`/`--version` or a bad flag,
/// clap prints what it has to say and the exit code is 0 or 64.
pub fn parse_args<C: clap::Parser>() -> Result<C, Exit> {
    C::try_parse().map_err(|e| {
        let _ = e.print();
        Exit::Printed(if e.use_stderr() { EXIT_BAD_CONFIG } else { 0 })
    })
}

/// Binds `listen` and prints `CAPSA_LISTENING=<bound addr>`; a bind failure is a bad config.
pub async fn bind_and_announce(listen: SocketAddr) -> Result<TcpListener, Exit> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| Exit::config(format!("--listen {listen}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Exit::failed("listener address", &e))?;
    println!("CAPSA_LISTENING={addr}");
    let _ = std::io::stdout().flush();
    Ok(listener)
}

/// Installs the SIGINT and SIGTERM handlers now and resolves on the first of them (never,
/// if they cannot be installed). Call it before announcing the address: until then a
/// SIGTERM would kill the process instead of shutting it down (exit 0).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_policy() {
        let io = std::io::Error::other("connection refused");
        assert_eq!(Exit::config("--x: bad").code(), 64);
        assert_eq!(Exit::unavailable("redis", &io).code(), 69);
        assert_eq!(Exit::failed("serve", &io).code(), 1);
        assert_eq!(Exit::Printed(0).code(), 0);
        assert_eq!(
            Exit::unavailable("redis", &io).message(),
            Some("redis: connection refused")
        );
        let telemetry = capsa_telemetry::ConfigError::Env {
            var: "OTEL_EXPORTER_OTLP_TIMEOUT".into(),
            reason: "\"x\" is not a whole number of milliseconds".into(),
        };
        let exit = Exit::from(telemetry);
        assert_eq!(exit.code(), 64);
        assert!(
            exit.message()
                .unwrap()
                .contains("OTEL_EXPORTER_OTLP_TIMEOUT")
        );
    }

    #[tokio::test]
    async fn a_listen_address_that_cannot_be_bound_is_a_config_error() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let exit = bind_and_announce(taken.local_addr().unwrap())
            .await
            .unwrap_err();
        assert_eq!(exit.code(), EXIT_BAD_CONFIG);
        assert!(exit.message().unwrap().starts_with("--listen "), "{exit:?}");
    }
}
