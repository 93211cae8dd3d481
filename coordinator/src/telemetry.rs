//! Metric names, described once at start-up, and the scrape endpoint.

pub mod http;
pub mod otel;

pub const SESSIONS_CREATED: &str = "coordinator_sessions_created_total";
pub const SESSIONS_ENDED: &str = "coordinator_sessions_ended_total";
pub const JOINS: &str = "coordinator_joins_total";
pub const CODE_GUESS_FAILURES: &str = "coordinator_code_guess_failures_total";
pub const RPC_ERRORS: &str = "coordinator_rpc_errors_total";
pub const RELAY_END_FAILURES: &str = "coordinator_relay_end_failures_total";
pub const CREATE_SESSION_SECONDS: &str = "coordinator_create_session_seconds";
pub const REAPER_ERRORS: &str = "coordinator_reaper_errors_total";
pub const RESUMES: &str = "coordinator_session_migrations_total";
pub const PLACEMENT_SECONDS: &str = "coordinator_placement_seconds";
pub const CONSENT_EVENTS: &str = "coordinator_consent_events_total";
pub const RESUME_CALLS: &str = "coordinator_resume_calls_total";
pub const RESUME_SECONDS: &str = "coordinator_resume_seconds";
pub const CODES_ALLOCATED: &str = "coordinator_codes_allocated_total";
pub const CODES_REDEEMED: &str = "coordinator_codes_redeemed_total";
pub const BACKEND_ERRORS: &str = "coordinator_backend_errors_total";

/// Permissions as the `permission` label of [`CONSENT_EVENTS`]: a fixed set.
const CONSENT_PERMISSIONS: [(kakehashi_proto::Permissions, &str); 5] = [
    (kakehashi_proto::Permissions::VIEW, "view"),
    (kakehashi_proto::Permissions::CONTROL, "control"),
    (kakehashi_proto::Permissions::FILE_TRANSFER, "file_transfer"),
    (kakehashi_proto::Permissions::SYSTEM_INFO, "system_info"),
    (kakehashi_proto::Permissions::RECORDING, "recording"),
];

/// Counts one consent event per permission in `perms`; `decision` is one of
/// `granted`, `denied`, `revoked`.
pub fn count_consent(decision: &'static str, perms: kakehashi_proto::Permissions) {
    for (perm, name) in CONSENT_PERMISSIONS {
        if perms.contains(perm) {
            metrics::counter!(CONSENT_EVENTS, "decision" => decision, "permission" => name)
                .increment(1);
        }
    }
}

/// Times one placement decision (a `RelayDirectory::pick`).
pub async fn timed_placement<T>(pick: impl std::future::Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let picked = pick.await;
    metrics::histogram!(PLACEMENT_SECONDS).record(started.elapsed().as_secs_f64());
    picked
}

/// Counts and times one `ResumeSession` call.
pub fn record_resume(ok: bool, took: std::time::Duration) {
    let result = if ok { "ok" } else { "error" };
    metrics::counter!(RESUME_CALLS, "result" => result).increment(1);
    metrics::histogram!(RESUME_SECONDS).record(took.as_secs_f64());
}

/// Counts a failed call to a backend; `backend` is `redis` or `etcd`.
pub fn backend_error(backend: &'static str) {
    metrics::counter!(BACKEND_ERRORS, "backend" => backend).increment(1);
}

/// Registers help text for every metric. Harmless to call more than once.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_histogram};
    crate::limiter::describe();
    crate::health::describe();
    crate::auth::describe();
    crate::monitoring::describe();
    describe_counter!(SESSIONS_CREATED, Unit::Count, "Sessions created.");
    describe_counter!(
        SESSIONS_ENDED,
        Unit::Count,
        "Sessions ended, by end reason."
    );
    describe_counter!(
        JOINS,
        Unit::Count,
        "Tokens issued to joining participants, by role."
    );
    describe_counter!(
        CODE_GUESS_FAILURES,
        Unit::Count,
        "JoinByCode calls with an unknown or expired code."
    );
    describe_counter!(
        RPC_ERRORS,
        Unit::Count,
        "Failed gRPC calls, by rpc and error kind."
    );
    describe_counter!(
        RELAY_END_FAILURES,
        Unit::Count,
        "RelayAdmin.EndSession calls that failed or timed out."
    );
    describe_histogram!(
        CREATE_SESSION_SECONDS,
        Unit::Seconds,
        "Time to create a session: placement, code allocation, record and event."
    );
    describe_counter!(
        RESUMES,
        Unit::Count,
        "Sessions moved to another relay after their relay died or drained."
    );
    describe_histogram!(
        PLACEMENT_SECONDS,
        Unit::Seconds,
        "Time to choose a relay for a new or moving session (power-of-two choices on the directory's view)."
    );
    describe_counter!(
        CONSENT_EVENTS,
        Unit::Count,
        "Customer consent decisions reported by host agents, by decision (granted, denied, revoked) and permission."
    );
    describe_counter!(
        RESUME_CALLS,
        Unit::Count,
        "ResumeSession calls (a participant moving after a relay loss or drain), by result (ok, error)."
    );
    describe_histogram!(
        RESUME_SECONDS,
        Unit::Seconds,
        "Time the coordinator takes to answer ResumeSession (placement, record update, new token)."
    );
    describe_counter!(CODES_ALLOCATED, Unit::Count, "Session codes allocated.");
    describe_counter!(
        CODES_REDEEMED,
        Unit::Count,
        "Session codes redeemed by a customer's JoinByCode."
    );
    describe_counter!(
        BACKEND_ERRORS,
        Unit::Count,
        "Failed calls to a backend, by backend (redis: commands that failed or timed out; etcd: lost directory watches and failed leader-election calls)."
    );
    // Series that exist before their first event, so dashboards show 0 rather than
    // nothing on a quiet cluster.
    for decision in ["granted", "denied", "revoked"] {
        for (_, permission) in CONSENT_PERMISSIONS {
            metrics::counter!(CONSENT_EVENTS, "decision" => decision, "permission" => permission)
                .increment(0);
        }
    }
    for result in ["ok", "error"] {
        metrics::counter!(RESUME_CALLS, "result" => result).increment(0);
    }
    for backend in ["redis", "etcd"] {
        metrics::counter!(BACKEND_ERRORS, "backend" => backend).increment(0);
    }
    metrics::counter!(CODES_ALLOCATED).increment(0);
    metrics::counter!(CODES_REDEEMED).increment(0);
    describe_counter!(
        REAPER_ERRORS,
        Unit::Count,
        "Reaper passes that hit a backend error."
    );
}
