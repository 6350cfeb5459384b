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
use tracing_subscriber::Layer as _;
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

/// What the operator chose: services fill it from their `--log-filter` and
/// `--otlp-endpoint` flags (`capsa_grpc::args::TelemetryArgs`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// `tracing` filter directives in `RUST_LOG` syntax, e.g. `info,capsa_vm_pool=debug`.
    pub log_filter: String,
    /// OTLP/gRPC collector URL; overrides the `OTEL_EXPORTER_OTLP_*ENDPOINT` variables.
    pub otlp_endpoint: Option<String>,
    /// A narrower filter for what is written to stderr only (spans and metrics still follow
    /// `log_filter`); `None` writes everything `log_filter` lets through.
    pub stderr_filter: Option<String>,
}

impl Settings {
    /// `RUST_LOG` if set, else `default_filter`; the endpoint from the environment only.
    pub fn from_env(default_filter: &str) -> Settings {
        Settings {
            log_filter: std::env::var("RUST_LOG").unwrap_or_else(|_| default_filter.to_owned()),
            otlp_endpoint: None,
            stderr_filter: None,
        }
    }
}

/// Where spans and metrics go.
pub enum Export {
    /// OTLP/gRPC to [`Settings::otlp_endpoint`] or, without it, to what the standard
    /// `OTEL_EXPORTER_OTLP_*` variables say; logs only when neither names an endpoint.
    Otlp,
    /// OTLP/gRPC over an already built channel: the guest agent has no network, so it
    /// exports through a vsock channel that the host forwards to the collector.
    Channel(tonic::transport::Channel),
}

/// Telemetry settings the process cannot start with (a configuration error, exit 64). The
/// message names the flag or variable; header values are never echoed (they carry tokens).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}: {reason}")]
    Env { var: String, reason: String },
    #[error("--otlp-endpoint {value:?}: {reason}")]
    Endpoint { value: String, reason: String },
    #[error("--log-filter (RUST_LOG) {value:?}: {reason}")]
    LogFilter { value: String, reason: String },
    #[error("stderr log filter {value:?}: {reason}")]
    StderrFilter { value: String, reason: String },
    #[error("OTLP exporter: {0}")]
    Exporter(String),
}

/// Installs the global subscriber, exporting as `settings` and the environment say. Must be
/// called inside a Tokio runtime. Every `OTEL_EXPORTER_OTLP_{,TRACES_,METRICS_}{ENDPOINT,
/// TIMEOUT,HEADERS}` variable is checked first: the exporter would panic on some malformed
/// values and silently ignore others.
pub fn init(
    service_name: &'static str,
    settings: &Settings,
) -> Result<TelemetryGuard, ConfigError> {
    init_with(service_name, settings, Export::Otlp)
}

/// Like [`init`], with the export target chosen by the caller.
pub fn init_with(
    service_name: &'static str,
    settings: &Settings,
    export: Export,
) -> Result<TelemetryGuard, ConfigError> {
    use opentelemetry_otlp::{WithExportConfig as _, WithTonicConfig as _};
    check_env(|var| std::env::var_os(var))?;
    if let Some(endpoint) = &settings.otlp_endpoint {
        check_endpoint(endpoint).map_err(|reason| ConfigError::Endpoint {
            value: endpoint.clone(),
            reason,
        })?;
    }
    let filter = parse_filter(&settings.log_filter).map_err(|reason| ConfigError::LogFilter {
        value: settings.log_filter.clone(),
        reason,
    })?;
    let stderr_filter = settings
        .stderr_filter
        .as_ref()
        .map(|value| {
            parse_filter(value).map_err(|reason| ConfigError::StderrFilter {
                value: value.clone(),
                reason,
            })
        })
        .transpose()?;
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    // Colour only for a person at a terminal: escape codes in a log file, a container's log
    // or a serial console are noise, and bytes on a console cost the guest CPU.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .with_filter(stderr_filter);
    let exporting = match &export {
        Export::Channel(_) => true,
        Export::Otlp => {
            settings.otlp_endpoint.is_some()
                || env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
                || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        }
    };
    if !exporting {
        tracing_subscriber::registry().with(filter).with(fmt).init();
        return Ok(TelemetryGuard {
            tracer: None,
            meter: None,
        });
    }
    let resource = resource(
        service_name,
        |var| std::env::var(var).ok(),
        std::process::id(),
    );
    let mut span_exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    let mut metric_exporter = opentelemetry_otlp::MetricExporter::builder().with_tonic();
    match export {
        Export::Channel(channel) => {
            span_exporter = span_exporter.with_channel(channel.clone());
            metric_exporter = metric_exporter.with_channel(channel);
        }
        Export::Otlp => {
            if let Some(endpoint) = &settings.otlp_endpoint {
                span_exporter = span_exporter.with_endpoint(endpoint);
                metric_exporter = metric_exporter.with_endpoint(endpoint);
            }
        }
    }
    let exporter_error =
        |e: opentelemetry_otlp::ExporterBuildError| ConfigError::Exporter(e.to_string());
    let span_exporter = span_exporter.build().map_err(exporter_error)?;
    let metric_exporter = metric_exporter.build().map_err(exporter_error)?;
    let tracer_provider = SdkTracerProvider::builder()
        .with_resource(resource.clone())
        .with_batch_exporter(span_exporter)
        .build();
    let meter_provider = meter_provider_builder(resource)
        .with_periodic_exporter(metric_exporter)
        .build();
    opentelemetry::global::set_meter_provider(meter_provider.clone());
    let tracer = tracer_provider.tracer(service_name);
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .init();
    Ok(TelemetryGuard {
        tracer: Some(tracer_provider),
        meter: Some(meter_provider),
    })
}

/// Checks `directives` (RUST_LOG syntax) the way [`init`] will parse them, so a process can
/// refuse a bad filter naming its own flag.
pub fn check_log_filter(directives: &str) -> Result<(), String> {
    parse_filter(directives).map(|_| ())
}

fn parse_filter(directives: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(directives).map_err(|e| e.to_string())
}

/// Overrides `service.instance.id` (see [`instance_id`]).
pub const INSTANCE_ID_ENV: &str = "CAPSA_INSTANCE_ID";

/// `service.name` and `service.instance.id` on top of what the SDK detects (including
/// `OTEL_RESOURCE_ATTRIBUTES`).
fn resource(
    service_name: &'static str,
    lookup: impl Fn(&str) -> Option<String>,
    pid: u32,
) -> opentelemetry_sdk::Resource {
    let builder = || opentelemetry_sdk::Resource::builder().with_service_name(service_name);
    let key = opentelemetry::Key::from_static_str("service.instance.id");
    let from_otel_env = builder().build().get(&key).map(|v| v.to_string());
    builder()
        .with_attribute(opentelemetry::KeyValue::new(
            key,
            instance_id(lookup, from_otel_env, pid),
        ))
        .build()
}

/// What tells this replica's series from the others' (replicas and nodes would otherwise
/// overwrite each other): `CAPSA_INSTANCE_ID`, else a `service.instance.id` given in
/// `OTEL_RESOURCE_ATTRIBUTES`, else `POD_NAME` (the Kubernetes manifests set it from the
/// downward API), else `<hostname>:<pid>`, unique among the processes of one host.
fn instance_id(
    lookup: impl Fn(&str) -> Option<String>,
    from_otel_env: Option<String>,
    pid: u32,
) -> String {
    let set = |var: &str| lookup(var).filter(|v| !v.trim().is_empty());
    if let Some(id) = set(INSTANCE_ID_ENV) {
        return id;
    }
    if let Some(id) = from_otel_env.filter(|v| !v.trim().is_empty()) {
        return id;
    }
    if let Some(id) = set("POD_NAME") {
        return id;
    }
    let host = set("HOSTNAME")
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "unknown-host".to_owned());
    format!("{host}:{pid}")
}

/// A meter provider with Capsa's views: every histogram in seconds gets
/// [`metrics::DURATION_BUCKETS_SECONDS`].
fn meter_provider_builder(
    resource: opentelemetry_sdk::Resource,
) -> opentelemetry_sdk::metrics::MeterProviderBuilder {
    SdkMeterProvider::builder()
        .with_resource(resource)
        .with_view(seconds_buckets)
}

fn seconds_buckets(
    instrument: &opentelemetry_sdk::metrics::Instrument,
) -> Option<opentelemetry_sdk::metrics::Stream> {
    use opentelemetry_sdk::metrics::{Aggregation, InstrumentKind, Stream};
    if instrument.kind() != InstrumentKind::Histogram || instrument.unit() != "s" {
        return None;
    }
    Stream::builder()
        .with_aggregation(Aggregation::ExplicitBucketHistogram {
            boundaries: metrics::DURATION_BUCKETS_SECONDS.to_vec(),
            record_min_max: true,
        })
        .build()
        .ok()
}

/// Set and not empty (the exporter treats an empty variable as unset).
fn env_set(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.is_empty())
}

/// Checks the OTLP exporter variables `lookup` finds (the process environment, in
/// [`init_with`]).
fn check_env(lookup: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<(), ConfigError> {
    type Check = fn(&str) -> Result<(), String>;
    let checks: [(&str, Check); 3] = [
        ("ENDPOINT", check_endpoint),
        ("TIMEOUT", check_timeout),
        ("HEADERS", check_headers),
    ];
    for signal in ["", "TRACES_", "METRICS_"] {
        for (setting, check) in checks {
            let var = format!("OTEL_EXPORTER_OTLP_{signal}{setting}");
            let Some(raw) = lookup(&var) else { continue };
            let reason = match raw.to_str() {
                None => Some("is not valid UTF-8".to_owned()),
                Some("") => None,
                Some(value) => check(value).err(),
            };
            if let Some(reason) = reason {
                return Err(ConfigError::Env { var, reason });
            }
        }
    }
    Ok(())
}

/// An `http://` or `https://` URL with a host, as the gRPC exporter dials it.
fn check_endpoint(value: &str) -> Result<(), String> {
    let uri: http::Uri = value
        .parse()
        .map_err(|e| format!("{value:?} is not a URL ({e})"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!("{value:?} needs an http:// or https:// scheme"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{value:?} has no host"));
    }
    Ok(())
}

/// Whole milliseconds, as the OTLP exporter specification says.
fn check_timeout(value: &str) -> Result<(), String> {
    value
        .trim()
        .parse::<u64>()
        .map(drop)
        .map_err(|_| format!("{value:?} is not a whole number of milliseconds"))
}

/// `key=value` pairs separated by commas, values percent-encoded. The values are secrets
/// (authorization tokens): errors say which entry, never what it holds.
fn check_headers(value: &str) -> Result<(), String> {
    for (i, entry) in value.split_terminator(',').enumerate() {
        let n = i + 1;
        let Some((key, val)) = entry.split_once('=') else {
            return Err(format!("entry {n} is not key=value"));
        };
        http::HeaderName::from_bytes(key.trim().as_bytes())
            .map_err(|_| format!("entry {n}: the key is not a valid header name"))?;
        let decoded = percent_decode(val.trim())
            .ok_or_else(|| format!("entry {n}: the value has a bad %-escape"))?;
        http::HeaderValue::from_str(&decoded)
            .map_err(|_| format!("entry {n}: the value is not a valid header value"))?;
    }
    Ok(())
}

/// `%XX` escapes decoded as UTF-8; `None` for a malformed escape or invalid UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The meter every Capsa metric is recorded on (a no-op until [`init`] configured OTLP).
pub fn meter() -> opentelemetry::metrics::Meter {
    opentelemetry::global::meter("capsa")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::ffi::OsString;

    fn check(vars: &[(&str, &str)]) -> Result<(), ConfigError> {
        let env: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        check_env(|var| env.get(var).cloned())
    }

    fn failing_var(vars: &[(&str, &str)]) -> String {
        match check(vars) {
            Err(ConfigError::Env { var, reason }) => {
                assert!(!reason.is_empty());
                var
            }
            other => panic!("{vars:?} accepted: {other:?}"),
        }
    }

    #[test]
    fn well_formed_and_empty_variables_pass() {
        check(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel-collector:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://[::1]:4317/"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "api-key=abc%20def, x-tenant=t1",
            ),
            ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", ""),
        ])
        .unwrap();
        check(&[]).unwrap();
    }

    #[test]
    fn each_malformed_variable_is_named() {
        for (var, value) in [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://[bad"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "otel-collector:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://collector:4317"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s"),
            ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "-1"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "bad key=v"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "k=%zz"),
        ] {
            assert_eq!(failing_var(&[(var, value)]), var, "{var}={value}");
        }
    }

    #[test]
    fn seconds_histograms_get_second_scale_buckets() {
        use opentelemetry::metrics::MeterProvider as _;
        use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
        use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader};

        let exporter = InMemoryMetricExporter::default();
        let provider = meter_provider_builder(resource("capsa-test", |_| None, 1))
            .with_reader(PeriodicReader::builder(exporter.clone()).build())
            .build();
        let meter = provider.meter("test");
        let seconds = meter.f64_histogram("test.duration").with_unit("s").build();
        let millis = meter.f64_histogram("test.size").with_unit("By").build();
        seconds.record(0.3, &[]);
        millis.record(0.3, &[]);
        provider.force_flush().unwrap();

        let exported = exporter.get_finished_metrics().unwrap();
        let histogram = |name: &str| {
            exported
                .iter()
                .flat_map(|rm| rm.scope_metrics())
                .flat_map(|sm| sm.metrics())
                .find(|m| m.name() == name)
                .map(|m| match m.data() {
                    AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                        let p = h.data_points().next().unwrap();
                        (
                            p.bounds().collect::<Vec<_>>(),
                            p.bucket_counts().collect::<Vec<_>>(),
                        )
                    }
                    other => panic!("{name}: {other:?}"),
                })
                .unwrap_or_else(|| panic!("{name} not exported: {exported:?}"))
        };
        let (bounds, counts) = histogram("test.duration");
        assert_eq!(bounds, metrics::DURATION_BUCKETS_SECONDS);
        // 0.3 s is in (0.25, 0.5]: bucket i counts values in (bounds[i-1], bounds[i]].
        let i = counts.iter().position(|&c| c == 1).unwrap();
        assert_eq!((bounds[i - 1], bounds[i]), (0.25, 0.5), "{counts:?}");
        // Other units keep the SDK's defaults.
        assert_ne!(histogram("test.size").0, metrics::DURATION_BUCKETS_SECONDS);
        provider.shutdown().unwrap();
    }

    #[test]
    fn instance_id_precedence() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |var: &str| {
                vars.iter()
                    .find(|(k, _)| *k == var)
                    .map(|(_, v)| v.to_string())
            }
        };
        let all = env(&[
            ("CAPSA_INSTANCE_ID", "node-7"),
            ("POD_NAME", "vm-pool-abc"),
            ("HOSTNAME", "host"),
        ]);
        assert_eq!(instance_id(all, Some("otel".into()), 9), "node-7");
        let no_override = env(&[
            ("CAPSA_INSTANCE_ID", " "),
            ("POD_NAME", "vm-pool-abc"),
            ("HOSTNAME", "host"),
        ]);
        assert_eq!(instance_id(no_override, Some("otel".into()), 9), "otel");
        assert_eq!(instance_id(no_override, None, 9), "vm-pool-abc");
        assert_eq!(instance_id(env(&[("HOSTNAME", "host")]), None, 9), "host:9");
        // No variables at all: the kernel's hostname, still with the pid.
        assert!(instance_id(env(&[]), None, 9).ends_with(":9"));
    }

    #[test]
    fn resource_carries_the_instance_id() {
        let r = resource(
            "capsa-test",
            |var| (var == INSTANCE_ID_ENV).then(|| "replica-2".to_owned()),
            1,
        );
        let get = |k: &'static str| {
            r.get(&opentelemetry::Key::from_static_str(k))
                .map(|v| v.to_string())
        };
        assert_eq!(get("service.instance.id").as_deref(), Some("replica-2"));
        assert_eq!(get("service.name").as_deref(), Some("capsa-test"));
    }

    #[test]
    fn header_errors_do_not_echo_the_value() {
        let err = check(&[(
            "OTEL_EXPORTER_OTLP_HEADERS",
            "authorization=ok,secret-token",
        )])
        .unwrap_err()
        .to_string();
        assert!(err.contains("entry 2"), "{err}");
        assert!(!err.contains("secret-token"), "{err}");
    }
}
