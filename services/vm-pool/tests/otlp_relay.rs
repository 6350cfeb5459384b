//! The guests' telemetry relay on real VMs. The test reaches a VM's relay exactly where the
//! VMM delivers the guest's connections to host port 4317 (the Unix socket
//! `<vm vsock socket>_4317`) and checks what a fake collector (a tonic OTLP server in this
//! test) receives: a guest cannot pass for another service or flood the collector, a flood
//! of connections neither stays open nor stops vm-pool from booting and leasing, idle
//! connections are closed, and everything ends with the VM.

mod common;

use std::io::Read as _;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsa_proto::vmpool::v1::{AcquireVmRequest, ReleaseVmRequest};
use capsa_test_support::eventually;
use common::{PoolUnderTest, open_fds, wait_warm, warm_vms};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
    metric,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use tokio::io::AsyncReadExt as _;
use tonic::transport::{Channel, Endpoint};

/// The relay's default connection cap per VM.
const MAX_CONNECTIONS: usize = 4;

/// What the fake collector received.
#[derive(Clone, Default)]
struct Received {
    spans: Arc<Mutex<Vec<ResourceSpans>>>,
    metrics: Arc<Mutex<Vec<ResourceMetrics>>>,
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        spans.extend(request.into_inner().resource_spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut metrics = self.metrics.lock().unwrap();
        metrics.extend(request.into_inner().resource_metrics);
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

impl Received {
    /// The resource of the span named `name`, if it arrived.
    fn span_resource(&self, name: &str) -> Option<Resource> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .find(|rs| {
                rs.scope_spans
                    .iter()
                    .flat_map(|ss| &ss.spans)
                    .any(|s| s.name == name)
            })
            .map(|rs| rs.resource.clone().unwrap_or_default())
    }

    fn metric_names(&self) -> Vec<String> {
        self.metrics
            .lock()
            .unwrap()
            .iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
            .map(|m| m.name.clone())
            .collect()
    }

    /// The point attributes of the metric named `name` whose `language` is `language`.
    fn metric_point(&self, name: &str, language: &str) -> Option<Vec<KeyValue>> {
        let metrics = self.metrics.lock().unwrap();
        metrics
            .iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
            .filter(|m| m.name == name)
            .filter_map(|m| match &m.data {
                Some(metric::Data::Histogram(h)) => Some(h.data_points.clone()),
                _ => None,
            })
            .flatten()
            .map(|p| p.attributes)
            .find(|a| attr(a, "language").as_deref() == Some(language))
    }
}

/// A fake OTLP collector on 127.0.0.1:0; stops on drop.
struct Collector {
    url: String,
    received: Received,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let received = Received::default();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(received.clone()))
            .add_service(MetricsServiceServer::new(received.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let task = tokio::spawn(async move {
            let _ = server.await;
        });
        Collector {
            url,
            received,
            task,
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}

/// One span named `name` under a resource with `resource` attributes, carrying `padding`
/// bytes in an attribute.
fn spans(resource: &[(&str, &str)], name: &str, padding: usize) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: resource.iter().map(|(k, v)| string_kv(k, v)).collect(),
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: vec![0x42; 16],
                    span_id: vec![0x24; 8],
                    name: name.into(),
                    attributes: vec![string_kv("padding", &"x".repeat(padding))],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// A gRPC channel over one new connection to the guest port socket, as the guest's
/// exporter would open through the VMM.
async fn guest_channel(socket: &Path) -> Channel {
    let socket = socket.to_owned();
    Endpoint::from_static("http://guest.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(socket)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .unwrap()
}

/// Where the VMM delivers `vm_id`'s guest connections to host port 4317.
fn guest_port(pool: &PoolUnderTest, vm_id: &str) -> PathBuf {
    let vsock = capsa_vsock::vm_socket_path(pool.state.path(), vm_id).unwrap();
    capsa_vsock::guest_port_path(&vsock, 4317)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_telemetry_arrives_as_the_guest_within_budget_and_idle_connections_close() {
    let collector = Collector::start().await;
    let pool = PoolUnderTest::start_with_env(
        &[
            "--warm",
            "1",
            "--capacity",
            "2",
            "--node-id",
            "node-otlp",
            "--guest-otlp-endpoint",
            &collector.url,
        ],
        // Environment rather than flags, so a vm-pool without these knobs still starts.
        &[
            ("CAPSA_VMPOOL_GUEST_OTLP_IDLE_TIMEOUT_SECS", "3"),
            ("CAPSA_VMPOOL_GUEST_OTLP_BYTES_PER_MINUTE", "262144"),
        ],
    )
    .await;
    let mut c = pool.client().await;
    wait_warm(&mut c, 1).await;
    let vm = warm_vms(&mut c).await.remove(0);
    let socket = guest_port(&pool, &vm.id);
    let received = &collector.received;

    // A span that claims to come from session-manager on the control-plane host.
    let forged = spans(
        &[
            ("service.name", "capsa-session-manager"),
            ("host.name", "control-plane"),
            ("capsa.vm_id", "vm-someone-else"),
        ],
        "forged-by-guest",
        0,
    );
    TraceServiceClient::new(guest_channel(&socket).await)
        .export(forged)
        .await
        .unwrap();
    eventually!(received.span_resource("forged-by-guest").is_some(), 30);
    let resource = received.span_resource("forged-by-guest").unwrap();
    let a = &resource.attributes;
    assert_eq!(
        attr(a, "service.name").as_deref(),
        Some("capsa-guest-agent"),
        "{a:?}"
    );
    assert_eq!(attr(a, "capsa.vm_id").as_deref(), Some(vm.id.as_str()));
    assert_eq!(attr(a, "capsa.node_id").as_deref(), Some("node-otlp"));
    assert_eq!(attr(a, "host.name"), None, "{a:?}");

    // Metrics: only the agent's own pass, as the guest; a forged pool gauge is rejected.
    let metrics = ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![string_kv("service.name", "capsa-vm-pool")],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![
                    Metric {
                        name: "capsa.execute.duration".into(),
                        data: Some(metric::Data::Histogram(Histogram {
                            data_points: vec![HistogramDataPoint {
                                attributes: vec![
                                    string_kv("service", "capsa-executor"),
                                    string_kv("language", "forged-lang"),
                                ],
                                count: 1,
                                ..Default::default()
                            }],
                            ..Default::default()
                        })),
                        ..Default::default()
                    },
                    Metric {
                        name: "capsa.pool.warm_vms".into(),
                        data: Some(metric::Data::Gauge(Gauge {
                            data_points: vec![NumberDataPoint::default()],
                        })),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let response = MetricsServiceClient::new(guest_channel(&socket).await)
        .export(metrics)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.partial_success.map(|p| p.rejected_data_points),
        Some(1)
    );
    // The relay answers after the collector did: what it forwarded has arrived.
    let point = received
        .metric_point("capsa.execute.duration", "forged-lang")
        .expect("the agent's metric is forwarded");
    assert_eq!(
        attr(&point, "service").as_deref(),
        Some("capsa-guest-agent")
    );
    assert!(
        !received
            .metric_names()
            .contains(&"capsa.pool.warm_vms".to_string()),
        "{:?}",
        received.metric_names()
    );

    // A connection on which nothing is sent is closed after the idle timeout (3 s here);
    // watched for up to 60 s.
    let started = Instant::now();
    let mut idle = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(60), async {
        let mut buf = [0u8; 1024];
        // The relay's HTTP/2 SETTINGS come first; then the end.
        while let Ok(n) = idle.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "an idle connection was still open after 60 s"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "closed after {:?}, before the idle timeout",
        started.elapsed()
    );

    // Volume: 256 KiB per minute. Exports of 60 KiB pass until the budget is spent; the
    // next is refused and never reaches the collector.
    let mut accepted = 0;
    let mut refused = None;
    for i in 0..10 {
        let name = format!("bulk-{i}");
        let result = TraceServiceClient::new(guest_channel(&socket).await)
            .export(spans(&[], &name, 60 * 1024))
            .await;
        match result {
            Ok(_) => accepted += 1,
            Err(status) => {
                refused = Some((name, status));
                break;
            }
        }
    }
    let (name, status) = refused.expect("10 exports of 60 KiB exceed 256 KiB per minute");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("budget"), "{status:?}");
    assert!((2..=4).contains(&accepted), "{accepted} accepted");
    assert!(received.span_resource(&name).is_none());
    assert!(received.span_resource("bulk-0").is_some());
}

/// Whether the relay still holds `stream` open (reads whatever it sent first).
fn still_open(stream: &mut StdUnixStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

fn count_open(streams: &Mutex<Vec<StdUnixStream>>) -> usize {
    streams
        .lock()
        .unwrap()
        .iter_mut()
        .map(still_open)
        .filter(|&open| open)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_guest_connections_is_capped_and_the_node_keeps_booting() {
    let collector = Collector::start().await;
    let pool = PoolUnderTest::start_with_env(
        &[
            "--warm",
            "1",
            "--capacity",
            "2",
            "--guest-otlp-endpoint",
            &collector.url,
        ],
        // Long enough that only the cap, not the idle timer, closes connections here.
        &[("CAPSA_VMPOOL_GUEST_OTLP_IDLE_TIMEOUT_SECS", "600")],
    )
    .await;
    let mut c = pool.client().await;
    wait_warm(&mut c, 1).await;
    let vm = warm_vms(&mut c).await.remove(0);
    let socket = guest_port(&pool, &vm.id);

    // 5000 connections, as a guest looping on connect() would open through the VMM.
    let streams = tokio::task::spawn_blocking(move || {
        (0..5000)
            .map(|_| {
                let s = StdUnixStream::connect(&socket).expect("connect to the guest port");
                s.set_nonblocking(true).unwrap();
                s
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let streams = Mutex::new(streams);

    // Only the cap stay open (the agent's own exporter may hold one of the slots).
    eventually!(count_open(&streams) <= MAX_CONNECTIONS, 60);
    let open = count_open(&streams);
    assert!(
        (MAX_CONNECTIONS - 1..=MAX_CONNECTIONS).contains(&open),
        "{open} open"
    );
    let fds = open_fds(pool.process().pid());
    assert!(fds < 500, "vm-pool holds {fds} fds");

    // The node still leases and boots.
    let leased = c
        .acquire_vm(AcquireVmRequest {
            lease_id: "otlp-flood".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        leased.vm.as_ref().map(|v| v.id.as_str()),
        Some(vm.id.as_str())
    );
    wait_warm(&mut c, 1).await;

    // The relay ends with its VM: the connections it held are closed.
    c.release_vm(ReleaseVmRequest {
        vm_id: vm.id.clone(),
    })
    .await
    .unwrap();
    eventually!(count_open(&streams) == 0, 30);
}
