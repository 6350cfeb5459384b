//! W3C trace context in gRPC metadata. Outgoing: [`propagate`] is a tonic interceptor that
//! writes the current span's context. Incoming: [`GrpcTraceLayer`] opens one span per call
//! whose parent is the caller's context.

use std::task::{Context, Poll};

use opentelemetry::propagation::{Extractor, Injector};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Tonic interceptor: adds the current span's trace context to an outgoing request.
#[allow(clippy::result_large_err)]
pub fn propagate(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(request.metadata_mut()))
    });
    Ok(request)
}

/// Tower layer for servers: one `grpc` span per call, child of the caller's trace.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTraceLayer;

impl<S> tower_layer::Layer<S> for GrpcTraceLayer {
    type Service = GrpcTraceService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcTraceService { inner }
    }
}

/// The service [`GrpcTraceLayer`] wraps around each server.
#[derive(Debug, Clone)]
pub struct GrpcTraceService<S> {
    inner: S,
}

impl<S, B> tower_service::Service<http::Request<B>> for GrpcTraceService<S>
where
    S: tower_service::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tracing::instrument::Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(request.headers()))
        });
        let path = request.uri().path();
        let span = tracing::info_span!("grpc", otel.name = %path, rpc.method = %path);
        let _ = span.set_parent(parent);
        self.inner.call(request).instrument(span)
    }
}
