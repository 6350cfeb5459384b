//! The guests' telemetry relay. A guest agent exports OTLP/gRPC over vsock to host port 4317,
//! which the VMM hands to the Unix socket `<vm vsock socket>_4317`. vm-pool serves the OTLP
//! trace and metrics services there itself (not a byte pipe to the collector), so a guest can
//! neither exhaust the node nor pass for another service:
//!
//! - **Identity.** Every resource a guest sends is rewritten: `service.name` becomes
//!   [`GUEST_SERVICE`], `capsa.vm_id`, `capsa.node_id` and `service.instance.id` (the VM id,
//!   so each VM's series are its own) are added from what vm-pool knows,
//!   and every other guest-supplied resource attribute is dropped except the SDK's own
//!   `telemetry.*` (so no `service.*`, `host.*`, `k8s.*`, `capsa.*` claims get through).
//!   Metrics other than [`GUEST_METRICS`] are dropped (reported back as rejected data
//!   points), and their `service` data-point attribute is forced to [`GUEST_SERVICE`].
//! - **Connections.** At most `max_connections` per VM (default 4); one more is closed at
//!   once. A connection on which nothing moves for `idle_timeout` (default 60 s) is closed;
//!   the agent's exporter reconnects on its next export. Each connection carries at most
//!   [`MAX_STREAMS_PER_CONNECTION`] concurrent requests of at most [`MAX_EXPORT_BYTES`].
//! - **Volume.** A token bucket per VM of `bytes_per_minute` (default 4 MiB), refilled
//!   continuously; an export costs its encoded size, at least [`MIN_EXPORT_CHARGE`]. Over
//!   budget the export is dropped with RESOURCE_EXHAUSTED.
//! - **Backpressure.** One shared client to the collector with a [`UPSTREAM_TIMEOUT`] per
//!   export; at most [`IN_FLIGHT_PER_VM`] exports per VM and [`IN_FLIGHT_TOTAL`] in all wait
//!   on it. Beyond that an export is dropped with RESOURCE_EXHAUSTED rather than queued.
//!
//! Drops are counted in `capsa.guest_telemetry.dropped` (attribute `reason`) and logged at
//! WARN once per VM and reason (then DEBUG, so a guest cannot flood the log).
//!
//! Everything of a VM's relay (listener, connections, in-flight exports) ends when its
//! [`VmRelay`] is dropped, i.e. when the VM fails or leaves the pool.

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use opentelemetry::KeyValue as OtelKeyValue;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::error::Error;

/// Host port the guest agent exports telemetry to over vsock (OTLP's own port).
pub const GUEST_OTLP_PORT: u32 = 4317;
/// The `service.name` of everything a guest exports, whatever it claimed.
pub const GUEST_SERVICE: &str = "capsa-guest-agent";
/// The metrics a guest may export: the ones the agent records.
pub const GUEST_METRICS: &[&str] = &[capsa_telemetry::metrics::EXECUTE_DURATION];
/// Largest export request accepted from a guest (encoded).
pub const MAX_EXPORT_BYTES: usize = 1024 * 1024;
/// Least budget an export costs, so floods of tiny exports are bounded too.
pub const MIN_EXPORT_CHARGE: u64 = 1024;
/// Concurrent requests on one guest connection (the agent sends at most two: spans and
/// metrics).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 8;
/// Exports of one VM waiting on the collector at once.
pub const IN_FLIGHT_PER_VM: usize = 4;
/// Exports of all VMs waiting on the collector at once.
pub const IN_FLIGHT_TOTAL: usize = 64;
/// Bound on one export to the collector, connecting included.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on connecting to the collector.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest header block a guest may send.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Resource attributes a guest may set itself: the SDK's description of itself.
const KEPT_RESOURCE_PREFIX: &str = "telemetry.";
/// Counter of dropped guest connections and exports, by `reason`.
const DROPPED_METRIC: &str = "capsa.guest_telemetry.dropped";
/// Pause after a failed accept (e.g. out of fds), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Per-VM limits; see the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: u32,
    pub idle_timeout: Duration,
    pub bytes_per_minute: u64,
}

/// Why a guest connection or export was dropped (the counter's `reason` attribute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DropReason {
    ConnectionCap,
    Budget,
    Busy,
    MetricNotAllowed,
    Upstream,
}

impl DropReason {
    fn as_str(self) -> &'static str {
        match self {
            DropReason::ConnectionCap => "connection_cap",
            DropReason::Budget => "budget",
            DropReason::Busy => "busy",
            DropReason::MetricNotAllowed => "metric_not_allowed",
            DropReason::Upstream => "upstream",
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error(
        "this VM's telemetry budget of {per_minute} bytes per minute is spent; export of {size} bytes dropped"
    )]
    Budget { per_minute: u64, size: u64 },
    #[error("too many of {0} exports are in flight; export dropped")]
    Busy(&'static str),
    #[error("collector: {}", .0.message())]
    Upstream(Status),
}

impl From<RelayError> for Status {
    fn from(e: RelayError) -> Status {
        match &e {
            RelayError::Budget { .. } | RelayError::Busy(_) => {
                Status::resource_exhausted(e.to_string())
            }
            RelayError::Upstream(s) => Status::new(s.code(), e.to_string()),
        }
    }
}

/// The node's relay: the collector client and limits shared by every VM's [`VmRelay`].
pub struct Relay {
    traces: TraceServiceClient<Channel>,
    metrics: MetricsServiceClient<Channel>,
    in_flight: Arc<Semaphore>,
    node_id: String,
    limits: Limits,
    dropped: opentelemetry::metrics::Counter<u64>,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("node_id", &self.node_id)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay to the OTLP/gRPC collector at `endpoint` (`http://host:port`, or `host:port`).
    /// Connects lazily, so a collector that is down now is found once it is up.
    pub fn new(endpoint: &str, node_id: String, limits: Limits) -> Result<Relay, Error> {
        let url = collector_url(endpoint)?;
        let channel = Endpoint::from_shared(url)
            .map_err(|e| {
                Error::Config(format!(
                    "--guest-otlp-endpoint {endpoint:?} is not a URL: {e}"
                ))
            })?
            .connect_timeout(UPSTREAM_CONNECT_TIMEOUT)
            .timeout(UPSTREAM_TIMEOUT)
            .connect_lazy();
        Ok(Relay {
            traces: TraceServiceClient::new(channel.clone()),
            metrics: MetricsServiceClient::new(channel),
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT_TOTAL)),
            node_id,
            limits,
            dropped: capsa_telemetry::meter()
                .u64_counter(DROPPED_METRIC)
                .with_description("Guest telemetry connections and exports dropped by vm-pool")
                .build(),
        })
    }

    /// Serves `vm_id`'s guest telemetry port behind its hybrid vsock socket `vsock` until
    /// the returned handle is dropped. Bind before the guest may connect.
    pub fn start(self: &Arc<Self>, vsock: &Path, vm_id: &str) -> std::io::Result<VmRelay> {
        let listener = capsa_vsock::GuestPortListener::bind(vsock, GUEST_OTLP_PORT)?;
        let vm = Arc::new(GuestVm {
            vm_id: vm_id.to_owned(),
            relay: self.clone(),
            connections: Arc::new(Semaphore::new(self.limits.max_connections as usize)),
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT_PER_VM)),
            budget: Mutex::new(Bucket::new(self.limits.bytes_per_minute, Instant::now())),
            warned: AtomicU8::new(0),
        });
        let cancel = CancellationToken::new();
        let task = tokio::spawn(accept_loop(listener, vm, cancel.clone()));
        Ok(VmRelay { task, cancel })
    }
}

/// One VM's relay; dropping it closes the listener, every connection and every export.
pub struct VmRelay {
    task: tokio::task::JoinHandle<()>,
    cancel: CancellationToken,
}

impl Drop for VmRelay {
    fn drop(&mut self) {
        // Aborting the accept loop drops its listener (removing the socket) and its JoinSet
        // (aborting the connections); the token ends the requests hyper spawned.
        self.cancel.cancel();
        self.task.abort();
    }
}

/// What the relay knows of one VM, shared by its connections and requests.
struct GuestVm {
    vm_id: String,
    relay: Arc<Relay>,
    connections: Arc<Semaphore>,
    in_flight: Arc<Semaphore>,
    budget: Mutex<Bucket>,
    /// Bit per [`DropReason`] already logged at WARN for this VM.
    warned: AtomicU8,
}

impl GuestVm {
    fn dropped(&self, reason: DropReason, detail: &dyn fmt::Display) {
        self.relay
            .dropped
            .add(1, &[OtelKeyValue::new("reason", reason.as_str())]);
        let bit = 1u8 << (reason as u8);
        if self.warned.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            tracing::warn!(vm = %self.vm_id, reason = reason.as_str(), %detail, "guest telemetry dropped (further drops for this reason are logged at debug)");
        } else {
            tracing::debug!(vm = %self.vm_id, reason = reason.as_str(), %detail, "guest telemetry dropped");
        }
    }

    /// Admits one export of `size` bytes: an in-flight slot (this VM's, then the node's)
    /// and its share of the budget. Never waits.
    fn admit(&self, size: usize) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit), Status> {
        let vm_slot = self.in_flight.clone().try_acquire_owned().map_err(|_| {
            let e = RelayError::Busy("this VM's");
            self.dropped(DropReason::Busy, &e);
            Status::from(e)
        })?;
        let node_slot = self
            .relay
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                let e = RelayError::Busy("the node's");
                self.dropped(DropReason::Busy, &e);
                Status::from(e)
            })?;
        let charge = (size as u64).max(MIN_EXPORT_CHARGE);
        let admitted = self
            .budget
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(charge, Instant::now());
        if !admitted {
            let e = RelayError::Budget {
                per_minute: self.relay.limits.bytes_per_minute,
                size: size as u64,
            };
            self.dropped(DropReason::Budget, &e);
            return Err(e.into());
        }
        Ok((vm_slot, node_slot))
    }

    fn upstream_failed(&self, status: Status) -> Status {
        let e = RelayError::Upstream(status);
        self.dropped(DropReason::Upstream, &e);
        e.into()
    }
}

async fn accept_loop(
    listener: capsa_vsock::GuestPortListener,
    vm: Arc<GuestVm>,
    cancel: CancellationToken,
) {
    let routes = tonic::service::Routes::new(
        TraceServiceServer::from_arc(vm.clone()).max_decoding_message_size(MAX_EXPORT_BYTES),
    )
    .add_service(
        MetricsServiceServer::from_arc(vm.clone()).max_decoding_message_size(MAX_EXPORT_BYTES),
    )
    .prepare();
    let mut h2 = hyper::server::conn::http2::Builder::new(CancellableExecutor(cancel));
    h2.max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(MAX_HEADER_LIST_BYTES);
    // Dropped with this task: aborting it aborts every connection.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next() => continue,
        };
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(vm = %vm.vm_id, error = %e, "accepting a guest telemetry connection");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Ok(permit) = vm.connections.clone().try_acquire_owned() else {
            drop(stream);
            vm.dropped(
                DropReason::ConnectionCap,
                &format_args!(
                    "{} connections already open; connection closed",
                    vm.relay.limits.max_connections
                ),
            );
            continue;
        };
        let io = TokioIo::new(IdleTimeout::new(stream, vm.relay.limits.idle_timeout));
        let serving = h2.serve_connection(
            io,
            hyper_util::service::TowerToHyperService::new(routes.clone()),
        );
        let vm_id = vm.vm_id.clone();
        connections.spawn(async move {
            if let Err(e) = serving.await {
                tracing::debug!(vm = %vm_id, error = %e, "guest telemetry connection ended");
            }
            drop(permit);
        });
    }
}

/// Runs hyper's per-request tasks until the VM's relay is dropped.
#[derive(Clone)]
struct CancellableExecutor(CancellationToken);

impl<F> hyper::rt::Executor<F> for CancellableExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let cancel = self.0.clone();
        tokio::spawn(async move {
            cancel.run_until_cancelled(fut).await;
        });
    }
}

#[tonic::async_trait]
impl TraceService for GuestVm {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut request = request.into_inner();
        let _slots = self.admit(request.encoded_len())?;
        for rs in &mut request.resource_spans {
            tag_resource(&mut rs.resource, &self.vm_id, &self.relay.node_id);
        }
        self.relay
            .traces
            .clone()
            .export(request)
            .await
            .map_err(|s| self.upstream_failed(s))
    }
}

#[tonic::async_trait]
impl MetricsService for GuestVm {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let mut request = request.into_inner();
        let _slots = self.admit(request.encoded_len())?;
        let rejected = filter_metrics(&mut request, &self.vm_id, &self.relay.node_id);
        if rejected > 0 {
            self.dropped(
                DropReason::MetricNotAllowed,
                &format_args!("{rejected} data points of metrics not in {GUEST_METRICS:?}"),
            );
        }
        let mut response = if request.resource_metrics.is_empty() {
            ExportMetricsServiceResponse::default()
        } else {
            self.relay
                .metrics
                .clone()
                .export(request)
                .await
                .map_err(|s| self.upstream_failed(s))?
                .into_inner()
        };
        if rejected > 0 {
            let partial = response
                .partial_success
                .get_or_insert_with(ExportMetricsPartialSuccess::default);
            partial.rejected_data_points += rejected;
            partial.error_message =
                format!("guests may export only {GUEST_METRICS:?}; {rejected} data points dropped");
        }
        Ok(Response::new(response))
    }
}

/// `http://collector:4317/` stays; `collector:4317` becomes `http://collector:4317`.
fn collector_url(endpoint: &str) -> Result<String, Error> {
    match endpoint.split_once("://") {
        None => Ok(format!("http://{endpoint}")),
        Some(("http", _)) => Ok(endpoint.to_owned()),
        Some((scheme, _)) => Err(Error::Config(format!(
            "--guest-otlp-endpoint {endpoint:?}: scheme {scheme:?} is not supported, use http://host:port"
        ))),
    }
}

fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..Default::default()
    }
}

/// Replaces the guest's claims about itself with what the host knows; see the module doc.
fn tag_resource(resource: &mut Option<Resource>, vm_id: &str, node_id: &str) {
    let resource = resource.get_or_insert_with(Resource::default);
    let before = resource.attributes.len();
    resource
        .attributes
        .retain(|kv| kv.key.starts_with(KEPT_RESOURCE_PREFIX));
    resource.dropped_attributes_count = resource
        .dropped_attributes_count
        .saturating_add((before - resource.attributes.len()) as u32);
    // Entity references name attribute keys, most of which were just dropped.
    resource.entity_refs.clear();
    resource.attributes.extend([
        string_kv("service.name", GUEST_SERVICE),
        string_kv("service.instance.id", vm_id),
        string_kv("capsa.vm_id", vm_id),
        string_kv("capsa.node_id", node_id),
    ]);
}

/// Tags every resource, keeps only [`GUEST_METRICS`] (with their `service` point attribute
/// forced to [`GUEST_SERVICE`]) and drops what became empty. Returns the data points dropped.
fn filter_metrics(request: &mut ExportMetricsServiceRequest, vm_id: &str, node_id: &str) -> i64 {
    let mut rejected = 0i64;
    for rm in &mut request.resource_metrics {
        tag_resource(&mut rm.resource, vm_id, node_id);
        for sm in &mut rm.scope_metrics {
            sm.metrics.retain_mut(|m| {
                if GUEST_METRICS.contains(&m.name.as_str()) {
                    for attributes in point_attributes(&mut m.data) {
                        force_service(attributes);
                    }
                    true
                } else {
                    rejected += point_attributes(&mut m.data).count() as i64;
                    false
                }
            });
        }
        rm.scope_metrics.retain(|sm| !sm.metrics.is_empty());
    }
    request
        .resource_metrics
        .retain(|rm| !rm.scope_metrics.is_empty());
    rejected
}

/// The attribute list of each data point of a metric.
fn point_attributes(data: &mut Option<Data>) -> Box<dyn Iterator<Item = &mut Vec<KeyValue>> + '_> {
    match data {
        None => Box::new(std::iter::empty()),
        Some(Data::Gauge(g)) => Box::new(g.data_points.iter_mut().map(|p| &mut p.attributes)),
        Some(Data::Sum(s)) => Box::new(s.data_points.iter_mut().map(|p| &mut p.attributes)),
        Some(Data::Histogram(h)) => Box::new(h.data_points.iter_mut().map(|p| &mut p.attributes)),
        Some(Data::ExponentialHistogram(h)) => {
            Box::new(h.data_points.iter_mut().map(|p| &mut p.attributes))
        }
        Some(Data::Summary(s)) => Box::new(s.data_points.iter_mut().map(|p| &mut p.attributes)),
    }
}

fn force_service(attributes: &mut [KeyValue]) {
    for kv in attributes.iter_mut().filter(|kv| kv.key == "service") {
        *kv = string_kv("service", GUEST_SERVICE);
    }
}

/// A token bucket of bytes: holds up to a minute's worth, refilled continuously.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    per_minute: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: u64, now: Instant) -> Bucket {
        Bucket {
            tokens: per_minute as f64,
            per_minute: per_minute as f64,
            at: now,
        }
    }

    /// Takes `n` tokens if there are that many.
    fn take(&mut self, n: u64, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() / 60.0 * self.per_minute;
        self.tokens = (self.tokens + refill).min(self.per_minute);
        self.at = now;
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }
}

/// A guest connection that fails once nothing moves either way for `idle`.
struct IdleTimeout<S> {
    inner: S,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<S> IdleTimeout<S> {
    fn new(inner: S, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn touch(&mut self) {
        let at = tokio::time::Instant::now() + self.idle;
        self.timer.as_mut().reset(at);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(r)
            }
            // hyper always has a read pending, so this is where an idle connection ends.
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("idle for {:?}", self.idle),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::metrics::v1::{
        Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    };

    fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
        attrs.iter().find(|kv| kv.key == key).and_then(|kv| {
            match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => Some(s.as_str()),
                _ => None,
            }
        })
    }

    #[test]
    fn resources_say_what_the_host_knows() {
        let mut resource = Some(Resource {
            attributes: vec![
                string_kv("service.name", "capsa-session-manager"),
                string_kv("service.instance.id", "sm-1"),
                string_kv("host.name", "control-plane"),
                string_kv("capsa.vm_id", "vm-someone-else"),
                string_kv("k8s.pod.name", "session-manager-0"),
                string_kv("telemetry.sdk.name", "opentelemetry"),
            ],
            dropped_attributes_count: 1,
            entity_refs: vec![Default::default()],
        });
        tag_resource(&mut resource, "vm-1", "node-a");
        let r = resource.unwrap();
        let mut keys: Vec<&str> = r.attributes.iter().map(|kv| kv.key.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "capsa.node_id",
                "capsa.vm_id",
                "service.instance.id",
                "service.name",
                "telemetry.sdk.name"
            ]
        );
        assert_eq!(attr(&r.attributes, "service.name"), Some(GUEST_SERVICE));
        assert_eq!(attr(&r.attributes, "service.instance.id"), Some("vm-1"));
        assert_eq!(attr(&r.attributes, "capsa.vm_id"), Some("vm-1"));
        assert_eq!(attr(&r.attributes, "capsa.node_id"), Some("node-a"));
        assert_eq!(r.dropped_attributes_count, 6);
        assert!(r.entity_refs.is_empty());

        let mut missing = None;
        tag_resource(&mut missing, "vm-1", "node-a");
        assert_eq!(
            attr(&missing.unwrap().attributes, "service.name"),
            Some(GUEST_SERVICE)
        );
    }

    fn metric(name: &str, service: &str) -> Metric {
        Metric {
            name: name.to_owned(),
            data: Some(Data::Histogram(Histogram {
                data_points: vec![HistogramDataPoint {
                    attributes: vec![string_kv("service", service), string_kv("language", "py")],
                    ..Default::default()
                }],
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn only_the_agents_metrics_pass_and_as_the_guest() {
        let forged_gauge = Metric {
            name: capsa_telemetry::metrics::POOL_WARM_VMS.to_owned(),
            data: Some(Data::Sum(Sum {
                data_points: vec![NumberDataPoint::default(), NumberDataPoint::default()],
                ..Default::default()
            })),
            ..Default::default()
        };
        let mut request = ExportMetricsServiceRequest {
            resource_metrics: vec![
                ResourceMetrics {
                    resource: None,
                    scope_metrics: vec![ScopeMetrics {
                        metrics: vec![
                            metric(capsa_telemetry::metrics::EXECUTE_DURATION, "capsa-executor"),
                            forged_gauge.clone(),
                        ],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                ResourceMetrics {
                    resource: None,
                    scope_metrics: vec![ScopeMetrics {
                        metrics: vec![forged_gauge],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ],
        };
        assert_eq!(filter_metrics(&mut request, "vm-1", "node-a"), 4);
        assert_eq!(
            request.resource_metrics.len(),
            1,
            "the emptied resource goes"
        );
        let rm = &request.resource_metrics[0];
        let r = rm.resource.as_ref().unwrap();
        assert_eq!(attr(&r.attributes, "capsa.vm_id"), Some("vm-1"));
        let metrics = &rm.scope_metrics[0].metrics;
        assert_eq!(metrics.len(), 1);
        let Some(Data::Histogram(h)) = &metrics[0].data else {
            panic!("{metrics:?}");
        };
        let point = &h.data_points[0].attributes;
        assert_eq!(attr(point, "service"), Some(GUEST_SERVICE));
        assert_eq!(attr(point, "language"), Some("py"));
    }

    #[test]
    fn the_bucket_holds_a_minute_and_refills_over_it() {
        let t0 = Instant::now();
        let mut b = Bucket::new(6000, t0);
        assert!(b.take(5000, t0));
        assert!(!b.take(2000, t0), "1000 left");
        // 10 s refill 1000 more.
        assert!(b.take(2000, t0 + Duration::from_secs(10)));
        assert!(!b.take(1, t0 + Duration::from_secs(10)));
        // Never more than a minute's worth, however long it rested.
        assert!(!b.take(6001, t0 + Duration::from_secs(3600)));
        assert!(b.take(6000, t0 + Duration::from_secs(3600)));
    }

    #[test]
    fn collector_urls() {
        assert_eq!(
            collector_url("http://collector:4317/").unwrap(),
            "http://collector:4317/"
        );
        assert_eq!(
            collector_url("collector:4317").unwrap(),
            "http://collector:4317"
        );
        let err = collector_url("https://collector:4317").unwrap_err();
        assert!(err.to_string().contains("--guest-otlp-endpoint"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn silent_connections_time_out_and_busy_ones_do_not() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut conn = IdleTimeout::new(ours, Duration::from_secs(60));
        let mut buf = [0u8; 8];
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            theirs.write_all(b"x").await.unwrap();
            assert_eq!(conn.read(&mut buf).await.unwrap(), 1);
        }
        let started = tokio::time::Instant::now();
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_secs(60));
    }
}
