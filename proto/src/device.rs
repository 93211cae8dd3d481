//! What an enrolled device signs to ask the coordinator for sessions waiting for it
//! (`AgentService.PollDevice`): one definition for the agent that signs and the
//! coordinator that checks.
//!
//! ```text
//! message = PROOF_DOMAIN || device id (hex, ASCII) || 0 || timestamp (i64 BE, unix ms)
//! device id = hex of the first 16 bytes of SHA-256(Ed25519 public key)
//! ```

use sha2::{Digest, Sha256};

/// Domain separation: a poll signature is good for nothing else.
pub const PROOF_DOMAIN: &[u8] = b"kakehashi-device-poll-v1\0";
/// Hex digits of a device id (16 bytes of SHA-256 of the public key).
pub const DEVICE_ID_HEX: usize = 32;

/// The device id a public key gives.
pub fn device_id_of(public_key: &[u8; 32]) -> String {
    hex::encode(&Sha256::digest(public_key)[..DEVICE_ID_HEX / 2])
}

/// What a device signs to poll at `timestamp_ms`.
pub fn proof_message(device_id: &str, timestamp_ms: i64) -> Vec<u8> {
    proof_message_in(PROOF_DOMAIN, device_id, timestamp_ms)
}

/// The same proof under another domain (e.g. [`crate::monitor::TICKET_PROOF_DOMAIN`]),
/// so a signature made for one request is good for no other.
pub fn proof_message_in(domain: &[u8], device_id: &str, timestamp_ms: i64) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.len() + device_id.len() + 9);
    m.extend_from_slice(domain);
    m.extend_from_slice(device_id.as_bytes());
    m.push(0);
    m.extend_from_slice(&timestamp_ms.to_be_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proof_message_layout_is_fixed() {
        let m = proof_message("00ff", 0x0102_0304_0506_0708);
        assert_eq!(
            hex::encode(m),
            "6b616b6568617368692d6465766963652d706f6c6c2d76310030306666000102030405060708"
        );
        assert_eq!(device_id_of(&[0; 32]).len(), DEVICE_ID_HEX);
    }
}
