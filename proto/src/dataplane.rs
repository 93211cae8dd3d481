//! The data-plane protocol between a participant (agent) and a relay, over QUIC.
//!
//! 1. **Connect.** The agent dials the relay's `address` from the `RelayEndpoint` the
//!    coordinator returned, ALPN [`ALPN`], TLS 1.3, SNI `server_name`, and accepts the
//!    relay's certificate only if its DER SHA-256 equals `cert_sha256` (pinning, with the
//!    handshake signature still verified).
//! 2. **Attach.** The agent opens one bidirectional stream, the *signal stream*, and
//!    writes `Signal` frames on it ([`Channel::Signal`], payload a `pb::Signal`). The first
//!    is `Hello { token, session_id }`. The relay answers `Welcome { participant_id,
//!    granted, peer_tokens }`, or closes the connection with [`close::REFUSED`] and a
//!    reason naming what was wrong (the [`crate::TokenError`] text). A session holds
//!    one host, one viewer (the operator) and any number of supervisors and recorders
//!    up to the relay's participant limit: a second host or viewer is refused (a
//!    reconnect of the same participant id replaces its old connection). Supervisors
//!    and recorders only receive: the relay forwards nothing they send, and a
//!    `Hangup` from one of them is its own leaving, not the session's end.
//! 3. **Signals, relay → participant:** `PeerJoined { token }` (check its signature and
//!    key before trusting it), `PeerLeft`, `GrantsChanged`, `KeyFrameRequest` (host only),
//!    `SessionEnded { reason }` — after which the relay closes with [`close::ENDED`].
//!    **Participant → relay:** `Grant { granted }` (host only; the full set, capped by
//!    the session), `Hangup { reason }`. A revoke is a `Grant` with less in it and
//!    takes effect at the relay with the next frame it reads; the host counts it done
//!    when the relay's `GrantsChanged` echoes the new set (one round trip). **Pause**
//!    is the same signal: `granted` carries [`crate::Permissions::PAUSED`]
//!    (`PERMISSION_FLAG_PAUSED`) while the customer has paused sharing, the relay then
//!    drops every screen frame, and `GrantsChanged` tells the viewer "paused" /
//!    "resumed".
//! 4. **Data.** For each channel it sends on, a participant opens one unidirectional
//!    stream and writes frames of that channel only, in order. The relay opens one
//!    unidirectional stream per channel towards each participant it forwards to, on the
//!    first frame for it. Frame headers are forwarded unchanged. The host's frames go
//!    to every other participant (the same bytes to each: the host seals a screen frame
//!    once under a group key, see `ScreenFrame.group_key`); recorders get them only
//!    while RECORDING is granted. Everyone else's frames go to the host only.
//! 5. **Sequence numbers** start at 1 per (sender, channel) and increase by one; with the
//!    channel they form the AEAD nonce, so they never repeat under one key.
//! 6. **Resume.** Senders keep frames of replayed channels ([`Channel::is_replayed`])
//!    until the peer acks them on the [`Channel::Ack`] channel (cumulative, end-to-end
//!    encrypted). After losing a relay, or on `Drain`, a participant calls
//!    `AgentService.ResumeSession`, attaches to the relay it is given with the new token,
//!    keeps its keys and sequence numbers, and replays what is unacked; receivers drop
//!    any sequence number they already delivered, so nothing is lost or duplicated.
//! 7. **Policy.** The relay forwards a data frame only if
//!    [`crate::policy::may_forward`] allows it; otherwise it drops and counts it. A
//!    malformed frame closes the sender's connection with [`close::PROTOCOL`]. Per
//!    channel: screen (host, VIEW, not paused), input (viewer, control session and
//!    CONTROL), pointer (viewer, VIEW: allowed in view-only sessions), control and chat
//!    (either, always: permission requests, consent answers, keyboard display and the
//!    view-only system summary travel as end-to-end `ControlMessage`s), file (either,
//!    FILE_TRANSFER), system info (host, SYSTEM_INFO).

use bytes::Bytes;
use prost::Message;

use crate::frame::{Channel, Frame, FrameHeader};
use crate::pb;

/// ALPN protocol id of the data plane.
pub const ALPN: &[u8] = b"kakehashi/1";

/// QUIC application close codes used by relays and agents.
pub mod close {
    /// The session ended normally (reason in the last `SessionEnded` signal).
    pub const ENDED: u32 = 0;
    /// The token or hello was refused; the reason string says why.
    pub const REFUSED: u32 = 1;
    /// The peer broke the protocol (malformed frame, wrong channel, oversize).
    pub const PROTOCOL: u32 = 2;
    /// The session's actor failed; only this session is affected.
    pub const SESSION_FAILED: u32 = 3;
    /// The relay is shutting down.
    pub const SHUTDOWN: u32 = 4;
    /// The participant left.
    pub const LEFT: u32 = 5;
}

#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("signal frame arrived on the {0:?} channel")]
    NotSignal(Channel),
    #[error("signal payload is not a valid message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("signal message has no kind")]
    Empty,
}

/// Encodes a signal as a frame. Signals are small and bounded by construction; callers
/// pass only messages they built.
pub fn signal_frame(kind: pb::signal::Kind, seq: u64) -> Frame {
    let payload = pb::Signal { kind: Some(kind) }.encode_to_vec();
    let header = FrameHeader::new(
        Channel::Signal,
        0,
        seq,
        crate::unix_now_us(),
        payload.len() as u32,
    );
    Frame::new(header, &payload)
}

/// Decodes a signal frame's payload.
pub fn decode_signal(frame: &Frame) -> Result<pb::signal::Kind, SignalError> {
    if frame.header.channel != Channel::Signal {
        return Err(SignalError::NotSignal(frame.header.channel));
    }
    pb::Signal::decode(Bytes::copy_from_slice(frame.payload()))?
        .kind
        .ok_or(SignalError::Empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_roundtrip() {
        let f = signal_frame(pb::signal::Kind::Grant(pb::Grant { granted: 3 }), 9);
        assert_eq!(f.header.seq, 9);
        match decode_signal(&f).expect("decodes") {
            pb::signal::Kind::Grant(g) => assert_eq!(g.granted, 3),
            other => panic!("unexpected {other:?}"),
        }
    }
}
