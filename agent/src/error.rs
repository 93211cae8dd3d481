//! The library's error type for joining and running a session.

use kakehashi_proto::TokenError;

use crate::crypto::CryptoError;
use crate::link::LinkError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("coordinator URL {url:?} is not usable: {source}")]
    CoordinatorUrl {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("cannot reach the coordinator at {url}: {source}")]
    CoordinatorUnreachable {
        url: String,
        source: tonic::transport::Error,
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
    SessionId(#[from] kakehashi_proto::ids::BadSessionId),
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
    #[error("the session is over")]
    Ended,
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
pub(crate) async fn connect_coordinator(
    url: &str,
) -> Result<tonic::transport::Channel, AgentError> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|source| AgentError::CoordinatorUrl {
            url: url.to_owned(),
            source,
        })?
        .connect_timeout(std::time::Duration::from_secs(5));
    endpoint
        .connect()
        .await
        .map_err(|source| AgentError::CoordinatorUnreachable {
            url: url.to_owned(),
            source,
        })
}
