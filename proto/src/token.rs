//! Coordinator-signed tokens: what lets a relay admit a participant without calling
//! anyone, and what lets participants trust each other's public keys.
//!
//! ```text
//! ver=1 u8 | role u8 | mode u8 | relay_id_len u8 | session_id [16] | participant u64
//! issued_at u64 | expires_at u64 | session_deadline u64 | permissions u32
//! public_key [32] | relay_id [relay_id_len <= 64] | ed25519 signature [64]
//! ```
//! All integers big-endian, times in unix seconds. The signature covers the domain string
//! [`SIGNING_CONTEXT`] followed by every byte before the signature.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::ids::SessionId;
use crate::policy::{Mode, Permissions};

pub const TOKEN_VERSION: u8 = 1;
pub const SIGNING_CONTEXT: &[u8] = b"kakehashi token v1\0";
pub const MAX_RELAY_ID_LEN: usize = 64;
const FIXED_LEN: usize = 4 + 16 + 8 + 8 + 8 + 8 + 4 + 32;
const SIG_LEN: usize = 64;
pub const MAX_TOKEN_LEN: usize = FIXED_LEN + MAX_RELAY_ID_LEN + SIG_LEN;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// The customer's agent: owns the screen, grants permissions.
    Host = 1,
    /// The operator's viewer.
    Viewer = 2,
    /// A recorder participant (joins like a viewer).
    Recorder = 3,
    /// A coordinator acting on a relay (RelayAdmin calls); never attaches over QUIC.
    Coordinator = 4,
    /// A second, watch-only operator: receives the screen once the customer admits it,
    /// sends nothing the relay forwards.
    Supervisor = 5,
}

impl Role {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Role::Host),
            2 => Some(Role::Viewer),
            3 => Some(Role::Recorder),
            4 => Some(Role::Coordinator),
            5 => Some(Role::Supervisor),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Viewer => "viewer",
            Role::Recorder => "recorder",
            Role::Coordinator => "coordinator",
            Role::Supervisor => "supervisor",
        }
    }
}

/// What a token says. Build one, [`Claims::sign`] it, hand the bytes out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub role: Role,
    pub mode: Mode,
    pub session_id: SessionId,
    pub participant_id: u64,
    pub issued_at: u64,
    pub expires_at: u64,
    /// The session ends at this instant whatever else happens (its max duration).
    pub session_deadline: u64,
    /// The most this session may ever be granted.
    pub permissions: Permissions,
    /// The participant's X25519 public key (zero for the coordinator role).
    pub public_key: [u8; 32],
    pub relay_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    #[error("token signature is not valid (forged, or signed by another cluster)")]
    BadSignature,
    #[error("token expired at {expired_at} (now {now})")]
    Expired { expired_at: u64, now: u64 },
    #[error("token is for relay {token_relay:?}, this is relay {this_relay:?}")]
    WrongRelay {
        token_relay: String,
        this_relay: String,
    },
    #[error("token is for session {token_session}, not {expected}")]
    WrongSession {
        token_session: SessionId,
        expected: SessionId,
    },
    #[error("token role {got} may not be used here (expected {expected})")]
    WrongRole {
        got: &'static str,
        expected: &'static str,
    },
}

impl Claims {
    pub fn sign(&self, key: &SigningKey) -> Vec<u8> {
        assert!(
            self.relay_id.len() <= MAX_RELAY_ID_LEN,
            "relay ids are bounded when configured"
        );
        let mut out = Vec::with_capacity(MAX_TOKEN_LEN);
        out.push(TOKEN_VERSION);
        out.push(self.role as u8);
        out.push(self.mode as u8);
        out.push(self.relay_id.len() as u8);
        out.extend_from_slice(self.session_id.as_bytes());
        out.extend_from_slice(&self.participant_id.to_be_bytes());
        out.extend_from_slice(&self.issued_at.to_be_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out.extend_from_slice(&self.session_deadline.to_be_bytes());
        out.extend_from_slice(&self.permissions.bits().to_be_bytes());
        out.extend_from_slice(&self.public_key);
        out.extend_from_slice(self.relay_id.as_bytes());
        let sig = key.sign(&signed_message(&out));
        out.extend_from_slice(&sig.to_bytes());
        out
    }

    /// Parses without checking the signature. Only for display and tests; everything
    /// that trusts a token calls [`verify`].
    pub fn decode_unverified(bytes: &[u8]) -> Result<(Self, &[u8], [u8; SIG_LEN]), TokenError> {
        if bytes.len() < FIXED_LEN + SIG_LEN {
            return Err(TokenError::Malformed("shorter than the fixed fields"));
        }
        if bytes.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("longer than any valid token"));
        }
        if bytes[0] != TOKEN_VERSION {
            return Err(TokenError::Malformed("unsupported token version"));
        }
        let role = Role::from_u8(bytes[1]).ok_or(TokenError::Malformed("unknown role"))?;
        let mode = Mode::from_u8(bytes[2]).ok_or(TokenError::Malformed("unknown mode"))?;
        let relay_len = usize::from(bytes[3]);
        if relay_len > MAX_RELAY_ID_LEN || bytes.len() != FIXED_LEN + relay_len + SIG_LEN {
            return Err(TokenError::Malformed(
                "length does not match relay id length",
            ));
        }
        let mut r = Reader(&bytes[4..]);
        let session_id = SessionId::from_bytes(r.array::<16>());
        let participant_id = u64::from_be_bytes(r.array());
        let issued_at = u64::from_be_bytes(r.array());
        let expires_at = u64::from_be_bytes(r.array());
        let session_deadline = u64::from_be_bytes(r.array());
        let permissions = Permissions::from_bits(u32::from_be_bytes(r.array()))
            .ok_or(TokenError::Malformed("unknown permission bits"))?;
        let public_key = r.array::<32>();
        let relay_id = std::str::from_utf8(r.take(relay_len))
            .map_err(|_| TokenError::Malformed("relay id is not UTF-8"))?
            .to_owned();
        let signature = r.array::<SIG_LEN>();
        let body = &bytes[..bytes.len() - SIG_LEN];
        Ok((
            Self {
                role,
                mode,
                session_id,
                participant_id,
                issued_at,
                expires_at,
                session_deadline,
                permissions,
                public_key,
                relay_id,
            },
            body,
            signature,
        ))
    }
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + body.len());
    msg.extend_from_slice(SIGNING_CONTEXT);
    msg.extend_from_slice(body);
    msg
}

/// Checks the signature and expiry. Callers then check relay, session and role with the
/// `expect_*` helpers, which produce the precise refusal reason.
pub fn verify(bytes: &[u8], key: &VerifyingKey, now_unix: u64) -> Result<Claims, TokenError> {
    let (claims, body, sig) = Claims::decode_unverified(bytes)?;
    key.verify_strict(&signed_message(body), &Signature::from_bytes(&sig))
        .map_err(|_| TokenError::BadSignature)?;
    if now_unix >= claims.expires_at {
        return Err(TokenError::Expired {
            expired_at: claims.expires_at,
            now: now_unix,
        });
    }
    Ok(claims)
}

impl Claims {
    pub fn expect_relay(&self, this_relay: &str) -> Result<(), TokenError> {
        if self.relay_id != this_relay {
            return Err(TokenError::WrongRelay {
                token_relay: self.relay_id.clone(),
                this_relay: this_relay.to_owned(),
            });
        }
        Ok(())
    }

    pub fn expect_session(&self, expected: &SessionId) -> Result<(), TokenError> {
        if &self.session_id != expected {
            return Err(TokenError::WrongSession {
                token_session: self.session_id,
                expected: *expected,
            });
        }
        Ok(())
    }

    pub fn expect_role(&self, allowed: &[Role]) -> Result<(), TokenError> {
        if !allowed.contains(&self.role) {
            return Err(TokenError::WrongRole {
                got: self.role.name(),
                expected: allowed.first().map_or("none", |r| r.name()),
            });
        }
        Ok(())
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    // Lengths were checked against the whole token before any read.
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        self.take(N).try_into().expect("length checked")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn claims() -> Claims {
        Claims {
            role: Role::Host,
            mode: Mode::Control,
            session_id: SessionId::from_bytes([7; 16]),
            participant_id: 42,
            issued_at: 1_000,
            expires_at: 2_000,
            session_deadline: 3_000,
            permissions: Permissions::VIEW | Permissions::CONTROL,
            public_key: [9; 32],
            relay_id: "relay-a".into(),
        }
    }

    #[test]
    fn roundtrip_and_checks() {
        let k = key(1);
        let t = claims().sign(&k);
        let got = verify(&t, &k.verifying_key(), 1_500).expect("valid");
        assert_eq!(got, claims());
        assert!(got.expect_relay("relay-a").is_ok());
        assert!(matches!(
            got.expect_relay("relay-b"),
            Err(TokenError::WrongRelay { .. })
        ));
        assert!(matches!(
            got.expect_session(&SessionId::from_bytes([8; 16])),
            Err(TokenError::WrongSession { .. })
        ));
        assert!(matches!(
            got.expect_role(&[Role::Viewer]),
            Err(TokenError::WrongRole { .. })
        ));
    }

    #[test]
    fn forged_and_expired_are_refused() {
        let t = claims().sign(&key(1));
        assert_eq!(
            verify(&t, &key(2).verifying_key(), 1_500),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verify(&t, &key(1).verifying_key(), 2_000),
            Err(TokenError::Expired {
                expired_at: 2_000,
                now: 2_000
            })
        );
        // Flip one bit anywhere in the body: the signature no longer matches.
        for i in 0..t.len() - SIG_LEN {
            let mut bad = t.clone();
            bad[i] ^= 0x10;
            assert!(
                verify(&bad, &key(1).verifying_key(), 1_500).is_err(),
                "byte {i}"
            );
        }
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = verify(&data, &key(1).verifying_key(), 0);
        }

        #[test]
        fn any_relay_id_roundtrips(relay in "[a-z0-9-]{0,64}", pid in any::<u64>()) {
            let c = Claims { relay_id: relay, participant_id: pid, ..claims() };
            let k = key(3);
            prop_assert_eq!(verify(&c.sign(&k), &k.verifying_key(), 0), Ok(c));
        }
    }
}
