//! gRPC clients of the nodes (vm-pool, executor) and of metering. One tonic `Channel` per
//! URL, cached: channels multiplex calls, so every replica holds one HTTP/2 connection per
//! node service. Every channel has a connect timeout and HTTP/2 keepalives, so a node that
//! stops answering is an error within half a minute instead of a hung call (one that dies
//! closes its connections, an error at once), and every call carries the caller's trace
//! context (`capsa_telemetry::propagate`).
//!
//! One connection carries every tenant's streams to a node, so its flow control is chosen
//! so that no stream can hold up another. Data a relay has not taken yet (its client reads
//! slowly or not at all) stays charged to that stream's receive window and to the
//! connection's. With hyper's client defaults (2 MiB per stream, 5 MiB per connection)
//! three stalled downloads exhaust the connection window and every other tenant's Execute
//! on that node waits behind them. So the connection window holds every stream the node
//! accepts (`max_streams::EXECUTOR`) at a full stream window
//! (`capsa_grpc::server::connection_window`): a stalled stream costs its own window only.
//! That is chosen over a pool of connections, which would only make the collision rarer.
//! The memory this allows is spent only while readers stall, which the stall timeout and
//! the per-tenant stream cap bound (see `proxy`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use capsa_grpc::server::{
    KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_FRAME_BYTES, STREAM_WINDOW, connection_window,
    max_streams,
};
use capsa_grpc::tls::identity;
use capsa_proto::executor::v1::executor_service_client::ExecutorServiceClient;
use capsa_proto::limits::MAX_MESSAGE_BYTES;
use capsa_proto::metering::v1::metering_service_client::MeteringServiceClient;
use capsa_proto::vmpool::v1::vm_pool_service_client::VmPoolServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::error::Error;

/// The interceptor every outgoing call goes through.
pub type Propagate = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;
/// A channel whose calls carry trace context.
pub type Traced = InterceptedService<Channel, Propagate>;

/// The executor client type the proxy calls.
pub type ExecutorClient = ExecutorServiceClient<Traced>;

/// Cached channels to node services and metering.
pub struct Clients {
    channels: Mutex<HashMap<String, Channel>>,
    metering_url: Option<String>,
    tls: capsa_grpc::tls::TlsArgs,
}

impl Clients {
    /// `tls`: mTLS to the node services and metering (this process's certificate and the CA).
    pub fn new(metering_url: Option<String>, tls: capsa_grpc::tls::TlsArgs) -> Self {
        Self {
            channels: Mutex::new(HashMap::new()),
            metering_url,
            tls,
        }
    }

    /// A channel to `url`, whose server must hold the certificate of `identity`.
    fn channel(&self, url: &str, identity: &str) -> Result<Traced, Error> {
        let mut channels = self.channels.lock().expect("channel cache lock");
        let channel = match channels.get(url) {
            Some(c) => c.clone(),
            None => {
                let endpoint = self
                    .tls
                    .internal_endpoint(url, identity)
                    .map_err(|e| Error::Internal(e.to_string()))?
                    .connect_timeout(Duration::from_secs(3))
                    .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                    .keep_alive_while_idle(true)
                    .initial_stream_window_size(STREAM_WINDOW)
                    .initial_connection_window_size(connection_window(max_streams::EXECUTOR))
                    .max_frame_size(MAX_FRAME_BYTES)
                    .tcp_nodelay(true);
                // Lazy: connects on first use and reconnects after failures by itself.
                let c = endpoint.connect_lazy();
                channels.insert(url.to_string(), c.clone());
                c
            }
        };
        Ok(InterceptedService::new(
            channel,
            capsa_telemetry::propagate as Propagate,
        ))
    }

    pub fn vmpool(&self, url: &str) -> Result<VmPoolServiceClient<Traced>, Error> {
        Ok(VmPoolServiceClient::new(
            self.channel(url, identity::VM_POOL)?,
        ))
    }

    /// Events and file chunks pass through unchanged: the same message limit as the public
    /// server and the executor's own.
    pub fn executor(&self, url: &str) -> Result<ExecutorServiceClient<Traced>, Error> {
        Ok(
            ExecutorServiceClient::new(self.channel(url, identity::EXECUTOR)?)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    /// The metering client, or UNAVAILABLE when no metering URL is configured.
    pub fn metering(&self) -> Result<MeteringServiceClient<Traced>, Error> {
        let url = self.metering_url.as_deref().ok_or_else(|| {
            Error::Unavailable("metering is not configured on this server".into())
        })?;
        Ok(MeteringServiceClient::new(
            self.channel(url, identity::METERING)?,
        ))
    }
}

/// A request with a deadline the server sees too (`grpc-timeout`).
pub fn with_timeout<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(timeout);
    req
}
