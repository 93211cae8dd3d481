//! The evidence sink (`kakehashi sink`): receives telework-monitoring uploads from
//! enrolled devices (`EvidenceService.Upload`) and keeps them as recordings.
//!
//! Each upload is checked whole before anything is written: the coordinator's
//! signature and expiry on the monitoring ticket, the item count, strictly increasing
//! seqs, and every item's limits and device signature
//! ([`kakehashi_proto::monitor::check_item`]). The accepted items become ONE recording
//! in the [`crate::recording`] format (encrypted with the recording key, hash-chained,
//! written as `.partial`, synced, renamed) before the sink answers, so a device deletes
//! from its offline buffer only what is on disk. `kakehashi recording verify` and
//! `recording prune` work on these files unchanged; the sink prunes its directory with
//! the same retention itself.
//!
//! # Layout
//! - `store`: the directory ([`EvidenceStore`]): file names, per-device dedupe, the
//!   record layout inside a file, and [`read_device`], the reader for people and tests.
//! - `server`: the gRPC service and [`Sink`], the running server with its prune task.
//!
//! # Invariants
//! - A request is refused whole or stored whole; nothing is acknowledged before it is
//!   synced and renamed.
//! - One device's uploads are stored one at a time, so an item is stored at most once:
//!   items at or below the device's high-water mark are acknowledged, not written.
//! - The sink serves plain HTTP/2 gRPC, like the coordinator: TLS is terminated in
//!   front of it (ingress or service mesh). Tickets and item signatures, not the
//!   transport, decide what is stored.
//! - One sink process per directory: high-water marks live in its memory (rebuilt from
//!   file names on start).

use std::net::SocketAddr;
use std::path::PathBuf;

mod server;
mod store;
#[cfg(test)]
mod tests;

pub use server::{MAX_CONCURRENT_STORES, Sink, SinkConfig};
pub use store::{
    Evidence, EvidenceStore, FILE_PREFIX, FILE_SUFFIX, StoreOutcome, file_name, parse_file_name,
    read_device, session_id_of,
};

use crate::recording::{RecordingError, VerifyError};

/// What the sink's store, reader or server failed at.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("evidence directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing evidence file {path}: {source}")]
    Write {
        path: PathBuf,
        source: RecordingError,
    },
    #[error("evidence file {path} FAILED verification: {source}")]
    Verify { path: PathBuf, source: VerifyError },
    #[error("evidence file {path} is not what the sink writes: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the storing task failed: {0}")]
    Task(String),
}
