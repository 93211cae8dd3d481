//! The library's error type for joining and running a session.

use kakehashi_proto::TokenError;

use crate::crypto::CryptoError;
use crate::link::LinkError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    // Errors are carried as plain fields (not `source`) and shown in the message, so
    // a log line with `%e` says everything and an error chain does not repeat it.
    #[error("coordinator URL {url:?} is not usable: {error}")]
    CoordinatorUrl {
        url: String,
        error: tonic::transport::Error,
    },
    #[error("cannot reach the coordinator at {url}: {}", transport_detail(.error))]
    CoordinatorUnreachable {
        url: String,
        error: tonic::transport::Error,
    },
    #[error("coordinator refused {call}: {} ({:?})", .status.message(), .status.code())]
    Rpc {
        call: &'static str,
        // Boxed: a `Status` is large and errors travel through every `Result`.
        status: Box<tonic::Status>,
    },
    #[error("coordinator's answer to {call} is unusable: {what}")]
    BadResponse {
        call: &'static str,
        what: &'static str,
    },
    #[error("session id from the coordinator is invalid: {0}")]
    SessionId(kakehashi_proto::ids::BadSessionId),
    #[error("this participant's own token does not verify: {0}")]
    OwnToken(TokenError),
    #[error("a peer's token was refused: {0}")]
    PeerToken(TokenError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("no peer is attached yet, so there is nobody to encrypt for")]
    NoPeer,
    #[error("a supervisor only watches: it sends nothing to the customer")]
    WatchOnly,
    #[error("the session is over")]
    Ended,
    #[error(
        "the peer acknowledged nothing on the {channel} channel for {waited:?} while its replay buffer was full"
    )]
    Stalled {
        channel: &'static str,
        waited: std::time::Duration,
    },
    #[error("the session moved to another relay while this frame was being sent; it was not sent")]
    Moved,
    #[error("the relay did not confirm the {what} within {waited:?}")]
    NotConfirmed {
        what: &'static str,
        waited: std::time::Duration,
    },
}

impl AgentError {
    pub(crate) fn rpc(call: &'static str, status: tonic::Status) -> Self {
        AgentError::Rpc {
            call,
            status: Box::new(status),
        }
    }
}

/// Opens a gRPC channel to the coordinator (plain `http://` or `https://` URL).
pub async fn connect_coordinator(url: &str) -> Result<tonic::transport::Channel, AgentError> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|error| AgentError::CoordinatorUrl {
            url: url.to_owned(),
            error,
        })?
        .connect_timeout(std::time::Duration::from_secs(5));
    endpoint
        .connect()
        .await
        .map_err(|error| AgentError::CoordinatorUnreachable {
            url: url.to_owned(),
            error,
        })
}

/// The innermost cause of a transport error ("Connection refused (os error 111)"):
/// tonic's own message is only "transport error".
fn transport_detail(e: &tonic::transport::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
