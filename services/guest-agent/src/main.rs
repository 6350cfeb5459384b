//! `capsa-agent`: parses the config, binds vsock (or, as a test seam, Unix sockets), prints
//! `CAPSA_LISTENING=<address>` and serves until SIGINT or SIGTERM.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;
use capsa_guest_agent::{Config, Listener};
use capsa_telemetry::Export;
use clap::Parser as _;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::try_parse() {
        Ok(config) => config,
        Err(e) => {
            // --help and --version are not errors; a bad flag is a configuration error.
            let code = if e.use_stderr() { 64 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if let Err(e) = config.validate() {
        eprintln!("capsa-agent: {e}");
        return ExitCode::from(64);
    }
    // In a VM, export through the host if it listens; the test seam uses the environment.
    let otlp = match (&config.listen_unix, config.otlp_vsock_port) {
        (None, port) if port != 0 => capsa_guest_agent::otlp::host_channel(port).await,
        _ => None,
    };
    let exporting = otlp.is_some();
    let export = otlp.map_or(Export::FromEnv, Export::Channel);
    let _telemetry = capsa_telemetry::init_with("capsa-guest-agent", "info", export);
    if exporting {
        tracing::info!(
            port = config.otlp_vsock_port,
            "exporting telemetry to the host over vsock"
        );
    }
    match serve(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "capsa-agent failed");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let (grpc, echo, listening) = match &config.listen_unix {
        Some(path) => {
            let grpc = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("bind {}", path.display()))?;
            let echo = match &config.echo_unix {
                Some(p) => Some(Listener::Unix(
                    tokio::net::UnixListener::bind(p)
                        .with_context(|| format!("bind {}", p.display()))?,
                )),
                None => None,
            };
            (
                Listener::Unix(grpc),
                echo,
                format!("unix:{}", path.display()),
            )
        }
        None => {
            let any = tokio_vsock::VMADDR_CID_ANY;
            let grpc = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
                any,
                config.vsock_port,
            ))
            .with_context(|| format!("bind vsock port {}", config.vsock_port))?;
            let echo = match config.echo_port {
                0 => None,
                port => Some(Listener::Vsock(
                    tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(any, port))
                        .with_context(|| format!("bind vsock port {port}"))?,
                )),
            };
            (
                Listener::Vsock(grpc),
                echo,
                format!("vsock:{}", config.vsock_port),
            )
        }
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "CAPSA_LISTENING={listening}")?;
    out.flush()?;
    drop(out);
    capsa_guest_agent::run(config, grpc, echo, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
