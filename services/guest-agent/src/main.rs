//! `capsa-agent`: parses the config, binds vsock (or, as a test seam, Unix sockets), prints
//! `CAPSA_LISTENING=<address>` and serves until SIGINT or SIGTERM. Exit codes:
//! `capsa_grpc::process`.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;
use capsa_grpc::process::{Exit, exit_code, parse_args, shutdown_signal};
use capsa_guest_agent::{Config, Listener};
use capsa_telemetry::Export;

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(start().await)
}

async fn start() -> Result<(), Exit> {
    let config: Config = parse_args()?;
    config.validate().map_err(Exit::config)?;
    // In a VM, export through the host if it listens; the test seam uses the environment.
    let otlp = match (&config.listen_unix, config.otlp_vsock_port) {
        (None, port) if port != 0 => capsa_guest_agent::otlp::host_channel(port).await,
        _ => None,
    };
    let exporting = otlp.is_some();
    let export = otlp.map_or(Export::Otlp, Export::Channel);
    let _telemetry =
        capsa_telemetry::init_with("capsa-guest-agent", &config.telemetry.settings(), export)?;
    if exporting {
        tracing::info!(
            port = config.otlp_vsock_port,
            "exporting telemetry to the host over vsock"
        );
    }
    serve(config)
        .await
        .map_err(|e| Exit::Failed(format!("capsa-agent failed: {e:#}")))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let shutdown = shutdown_signal();
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
    capsa_guest_agent::run(config, grpc, echo, shutdown).await?;
    Ok(())
}
