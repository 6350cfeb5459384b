//! The Capsa guest agent: runs inside every microVM and serves `capsa.agent.v1.AgentService`
//! (plus health and reflection) on vsock port 1024, and a raw echo server on port 1025 for
//! benchmarks.
//!
//! - [`kernel`]: persistent Python and shell kernels, one execute at a time per kernel,
//!   with streaming output, an output cap, timeouts and interrupts.
//! - [`files`]: upload, download, list, info, mkdir, remove.
//! - [`processes`]: background processes (each in its own session, output in a ring per
//!   process for AttachProcess) and the table terminals share with them.
//! - [`terminal`]: a program on a real PTY, driven by one OpenTerminal stream.
//! - [`ports`]: ConnectPort, a TCP connection to a port on the guest's loopback.
//! - [`identity`]: Reidentify, a restored guest's own address, machine-id, RNG and clock.
//! - [`clock`]: the guest clock, stepped to the host's.
//! - [`stats`]: memory, processes, uptime and kernel release of the guest.
//! - [`grpc`]: the adapter between the proto contract and those modules.
//! - [`echo`]: the echo server.
//! - [`otlp`]: telemetry export to the host over vsock.
//! - [`serial`]: the channel to the host on a virtio-serial port (QEMU VMs), multiplexed.
//!
//! [`run`] takes already bound listeners and a shutdown future, so tests run the agent as
//! a plain process on Unix sockets.

pub mod clock;
pub mod config;
pub mod echo;
pub mod error;
pub mod files;
pub mod grpc;
pub mod identity;
pub mod kernel;
pub mod otlp;
pub mod ports;
pub mod processes;
pub mod serial;
pub mod stats;
pub mod terminal;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use capsa_proto::agent::v1::agent_service_server::AgentServiceServer;
use capsa_vsock::mux::MuxStream;
use futures::StreamExt as _;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tokio_vsock::VsockListener;

pub use config::Config;

/// A bound listener: vsock (Cloud Hypervisor) or the serial port's connections (QEMU) in a
/// VM, a Unix socket in tests.
pub enum Listener {
    Vsock(VsockListener),
    Serial(mpsc::Receiver<MuxStream>),
    Unix(UnixListener),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot create the scratch directory")]
    Scratch(#[source] std::io::Error),
    #[error("gRPC server failed")]
    Serve(#[source] capsa_grpc::ServeError),
}

/// Serves until `shutdown` resolves: then health goes NOT_SERVING, running executes are
/// interrupted, every background process and terminal is killed (so attached streams end),
/// port connections end, connections drain and the kernels are stopped.
pub async fn run(
    config: Config,
    grpc: Listener,
    echo: Option<Listener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down");
            stop.cancel();
        }
    });
    // Code files for the shell kernel; private to the agent (0700) and removed on exit.
    let scratch = tempfile::Builder::new()
        .prefix("capsa-agent-")
        .tempdir()
        .map_err(RunError::Scratch)?;
    let settings = kernel::KernelSettings {
        python: config.python.clone(),
        shell: config.shell.clone(),
        workdir: config.workdir.clone(),
        scratch: scratch.path().to_owned(),
        interrupt_grace: config.interrupt_grace(),
    };
    let kernels = Arc::new(kernel::Kernels::start(
        settings,
        config.prestart_python,
        stop.clone(),
    ));
    let processes = Arc::new(processes::Processes::new(config.workdir.clone()));
    tokio::spawn({
        let (stop, processes) = (stop.clone(), processes.clone());
        async move {
            stop.cancelled().await;
            processes.kill_all();
        }
    });
    // Reidentify changes the whole machine: only in a VM, never for the test seam.
    let in_vm = !matches!(grpc, Listener::Unix(_));
    let api = grpc::AgentApi::new(
        kernels.clone(),
        processes.clone(),
        identity::Identity::new(in_vm),
        config.default_timeout(),
        stop.clone(),
    );
    // The executor's agent client uses the same limits: every event fits through both.
    let service = AgentServiceServer::new(api)
        .max_decoding_message_size(capsa_proto::limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(capsa_proto::limits::MAX_MESSAGE_BYTES);
    let server = capsa_grpc::Server::new().add_service(service);

    let echo_task = echo.map(|l| {
        let stop = stop.clone();
        tokio::spawn(async move {
            match l {
                Listener::Vsock(l) => echo::serve(l.incoming(), stop.cancelled_owned()).await,
                Listener::Serial(rx) => {
                    echo::serve(ReceiverStream::new(rx).map(Ok), stop.cancelled_owned()).await
                }
                Listener::Unix(l) => {
                    echo::serve(UnixListenerStream::new(l), stop.cancelled_owned()).await
                }
            }
        })
    });
    let served = match grpc {
        Listener::Vsock(l) => {
            server
                .serve(l.incoming(), stop.clone().cancelled_owned())
                .await
        }
        Listener::Serial(rx) => {
            let incoming = ReceiverStream::new(rx).map(Ok::<_, std::io::Error>);
            server.serve(incoming, stop.clone().cancelled_owned()).await
        }
        Listener::Unix(l) => {
            server
                .serve(UnixListenerStream::new(l), stop.clone().cancelled_owned())
                .await
        }
    };
    stop.cancel();
    // Also here, in case serving failed before the stop token was cancelled.
    processes.kill_all();
    if let Some(t) = echo_task {
        let _ = t.await;
    }
    kernels
        .wait_stopped(config.interrupt_grace() + Duration::from_secs(2))
        .await;
    served.map_err(RunError::Serve)
}
