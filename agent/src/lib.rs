//! Kakehashi agent: the participant side of a remote-support session, as a library
//! (used by the `kakehashi` CLI, the loadtest and the system tests).
//!
//! # Layout
//! - [`host`]: the customer's agent ([`Host`]): joins by code, asks for consent,
//!   enforces grants, streams the screen ([`SyntheticScreen`] for tests and load).
//! - [`viewer`]: the operator's agent ([`Viewer`]): joins with the operator ticket,
//!   shows the screen, asks for permissions, sends input only when granted.
//! - [`consent`]: how answers become grants; the terminal prompt.
//! - [`peer`]: trusting the other participant through its coordinator-signed token.
//! - [`recording`]: the recorder's files: encrypted, hash-chained segments, verify,
//!   playback, retention (`prune`).
//! - [`crypto`]: X25519 + HKDF session keys, AES-256-GCM frame sealing, the SAS.
//! - [`link`]: the QUIC data-plane client ([`RelayLink`]), following
//!   [`kakehashi_proto::dataplane`] exactly.
//! - [`reliable`]: exactly-once delivery across relay moves as plain state machines:
//!   the sender's buffer of unacknowledged frames, the receiver's duplicate filter.
//! - `conduit`: the sending side that outlives relays (seals, keeps, replays, moves
//!   to a new link with the sequence numbers continued).
//! - `resume`: `AgentService.ResumeSession` with retries, and following a peer that
//!   moved the session.
//! - [`device`]: unattended access, the device's side: the Ed25519 device key file,
//!   the signed `PollDevice` loop, joining a pending session without a prompt.
//! - [`monitor`]: telework monitoring, the device's side: snapshots and presence,
//!   signed with the device key, kept in an on-disk ring of the newest 500 snapshots
//!   while offline, uploaded oldest first to the evidence sink.
//! - [`sink`]: the evidence sink: checks monitoring tickets and every item, stores each
//!   upload as a recording before answering, [`sink::read_device`].
//! - [`files`]: file transfer (offer, approval, chunks, SHA-256), either direction.
//! - [`sysinfo`]: the system information a customer may share (Linux first).
//! - [`tls`]: the pinned-certificate verifier and the quinn client configuration.
//! - [`control`]: serde views of sessions and events for the `ctl` command.
//! - [`stats`]: latency percentiles for the viewer's progress line.
//! - `media` (feature `media`, on by default): screen capture (X11), H.264, input
//!   injection behind a control gate, PNG output; not yet wired into host/viewer.
//!
//! # Invariants
//! - Nothing from the network or the user is unwrapped: every failure is an error or
//!   a counted, logged drop.
//! - The host sends no screen without VIEW (nor while the customer has paused
//!   sharing), obeys no input without CONTROL in a control session, shares system
//!   information only with SYSTEM_INFO and files only with FILE_TRANSFER and the
//!   customer's approval of each, by the same [`kakehashi_proto::policy::may_forward`]
//!   rule the relay applies.
//! - The host writes nothing to disk: keys, tokens and received files live in memory.
//!   The one exception is `kakehashi device init`, which writes the device key (0600).
//!   (The recorder and `device monitor` are not the host: they write recordings and
//!   the monitor's spool.)
//! - Every task is owned (a `JoinSet` in the object that started it); dropping a
//!   [`Host`], [`Viewer`] or [`RelayLink`] stops its tasks and leaves the session.
//! - A relay loss costs a pause, never a reliable byte: input, control, chat and file
//!   frames are kept until the peer acknowledges them, replayed on the next relay, and
//!   delivered exactly once, in order. Sequence numbers (the AEAD nonces) continue
//!   across relays and never repeat under one key.

mod conduit;
pub mod consent;
pub mod control;
pub mod crypto;
pub mod device;
pub mod error;
pub mod files;
pub mod host;
pub mod link;
#[cfg(feature = "media")]
pub mod media;
pub mod monitor;
pub mod peer;
pub mod recording;
pub mod reliable;
mod resume;
pub mod sink;
pub mod stats;
pub mod sysinfo;
pub mod tls;
pub mod viewer;

pub use consent::Consent;
pub use error::AgentError;
pub use host::{Host, HostConfig, HostEvent, HostOptions, SyntheticScreen};
pub use link::{LinkError, RelayLink};
pub use viewer::{Viewer, ViewerConfig, ViewerEvent};
