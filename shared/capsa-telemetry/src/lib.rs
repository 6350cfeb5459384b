//! Telemetry for every Capsa process: `tracing` to stderr, and, when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans and metrics exported over OTLP/gRPC.
//! Trace context crosses process boundaries as W3C `traceparent` metadata: clients add it
//! with [`propagate`], servers read it in [`GrpcTraceLayer`], so one Execute is one trace
//! from session-manager through executor into the guest agent.

pub mod metrics;
mod propagation;

pub use propagation::{GrpcTraceLayer, GrpcTraceService, propagate};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Flushes and shuts down the exporters when dropped; keep it alive in `main`.
pub struct TelemetryGuard {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(t) = self.tracer.take() {
            let _ = t.shutdown();
        }
        if let Some(m) = self.meter.take() {
            let _ = m.shutdown();
        }
    }
}

/// Where spans and metrics go.
pub enum Export {
    /// OTLP/gRPC to `OTEL_EXPORTER_OTLP_ENDPOINT` when it is set; otherwise logs only.
    FromEnv,
    /// OTLP/gRPC over an already built channel: the guest agent has no network, so it
    /// exports through a vsock channel that the host forwards to the collector.
    Channel(tonic::transport::Channel),
}

/// Installs the global subscriber, exporting as `OTEL_EXPORTER_OTLP_ENDPOINT` says.
/// `RUST_LOG` overrides `default_filter`. Must be called inside a Tokio runtime.
pub fn init(service_name: &'static str, default_filter: &str) -> TelemetryGuard {
    init_with(service_name, default_filter, Export::FromEnv)
}

/// Like [`init`], with the export target chosen by the caller.
pub fn init_with(
    service_name: &'static str,
    default_filter: &str,
    export: Export,
) -> TelemetryGuard {
    use opentelemetry_otlp::WithTonicConfig as _;
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let channel = match export {
        Export::Channel(channel) => Some(channel),
        Export::FromEnv
            if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
                || std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some() =>
        {
            None
        }
        Export::FromEnv => {
            tracing_subscriber::registry().with(filter).with(fmt).init();
            return TelemetryGuard {
                tracer: None,
                meter: None,
            };
        }
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name)
        .build();
    let mut span_exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    let mut metric_exporter = opentelemetry_otlp::MetricExporter::builder().with_tonic();
    if let Some(channel) = channel {
        span_exporter = span_exporter.with_channel(channel.clone());
        metric_exporter = metric_exporter.with_channel(channel);
    }
    let span_exporter = span_exporter
        .build()
        .expect("the OTLP span exporter builds");
    let metric_exporter = metric_exporter
        .build()
        .expect("the OTLP metric exporter builds");
    let tracer_provider = SdkTracerProvider::builder()
        .with_resource(resource.clone())
        .with_batch_exporter(span_exporter)
        .build();
    let meter_provider = SdkMeterProvider::builder()
        .with_resource(resource)
        .with_periodic_exporter(metric_exporter)
        .build();
    opentelemetry::global::set_meter_provider(meter_provider.clone());
    let tracer = tracer_provider.tracer(service_name);
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .init();
    TelemetryGuard {
        tracer: Some(tracer_provider),
        meter: Some(meter_provider),
    }
}

/// The meter every Capsa metric is recorded on (a no-op until [`init`] configured OTLP).
pub fn meter() -> opentelemetry::metrics::Meter {
    opentelemetry::global::meter("capsa")
}
