//! Telework monitoring: one definition of what the coordinator signs (the monitoring
//! ticket), what a device signs (each evidence item) and what the evidence sink accepts
//! (its limits), for the three processes that build or check them.
//!
//! ```text
//! ticket  ver=1 u8 | device id [16] | device public key [32] | issued_at u64
//!         | expires_at u64 | tenant_len u8 | tenant [tenant_len <= 64]
//!         | Ed25519 signature [64] by the coordinator's token key over
//!           TICKET_DOMAIN || every byte before the signature
//! item    Ed25519 by the device key over
//!         ITEM_DOMAIN || device id (hex, ASCII) || 0 || seq u64 || captured_at i64
//!         || body kind u8 (1 presence, 2 snapshot) || SHA-256 of the body fields
//! ```
//!
//! All integers big-endian, ticket times in unix seconds. The body digest covers, for
//! a presence, state u32 || idle_secs u32 || offline_secs u32 || detail; for a
//! snapshot, width u32 || height u32 || format (u16 len + bytes) || SHA-256(data). So
//! the signature does not depend on how protobuf happened to encode the item.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::pb;

/// Domain of the proof a device signs to ask for a ticket
/// ([`crate::device::proof_message_in`]).
pub const TICKET_PROOF_DOMAIN: &[u8] = b"kakehashi-device-monitor-v1\0";
/// Domain of the coordinator's signature on a ticket.
pub const TICKET_DOMAIN: &[u8] = b"kakehashi monitor ticket v1\0";
/// Domain of a device's signature on an evidence item.
pub const ITEM_DOMAIN: &[u8] = b"kakehashi evidence item v1\0";

pub const TICKET_VERSION: u8 = 1;
pub const MAX_TENANT_LEN: usize = 64;
const FIXED_LEN: usize = 1 + 16 + 32 + 8 + 8 + 1;
const SIG_LEN: usize = 64;
pub const MAX_TICKET_LEN: usize = FIXED_LEN + MAX_TENANT_LEN + SIG_LEN;

/// The sink's limits on one upload.
pub const MAX_ITEMS_PER_UPLOAD: usize = 64;
/// A snapshot's largest picture: bigger screens are scaled down to fit.
pub const MAX_SNAPSHOT_WIDTH: u32 = 1920;
pub const MAX_SNAPSHOT_HEIGHT: u32 = 1080;
/// A snapshot's encoded bytes.
pub const MAX_SNAPSHOT_BYTES: usize = 4 * 1024 * 1024;
/// A presence event's free text.
pub const MAX_PRESENCE_DETAIL: usize = 256;
/// The largest upload request the sink decodes (a full upload of the largest
/// snapshots is refused by item count first; devices send fewer, larger ones).
pub const MAX_UPLOAD_BYTES: usize = 24 * 1024 * 1024;
/// How many snapshots a device keeps while it cannot reach the sink; the oldest is
/// overwritten first.
pub const OFFLINE_BUFFER_SNAPSHOTS: usize = 500;
/// The only snapshot encoding so far.
pub const SNAPSHOT_FORMAT_PNG: &str = "png";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("monitoring ticket is malformed: {0}")]
    Malformed(&'static str),
    #[error("monitoring ticket version {0} is not supported")]
    Version(u8),
    #[error("monitoring ticket signature is not the coordinator's")]
    Signature,
    #[error("monitoring ticket expired at {expires_at} (now {now})")]
    Expired { expires_at: u64, now: u64 },
    #[error("monitoring ticket is for device {ticket}, not {claimed}")]
    WrongDevice { ticket: String, claimed: String },
}

/// What a monitoring ticket says: this device (with this key) of this tenant may upload
/// evidence until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorTicket {
    /// Hex, [`crate::device::DEVICE_ID_HEX`] digits.
    pub device_id: String,
    pub public_key: [u8; 32],
    pub tenant: String,
    pub issued_at: u64,
    pub expires_at: u64,
}

impl MonitorTicket {
    /// Signs the ticket. `device_id` must be the hex of 16 bytes and the tenant at most
    /// [`MAX_TENANT_LEN`] bytes.
    pub fn sign(&self, key: &SigningKey) -> Result<Vec<u8>, TicketError> {
        let id = hex::decode(&self.device_id)
            .ok()
            .filter(|b| b.len() == 16)
            .ok_or(TicketError::Malformed("device id is not 32 hex digits"))?;
        if self.tenant.len() > MAX_TENANT_LEN {
            return Err(TicketError::Malformed("tenant is longer than 64 bytes"));
        }
        let mut out = Vec::with_capacity(FIXED_LEN + self.tenant.len() + SIG_LEN);
        out.push(TICKET_VERSION);
        out.extend_from_slice(&id);
        out.extend_from_slice(&self.public_key);
        out.extend_from_slice(&self.issued_at.to_be_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out.push(self.tenant.len() as u8);
        out.extend_from_slice(self.tenant.as_bytes());
        let sig = key.sign(&signed_bytes(TICKET_DOMAIN, &out));
        out.extend_from_slice(&sig.to_bytes());
        Ok(out)
    }

    /// Checks the coordinator's signature and the expiry against `now` (unix seconds).
    pub fn verify(bytes: &[u8], key: &VerifyingKey, now: u64) -> Result<Self, TicketError> {
        if bytes.len() > MAX_TICKET_LEN {
            return Err(TicketError::Malformed("longer than any ticket"));
        }
        if bytes.len() < FIXED_LEN + SIG_LEN {
            return Err(TicketError::Malformed("shorter than any ticket"));
        }
        if bytes[0] != TICKET_VERSION {
            return Err(TicketError::Version(bytes[0]));
        }
        let tenant_len = bytes[FIXED_LEN - 1] as usize;
        if tenant_len > MAX_TENANT_LEN || bytes.len() != FIXED_LEN + tenant_len + SIG_LEN {
            return Err(TicketError::Malformed("tenant length does not match"));
        }
        let (body, sig) = bytes.split_at(FIXED_LEN + tenant_len);
        let sig = Signature::from_slice(sig).map_err(|_| TicketError::Signature)?;
        key.verify_strict(&signed_bytes(TICKET_DOMAIN, body), &sig)
            .map_err(|_| TicketError::Signature)?;
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[i..i + 8]);
            u64::from_be_bytes(b)
        };
        let mut public_key = [0u8; 32];
        public_key.copy_from_slice(&body[17..49]);
        let tenant = std::str::from_utf8(&body[FIXED_LEN..])
            .map_err(|_| TicketError::Malformed("tenant is not UTF-8"))?
            .to_owned();
        let ticket = Self {
            device_id: hex::encode(&body[1..17]),
            public_key,
            tenant,
            issued_at: u64_at(49),
            expires_at: u64_at(57),
        };
        if now >= ticket.expires_at {
            return Err(TicketError::Expired {
                expires_at: ticket.expires_at,
                now,
            });
        }
        Ok(ticket)
    }
}

fn signed_bytes(domain: &[u8], body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.len() + body.len());
    m.extend_from_slice(domain);
    m.extend_from_slice(body);
    m
}

/// What a device signs for `item` (its `signature` field is not read). `None` for an
/// item without a body: there is nothing to sign.
pub fn item_message(device_id: &str, item: &pb::EvidenceItem) -> Option<Vec<u8>> {
    use pb::evidence_item::Body;
    let mut h = Sha256::new();
    let kind = match item.body.as_ref()? {
        Body::Presence(p) => {
            h.update(p.state.to_be_bytes());
            h.update(p.idle_secs.to_be_bytes());
            h.update(p.offline_secs.to_be_bytes());
            h.update(p.detail.as_bytes());
            1u8
        }
        Body::Snapshot(s) => {
            h.update(s.width.to_be_bytes());
            h.update(s.height.to_be_bytes());
            h.update((s.format.len().min(u16::MAX as usize) as u16).to_be_bytes());
            h.update(s.format.as_bytes());
            h.update(Sha256::digest(&s.data));
            2u8
        }
    };
    let mut m = Vec::with_capacity(ITEM_DOMAIN.len() + device_id.len() + 1 + 17 + 32);
    m.extend_from_slice(ITEM_DOMAIN);
    m.extend_from_slice(device_id.as_bytes());
    m.push(0);
    m.extend_from_slice(&item.seq.to_be_bytes());
    m.extend_from_slice(&item.captured_at_unix_ms.to_be_bytes());
    m.push(kind);
    m.extend_from_slice(&h.finalize());
    Some(m)
}

/// Signs `item` in place with the device key.
pub fn sign_item(device_id: &str, key: &SigningKey, item: &mut pb::EvidenceItem) {
    item.signature = match item_message(device_id, item) {
        Some(m) => key.sign(&m).to_bytes().to_vec(),
        None => Vec::new(),
    };
}

/// Why the sink refuses an item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemError {
    #[error("item {seq} has no body")]
    NoBody { seq: u64 },
    #[error("item {seq}: the device's signature does not verify")]
    Signature { seq: u64 },
    #[error("item {seq}: snapshot is {width}x{height}; the most is 1920x1080")]
    TooLarge { seq: u64, width: u32, height: u32 },
    #[error("item {seq}: snapshot holds {len} bytes; the most is {MAX_SNAPSHOT_BYTES}")]
    TooManyBytes { seq: u64, len: usize },
    #[error("item {seq}: snapshot format {format:?} is not \"png\"")]
    Format { seq: u64, format: String },
    #[error("item {seq}: presence detail holds {len} bytes; the most is {MAX_PRESENCE_DETAIL}")]
    Detail { seq: u64, len: usize },
    #[error("item {seq}: presence state {state} is not one this sink knows")]
    State { seq: u64, state: i32 },
}

/// Checks one item's limits and its signature by the ticket's device key.
pub fn check_item(ticket: &MonitorTicket, item: &pb::EvidenceItem) -> Result<(), ItemError> {
    use pb::evidence_item::Body;
    let seq = item.seq;
    match item.body.as_ref() {
        None => return Err(ItemError::NoBody { seq }),
        Some(Body::Presence(p)) => {
            if p.detail.len() > MAX_PRESENCE_DETAIL {
                return Err(ItemError::Detail {
                    seq,
                    len: p.detail.len(),
                });
            }
            match pb::PresenceState::try_from(p.state) {
                Ok(s) if s != pb::PresenceState::Unspecified => {}
                _ => {
                    return Err(ItemError::State {
                        seq,
                        state: p.state,
                    });
                }
            }
        }
        Some(Body::Snapshot(s)) => {
            if s.width == 0
                || s.height == 0
                || s.width > MAX_SNAPSHOT_WIDTH
                || s.height > MAX_SNAPSHOT_HEIGHT
            {
                return Err(ItemError::TooLarge {
                    seq,
                    width: s.width,
                    height: s.height,
                });
            }
            if s.data.len() > MAX_SNAPSHOT_BYTES {
                return Err(ItemError::TooManyBytes {
                    seq,
                    len: s.data.len(),
                });
            }
            if s.format != SNAPSHOT_FORMAT_PNG {
                return Err(ItemError::Format {
                    seq,
                    format: s.format.chars().take(16).collect(),
                });
            }
        }
    }
    let message = item_message(&ticket.device_id, item).ok_or(ItemError::NoBody { seq })?;
    let sig = Signature::from_slice(&item.signature).map_err(|_| ItemError::Signature { seq })?;
    VerifyingKey::from_bytes(&ticket.public_key)
        .and_then(|k| k.verify(&message, &sig))
        .map_err(|_| ItemError::Signature { seq })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::device_id_of;

    fn keys() -> (SigningKey, SigningKey) {
        (
            SigningKey::from_bytes(&[7; 32]),
            SigningKey::from_bytes(&[9; 32]),
        )
    }

    fn ticket(device: &SigningKey) -> MonitorTicket {
        let public_key = device.verifying_key().to_bytes();
        MonitorTicket {
            device_id: device_id_of(&public_key),
            public_key,
            tenant: "acme".into(),
            issued_at: 1000,
            expires_at: 2000,
        }
    }

    fn snapshot(seq: u64) -> pb::EvidenceItem {
        pb::EvidenceItem {
            seq,
            captured_at_unix_ms: 1_700_000_000_000,
            body: Some(pb::evidence_item::Body::Snapshot(pb::Snapshot {
                width: 1920,
                height: 1080,
                format: "png".into(),
                data: vec![1, 2, 3],
            })),
            signature: Vec::new(),
        }
    }

    #[test]
    fn a_ticket_round_trips_and_every_byte_is_covered() {
        let (coord, device) = keys();
        let t = ticket(&device);
        let bytes = t.sign(&coord).unwrap();
        assert_eq!(
            MonitorTicket::verify(&bytes, &coord.verifying_key(), 1500),
            Ok(t.clone())
        );
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert!(
                MonitorTicket::verify(&b, &coord.verifying_key(), 1500).is_err(),
                "byte {i} flipped still verifies"
            );
        }
        assert_eq!(
            MonitorTicket::verify(&bytes, &device.verifying_key(), 1500),
            Err(TicketError::Signature)
        );
        assert_eq!(
            MonitorTicket::verify(&bytes, &coord.verifying_key(), 2000),
            Err(TicketError::Expired {
                expires_at: 2000,
                now: 2000
            })
        );
        assert!(MonitorTicket::verify(&bytes[..10], &coord.verifying_key(), 1500).is_err());
    }

    #[test]
    fn an_item_verifies_only_as_signed_and_within_limits() {
        let (_, device) = keys();
        let t = ticket(&device);
        let mut item = snapshot(5);
        sign_item(&t.device_id, &device, &mut item);
        assert_eq!(check_item(&t, &item), Ok(()));

        let mut other = item.clone();
        other.seq = 6;
        assert_eq!(check_item(&t, &other), Err(ItemError::Signature { seq: 6 }));
        let mut other = item.clone();
        if let Some(pb::evidence_item::Body::Snapshot(s)) = other.body.as_mut() {
            s.data[0] ^= 1;
        }
        assert_eq!(check_item(&t, &other), Err(ItemError::Signature { seq: 5 }));

        let mut big = snapshot(7);
        if let Some(pb::evidence_item::Body::Snapshot(s)) = big.body.as_mut() {
            s.width = 1921;
        }
        sign_item(&t.device_id, &device, &mut big);
        assert!(matches!(
            check_item(&t, &big),
            Err(ItemError::TooLarge { seq: 7, .. })
        ));

        let mut presence = pb::EvidenceItem {
            seq: 8,
            captured_at_unix_ms: 1,
            body: Some(pb::evidence_item::Body::Presence(pb::Presence {
                state: pb::PresenceState::Idle as i32,
                idle_secs: 300,
                offline_secs: 0,
                detail: String::new(),
            })),
            signature: Vec::new(),
        };
        sign_item(&t.device_id, &device, &mut presence);
        assert_eq!(check_item(&t, &presence), Ok(()));
    }
}
