//! OpenTelemetry traces over OTLP/gRPC, shared by the coordinator and the relay (cargo
//! feature `otel`). The session's trace is part of the contract between processes: every
//! coordinator replica and relay derives it from the session id
//! ([`crate::SessionId::trace_context`]), so spans about one session land in one trace
//! without anything carried on the wire.
//!
//! Export is configured by the standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER[_ARG]`) and is off when no endpoint is set.

use std::time::SystemTime;

use crate::SessionId;
use opentelemetry::trace::{
    Link, SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    #[error("cannot build the OTLP span exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// The OTLP endpoint the environment names, if any.
pub fn endpoint_from_env() -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .into_iter()
    .filter_map(|v| std::env::var(v).ok())
    .map(|v| v.trim().to_owned())
    .find(|v| !v.is_empty())
}

/// A tracer provider exporting over OTLP/gRPC to `endpoint` in batches, made the
/// global provider, with the W3C trace-context propagator installed. `service_name` is
/// used unless `OTEL_SERVICE_NAME` says otherwise. Call inside a Tokio runtime; call
/// [`SdkTracerProvider::shutdown`] before exiting to flush.
pub fn install(endpoint: &str, service_name: &str) -> Result<SdkTracerProvider, OtelError> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|source| OtelError::Exporter {
            endpoint: endpoint.to_owned(),
            source,
        })?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service_name.to_owned());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Ok(provider)
}

/// The `tracing` layer that turns spans into OpenTelemetry spans of `provider`, under
/// the instrumentation scope `tracer` (the binary's name).
pub fn layer<S>(
    provider: &SdkTracerProvider,
    tracer: &'static str,
) -> impl tracing_subscriber::Layer<S> + use<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer(tracer))
}

/// The remote parent every span about `session` hangs under.
pub fn session_context(session: SessionId) -> Context {
    let (trace, span) = session.trace_context();
    Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from_bytes(trace),
        SpanId::from_bytes(span),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ))
}

/// Records one finished step of `session` (from `started` until now) in the session's
/// trace, linked to the current span if there is one. A no-op without a provider.
pub fn session_step(
    tracer: &'static str,
    name: &'static str,
    session: SessionId,
    started: SystemTime,
    attributes: Vec<KeyValue>,
) {
    let tracer = opentelemetry::global::tracer(tracer);
    let current = tracing::Span::current().context();
    let caller = current.span().span_context().clone();
    let mut builder = tracer.span_builder(name).with_start_time(started);
    let mut attributes = attributes;
    attributes.push(KeyValue::new("session.id", session.to_string()));
    builder = builder.with_attributes(attributes);
    if caller.is_valid() {
        builder = builder.with_links(vec![Link::with_context(caller)]);
    }
    let mut span = builder.start_with_context(&tracer, &session_context(session));
    opentelemetry::trace::Span::end(&mut span);
}
