//! Who is calling: per-tenant API keys for `SessionService` and `AdminService`.
//!
//! A caller sends `authorization: Bearer kh_<key_id>_<secret>` (gRPC metadata). The
//! store keeps, per key id, the tenant, the [`Role`], the operator identity the key acts
//! as, its groups and the SHA-256 of the secret only; the secret is compared as a digest
//! in constant time. An [`Authenticator`] turns a call's metadata into a [`Caller`]; the
//! services then scope every call to the caller's tenant and role. A client-certificate
//! (mTLS) authenticator would be a second implementation of the same trait, mapping the
//! certificate's subject to a `Caller`; it is not built.
//!
//! The cluster-admin key (tenant [`CLUSTER_TENANT`]) comes from configuration
//! (`--bootstrap-admin-key-file`), not from the store, so a fresh cluster can create its
//! first tenant keys; it is checked the same way.
//!
//! # Invariants
//! - A secret is never stored, logged or echoed; only its digest is kept.
//! - A revoked key stays revoked (its record is kept, with the first revocation time).
//! - With [`AuthMode::Disabled`] every caller is an unrestricted cluster admin: the
//!   embedded dev cluster and the tests of features other than auth.

pub mod store;

use std::sync::Arc;

use kakehashi_proto::pb;
use sha2::{Digest, Sha256};
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::backend::{BackendError, BoxFuture};
use crate::random::{self, RandomError};
use crate::service::digests_equal;

pub use store::{AuthStore, InMemoryAuthStore};

/// The tenant of the cluster-admin key: it may act on every tenant.
pub const CLUSTER_TENANT: &str = "*";
/// Longest `authorization` value read; a real key is 84 bytes.
pub const MAX_HEADER_BYTES: usize = 256;
/// Hex digits of a key id (8 random bytes).
pub const KEY_ID_HEX: usize = 16;
/// Hex digits of a secret (32 random bytes).
pub const SECRET_HEX: usize = 64;
/// Groups per key at most, and characters per group name.
pub const MAX_GROUPS: usize = 32;
/// Keys a tenant may hold (revoked ones included), so listing stays bounded.
pub const MAX_KEYS_PER_TENANT: usize = 1000;

/// `coordinator_auth_failures_total{reason}`.
pub const AUTH_FAILURES: &str = "coordinator_auth_failures_total";
/// Every value the `reason` label takes.
pub const FAILURE_REASONS: [&str; 6] = [
    "missing",
    "malformed",
    "unknown",
    "revoked",
    "wrong_tenant",
    "role",
];

/// Registers the help text of the auth metrics and their zero series.
pub fn describe() {
    metrics::describe_counter!(
        AUTH_FAILURES,
        metrics::Unit::Count,
        "Refused SessionService/AdminService calls, by reason: missing, malformed, unknown or revoked key (UNAUTHENTICATED); another tenant's resource (wrong_tenant) or a call the key's role may not make (role), both PERMISSION_DENIED."
    );
    for reason in FAILURE_REASONS {
        metrics::counter!(AUTH_FAILURES, "reason" => reason).increment(0);
    }
}

/// How the coordinator authenticates `SessionService` and `AdminService` callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// Everyone is a cluster admin. For the embedded dev cluster and tests only.
    #[default]
    Disabled,
    /// Every call needs an API key.
    ApiKeys,
}

impl std::str::FromStr for AuthMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "disabled" => Ok(AuthMode::Disabled),
            "api-keys" => Ok(AuthMode::ApiKeys),
            other => Err(format!(
                "unknown auth mode {other:?}; expected api-keys or disabled"
            )),
        }
    }
}

/// The auth part of the coordinator's configuration.
#[derive(Clone, Default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// The cluster-admin key (tenant `*`, role admin); its secret's digest only.
    pub bootstrap_admin: Option<BootstrapKey>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("mode", &self.mode)
            .field(
                "bootstrap_admin",
                &self.bootstrap_admin.as_ref().map(|k| &k.key_id),
            )
            .finish()
    }
}

/// The cluster-admin key, held as its id and the digest of its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapKey {
    pub key_id: String,
    pub secret_sha256: [u8; 32],
}

impl BootstrapKey {
    /// From the whole key text (`kh_<key_id>_<secret>`, surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<Self, AuthError> {
        let parsed = ParsedKey::parse(text.trim())?;
        Ok(Self {
            key_id: parsed.key_id.to_owned(),
            secret_sha256: secret_digest(parsed.secret),
        })
    }
}

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything in its tenant, keys and policy included.
    Admin,
    /// Every `SessionService` call.
    Operator,
    /// `SessionService` reads only: Get, List, Watch, GetAuditLog.
    Auditor,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            "auditor" => Some(Role::Auditor),
            _ => None,
        }
    }

    pub fn from_pb(value: i32) -> Option<Self> {
        match pb::ApiRole::try_from(value).ok()? {
            pb::ApiRole::Admin => Some(Role::Admin),
            pb::ApiRole::Operator => Some(Role::Operator),
            pb::ApiRole::Auditor => Some(Role::Auditor),
            pb::ApiRole::Unspecified => None,
        }
    }

    pub fn to_pb(self) -> pb::ApiRole {
        match self {
            Role::Admin => pb::ApiRole::Admin,
            Role::Operator => pb::ApiRole::Operator,
            Role::Auditor => pb::ApiRole::Auditor,
        }
    }
}

/// What a call wants to do, for the role check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Get, List, Watch, GetAuditLog.
    ReadSessions,
    /// Create, End.
    WriteSessions,
    /// AdminService: keys and policy.
    Administer,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::ReadSessions => "read sessions",
            Action::WriteSessions => "create or end sessions",
            Action::Administer => "manage API keys and tenant policy",
        }
    }
}

/// The authenticated caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The caller's tenant; [`CLUSTER_TENANT`] for the cluster admin.
    pub tenant: String,
    pub role: Role,
    /// The operator identity the key acts as.
    pub name: String,
    pub groups: Vec<String>,
    /// The key's public id (empty with auth disabled).
    pub key_id: String,
}

impl Caller {
    /// The caller every call has when auth is disabled: a cluster admin.
    pub fn unrestricted() -> Self {
        Self {
            tenant: CLUSTER_TENANT.into(),
            role: Role::Admin,
            name: String::new(),
            groups: Vec::new(),
            key_id: String::new(),
        }
    }

    pub fn is_cluster_wide(&self) -> bool {
        self.tenant == CLUSTER_TENANT
    }

    /// PERMISSION_DENIED unless the role may do `action`.
    pub fn require(&self, action: Action) -> Result<(), AuthError> {
        let allowed = match self.role {
            Role::Admin => true,
            Role::Operator => action != Action::Administer,
            Role::Auditor => action == Action::ReadSessions,
        };
        if allowed {
            Ok(())
        } else {
            Err(AuthError::RoleDenied {
                role: self.role,
                action,
            })
        }
    }

    /// PERMISSION_DENIED unless the caller may act on `tenant`'s resources.
    pub fn require_tenant(&self, tenant: &str, what: &'static str) -> Result<(), AuthError> {
        if self.is_cluster_wide() || self.tenant == tenant {
            Ok(())
        } else {
            Err(AuthError::WrongTenant { what })
        }
    }
}

/// Why a call was not let through. The messages never contain a secret.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing API key: send the metadata `authorization: Bearer kh_<key_id>_<secret>`")]
    Missing,
    #[error("malformed API key: {0}")]
    Malformed(&'static str),
    #[error("unknown API key {key_id} (no such key, or wrong secret)")]
    Unknown { key_id: String },
    #[error("API key {key_id} has been revoked")]
    Revoked { key_id: String },
    #[error("{what} belongs to another tenant")]
    WrongTenant { what: &'static str },
    #[error("role {} may not {}", role.name(), action.name())]
    RoleDenied { role: Role, action: Action },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl AuthError {
    fn reason(&self) -> Option<&'static str> {
        Some(match self {
            AuthError::Missing => "missing",
            AuthError::Malformed(_) => "malformed",
            AuthError::Unknown { .. } => "unknown",
            AuthError::Revoked { .. } => "revoked",
            AuthError::WrongTenant { .. } => "wrong_tenant",
            AuthError::RoleDenied { .. } => "role",
            AuthError::Backend(_) => return None,
        })
    }

    /// Counts and logs the refusal once and returns what the client sees.
    pub fn status(self, rpc: &'static str) -> Status {
        let Some(reason) = self.reason() else {
            return match self {
                AuthError::Backend(e) => crate::ApiError::from(e).status(rpc),
                _ => Status::internal("unclassified auth error"),
            };
        };
        metrics::counter!(AUTH_FAILURES, "reason" => reason).increment(1);
        tracing::debug!(rpc, reason, error = %self, "call refused by auth");
        match self {
            AuthError::WrongTenant { .. } | AuthError::RoleDenied { .. } => {
                Status::permission_denied(self.to_string())
            }
            _ => Status::unauthenticated(self.to_string()),
        }
    }
}

/// Why an authenticated call failed: refused by auth or policy, or failed in the core.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Api(#[from] crate::ApiError),
    /// The tenant's policy does not allow this session mode.
    #[error("tenant {tenant:?} does not allow {mode} sessions (tenant policy allowed_modes)")]
    ModeNotAllowed { tenant: String, mode: &'static str },
    /// The session asks for the RECORDING permission and the tenant's policy does not
    /// enable recording.
    #[error(
        "tenant {tenant:?} does not enable recording (tenant policy recording_enabled); ask without the recording permission"
    )]
    RecordingNotAllowed { tenant: String },
    /// Unattended access refused (policy, enrolment, block, operator lists).
    #[error(transparent)]
    Unattended(#[from] crate::unattended::UnattendedError),
}

impl From<BackendError> for CallError {
    fn from(e: BackendError) -> Self {
        CallError::Api(e.into())
    }
}

impl From<RandomError> for CallError {
    fn from(e: RandomError) -> Self {
        CallError::Api(e.into())
    }
}

impl CallError {
    pub fn status(self, rpc: &'static str) -> Status {
        match self {
            CallError::Auth(e) => e.status(rpc),
            CallError::Api(e) => e.status(rpc),
            CallError::Unattended(e) => e.status(rpc),
            CallError::ModeNotAllowed { .. } => {
                metrics::counter!(crate::telemetry::RPC_ERRORS, "rpc" => rpc, "kind" => "mode_not_allowed")
                    .increment(1);
                Status::permission_denied(self.to_string())
            }
            CallError::RecordingNotAllowed { .. } => {
                metrics::counter!(crate::telemetry::RPC_ERRORS, "rpc" => rpc, "kind" => "recording_not_allowed")
                    .increment(1);
                Status::permission_denied(self.to_string())
            }
        }
    }
}

/// A stored API key: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub key_id: String,
    pub tenant: String,
    pub role: Role,
    pub name: String,
    pub groups: Vec<String>,
    pub secret_sha256: [u8; 32],
    pub created_at_ms: i64,
    /// 0 while the key is valid.
    pub revoked_at_ms: i64,
}

impl ApiKeyRecord {
    pub fn is_revoked(&self) -> bool {
        self.revoked_at_ms != 0
    }

    /// The listing form: no digest.
    pub fn to_pb(&self) -> pb::ApiKeyInfo {
        pb::ApiKeyInfo {
            key_id: self.key_id.clone(),
            tenant: self.tenant.clone(),
            role: self.role.to_pb() as i32,
            name: self.name.clone(),
            groups: self.groups.clone(),
            created_at_unix_ms: self.created_at_ms,
            revoked_at_unix_ms: self.revoked_at_ms,
        }
    }
}

/// A freshly made key: the record to store and the whole key text, shown once.
pub struct NewKey {
    pub record: ApiKeyRecord,
    pub api_key: String,
}

/// Makes a key with random id and secret. The caller stores `record` and hands
/// `api_key` to whoever asked, once.
pub fn new_key(
    tenant: String,
    role: Role,
    name: String,
    groups: Vec<String>,
    now_ms: i64,
) -> Result<NewKey, RandomError> {
    let key_id = hex::encode(random::bytes::<{ KEY_ID_HEX / 2 }>()?);
    let secret = hex::encode(random::bytes::<{ SECRET_HEX / 2 }>()?);
    let api_key = format!("kh_{key_id}_{secret}");
    Ok(NewKey {
        record: ApiKeyRecord {
            key_id,
            tenant,
            role,
            name,
            groups,
            secret_sha256: secret_digest(&secret),
            created_at_ms: now_ms,
            revoked_at_ms: 0,
        },
        api_key,
    })
}

fn secret_digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `kh_<key_id>_<secret>`, split and checked.
struct ParsedKey<'a> {
    key_id: &'a str,
    secret: &'a str,
}

impl<'a> ParsedKey<'a> {
    fn parse(text: &'a str) -> Result<Self, AuthError> {
        let rest = text
            .strip_prefix("kh_")
            .ok_or(AuthError::Malformed("an API key starts with kh_"))?;
        let (key_id, secret) = rest
            .split_once('_')
            .ok_or(AuthError::Malformed("expected kh_<key_id>_<secret>"))?;
        if !is_lower_hex(key_id, KEY_ID_HEX) {
            return Err(AuthError::Malformed(
                "the key id is not 16 lowercase hex digits",
            ));
        }
        if !is_lower_hex(secret, SECRET_HEX) {
            return Err(AuthError::Malformed(
                "the secret is not 64 lowercase hex digits",
            ));
        }
        Ok(Self { key_id, secret })
    }
}

/// Reads the bearer key out of a call's metadata.
fn bearer(metadata: &MetadataMap) -> Result<ParsedKey<'_>, AuthError> {
    let value = metadata.get("authorization").ok_or(AuthError::Missing)?;
    if value.len() > MAX_HEADER_BYTES {
        return Err(AuthError::Malformed("the authorization value is too long"));
    }
    let text = value
        .to_str()
        .map_err(|_| AuthError::Malformed("the authorization value is not text"))?;
    let key = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
        .ok_or(AuthError::Malformed(
            "the authorization value must be `Bearer <key>`",
        ))?;
    ParsedKey::parse(key.trim())
}

/// Turns a call's metadata into its [`Caller`]. One implementation per credential kind:
/// API keys now; client certificates (mTLS) would be another, reading the peer
/// certificate tonic attaches to the request.
pub trait Authenticator: Send + Sync {
    fn authenticate<'a>(
        &'a self,
        metadata: &'a MetadataMap,
    ) -> BoxFuture<'a, Result<Caller, AuthError>>;
}

/// [`AuthMode::Disabled`]: every caller is [`Caller::unrestricted`].
pub struct NoAuth;

impl Authenticator for NoAuth {
    fn authenticate<'a>(
        &'a self,
        _metadata: &'a MetadataMap,
    ) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(async { Ok(Caller::unrestricted()) })
    }
}

/// [`AuthMode::ApiKeys`]: the bootstrap key, then the store.
pub struct ApiKeyAuthenticator {
    store: Arc<dyn AuthStore>,
    bootstrap: Option<BootstrapKey>,
}

impl ApiKeyAuthenticator {
    pub fn new(store: Arc<dyn AuthStore>, bootstrap: Option<BootstrapKey>) -> Self {
        Self { store, bootstrap }
    }
}

impl Authenticator for ApiKeyAuthenticator {
    fn authenticate<'a>(
        &'a self,
        metadata: &'a MetadataMap,
    ) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(async move {
            let key = bearer(metadata)?;
            let digest = secret_digest(key.secret);
            if let Some(boot) = &self.bootstrap
                && boot.key_id == key.key_id
            {
                if digests_equal(&boot.secret_sha256, &digest) {
                    return Ok(Caller {
                        tenant: CLUSTER_TENANT.into(),
                        role: Role::Admin,
                        name: "cluster-admin".into(),
                        groups: Vec::new(),
                        key_id: boot.key_id.clone(),
                    });
                }
                return Err(AuthError::Unknown {
                    key_id: key.key_id.to_owned(),
                });
            }
            let unknown = || AuthError::Unknown {
                key_id: key.key_id.to_owned(),
            };
            let record = self.store.get_key(key.key_id).await?.ok_or_else(unknown)?;
            if !digests_equal(&record.secret_sha256, &digest) {
                return Err(unknown());
            }
            if record.is_revoked() {
                return Err(AuthError::Revoked {
                    key_id: record.key_id,
                });
            }
            Ok(Caller {
                tenant: record.tenant,
                role: record.role,
                name: record.name,
                groups: record.groups,
                key_id: record.key_id,
            })
        })
    }
}

/// The authenticator `config` asks for.
pub fn authenticator(config: &AuthConfig, store: Arc<dyn AuthStore>) -> Arc<dyn Authenticator> {
    match config.mode {
        AuthMode::Disabled => Arc::new(NoAuth),
        AuthMode::ApiKeys => Arc::new(ApiKeyAuthenticator::new(
            store,
            config.bootstrap_admin.clone(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", value.parse().expect("ascii"));
        m
    }

    #[tokio::test]
    async fn keys_authenticate_until_revoked() {
        let store = Arc::new(InMemoryAuthStore::new());
        let made =
            new_key("acme".into(), Role::Operator, "alice".into(), vec![], 1).expect("randomness");
        assert!(store.insert_key(made.record.clone()).await.expect("insert"));
        let auth = ApiKeyAuthenticator::new(store.clone(), None);
        let caller = auth
            .authenticate(&metadata(&format!("Bearer {}", made.api_key)))
            .await
            .expect("valid key");
        assert_eq!(caller.tenant, "acme");
        assert_eq!(caller.name, "alice");

        let wrong = format!(
            "Bearer kh_{}_{}",
            made.record.key_id,
            "0".repeat(SECRET_HEX)
        );
        let err = auth
            .authenticate(&metadata(&wrong))
            .await
            .expect_err("wrong");
        assert!(matches!(err, AuthError::Unknown { .. }), "{err}");
        assert!(!err.to_string().contains(&"0".repeat(SECRET_HEX)));

        store
            .revoke_key(&made.record.key_id, 5)
            .await
            .expect("revoke");
        let err = auth
            .authenticate(&metadata(&format!("Bearer {}", made.api_key)))
            .await
            .expect_err("revoked");
        assert!(matches!(err, AuthError::Revoked { .. }), "{err}");
    }

    #[tokio::test]
    async fn malformed_and_missing_keys_are_named() {
        let auth = ApiKeyAuthenticator::new(Arc::new(InMemoryAuthStore::new()), None);
        let err = auth
            .authenticate(&MetadataMap::new())
            .await
            .expect_err("none");
        assert!(matches!(err, AuthError::Missing));
        for bad in ["Basic abc", "Bearer xyz", "Bearer kh_12_34", "Bearer kh_zz"] {
            let err = auth.authenticate(&metadata(bad)).await.expect_err(bad);
            assert!(matches!(err, AuthError::Malformed(_)), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn bootstrap_key_is_a_cluster_admin() {
        let made = new_key("*".into(), Role::Admin, "x".into(), vec![], 1).expect("randomness");
        let boot = BootstrapKey::parse(&format!("  {}\n", made.api_key)).expect("parse");
        let auth = ApiKeyAuthenticator::new(Arc::new(InMemoryAuthStore::new()), Some(boot));
        let caller = auth
            .authenticate(&metadata(&format!("Bearer {}", made.api_key)))
            .await
            .expect("bootstrap");
        assert!(caller.is_cluster_wide());
        assert_eq!(caller.role, Role::Admin);
    }

    #[test]
    fn roles_allow_what_they_should() {
        let mut c = Caller::unrestricted();
        c.tenant = "acme".into();
        c.role = Role::Auditor;
        assert!(c.require(Action::ReadSessions).is_ok());
        assert!(c.require(Action::WriteSessions).is_err());
        c.role = Role::Operator;
        assert!(c.require(Action::WriteSessions).is_ok());
        assert!(c.require(Action::Administer).is_err());
        assert!(c.require_tenant("globex", "session").is_err());
        assert!(c.require_tenant("acme", "session").is_ok());
    }
}
