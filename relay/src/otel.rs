//! OpenTelemetry traces, the relay's side: `relay.attach` and `relay.session` spans in
//! the session's trace. Export, the session trace and the `tracing` layer are
//! [`kakehashi_proto::otel`]'s, shared with the coordinator.

use std::time::SystemTime;

use kakehashi_proto::SessionId;
pub use kakehashi_proto::otel::{OtelError, endpoint_from_env, install, session_context};
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::SdkTracerProvider;

/// Name of the tracer (instrumentation scope) the relay's spans come from.
pub const TRACER: &str = "kakehashi-relay";

/// The `tracing` layer exporting the relay's spans through `provider`.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S> + use<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    kakehashi_proto::otel::layer(provider, TRACER)
}

/// Records one finished step of `session` (from `started` until now) in the session's
/// trace, linked to the current span if there is one. A no-op without a provider.
pub fn session_step(
    name: &'static str,
    session: SessionId,
    started: SystemTime,
    attributes: Vec<KeyValue>,
) {
    kakehashi_proto::otel::session_step(TRACER, name, session, started, attributes);
}
