//! Telemetry export from inside the VM. The guest has no network, so spans and metrics go
//! over vsock to the host (CID 2) on `--otlp-vsock-port` (default 4317, OTLP's own port).
//! The VMM hands a guest-initiated connection to port P to the host's Unix socket
//! `<vm vsock socket>_P` (Cloud Hypervisor and vhost-device-vsock both do this); whatever
//! listens there on the node forwards it to the collector.
//!
//! The port is probed once at boot: when nothing listens, the agent logs to stderr only and
//! spends nothing on exporting.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio_vsock::{VMADDR_CID_HOST, VsockAddr, VsockStream};
use tonic::transport::{Channel, Endpoint};

/// How long the boot-time probe waits for the host to accept.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// A lazily connecting OTLP channel to the host's `port`, or `None` if nothing listens.
pub async fn host_channel(port: u32) -> Option<Channel> {
    let addr = VsockAddr::new(VMADDR_CID_HOST, port);
    match tokio::time::timeout(PROBE_TIMEOUT, VsockStream::connect(addr)).await {
        Ok(Ok(_probe)) => {}
        _ => return None,
    }
    let channel = Endpoint::from_static("http://host.vsock.invalid")
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector_lazy(tower::service_fn(move |_| async move {
            VsockStream::connect(addr).await.map(TokioIo::new)
        }));
    Some(channel)
}
