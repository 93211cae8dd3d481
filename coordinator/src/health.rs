//! `grpc.health.v1` and server reflection for the coordinator's gRPC port.
//!
//! Health answers for the whole server (`""`) and for each Kakehashi service. A probe
//! task reads the backends every [`PROBE_INTERVAL`]: one session-store lookup (Redis,
//! or memory) and one relay-directory listing (etcd, or the static list). While either
//! fails or takes longer than [`PROBE_TIMEOUT`], every status is `NOT_SERVING`, so a
//! load balancer or Kubernetes probe stops sending calls this replica would refuse
//! with `UNAVAILABLE` anyway. An empty relay directory is still `SERVING`: the
//! coordinator can answer everything except `CreateSession`, and that answer is precise.

use std::sync::Arc;
use std::time::Duration;

use kakehashi_proto::{SessionId, pb};
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::Backends;

/// How often the backends are probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// A probe that takes longer than this counts as a failure.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Names of the services whose status is reported, besides the server's (`""`).
pub const SERVICES: [&str; 3] = [
    "kakehashi.v1.SessionService",
    "kakehashi.v1.AgentService",
    "kakehashi.v1.AdminService",
];

/// The gauge that mirrors the probe: 1 while the backends answer, 0 otherwise.
pub const BACKENDS_UP: &str = "coordinator_backends_up";

/// Registers this module's metric help text.
pub fn describe() {
    metrics::describe_gauge!(
        BACKENDS_UP,
        "1 while the last backend probe (session store and relay directory) succeeded, else 0; gRPC health follows it."
    );
}

/// The reflection services (v1 and v1alpha, for older `grpcurl`s) over every `.proto`
/// file the coordinator serves.
pub fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok((v1, v1alpha))
}

/// Probes the backends until `cancel` fires and publishes the result as health status.
/// At shutdown every status turns `NOT_SERVING` and every `Watch` stream then ends.
pub async fn run(mut reporter: HealthReporter, backends: Backends, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<bool> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let up = tokio::select! {
            () = cancel.cancelled() => break,
            up = probe(&backends) => up,
        };
        metrics::gauge!(BACKENDS_UP).set(if up { 1.0 } else { 0.0 });
        if last != Some(up) {
            if up {
                tracing::info!("backends reachable: health SERVING");
            } else {
                tracing::warn!("backends unreachable: health NOT_SERVING");
            }
            set_all(&reporter, status(up)).await;
            last = Some(up);
        }
    }
    set_all(&reporter, ServingStatus::NotServing).await;
    // Dropping the statuses ends every open `Watch` stream (after its NOT_SERVING), which
    // graceful shutdown would otherwise wait for forever.
    reporter.clear_service_status("").await;
    for name in SERVICES {
        reporter.clear_service_status(name).await;
    }
}

fn status(up: bool) -> ServingStatus {
    if up {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Sets the server's and every service's status.
pub async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for name in SERVICES {
        reporter.set_service_status(name, status).await;
    }
}

/// One round trip to each backend, bounded by [`PROBE_TIMEOUT`].
async fn probe(backends: &Backends) -> bool {
    let sessions = Arc::clone(&backends.sessions);
    let relays = Arc::clone(&backends.relays);
    let round = async move {
        // A lookup of an id nobody holds: one read, no write, the same path every
        // session RPC takes first.
        let session = sessions.get(SessionId::from_bytes([0; 16])).await;
        if let Err(e) = &session {
            tracing::debug!(error = %e, "health probe: session store failed");
        }
        let directory = relays.list().await;
        if let Err(e) = &directory {
            tracing::debug!(error = %e, "health probe: relay directory failed");
        }
        session.is_ok() && directory.is_ok()
    };
    tokio::time::timeout(PROBE_TIMEOUT, round)
        .await
        .unwrap_or(false)
}
