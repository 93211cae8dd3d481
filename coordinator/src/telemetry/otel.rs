//! OpenTelemetry traces over OTLP/gRPC.
//!
//! Export is configured by the standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER[_ARG]`) and is off when no endpoint is set.
//!
//! Two kinds of spans:
//! - one per gRPC call (`grpc`), a child of the caller's W3C `traceparent` when the
//!   request carries one;
//! - one per step of a session (`session.create`, `session.join`, `session.end`, and the
//!   relay's `relay.attach` / `relay.session`), all in the session's own trace
//!   ([`kakehashi_proto::SessionId::trace_context`]) and linked to the gRPC call that
//!   did the step. The session's trace is derived from its id, so a customer's agent,
//!   which knows nothing of the call-center software's trace, still lands in it.

use std::time::SystemTime;

pub use kakehashi_proto::otel::{OtelError, endpoint_from_env, install, session_context};
use kakehashi_proto::{SessionId, pb};
use opentelemetry::KeyValue;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Name of the tracer (instrumentation scope) the coordinator's spans come from.
pub const TRACER: &str = "kakehashi-coordinator";

/// The `tracing` layer exporting the coordinator's spans through `provider`.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S> + use<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    kakehashi_proto::otel::layer(provider, TRACER)
}

/// The span of one gRPC call, a child of the caller's `traceparent` if it sent one.
pub fn grpc_span(request: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!("grpc", rpc.method = %request.uri().path());
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    span
}

struct HeaderExtractor<'a>(&'a tonic::codegen::http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .map(tonic::codegen::http::HeaderName::as_str)
            .collect()
    }
}

/// [`session_step`] for a gRPC handler that knows the session only from its answer:
/// `session` is the answer's session id, if it succeeded. `started` is when the call
/// began.
pub fn rpc_step(name: &'static str, started: std::time::Instant, session: Option<&pb::Session>) {
    let Some(id) = session.and_then(|s| s.session_id.parse::<SessionId>().ok()) else {
        return;
    };
    let started = SystemTime::now()
        .checked_sub(started.elapsed())
        .unwrap_or_else(SystemTime::now);
    session_step(name, id, started, Vec::new());
}

/// Records one finished step of `session` (from `started` until now) in the session's
/// trace, linked to the current span (the gRPC call). A no-op without a provider.
pub fn session_step(
    name: &'static str,
    session: SessionId,
    started: SystemTime,
    attributes: Vec<KeyValue>,
) {
    kakehashi_proto::otel::session_step(TRACER, name, session, started, attributes);
}
