//! Errors: one enum for every way a request fails, classified once into a gRPC status,
//! a client-facing message and a metric label; and the errors of starting the server.

use std::net::SocketAddr;

use kakehashi_proto::{SessionId, TokenError};
use tonic::{Code, Status};

use crate::backend::BackendError;
use crate::random::RandomError;

/// Why a request failed. [`ApiError::status`] turns it into what the client sees.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("session {0} not found")]
    SessionNotFound(SessionId),
    #[error("code not found or expired")]
    CodeNotFound,
    #[error("session {0} has already ended")]
    SessionEnded(SessionId),
    #[error("session {session} is {state}, not waiting for its code")]
    NotWaiting {
        session: SessionId,
        state: &'static str,
    },
    #[error("operator ticket does not match session {0}")]
    BadTicket(SessionId),
    #[error("token refused: {0}")]
    BadToken(#[source] TokenError),
    #[error("this call needs a host token for the session's current host")]
    NotHost,
    #[error("too many wrong codes from {source_ip}; next try in {retry_after_secs} s")]
    GuessLimited {
        source_ip: std::net::IpAddr,
        retry_after_secs: u64,
    },
    #[error("no relay is available")]
    NoRelays,
    #[error("relay directory (etcd) unavailable: {0}")]
    DirectoryUnavailable(String),
    #[error("session {0} is changing too fast; concurrent updates kept colliding")]
    Contention(SessionId),
    #[error("session {0} has too many events")]
    EventLogFull(SessionId),
    #[error("backend failure: {0}")]
    Backend(#[source] BackendError),
    #[error(transparent)]
    Random(#[from] RandomError),
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::NoRelays => ApiError::NoRelays,
            BackendError::DirectoryUnavailable(d) => ApiError::DirectoryUnavailable(d),
            BackendError::EventLogFull { session, .. } => ApiError::EventLogFull(session),
            other => ApiError::Backend(other),
        }
    }
}

impl ApiError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ApiError::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument { .. } => Code::InvalidArgument,
            ApiError::SessionNotFound(_) | ApiError::CodeNotFound => Code::NotFound,
            ApiError::SessionEnded(_) | ApiError::NotWaiting { .. } => Code::FailedPrecondition,
            ApiError::BadTicket(_) | ApiError::NotHost => Code::PermissionDenied,
            ApiError::BadToken(_) => Code::Unauthenticated,
            ApiError::GuessLimited { .. } | ApiError::EventLogFull(_) => Code::ResourceExhausted,
            ApiError::NoRelays
            | ApiError::DirectoryUnavailable(_)
            | ApiError::Contention(_)
            | ApiError::Backend(_)
            | ApiError::Random(_) => Code::Unavailable,
        }
    }

    /// Fixed-cardinality label for `coordinator_rpc_errors_total`.
    pub fn label(&self) -> &'static str {
        match self {
            ApiError::InvalidArgument { .. } => "invalid_argument",
            ApiError::SessionNotFound(_) => "session_not_found",
            ApiError::CodeNotFound => "code_not_found",
            ApiError::SessionEnded(_) => "session_ended",
            ApiError::NotWaiting { .. } => "not_waiting",
            ApiError::BadTicket(_) => "bad_ticket",
            ApiError::BadToken(_) => "bad_token",
            ApiError::NotHost => "not_host",
            ApiError::GuessLimited { .. } => "guess_limited",
            ApiError::NoRelays => "no_relays",
            ApiError::DirectoryUnavailable(_) => "relay_directory_unavailable",
            ApiError::Contention(_) => "contention",
            ApiError::EventLogFull(_) => "event_log_full",
            ApiError::Backend(_) => "backend",
            ApiError::Random(_) => "random",
        }
    }

    /// What the client reads: actionable, and free of internal detail (backend errors
    /// say only that the service is unavailable; the detail goes to the log).
    pub fn client_message(&self) -> String {
        match self {
            ApiError::NoRelays => {
                "no relay is available to host the session; try again shortly".into()
            }
            // Names the store and how long it has been out of reach; the etcd error
            // text itself stays in the log.
            ApiError::DirectoryUnavailable(_) => {
                "relay directory (etcd) unavailable: new sessions cannot be placed until etcd is reachable again; sessions already running are not affected; retry shortly".into()
            }
            ApiError::Contention(_) => {
                "the session was being changed concurrently; retry the call".into()
            }
            // Name the store that is down (a fixed backend label, no internal detail), so
            // an operator knows where to look.
            ApiError::Backend(BackendError::Unavailable { backend, .. }) => {
                format!("the coordinator cannot reach its {backend} store; retry shortly")
            }
            ApiError::Backend(_) | ApiError::Random(_) => {
                "the coordinator is temporarily unavailable; retry shortly".into()
            }
            ApiError::GuessLimited {
                retry_after_secs, ..
            } => format!(
                "too many wrong codes from this address; try again in {retry_after_secs} seconds"
            ),
            ApiError::EventLogFull(_) => {
                "this session has produced too many events; end it and start a new one".into()
            }
            other => other.to_string(),
        }
    }

    /// Classifies, counts and logs the error once, and returns the status for the client.
    pub fn status(&self, rpc: &'static str) -> Status {
        let code = self.code();
        metrics::counter!(crate::telemetry::RPC_ERRORS, "rpc" => rpc, "kind" => self.label())
            .increment(1);
        if code == Code::Unavailable {
            tracing::warn!(rpc, error = %self, source = ?std::error::Error::source(self), "request failed");
        } else {
            tracing::debug!(rpc, error = %self, "request refused");
        }
        Status::new(code, self.client_message())
    }
}

/// Why [`crate::Coordinator::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen for metrics on {addr}: {source}")]
    MetricsBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "a metrics recorder is already installed in this process; set metrics_listen only once"
    )]
    MetricsRecorderInstalled,
}
