//! An OTLP metrics receiver run by a test, standing where a Collector would: services export
//! to it over OTLP/gRPC, and the test reads what arrived.

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::HistogramDataPoint;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;

/// Everything exported to it, kept in order; serves until its last clone is dropped.
#[derive(Clone)]
pub struct Receiver {
    received: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    _serving: Option<Arc<Serving>>,
}

/// Aborts the server task when the last clone of the receiver goes.
struct Serving(tokio::task::JoinHandle<()>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Receiver {
    /// Listens on `bind` (e.g. `127.0.0.1:0`); returns it and its `http://` URL.
    pub async fn start(bind: &str) -> (Receiver, String) {
        let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let service = Receiver {
            received: received.clone(),
            _serving: None,
        };
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(MetricsServiceServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        (
            Receiver {
                received,
                _serving: Some(Arc::new(Serving(task))),
            },
            url,
        )
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.received.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(any_value::Value::StringValue(s)) => Some(s.as_str()),
            _ => None,
        })
}

impl Receiver {
    /// `(service.name, service.instance.id)` of every resource received.
    pub fn instances(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .received
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| r.resource_metrics.iter())
            .filter_map(|rm| rm.resource.as_ref())
            .map(|r| {
                (
                    attr(&r.attributes, "service.name").unwrap_or("").to_owned(),
                    attr(&r.attributes, "service.instance.id")
                        .unwrap_or("")
                        .to_owned(),
                )
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The latest point of histogram `metric` from `service` (cumulative: it holds all).
    pub fn histogram(&self, service: &str, metric: &str) -> Option<HistogramDataPoint> {
        let received = self.received.lock().unwrap();
        received
            .iter()
            .flat_map(|r| r.resource_metrics.iter())
            .filter(|rm| {
                rm.resource
                    .as_ref()
                    .is_some_and(|r| attr(&r.attributes, "service.name") == Some(service))
            })
            .flat_map(|rm| rm.scope_metrics.iter())
            .flat_map(|sm| sm.metrics.iter())
            .filter(|m| m.name == metric)
            .filter_map(|m| match &m.data {
                Some(Data::Histogram(h)) => h.data_points.iter().max_by_key(|p| p.time_unix_nano),
                _ => None,
            })
            .max_by_key(|p| p.time_unix_nano)
            .cloned()
    }
}
