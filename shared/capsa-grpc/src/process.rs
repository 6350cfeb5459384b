//! What every service binary's `main` does around `lib::run`: parse flags (help and version
//! exit 0, bad flags exit 64), bind the listener and announce it as
//! `CAPSA_LISTENING=<addr>` on stdout (how scripts and tests learn a `:0` port), and turn
//! SIGINT/SIGTERM into the shutdown future.

use std::io::Write as _;
use std::process::ExitCode;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

/// Configuration the process cannot run with (EX_USAGE).
pub const EXIT_BAD_CONFIG: u8 = 64;
/// A dependency such as Redis is unreachable (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// Parses `C` from the command line and environment, or says why not and gives the exit
/// code: 0 for `--help`/`--version`, [`EXIT_BAD_CONFIG`] for bad flags.
pub fn parse_args<C: clap::Parser>() -> Result<C, ExitCode> {
    C::try_parse().map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            ExitCode::from(EXIT_BAD_CONFIG)
        } else {
            ExitCode::SUCCESS
        }
    })
}

/// Binds `listen` and prints `CAPSA_LISTENING=<bound addr>`; a bind failure is a bad config.
pub async fn bind_and_announce(listen: &str) -> Result<TcpListener, ExitCode> {
    let listener = TcpListener::bind(listen).await.map_err(|e| {
        tracing::error!(%listen, error = %e, "cannot bind");
        ExitCode::from(EXIT_BAD_CONFIG)
    })?;
    let addr = listener.local_addr().map_err(|e| {
        tracing::error!(error = %e, "no local address");
        ExitCode::FAILURE
    })?;
    println!("CAPSA_LISTENING={addr}");
    let _ = std::io::stdout().flush();
    Ok(listener)
}

/// Resolves on the first SIGINT or SIGTERM (never, if the handlers cannot be installed).
pub async fn shutdown_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
}
