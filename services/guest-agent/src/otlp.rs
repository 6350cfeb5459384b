//! Telemetry export from inside the VM. The guest has no network, so spans and metrics go
//! to the host on `--otlp-vsock-port` (default 4317, OTLP's own port): over vsock to CID 2
//! (Cloud Hypervisor), or as a connection over the serial port's multiplexer (QEMU). Either
//! way the host hands a guest connection to port P to its Unix socket `<vm vsock socket>_P`;
//! whatever listens there on the node forwards it to the collector.
//!
//! The port is probed once at boot: when nothing listens, the agent logs to stderr only and
//! spends nothing on exporting.

use std::sync::Arc;
use std::time::Duration;

use capsa_vsock::mux::Mux;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_vsock::{VMADDR_CID_HOST, VsockAddr, VsockStream};
use tonic::transport::{Channel, Endpoint};

/// How long the boot-time probe waits for the host to accept.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the probe waits for the serial link to come up (the host's bridge is connected
/// before the guest boots, so this is the time of one greeting).
const LINK_TIMEOUT: Duration = Duration::from_secs(2);

/// How the agent reaches the host.
#[derive(Clone)]
pub enum HostRoute {
    Vsock,
    /// The serial port's current link (none while the host is away).
    Serial(watch::Receiver<Option<Arc<Mux>>>),
}

/// A lazily connecting OTLP channel to the host's `port`, or `None` if nothing listens.
pub async fn host_channel(port: u32, route: HostRoute) -> Option<Channel> {
    let endpoint =
        Endpoint::from_static("http://host.vsock.invalid").connect_timeout(Duration::from_secs(2));
    match route {
        HostRoute::Vsock => {
            let addr = VsockAddr::new(VMADDR_CID_HOST, port);
            match tokio::time::timeout(PROBE_TIMEOUT, VsockStream::connect(addr)).await {
                Ok(Ok(_probe)) => {}
                _ => return None,
            }
            Some(
                endpoint.connect_with_connector_lazy(tower::service_fn(move |_| async move {
                    VsockStream::connect(addr).await.map(TokioIo::new)
                })),
            )
        }
        HostRoute::Serial(mut current) => {
            let mux = tokio::time::timeout(LINK_TIMEOUT, current.wait_for(Option::is_some))
                .await
                .ok()?
                .ok()?
                .clone()?;
            match tokio::time::timeout(PROBE_TIMEOUT, mux.connect(port)).await {
                Ok(Ok(_probe)) => {}
                _ => return None,
            }
            Some(
                endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
                    let mux = current.borrow().clone();
                    async move {
                        let mux = mux.ok_or_else(|| {
                            std::io::Error::new(std::io::ErrorKind::NotConnected, "host away")
                        })?;
                        mux.connect(port).await.map(TokioIo::new).map_err(|e| {
                            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e)
                        })
                    }
                })),
            )
        }
    }
}
