//! Backend traits: where codes, session records, events and relay membership live.
//!
//! Each trait is object safe (`Arc<dyn Trait>`) and returns boxed futures, so a Redis or
//! etcd implementation can sit behind the same coordinator code as the in-memory one.
//! The in-memory implementations are the embedded default and what the tests use; the
//! behaviour every implementation must show is written down once, in
//! [`crate::contract`].

pub mod codes;
pub mod etcd;
pub mod events;
pub mod redis;
pub mod relays;
pub mod sessions;

pub use futures::future::BoxFuture;
pub use futures::stream::BoxStream;

use kakehashi_proto::SessionId;

use crate::random::RandomError;

/// Why a backend could not do what was asked. Service code classifies these into gRPC
/// statuses; the text here is for logs, never for clients.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{backend} backend is unavailable: {detail}")]
    Unavailable {
        backend: &'static str,
        detail: String,
    },
    #[error("session {0} already exists")]
    AlreadyExists(SessionId),
    #[error("no free {digits}-digit code after {attempts} attempts")]
    CodeSpaceExhausted { digits: usize, attempts: u32 },
    #[error("code length {0} is outside 4..=12 digits")]
    BadCodeLength(usize),
    #[error("no relay is available for placement")]
    NoRelays,
    /// The relay directory cannot see its membership store (etcd); the text says for
    /// how long, and is safe to show a client.
    #[error("relay directory (etcd) unavailable: {0}")]
    DirectoryUnavailable(String),
    #[error("event log of session {session} is full ({limit} events)")]
    EventLogFull { session: SessionId, limit: usize },
    #[error(transparent)]
    Random(#[from] RandomError),
}
