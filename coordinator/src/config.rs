//! The coordinator's configuration and the set of backends it runs on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;

use crate::auth::{AuthConfig, AuthStore, InMemoryAuthStore};
use crate::backend::codes::{CodeStore, InMemoryCodeStore, MAX_CODE_DIGITS, MIN_CODE_DIGITS};
use crate::backend::events::{EventBus, InMemoryEventBus};
use crate::backend::relays::{RelayDirectory, RelayInfo, StaticRelayDirectory};
use crate::backend::sessions::{InMemorySessionStore, SessionStore};
use crate::error::StartError;
use crate::limiter::{GuessLimiter, InMemoryGuessLimiter};
use crate::random::{self, RandomError};
use crate::tenants::TenantPolicies;

/// Everything a coordinator needs to run. Build it directly in tests; `main.rs` fills it
/// from flags.
#[derive(Clone)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    /// Signs every token of this cluster; relays hold the public half.
    pub signing_key: SigningKey,
    pub code_digits: usize,
    pub code_ttl: Duration,
    /// A session's duration when neither its request nor its tenant's policy sets one.
    pub default_max_duration: Duration,
    /// The longest session of any tenant; every tenant's maximum is at most this.
    pub max_max_duration: Duration,
    /// Per-tenant overrides of the two durations above, set by the cluster's operator.
    pub tenants: TenantPolicies,
    /// The configured relays, checked at start. The in-memory directory is built from
    /// the same list (`Backends::in_memory(config.relays.clone())`).
    pub relays: Vec<RelayInfo>,
    /// Take part in the etcd leader election (cluster-wide chores); `None` without etcd.
    pub leader: Option<crate::leader::LeaderConfig>,
    /// Who may call `SessionService` and `AdminService`; disabled in `dev`.
    pub auth: AuthConfig,
    /// Telework monitoring: the evidence sink's gRPC URL handed out with monitoring
    /// tickets. Empty: no monitoring (`GetMonitorTicket` answers FAILED_PRECONDITION).
    pub evidence_sink_url: String,
    /// How often a monitored device takes an evidence snapshot (1 s ..= 1 day).
    pub monitor_snapshot_interval: Duration,
    /// How long a monitoring ticket stays valid (1 min ..= 1 day).
    pub monitor_ticket_ttl: Duration,
}

/// The longest evidence sink URL accepted.
pub const MAX_SINK_URL_LEN: usize = 2048;
/// Bounds of [`CoordinatorConfig::monitor_snapshot_interval`], in seconds.
pub const MONITOR_SNAPSHOT_INTERVAL_SECS: std::ops::RangeInclusive<u64> = 1..=86_400;
/// Bounds of [`CoordinatorConfig::monitor_ticket_ttl`], in seconds.
pub const MONITOR_TICKET_TTL_SECS: std::ops::RangeInclusive<u64> = 60..=86_400;
/// Defaults of the two above.
pub const DEFAULT_MONITOR_SNAPSHOT_INTERVAL_SECS: u64 = 300;
pub const DEFAULT_MONITOR_TICKET_TTL_SECS: u64 = 3600;

impl std::fmt::Debug for CoordinatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The signing key is a secret: show only its public half.
        f.debug_struct("CoordinatorConfig")
            .field("listen", &self.listen)
            .field("metrics_listen", &self.metrics_listen)
            .field(
                "public_key",
                &hex::encode(self.signing_key.verifying_key().as_bytes()),
            )
            .field("code_digits", &self.code_digits)
            .field("code_ttl", &self.code_ttl)
            .field("default_max_duration", &self.default_max_duration)
            .field("max_max_duration", &self.max_max_duration)
            .field("tenants", &self.tenants)
            .field("relays", &self.relays)
            .field("leader", &self.leader)
            .field("auth", &self.auth)
            .field("evidence_sink_url", &self.evidence_sink_url)
            .field("monitor_snapshot_interval", &self.monitor_snapshot_interval)
            .field("monitor_ticket_ttl", &self.monitor_ticket_ttl)
            .finish()
    }
}

/// A fresh random Ed25519 signing key from the OS.
pub fn generate_signing_key() -> Result<SigningKey, RandomError> {
    Ok(SigningKey::from_bytes(&random::bytes::<32>()?))
}

impl CoordinatorConfig {
    /// A laptop configuration: 127.0.0.1:0, a fresh random signing key, 6-digit codes
    /// live for 10 minutes, 40-minute sessions by default, 4 hours at most, no tenant
    /// policies, no evidence sink (monitoring off; snapshots every 5 minutes and
    /// one-hour tickets once `evidence_sink_url` is set).
    ///
    /// # Panics
    /// If the operating system has no randomness to give, which leaves nothing to do.
    pub fn dev(relays: Vec<RelayInfo>) -> Self {
        let signing_key =
            generate_signing_key().expect("the OS must provide randomness for a signing key");
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: None,
            signing_key,
            code_digits: 6,
            code_ttl: Duration::from_secs(10 * 60),
            default_max_duration: Duration::from_secs(40 * 60),
            max_max_duration: Duration::from_secs(4 * 3600),
            tenants: TenantPolicies::new(),
            relays,
            leader: None,
            auth: AuthConfig::default(),
            evidence_sink_url: String::new(),
            monitor_snapshot_interval: Duration::from_secs(DEFAULT_MONITOR_SNAPSHOT_INTERVAL_SECS),
            monitor_ticket_ttl: Duration::from_secs(DEFAULT_MONITOR_TICKET_TTL_SECS),
        }
    }

    /// Refuses configurations the coordinator cannot honour.
    pub fn validate(&self) -> Result<(), StartError> {
        let bad = |s: String| Err(StartError::Config(s));
        if !(MIN_CODE_DIGITS..=MAX_CODE_DIGITS).contains(&self.code_digits) {
            return bad(format!(
                "code digits must be {MIN_CODE_DIGITS}..={MAX_CODE_DIGITS}, got {}",
                self.code_digits
            ));
        }
        if self.code_ttl.is_zero() {
            return bad("code TTL must be positive".into());
        }
        if self.default_max_duration.is_zero() || self.max_max_duration.is_zero() {
            return bad("session durations must be positive".into());
        }
        if self.default_max_duration > self.max_max_duration {
            return bad(format!(
                "default max duration {:?} exceeds the maximum {:?}",
                self.default_max_duration, self.max_max_duration
            ));
        }
        self.tenants
            .validate(self.max_max_duration)
            .map_err(|e| StartError::Config(e.to_string()))?;
        for r in &self.relays {
            validate_relay(r).map_err(StartError::Config)?;
        }
        let sink = &self.evidence_sink_url;
        let sink_ok =
            sink.is_empty() || sink.starts_with("http://") || sink.starts_with("https://");
        if !sink_ok {
            return bad(format!(
                "evidence sink URL {:?} must start with http:// or https://",
                self.evidence_sink_url
            ));
        }
        if self.evidence_sink_url.len() > MAX_SINK_URL_LEN {
            return bad(format!(
                "evidence sink URL is longer than {MAX_SINK_URL_LEN} bytes"
            ));
        }
        let secs = |d: Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
        if !MONITOR_SNAPSHOT_INTERVAL_SECS.contains(&secs(self.monitor_snapshot_interval)) {
            return bad(format!(
                "monitor snapshot interval must be 1..=86400 s, got {:?}",
                self.monitor_snapshot_interval
            ));
        }
        if !MONITOR_TICKET_TTL_SECS.contains(&secs(self.monitor_ticket_ttl)) {
            return bad(format!(
                "monitor ticket TTL must be 60..=86400 s, got {:?}",
                self.monitor_ticket_ttl
            ));
        }
        Ok(())
    }
}

/// Checks one relay entry; the message names the relay and the field.
pub fn validate_relay(r: &RelayInfo) -> Result<(), String> {
    if r.relay_id.is_empty() || r.relay_id.len() > kakehashi_proto::token::MAX_RELAY_ID_LEN {
        return Err(format!(
            "relay id {:?} must be 1..={} bytes",
            r.relay_id,
            kakehashi_proto::token::MAX_RELAY_ID_LEN
        ));
    }
    if r.quic_addr.is_empty() {
        return Err(format!("relay {}: QUIC address is empty", r.relay_id));
    }
    if !(r.admin_url.starts_with("http://") || r.admin_url.starts_with("https://")) {
        return Err(format!(
            "relay {}: admin URL {:?} must start with http:// or https://",
            r.relay_id, r.admin_url
        ));
    }
    if r.server_name.is_empty() {
        return Err(format!("relay {}: server name is empty", r.relay_id));
    }
    Ok(())
}

/// The storage the coordinator runs on. Clone-cheap.
#[derive(Clone)]
pub struct Backends {
    pub codes: Arc<dyn CodeStore>,
    pub sessions: Arc<dyn SessionStore>,
    pub events: Arc<dyn EventBus>,
    pub relays: Arc<dyn RelayDirectory>,
    /// Guess limits on JoinByCode; shared by replicas when it lives in Redis.
    pub limiter: Arc<dyn GuessLimiter>,
    /// API keys and tenant policies set through `AdminService`.
    pub auth: Arc<dyn AuthStore>,
}

impl Backends {
    /// Everything in this process: the embedded default, and what tests use.
    pub fn in_memory(relays: Vec<RelayInfo>) -> Self {
        Self {
            codes: Arc::new(InMemoryCodeStore::new()),
            sessions: Arc::new(InMemorySessionStore::new()),
            events: Arc::new(InMemoryEventBus::new()),
            relays: Arc::new(StaticRelayDirectory::new(relays)),
            limiter: Arc::new(InMemoryGuessLimiter::default()),
            auth: Arc::new(InMemoryAuthStore::new()),
        }
    }
}
