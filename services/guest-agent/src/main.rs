//! `capsa-agent`: parses the config, opens its channel to the host (the virtio-serial port
//! in QEMU VMs, vsock in Cloud Hypervisor VMs, Unix sockets as a test seam), prints
//! `CAPSA_LISTENING=<address>` and serves until SIGINT or SIGTERM. Exit codes:
//! `capsa_grpc::process`.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use capsa_grpc::process::{Exit, exit_code, parse_args, shutdown_signal};

use capsa_guest_agent::{Config, Listener, otlp, serial};
use capsa_telemetry::Export;

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(start().await)
}

async fn start() -> Result<(), Exit> {
    let config: Config = parse_args()?;
    config.validate().map_err(Exit::config)?;
    // The channel to the host comes first: telemetry export runs over it.
    let transport =
        Transport::open(&config).map_err(|e| Exit::Failed(format!("capsa-agent failed: {e:#}")))?;
    // In a VM, export through the host if it listens; the test seam uses the environment.
    let otlp = match (&transport.route, config.otlp_vsock_port) {
        (Some(route), port) if port != 0 => otlp::host_channel(port, route.clone()).await,
        _ => None,
    };
    let exporting = otlp.is_some();
    let export = otlp.map_or(Export::Otlp, Export::Channel);
    let settings = capsa_telemetry::Settings {
        stderr_filter: Some(config.console_log_filter.clone()),
        ..config.telemetry.settings()
    };
    let _telemetry = capsa_telemetry::init_with("capsa-guest-agent", &settings, export)?;
    if exporting {
        tracing::info!(
            port = config.otlp_vsock_port,
            "exporting telemetry to the host"
        );
    }
    serve(config, transport)
        .await
        .map_err(|e| Exit::Failed(format!("capsa-agent failed: {e:#}")))
}

/// Where the agent listens, and how it reaches the host (`None` for the test seam).
struct Transport {
    grpc: Listener,
    echo: Option<Listener>,
    listening: String,
    route: Option<otlp::HostRoute>,
}

impl Transport {
    /// The test seam's Unix sockets if configured; else the virtio-serial port if the VM has
    /// one (QEMU); else vsock (Cloud Hypervisor).
    fn open(config: &Config) -> anyhow::Result<Transport> {
        if let Some(path) = &config.listen_unix {
            let grpc = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("bind {}", path.display()))?;
            let echo = match &config.echo_unix {
                Some(p) => Some(Listener::Unix(
                    tokio::net::UnixListener::bind(p)
                        .with_context(|| format!("bind {}", p.display()))?,
                )),
                None => None,
            };
            return Ok(Transport {
                grpc: Listener::Unix(grpc),
                echo,
                listening: format!("unix:{}", path.display()),
                route: None,
            });
        }
        if let Some(device) = serial::find_port(Path::new(serial::SYS_PORTS)) {
            let link = serial::Link::start(&device, config.vsock_port, config.echo_port)
                .with_context(|| format!("open {}", device.display()))?;
            return Ok(Transport {
                grpc: Listener::Serial(link.grpc),
                echo: link.echo.map(Listener::Serial),
                listening: format!("serial:{}:{}", device.display(), config.vsock_port),
                route: Some(otlp::HostRoute::Serial(link.current)),
            });
        }
        let any = tokio_vsock::VMADDR_CID_ANY;
        let grpc =
            tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(any, config.vsock_port))
                .with_context(|| format!("bind vsock port {}", config.vsock_port))?;
        let echo = match config.echo_port {
            0 => None,
            port => Some(Listener::Vsock(
                tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(any, port))
                    .with_context(|| format!("bind vsock port {port}"))?,
            )),
        };
        Ok(Transport {
            grpc: Listener::Vsock(grpc),
            echo,
            listening: format!("vsock:{}", config.vsock_port),
            route: Some(otlp::HostRoute::Vsock),
        })
    }
}

async fn serve(config: Config, transport: Transport) -> anyhow::Result<()> {
    let shutdown = shutdown_signal();
    let mut out = std::io::stdout().lock();
    writeln!(out, "CAPSA_LISTENING={}", transport.listening)?;
    out.flush()?;
    drop(out);
    capsa_guest_agent::run(config, transport.grpc, transport.echo, shutdown).await?;
    Ok(())
}
