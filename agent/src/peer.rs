//! Trusting the other participant: its token must carry the coordinator's signature,
//! name this session and the expected role; its public key then gives the session keys.

use ed25519_dalek::VerifyingKey;
use kakehashi_proto::token::{self, Claims, Role};
use kakehashi_proto::{Channel, Frame, SessionId, pb};

use crate::crypto::{Keypair, SessionKeys, Side};
use crate::error::AgentError;

/// What a participant learned from the coordinator when it joined.
#[derive(Debug, Clone)]
pub struct Joined {
    pub session: pb::Session,
    pub session_id: SessionId,
    pub token: Vec<u8>,
    pub relay: pb::RelayEndpoint,
    pub coordinator_key: VerifyingKey,
    /// This participant's own claims, verified like a peer's.
    pub claims: Claims,
}

impl Joined {
    /// Checks a `JoinResponse` and this participant's own token in it.
    pub fn from_response(
        call: &'static str,
        resp: pb::JoinResponse,
        me: &Keypair,
        role: Role,
    ) -> Result<Self, AgentError> {
        let bad = |what| AgentError::BadResponse { call, what };
        let key: [u8; 32] = resp
            .coordinator_public_key
            .as_slice()
            .try_into()
            .map_err(|_| bad("coordinator_public_key is not 32 bytes"))?;
        let coordinator_key =
            VerifyingKey::from_bytes(&key).map_err(|_| bad("coordinator_public_key is invalid"))?;
        let session = resp.session.ok_or(bad("no session"))?;
        let relay = resp.relay.ok_or(bad("no relay endpoint"))?;
        let session_id: SessionId = session.session_id.parse().map_err(AgentError::SessionId)?;
        let claims = token::verify(&resp.token, &coordinator_key, kakehashi_proto::unix_now())
            .map_err(AgentError::OwnToken)?;
        claims
            .expect_session(&session_id)
            .and_then(|()| claims.expect_role(&[role]))
            .map_err(AgentError::OwnToken)?;
        if claims.public_key != me.public_bytes() {
            return Err(bad("token does not carry this participant's public key"));
        }
        Ok(Self {
            session,
            session_id,
            token: resp.token,
            relay,
            coordinator_key,
            claims,
        })
    }
}

/// A verified peer and the keys shared with it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub participant_id: u64,
    /// What its token says it is (viewer or supervisor, for a host).
    pub role: Role,
    /// The X25519 key its coordinator-signed token carries. A participant that comes
    /// back after a relay move must present the same one.
    pub public_key: [u8; 32],
    pub keys: SessionKeys,
}

impl Peer {
    pub fn sas(&self) -> &str {
        self.keys.sas()
    }

    /// Tries to open a frame with this peer's keys.
    pub fn open(&self, frame: &Frame) -> Result<Vec<u8>, crate::crypto::CryptoError> {
        self.keys.open(frame)
    }
}

/// Verifies a peer token (signature, expiry, session, one of `expect` roles) and
/// derives the keys.
pub fn accept_peer(
    token_bytes: &[u8],
    joined: &Joined,
    expect: &[Role],
    me: &Keypair,
    my_side: Side,
) -> Result<Peer, AgentError> {
    let claims = token::verify(
        token_bytes,
        &joined.coordinator_key,
        kakehashi_proto::unix_now(),
    )
    .map_err(AgentError::PeerToken)?;
    claims
        .expect_session(&joined.session_id)
        .and_then(|()| claims.expect_role(expect))
        .map_err(AgentError::PeerToken)?;
    let keys = SessionKeys::derive(me, my_side, &claims.public_key, &joined.session_id)?;
    Ok(Peer {
        participant_id: claims.participant_id,
        role: claims.role,
        public_key: claims.public_key,
        keys,
    })
}

/// Decodes an end-to-end payload, naming the channel when it is not the expected message.
pub(crate) fn decode<M: prost::Message + Default>(
    channel: Channel,
    bytes: &[u8],
) -> Result<M, String> {
    M::decode(bytes).map_err(|e| format!("{} payload does not decode: {e}", channel.name()))
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Signed tokens and join responses built without a coordinator.
    use super::*;
    use ed25519_dalek::SigningKey;
    use kakehashi_proto::{Mode, Permissions};

    pub fn signing_key() -> SigningKey {
        SigningKey::from_bytes(&[3; 32])
    }

    pub fn session_id() -> SessionId {
        SessionId::from_bytes([9; 16])
    }

    pub fn token(role: Role, pid: u64, public_key: [u8; 32], mode: Mode) -> Vec<u8> {
        let now = kakehashi_proto::unix_now();
        Claims {
            role,
            mode,
            session_id: session_id(),
            participant_id: pid,
            issued_at: now,
            expires_at: now + 600,
            session_deadline: now + 3600,
            permissions: Permissions::VIEW | Permissions::CONTROL,
            public_key,
            relay_id: "relay-test".into(),
        }
        .sign(&signing_key())
    }

    pub fn joined(me: &Keypair, role: Role, mode: Mode) -> Joined {
        let resp = pb::JoinResponse {
            session: Some(pb::Session {
                session_id: session_id().to_string(),
                mode: mode.to_pb() as i32,
                permissions: (Permissions::VIEW | Permissions::CONTROL).bits(),
                ..Default::default()
            }),
            token: token(role, 1, me.public_bytes(), mode),
            relay: Some(pb::RelayEndpoint::default()),
            coordinator_public_key: signing_key().verifying_key().to_bytes().to_vec(),
        };
        Joined::from_response("Test", resp, me, role).expect("valid join response")
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use kakehashi_proto::Mode;

    #[test]
    fn peers_agree_on_sas_through_tokens() {
        let host = Keypair::generate().expect("random");
        let viewer = Keypair::generate().expect("random");
        let hj = joined(&host, Role::Host, Mode::Control);
        let vj = joined(&viewer, Role::Viewer, Mode::Control);
        let vt = token(Role::Viewer, 2, viewer.public_bytes(), Mode::Control);
        let ht = token(Role::Host, 1, host.public_bytes(), Mode::Control);
        let at_host = accept_peer(&vt, &hj, &[Role::Viewer], &host, Side::Host).expect("viewer ok");
        let at_viewer =
            accept_peer(&ht, &vj, &[Role::Host], &viewer, Side::Viewer).expect("host ok");
        assert_eq!(at_host.participant_id, 2);
        assert_eq!(at_host.sas(), at_viewer.sas());
    }

    #[test]
    fn wrong_role_forged_or_other_session_is_refused() {
        let host = Keypair::generate().expect("random");
        let hj = joined(&host, Role::Host, Mode::Control);
        let other = Keypair::generate().expect("random");
        // A second host token is not a viewer.
        let t = token(Role::Host, 5, other.public_bytes(), Mode::Control);
        assert!(matches!(
            accept_peer(&t, &hj, &[Role::Viewer], &host, Side::Host),
            Err(AgentError::PeerToken(token::TokenError::WrongRole { .. }))
        ));
        // Signed by someone else: a relay cannot mint a key of its own choosing.
        let mut forged = token(Role::Viewer, 5, other.public_bytes(), Mode::Control);
        let n = forged.len();
        forged[n - 70] ^= 1;
        assert!(matches!(
            accept_peer(&forged, &hj, &[Role::Viewer], &host, Side::Host),
            Err(AgentError::PeerToken(_))
        ));
    }

    #[test]
    fn own_token_must_carry_own_key() {
        let me = Keypair::generate().expect("random");
        let someone = Keypair::generate().expect("random");
        let resp = pb::JoinResponse {
            session: Some(pb::Session {
                session_id: session_id().to_string(),
                ..Default::default()
            }),
            token: token(Role::Host, 1, someone.public_bytes(), Mode::View),
            relay: Some(pb::RelayEndpoint::default()),
            coordinator_public_key: signing_key().verifying_key().to_bytes().to_vec(),
        };
        assert!(matches!(
            Joined::from_response("Test", resp, &me, Role::Host),
            Err(AgentError::BadResponse { .. })
        ));
    }
}
