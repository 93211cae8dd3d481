//! The gRPC services and the shared core they call.
//!
//! [`Core`] holds the configuration, backends and signing key, and implements each
//! operation as a method returning [`ApiError`]; the tonic trait impls in `session` and
//! `agent` only convert requests and classify errors.

pub mod admin;
pub mod agent;
pub mod session;

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use kakehashi_proto::token::{Claims, MAX_RELAY_ID_LEN, Role};
use kakehashi_proto::{SessionId, pb};
use tokio_util::sync::CancellationToken;

use crate::backend::sessions::SessionRecord;
use crate::config::{Backends, CoordinatorConfig};
use crate::error::ApiError;
use crate::random;
use crate::telemetry;

/// How often a compare-and-swap update is retried before giving up.
const CAS_ATTEMPTS: u32 = 16;
/// Budget for one RelayAdmin call, connection included.
pub const RELAY_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Lifetime of the coordinator-role token sent with a RelayAdmin call.
const ADMIN_TOKEN_SECS: u64 = 60;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// State shared by every request handler and the reaper.
pub struct Core {
    pub config: CoordinatorConfig,
    pub backends: Backends,
    /// Cancelled at shutdown; open watch streams end with it.
    pub shutdown: CancellationToken,
}

impl Core {
    pub fn new(
        config: CoordinatorConfig,
        backends: Backends,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            backends,
            shutdown,
        })
    }

    fn signing_key(&self) -> &SigningKey {
        &self.config.signing_key
    }

    pub async fn get(&self, id: SessionId) -> Result<SessionRecord, ApiError> {
        self.backends
            .sessions
            .get(id)
            .await?
            .ok_or(ApiError::SessionNotFound(id))
    }

    /// Reads, changes and writes a record with compare-and-swap, retrying on races.
    /// `change` may refuse by returning an error; it may run more than once.
    pub async fn modify<F>(&self, id: SessionId, mut change: F) -> Result<SessionRecord, ApiError>
    where
        F: FnMut(&mut SessionRecord) -> Result<(), ApiError>,
    {
        for _ in 0..CAS_ATTEMPTS {
            let mut record = self.get(id).await?;
            let expected = record.version;
            change(&mut record)?;
            if self
                .backends
                .sessions
                .compare_and_swap(expected, record.clone())
                .await?
            {
                record.version = expected + 1;
                return Ok(record);
            }
        }
        Err(ApiError::Contention(id))
    }

    /// Appends an event to the session's log, with the actor its kind implies
    /// ([`default_actor`]) and nothing more to say.
    pub async fn publish(
        &self,
        record: &SessionRecord,
        kind: pb::EventKind,
    ) -> Result<pb::SessionEvent, ApiError> {
        self.publish_event(record, EventNote::new(kind, default_actor(kind, record)))
            .await
    }

    /// Appends an event to the session's log: the record gives the granted set and
    /// the end reason, `note` what happened and who did it.
    pub async fn publish_event(
        &self,
        record: &SessionRecord,
        note: EventNote,
    ) -> Result<pb::SessionEvent, ApiError> {
        let kind = note.kind;
        let ended = kind == pb::EventKind::Ended;
        let event = pb::SessionEvent {
            session_id: record.id.to_string(),
            seq: 0,
            at_unix_ms: now_ms(),
            kind: kind as i32,
            granted: record.granted.bits(),
            end_reason: if ended {
                record.end_reason as i32
            } else {
                pb::EndReason::Unspecified as i32
            },
            detail: if ended {
                record.end_detail.clone()
            } else {
                note.detail
            },
            actor: note.actor as i32,
            permissions: note.permissions.bits(),
            remaining_secs: note.remaining_secs,
        };
        Ok(self.backends.events.publish(event).await?)
    }

    /// Ends a live session: marks the record, publishes ENDED, frees its code and its
    /// place on the relay. [`ApiError::SessionEnded`] if it had already ended (exactly
    /// one caller wins a race between ends).
    pub async fn end(
        &self,
        id: SessionId,
        reason: pb::EndReason,
        detail: &str,
    ) -> Result<SessionRecord, ApiError> {
        self.end_by(id, reason, detail, end_actor(reason)).await
    }

    /// [`Core::end`], naming who ended it.
    pub async fn end_by(
        &self,
        id: SessionId,
        reason: pb::EndReason,
        detail: &str,
        actor: pb::EventActor,
    ) -> Result<SessionRecord, ApiError> {
        let record = self
            .modify(id, |r| {
                if r.is_ended() {
                    return Err(ApiError::SessionEnded(id));
                }
                r.state = pb::SessionState::Ended;
                r.ended_at_ms = now_ms();
                r.end_reason = reason;
                r.end_detail = detail.to_owned();
                Ok(())
            })
            .await?;
        metrics::counter!(telemetry::SESSIONS_ENDED, "reason" => end_reason_label(reason))
            .increment(1);
        tracing::info!(session = %id, reason = end_reason_label(reason), "session ended");
        // The record says ended whatever happens next; the follow-ups are best effort and
        // their failures are logged here, where they are handled.
        let note = EventNote::new(pb::EventKind::Ended, actor);
        if let Err(e) = self.publish_event(&record, note).await {
            tracing::warn!(session = %id, error = %e, "could not publish the ENDED event");
        }
        if let Err(e) = self.backends.codes.revoke(&record.code).await {
            tracing::warn!(session = %id, error = %e, "could not revoke the session code");
        }
        if let Err(e) = self.backends.relays.release(&record.relay.relay_id).await {
            tracing::warn!(session = %id, error = %e, "could not release the relay placement");
        }
        Ok(record)
    }

    /// Signs a token for a participant of `record`.
    pub fn issue_token(
        &self,
        record: &SessionRecord,
        role: Role,
        participant_id: u64,
        public_key: [u8; 32],
        expires_at: u64,
    ) -> Result<Vec<u8>, ApiError> {
        if record.relay.relay_id.len() > MAX_RELAY_ID_LEN {
            // Relay ids are checked when relays are configured; a backend handing out a
            // longer one is a backend fault, not the caller's.
            return Err(ApiError::Backend(
                crate::backend::BackendError::Unavailable {
                    backend: "relays",
                    detail: format!(
                        "relay id {:?} is too long for a token",
                        record.relay.relay_id
                    ),
                },
            ));
        }
        let claims = Claims {
            role,
            mode: record.mode,
            session_id: record.id,
            participant_id,
            issued_at: kakehashi_proto::unix_now(),
            expires_at,
            session_deadline: deadline_secs(record),
            permissions: record.permissions,
            public_key,
            relay_id: record.relay.relay_id.clone(),
        };
        Ok(claims.sign(self.signing_key()))
    }

    /// A participant token (host or viewer) living until the session deadline.
    pub fn participant_token(
        &self,
        record: &SessionRecord,
        role: Role,
        participant_id: u64,
        public_key: [u8; 32],
    ) -> Result<Vec<u8>, ApiError> {
        self.issue_token(
            record,
            role,
            participant_id,
            public_key,
            deadline_secs(record),
        )
    }

    /// Tells the session's relay to end it. Failures are logged and counted: the
    /// session has already ended in the record, and the relay enforces the deadline on
    /// its own.
    pub async fn end_on_relay(&self, record: &SessionRecord) {
        let result = tokio::time::timeout(RELAY_CALL_TIMEOUT, self.call_relay_end(record)).await;
        let failure = match result {
            Ok(Ok(was_live)) => {
                tracing::debug!(session = %record.id, relay = %record.relay.relay_id, was_live, "relay ended the session");
                return;
            }
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {RELAY_CALL_TIMEOUT:?}"),
        };
        metrics::counter!(telemetry::RELAY_END_FAILURES).increment(1);
        tracing::warn!(
            session = %record.id,
            relay = %record.relay.relay_id,
            admin_url = %record.relay.admin_url,
            error = %failure,
            "relay did not confirm the end of the session"
        );
    }

    async fn call_relay_end(&self, record: &SessionRecord) -> Result<bool, String> {
        let expires_at = kakehashi_proto::unix_now() + ADMIN_TOKEN_SECS;
        let token = self
            .issue_token(record, Role::Coordinator, 0, [0; 32], expires_at)
            .map_err(|e| e.to_string())?;
        let endpoint = tonic::transport::Endpoint::from_shared(record.relay.admin_url.clone())
            .map_err(|e| format!("bad admin URL: {e}"))?
            .connect_timeout(RELAY_CALL_TIMEOUT)
            .timeout(RELAY_CALL_TIMEOUT);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut client = pb::relay_admin_client::RelayAdminClient::new(channel);
        let response = client
            .end_session(pb::RelayEndSessionRequest {
                session_id: record.id.to_string(),
                token,
                reason: record.end_reason as i32,
                detail: record.end_detail.clone(),
            })
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        Ok(response.into_inner().was_live)
    }

    /// A fresh session id.
    pub fn new_session_id() -> Result<SessionId, ApiError> {
        Ok(SessionId::from_bytes(random::bytes::<16>()?))
    }

    /// A fresh participant id (never 0, which the coordinator role uses).
    pub fn new_participant_id() -> Result<u64, ApiError> {
        loop {
            let id = random::u64()?;
            if id != 0 {
                return Ok(id);
            }
        }
    }
}

/// What an event says beyond the record's state.
#[derive(Debug, Clone)]
pub struct EventNote {
    pub kind: pb::EventKind,
    pub actor: pb::EventActor,
    /// Requested, newly granted, denied or revoked permissions.
    pub permissions: kakehashi_proto::Permissions,
    pub remaining_secs: u32,
    pub detail: String,
}

impl EventNote {
    pub fn new(kind: pb::EventKind, actor: pb::EventActor) -> Self {
        Self {
            kind,
            actor,
            permissions: kakehashi_proto::Permissions::NONE,
            remaining_secs: 0,
            detail: String::new(),
        }
    }

    pub fn permissions(mut self, p: kakehashi_proto::Permissions) -> Self {
        self.permissions = p;
        self
    }

    pub fn detail(mut self, detail: String) -> Self {
        self.detail = detail;
        self
    }
}

/// Who causes an event of this kind when the caller does not say.
pub fn default_actor(kind: pb::EventKind, record: &SessionRecord) -> pb::EventActor {
    use pb::EventActor as A;
    use pb::EventKind as K;
    match kind {
        K::Created | K::UnattendedConnect => A::Api,
        K::CodeEntered
        | K::ConsentGiven
        | K::ConsentDenied
        | K::ConsentRevoked
        | K::Paused
        | K::Resumed
        | K::FileTransfer
        | K::SupervisorAdmitted
        | K::SupervisorRefused => A::Customer,
        K::OperatorJoined | K::PermissionRequested => A::Operator,
        K::RelayMigrated | K::TimeWarning | K::Unspecified => A::System,
        K::Ended => end_actor(record.end_reason),
    }
}

/// Who ended a session for this reason, when nobody says otherwise (the API's
/// EndSession says [`pb::EventActor::Api`]).
pub fn end_actor(reason: pb::EndReason) -> pb::EventActor {
    match reason {
        pb::EndReason::EndedByOperator => pb::EventActor::Operator,
        pb::EndReason::EndedByCustomer | pb::EndReason::ConsentDenied => pb::EventActor::Customer,
        _ => pb::EventActor::System,
    }
}

/// The session deadline in whole unix seconds, rounded down so no token outlives it.
pub fn deadline_secs(record: &SessionRecord) -> u64 {
    u64::try_from(record.deadline_ms / 1000).unwrap_or(0)
}

/// Fixed metric label for an end reason.
pub fn end_reason_label(reason: pb::EndReason) -> &'static str {
    match reason {
        pb::EndReason::Unspecified => "unspecified",
        pb::EndReason::EndedByOperator => "ended_by_operator",
        pb::EndReason::EndedByCustomer => "ended_by_customer",
        pb::EndReason::TimeLimit => "time_limit",
        pb::EndReason::CodeExpired => "code_expired",
        pb::EndReason::ConsentDenied => "consent_denied",
        pb::EndReason::SessionFailed => "session_failed",
        pb::EndReason::RelayShutdown => "relay_shutdown",
        pb::EndReason::IdleTimeout => "idle_timeout",
    }
}

/// Compares two digests without an early exit, so timing does not reveal how much of a
/// guessed ticket matched.
pub fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn digest_compare() {
        let a = [1u8; 32];
        let mut b = a;
        assert!(super::digests_equal(&a, &b));
        b[31] = 0;
        assert!(!super::digests_equal(&a, &b));
    }
}
