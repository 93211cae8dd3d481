//! Tokens and join responses signed here in the coordinator's format, so participants
//! can be started without a coordinator.

use anyhow::Result;
use ed25519_dalek::SigningKey;
use kakehashi_agent::crypto::Keypair;
use kakehashi_agent::peer::Joined;
use kakehashi_proto::token::{Claims, Role};
use kakehashi_proto::{Mode, Permissions, SessionId, pb};

pub fn signing_key() -> SigningKey {
    SigningKey::from_bytes(&[11; 32])
}

pub fn session_id() -> SessionId {
    SessionId::from_bytes([4; 16])
}

/// A verified join for `role`: host tokens carry participant 1, viewer tokens 2.
pub fn joined(me: &Keypair, role: Role, mode: Mode, relay: &pb::RelayEndpoint) -> Result<Joined> {
    let now = kakehashi_proto::unix_now();
    let permissions = Permissions::VIEW | Permissions::CONTROL;
    let token = Claims {
        role,
        mode,
        session_id: session_id(),
        participant_id: if role == Role::Host { 1 } else { 2 },
        issued_at: now,
        expires_at: now + 600,
        session_deadline: now + 3600,
        permissions,
        public_key: me.public_bytes(),
        relay_id: relay.relay_id.clone(),
    }
    .sign(&signing_key());
    let resp = pb::JoinResponse {
        session: Some(pb::Session {
            session_id: session_id().to_string(),
            mode: mode.to_pb() as i32,
            permissions: permissions.bits(),
            relay: Some(relay.clone()),
            ..Default::default()
        }),
        token,
        relay: Some(relay.clone()),
        coordinator_public_key: signing_key().verifying_key().to_bytes().to_vec(),
    };
    Ok(Joined::from_response("Test", resp, me, role)?)
}
