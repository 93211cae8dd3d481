//! Metric names, described once at start-up, and the scrape endpoint.

pub mod http;

pub const SESSIONS_CREATED: &str = "coordinator_sessions_created_total";
pub const SESSIONS_ENDED: &str = "coordinator_sessions_ended_total";
pub const JOINS: &str = "coordinator_joins_total";
pub const CODE_GUESS_FAILURES: &str = "coordinator_code_guess_failures_total";
pub const RPC_ERRORS: &str = "coordinator_rpc_errors_total";
pub const RELAY_END_FAILURES: &str = "coordinator_relay_end_failures_total";
pub const CREATE_SESSION_SECONDS: &str = "coordinator_create_session_seconds";
pub const REAPER_ERRORS: &str = "coordinator_reaper_errors_total";
pub const RESUMES: &str = "coordinator_session_migrations_total";

/// Registers help text for every metric. Harmless to call more than once.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_histogram};
    crate::limiter::describe();
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
    describe_counter!(
        REAPER_ERRORS,
        Unit::Count,
        "Reaper passes that hit a backend error."
    );
}
