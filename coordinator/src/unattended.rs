//! Unattended access: an admin enrols an installed agent's device key
//! (`AdminService.EnrollDevice`); an operator key creates a session for the device
//! (`CreateSessionRequest.device_id`), which waits as a pending entry until the device
//! collects it with a signed `AgentService.PollDevice` and joins with the code, consenting
//! without a prompt.
//!
//! # Invariants
//! - A device session is created only when the tenant policy enables unattended access
//!   (or auth is disabled), the device is enrolled in the session's tenant and not
//!   blocked, and the operator is allowed on it (never on the deny list; on the allow list
//!   when that list is not empty). Every refusal is PERMISSION_DENIED.
//! - A poll is accepted only with a valid Ed25519 signature by the enrolled key over
//!   [`proof_message`], a timestamp within [`POLL_WINDOW_MS`] of the coordinator's clock
//!   and newer than the device's last accepted poll (the store keeps that one timestamp
//!   per device, atomically with taking the pending sessions, so a replay is refused by
//!   every replica). Each pending session is handed out once.

use std::collections::HashMap;
use std::sync::Mutex;

use ed25519_dalek::{Signature, VerifyingKey};
pub use kakehashi_proto::device::{DEVICE_ID_HEX, PROOF_DOMAIN, device_id_of, proof_message};
use kakehashi_proto::pb;
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::auth::{AuthMode, Caller};
use crate::backend::BackendError;
use crate::error::ApiError;
use crate::service::{Core, EventNote, now_ms};
use crate::validate;

/// How far a poll's timestamp may be from the coordinator's clock.
pub const POLL_WINDOW_MS: i64 = 60_000;
/// Devices a tenant may enrol, so listing stays bounded.
pub const MAX_DEVICES_PER_TENANT: usize = 10_000;
/// Names in an allow or deny list.
pub const MAX_OPERATORS_PER_LIST: usize = 256;
/// Sessions waiting for one device; a newer one pushes out the oldest (whose code then
/// simply expires).
pub const MAX_PENDING_PER_DEVICE: usize = 16;
/// Accepted polls per device per second, per coordinator.
pub const MAX_POLLS_PER_SECOND: u32 = 5;
/// Devices tracked by the poll rate limiter before old windows are dropped.
const RATE_TRACKED_DEVICES: usize = 100_000;

/// An enrolled device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub device_id: String,
    pub tenant: String,
    pub name: String,
    pub public_key: [u8; 32],
    pub blocked: bool,
    pub allowed_operators: Vec<String>,
    pub denied_operators: Vec<String>,
    pub enrolled_at_ms: i64,
    /// Telework monitoring: the device may get a monitoring ticket when its tenant's
    /// policy enables monitoring too. Absent in records stored before monitoring
    /// existed, which read as off.
    #[serde(default)]
    pub monitoring: bool,
}

impl DeviceRecord {
    pub fn to_pb(&self) -> pb::DeviceInfo {
        pb::DeviceInfo {
            device_id: self.device_id.clone(),
            tenant: self.tenant.clone(),
            name: self.name.clone(),
            public_key: self.public_key.to_vec(),
            blocked: self.blocked,
            allowed_operators: self.allowed_operators.clone(),
            denied_operators: self.denied_operators.clone(),
            enrolled_at_unix_ms: self.enrolled_at_ms,
            monitoring: self.monitoring,
        }
    }

    /// Whether `operator` may connect: never when denied, and only when listed if the
    /// allow list is not empty.
    pub fn check_operator(&self, operator: &str) -> Result<(), UnattendedError> {
        if self.denied_operators.iter().any(|o| o == operator) {
            return Err(UnattendedError::OperatorDenied {
                operator: operator.to_owned(),
                device_id: self.device_id.clone(),
            });
        }
        if !self.allowed_operators.is_empty()
            && !self.allowed_operators.iter().any(|o| o == operator)
        {
            return Err(UnattendedError::OperatorNotAllowed {
                operator: operator.to_owned(),
                device_id: self.device_id.clone(),
            });
        }
        Ok(())
    }
}

/// A session waiting for its device to poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSession {
    pub session_id: String,
    pub code: String,
    pub operator: String,
    /// `pb::SessionMode` as i32.
    pub mode: i32,
    pub permissions: u32,
    /// When the code expires; an entry past it is dropped, not handed out.
    pub expires_at_ms: i64,
}

impl PendingSession {
    pub fn to_pb(&self) -> pb::PendingDeviceSession {
        pb::PendingDeviceSession {
            session_id: self.session_id.clone(),
            code: self.code.clone(),
            operator: self.operator.clone(),
            mode: self.mode,
            permissions: self.permissions,
        }
    }
}

/// Why a poll was refused before the store was asked; everything but a store error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProofError {
    BadSignatureLength,
    BadSignature,
    TooOld,
    TooNew,
}

/// Checks a poll's signature and timestamp against `now_ms`. Pure: no clock, no store.
pub fn verify_proof(
    public_key: &[u8; 32],
    device_id: &str,
    timestamp_ms: i64,
    signature: &[u8],
    now_ms: i64,
) -> Result<(), ProofError> {
    verify_proof_in(
        PROOF_DOMAIN,
        public_key,
        device_id,
        timestamp_ms,
        signature,
        now_ms,
    )
}

/// [`verify_proof`] for a proof under another `domain` (the monitoring ticket's), with
/// the same window.
pub fn verify_proof_in(
    domain: &[u8],
    public_key: &[u8; 32],
    device_id: &str,
    timestamp_ms: i64,
    signature: &[u8],
    now_ms: i64,
) -> Result<(), ProofError> {
    if timestamp_ms < now_ms.saturating_sub(POLL_WINDOW_MS) {
        return Err(ProofError::TooOld);
    }
    if timestamp_ms > now_ms.saturating_add(POLL_WINDOW_MS) {
        return Err(ProofError::TooNew);
    }
    let sig: [u8; 64] = signature
        .try_into()
        .map_err(|_| ProofError::BadSignatureLength)?;
    let key = VerifyingKey::from_bytes(public_key).map_err(|_| ProofError::BadSignature)?;
    key.verify_strict(
        &kakehashi_proto::device::proof_message_in(domain, device_id, timestamp_ms),
        &Signature::from_bytes(&sig),
    )
    .map_err(|_| ProofError::BadSignature)
}

impl ProofError {
    /// Why, for the device's operator.
    pub fn reason(self) -> &'static str {
        match self {
            ProofError::BadSignatureLength => "the signature is not 64 bytes",
            ProofError::BadSignature => "the signature does not verify with the enrolled key",
            ProofError::TooOld => "the timestamp is more than 60 s in the past",
            ProofError::TooNew => "the timestamp is more than 60 s in the future",
        }
    }
}

/// Accepted polls per device in the current one-second window, in this process. The
/// replay guard lives in the store; this only keeps one device from hammering it.
#[derive(Default)]
pub struct PollRate {
    windows: Mutex<HashMap<String, (i64, u32)>>,
}

impl PollRate {
    /// Counts a poll at `now_ms`; `false` when the device is over its rate.
    pub fn allow(&self, device_id: &str, now_ms: i64) -> bool {
        let second = now_ms.div_euclid(1000);
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() >= RATE_TRACKED_DEVICES && !windows.contains_key(device_id) {
            windows.retain(|_, (s, _)| *s == second);
            if windows.len() >= RATE_TRACKED_DEVICES {
                return false;
            }
        }
        let entry = windows.entry(device_id.to_owned()).or_insert((second, 0));
        if entry.0 != second {
            *entry = (second, 0);
        }
        entry.1 += 1;
        entry.1 <= MAX_POLLS_PER_SECOND
    }
}

static POLL_RATE: std::sync::LazyLock<PollRate> = std::sync::LazyLock::new(PollRate::default);

/// Why an unattended connection or a device poll was refused.
#[derive(Debug, thiserror::Error)]
pub enum UnattendedError {
    #[error(
        "tenant {tenant:?} does not enable unattended access (tenant policy unattended_enabled)"
    )]
    NotEnabled { tenant: String },
    #[error("device {device_id} is not enrolled in tenant {tenant:?}")]
    NotEnrolled { device_id: String, tenant: String },
    #[error("device {device_id} is blocked (SetDeviceAccess)")]
    Blocked { device_id: String },
    #[error("operator {operator:?} is on the deny list of device {device_id}")]
    OperatorDenied { operator: String, device_id: String },
    #[error("operator {operator:?} is not on the allow list of device {device_id}")]
    OperatorNotAllowed { operator: String, device_id: String },
    #[error(
        "a device session is created as the key's own operator {key_name:?}, not {requested:?}"
    )]
    OperatorMismatch { key_name: String, requested: String },
    #[error("device poll refused: {0}")]
    PollRefused(String),
    #[error("device {device_id} polls more than {MAX_POLLS_PER_SECOND} times a second")]
    RateLimited { device_id: String },
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl From<BackendError> for UnattendedError {
    fn from(e: BackendError) -> Self {
        UnattendedError::Api(e.into())
    }
}

impl UnattendedError {
    pub fn status(self, rpc: &'static str) -> Status {
        let (kind, code) = match &self {
            UnattendedError::Api(_) => ("", tonic::Code::Internal),
            UnattendedError::PollRefused(_) => {
                ("device_poll_refused", tonic::Code::Unauthenticated)
            }
            UnattendedError::RateLimited { .. } => {
                ("device_poll_rate", tonic::Code::ResourceExhausted)
            }
            _ => ("unattended_refused", tonic::Code::PermissionDenied),
        };
        if let UnattendedError::Api(e) = self {
            return e.status(rpc);
        }
        metrics::counter!(crate::telemetry::RPC_ERRORS, "rpc" => rpc, "kind" => kind).increment(1);
        tracing::debug!(rpc, error = %self, "unattended access refused");
        Status::new(code, self.to_string())
    }
}

/// Checks a device id's form.
pub fn validate_device_id(device_id: &str) -> Result<(), ApiError> {
    if device_id.len() != DEVICE_ID_HEX
        || !device_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(ApiError::invalid(
            "device_id",
            format!("must be {DEVICE_ID_HEX} lowercase hex digits"),
        ));
    }
    Ok(())
}

/// Checks an allow or deny list.
pub fn validate_operators(field: &'static str, names: &[String]) -> Result<(), ApiError> {
    if names.len() > MAX_OPERATORS_PER_LIST {
        return Err(ApiError::invalid(
            field,
            format!("at most {MAX_OPERATORS_PER_LIST} names"),
        ));
    }
    for n in names {
        validate::name(field, n)?;
    }
    Ok(())
}

/// A device session that passed the checks: who connects to what.
pub struct DeviceGrant {
    pub device: DeviceRecord,
    pub operator: String,
}

impl Core {
    /// The device branch of CreateSession, before anything is allocated: fills the
    /// request's tenant (from the device, for a cluster-wide caller that named none) and
    /// operator, and refuses unless the device may take this operator now.
    pub async fn check_unattended(
        &self,
        caller: &Caller,
        req: &mut pb::CreateSessionRequest,
    ) -> Result<DeviceGrant, UnattendedError> {
        validate_device_id(&req.device_id)?;
        let found = self.backends.auth.get_device(&req.device_id).await?;
        if req.tenant.is_empty() && caller.is_cluster_wide() {
            // Only a cluster-wide caller gets here with no tenant; the device names it.
            if let Some(d) = &found {
                req.tenant = d.tenant.clone();
            }
        }
        validate::name("tenant", &req.tenant)?;
        // The operator is the key's identity: an allow list must not be dodged by
        // naming someone else in the request.
        if !caller.name.is_empty() {
            if !req.operator.is_empty() && req.operator != caller.name {
                return Err(UnattendedError::OperatorMismatch {
                    key_name: caller.name.clone(),
                    requested: req.operator.clone(),
                });
            }
            req.operator = caller.name.clone();
        }
        validate::name("operator", &req.operator)?;
        if self.config.auth.mode != AuthMode::Disabled {
            let enabled = self
                .backends
                .auth
                .get_policy(&req.tenant)
                .await?
                .is_some_and(|p| p.unattended_enabled);
            if !enabled {
                return Err(UnattendedError::NotEnabled {
                    tenant: req.tenant.clone(),
                });
            }
        }
        // Another tenant's device answers as if it were not enrolled: a tenant learns
        // nothing about other tenants' devices.
        let device = found
            .filter(|d| {
                d.tenant == req.tenant && (caller.is_cluster_wide() || caller.tenant == d.tenant)
            })
            .ok_or_else(|| UnattendedError::NotEnrolled {
                device_id: req.device_id.clone(),
                tenant: req.tenant.clone(),
            })?;
        if device.blocked {
            return Err(UnattendedError::Blocked {
                device_id: device.device_id,
            });
        }
        device.check_operator(&req.operator)?;
        Ok(DeviceGrant {
            operator: req.operator.clone(),
            device,
        })
    }

    /// After the session exists: audits the connection and leaves the session for the
    /// device to collect.
    pub async fn start_unattended(
        &self,
        grant: &DeviceGrant,
        record: &crate::backend::sessions::SessionRecord,
    ) -> Result<(), ApiError> {
        let detail = format!(
            "device {} ({}) by operator {}",
            grant.device.device_id, grant.device.name, grant.operator
        );
        let note =
            EventNote::new(pb::EventKind::UnattendedConnect, pb::EventActor::Api).detail(detail);
        self.publish_event(record, note).await?;
        let pending = PendingSession {
            session_id: record.id.to_string(),
            code: record.code.clone(),
            operator: grant.operator.clone(),
            mode: record.mode as i32,
            permissions: record.permissions.bits(),
            expires_at_ms: record.code_expires_at_ms,
        };
        self.backends
            .auth
            .push_pending(&grant.device.device_id, pending)
            .await?;
        tracing::info!(
            session = %record.id,
            tenant = %record.tenant,
            device = %grant.device.device_id,
            operator = %grant.operator,
            "unattended connection requested"
        );
        Ok(())
    }

    /// `AgentService.PollDevice`: the device's pending sessions, once each.
    pub async fn poll_device(
        &self,
        req: pb::PollDeviceRequest,
    ) -> Result<pb::PollDeviceResponse, UnattendedError> {
        let refused =
            |why: &str| UnattendedError::PollRefused(format!("device {}: {why}", req.device_id));
        validate_device_id(&req.device_id)
            .map_err(|e| UnattendedError::PollRefused(e.to_string()))?;
        let device = self
            .backends
            .auth
            .get_device(&req.device_id)
            .await?
            .ok_or_else(|| refused("not enrolled"))?;
        let now = now_ms();
        verify_proof(
            &device.public_key,
            &req.device_id,
            req.timestamp_ms,
            &req.signature,
            now,
        )
        .map_err(|e| refused(e.reason()))?;
        if !POLL_RATE.allow(&req.device_id, now) {
            return Err(UnattendedError::RateLimited {
                device_id: req.device_id,
            });
        }
        let taken = self
            .backends
            .auth
            .take_pending(&req.device_id, req.timestamp_ms, now)
            .await?
            .ok_or_else(|| {
                refused("the timestamp is not newer than the last accepted poll (replay)")
            })?;
        // A blocked device collects nothing; what was waiting is dropped with the poll.
        let sessions = if device.blocked {
            Vec::new()
        } else {
            taken.iter().map(PendingSession::to_pb).collect()
        };
        Ok(pb::PollDeviceResponse { sessions })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    #[test]
    fn a_signed_poll_verifies_and_anything_else_does_not() {
        let k = key();
        let public = k.verifying_key().to_bytes();
        let id = device_id_of(&public);
        assert_eq!(id.len(), DEVICE_ID_HEX);
        let now = 1_800_000_000_000;
        let sig = k.sign(&proof_message(&id, now)).to_bytes();
        assert_eq!(verify_proof(&public, &id, now, &sig, now), Ok(()));
        assert_eq!(
            verify_proof(&public, &id, now, &sig, now + POLL_WINDOW_MS),
            Ok(())
        );
        assert_eq!(
            verify_proof(&public, &id, now, &sig, now + POLL_WINDOW_MS + 1),
            Err(ProofError::TooOld)
        );
        assert_eq!(
            verify_proof(&public, &id, now, &sig, now - POLL_WINDOW_MS - 1),
            Err(ProofError::TooNew)
        );
        // Another timestamp, another device, another key, a flipped bit.
        assert_eq!(
            verify_proof(&public, &id, now + 1, &sig, now),
            Err(ProofError::BadSignature)
        );
        let other = device_id_of(&[1; 32]);
        assert_eq!(
            verify_proof(&public, &other, now, &sig, now),
            Err(ProofError::BadSignature)
        );
        let stranger = SigningKey::from_bytes(&[9; 32]).verifying_key().to_bytes();
        assert_eq!(
            verify_proof(&stranger, &id, now, &sig, now),
            Err(ProofError::BadSignature)
        );
        let mut bad = sig;
        bad[10] ^= 1;
        assert_eq!(
            verify_proof(&public, &id, now, &bad, now),
            Err(ProofError::BadSignature)
        );
        assert_eq!(
            verify_proof(&public, &id, now, &sig[..63], now),
            Err(ProofError::BadSignatureLength)
        );
    }

    #[test]
    fn the_rate_limit_counts_per_device_and_second() {
        let rate = PollRate::default();
        for _ in 0..MAX_POLLS_PER_SECOND {
            assert!(rate.allow("a", 5_000));
        }
        assert!(!rate.allow("a", 5_999));
        assert!(rate.allow("b", 5_999));
        assert!(rate.allow("a", 6_000));
    }

    #[test]
    fn a_device_stored_before_monitoring_reads_with_monitoring_off() {
        let old = r#"{"device_id":"d","tenant":"t","name":"n","public_key":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],"blocked":false,"allowed_operators":[],"denied_operators":[],"enrolled_at_ms":5}"#;
        let d: DeviceRecord = serde_json::from_str(old).expect("an old record reads");
        assert!(!d.monitoring);
        assert_eq!(d.enrolled_at_ms, 5);
    }

    #[test]
    fn operator_lists() {
        let mut d = DeviceRecord {
            device_id: "d".into(),
            tenant: "t".into(),
            name: "n".into(),
            public_key: [0; 32],
            blocked: false,
            allowed_operators: vec![],
            denied_operators: vec!["mallory".into()],
            enrolled_at_ms: 0,
            monitoring: false,
        };
        assert!(d.check_operator("alice").is_ok());
        assert!(matches!(
            d.check_operator("mallory"),
            Err(UnattendedError::OperatorDenied { .. })
        ));
        d.allowed_operators = vec!["alice".into(), "mallory".into()];
        assert!(d.check_operator("alice").is_ok());
        assert!(matches!(
            d.check_operator("bob"),
            Err(UnattendedError::OperatorNotAllowed { .. })
        ));
        assert!(matches!(
            d.check_operator("mallory"),
            Err(UnattendedError::OperatorDenied { .. })
        ));
    }
}
