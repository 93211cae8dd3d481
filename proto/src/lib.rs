//! The Kakehashi wire contract. Every byte that crosses a process boundary is defined
//! here and nowhere else.
//!
//! # Layout
//! - [`pb`]: generated from `proto/kakehashi/v1/kakehashi.proto`: the gRPC services
//!   (`SessionService` for call-center software, `AgentService` for agents, `RelayAdmin`
//!   for coordinators) and the messages carried inside data-plane frames.
//! - [`dataplane`]: the participant <-> relay protocol over QUIC (read this first).
//! - [`frame`]: the 24-byte data-plane frame header and its codec.
//! - [`token`]: coordinator-signed Ed25519 tokens that relays verify offline.
//! - [`policy`]: modes, permissions and the consent rule deciding which frame may pass.
//! - [`ids`]: session identifiers.
//! - [`device`]: the proof an enrolled device signs (unattended access, monitoring).
//! - [`monitor`]: telework monitoring: the coordinator's monitoring ticket, what a
//!   device signs for each evidence item, the sink's limits.
//! - [`membership`]: the etcd key layout of relay registrations and the leader election.
//! - `otel` (feature `otel`): OTLP export and the session trace every server derives from
//!   the session id.
//!
//! # Invariants
//! - Decoding never panics and never allocates past a bound fixed before reading.
//! - Only `Signal` frames are plaintext; every other payload is end-to-end ciphertext.

pub mod dataplane;
pub mod device;
pub mod frame;
pub mod ids;
pub mod membership;
pub mod monitor;
#[cfg(feature = "otel")]
pub mod otel;
pub mod policy;
pub mod token;

/// Generated protobuf and gRPC types (`kakehashi.v1`).
#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("kakehashi.v1");

    /// The encoded `FileDescriptorSet` of every `.proto` file above (for gRPC server
    /// reflection, so tools such as `grpcurl` work without the files).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/kakehashi_descriptor.bin"));
}

pub use frame::{Channel, Frame, FrameDecoder, FrameError, FrameHeader};
pub use ids::SessionId;
pub use policy::{Mode, Permissions};
pub use token::{Claims, Role, TokenError};

/// Seconds since the unix epoch, from the system clock.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Microseconds since the unix epoch, from the system clock (frame timestamps).
pub fn unix_now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
