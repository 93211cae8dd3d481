//! Membership: the relay registers itself in etcd under a lease and rewrites its record
//! about every second (live sessions, load, draining), so coordinators can place
//! sessions on it and notice within one lease TTL when it is gone.
//!
//! etcd is never on the data path: when it is unreachable this task keeps retrying with
//! a fresh lease, and the relay's sessions keep flowing untouched.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, PutOptions};
use kakehashi_proto::membership;
use kakehashi_proto::pb;
use prost::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Where and how the relay registers. `None` in [`crate::RelayConfig`] means nowhere.
#[derive(Debug, Clone)]
pub struct Registration {
    /// etcd client URLs, e.g. `http://127.0.0.1:2379`.
    pub etcd_endpoints: Vec<String>,
    /// Key namespace shared with the coordinators (see `kakehashi_proto::membership`).
    pub namespace: String,
    pub region: String,
    /// Lease time-to-live: how long after its last refresh a dead relay stays placeable.
    pub lease_ttl: Duration,
    /// How often the record and the lease are refreshed.
    pub refresh: Duration,
}

impl Registration {
    pub fn new(etcd_endpoints: Vec<String>) -> Self {
        Self {
            etcd_endpoints,
            namespace: membership::DEFAULT_NAMESPACE.into(),
            region: String::new(),
            lease_ttl: Duration::from_secs(3),
            refresh: Duration::from_secs(1),
        }
    }
}

/// Described with the other relay metrics in `stats`.
const REGISTRATION_ERRORS: &str = "relay_registration_errors_total";

/// Budget of each etcd call; a refresh that takes longer counts as a failure.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait between registration attempts while etcd is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
enum RegisterError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {CALL_TIMEOUT:?}")]
    Timeout,
    #[error("lease {0:x} expired before it could be refreshed")]
    LeaseLost(i64),
}

async fn bounded<T>(
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, RegisterError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(RegisterError::Timeout),
    }
}

/// What the relay says about itself, minus the changing numbers.
pub(crate) struct Identity {
    pub relay_id: String,
    pub quic_address: String,
    pub admin_url: String,
    pub server_name: String,
    pub cert_sha256: Vec<u8>,
    pub region: String,
    pub capacity: u32,
}

/// Runs until `cancel` fires; then revokes the lease so the relay leaves placement at
/// once instead of after a TTL.
pub(crate) async fn run(
    reg: Registration,
    me: Identity,
    mut live: watch::Receiver<usize>,
    mut draining: watch::Receiver<bool>,
    registered: watch::Sender<bool>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut lease = None;
        // `session` watches `cancel` itself so that it can revoke the lease on the way
        // out; every etcd call in it is bounded, so it notices within CALL_TIMEOUT.
        let result = session(
            &reg,
            &me,
            &mut live,
            &mut draining,
            &registered,
            &cancel,
            &mut lease,
        )
        .await;
        match result {
            Ok(client) => {
                // Cancelled while registered: leave placement now.
                if let (Some(mut client), Some(id)) = (client, lease)
                    && let Err(e) = bounded(client.lease_revoke(id)).await
                {
                    warn!(error = %e, "could not revoke the registration lease; it expires on its own");
                }
                return;
            }
            Err(e) => {
                metrics::counter!(REGISTRATION_ERRORS).increment(1);
                warn!(error = %e, retry_in = ?backoff, "etcd registration lost; sessions keep flowing, retrying");
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One registration: a new lease, then refreshes until an error or cancellation.
/// Returns the client on cancellation so the caller can revoke the lease.
async fn session(
    reg: &Registration,
    me: &Identity,
    live: &mut watch::Receiver<usize>,
    draining: &mut watch::Receiver<bool>,
    registered: &watch::Sender<bool>,
    cancel: &CancellationToken,
    lease_out: &mut Option<i64>,
) -> Result<Option<Client>, RegisterError> {
    let options = ConnectOptions::new()
        .with_connect_timeout(CALL_TIMEOUT)
        .with_timeout(CALL_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), CALL_TIMEOUT);
    let mut client = bounded(Client::connect(&reg.etcd_endpoints, Some(options))).await?;
    let ttl = i64::try_from(reg.lease_ttl.as_secs().max(1)).unwrap_or(i64::MAX);
    let lease = bounded(client.lease_grant(ttl, None)).await?.id();
    *lease_out = Some(lease);
    let (mut keeper, mut acks) = bounded(client.lease_keep_alive(lease)).await?;
    let key = membership::relay_key(&reg.namespace, &me.relay_id);
    info!(relay = %me.relay_id, lease = format!("{lease:x}"), ttl, "registered in etcd");
    let mut tick = tokio::time::interval(reg.refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let record = record(me, *live.borrow_and_update(), *draining.borrow_and_update());
        bounded(client.put(
            key.as_bytes(),
            record.encode_to_vec(),
            Some(PutOptions::new().with_lease(lease)),
        ))
        .await?;
        bounded(keeper.keep_alive()).await?;
        match bounded(acks.message()).await? {
            Some(ack) if ack.ttl() > 0 => {}
            _ => return Err(RegisterError::LeaseLost(lease)),
        }
        // Readiness needs one registration; later etcd outages do not undo it (the
        // relay keeps its sessions, and the lease takes it out of placement anyway).
        registered.send_if_modified(|r| !std::mem::replace(r, true));
        tokio::select! {
            () = cancel.cancelled() => return Ok(Some(client)),
            _ = tick.tick() => {}
            // Draining must reach coordinators now, not at the next tick.
            Ok(()) = draining.changed() => {}
        }
    }
}

fn record(me: &Identity, live: usize, draining: bool) -> pb::RelayRegistration {
    let live = u32::try_from(live).unwrap_or(u32::MAX);
    pb::RelayRegistration {
        relay_id: me.relay_id.clone(),
        quic_address: me.quic_address.clone(),
        admin_url: me.admin_url.clone(),
        server_name: me.server_name.clone(),
        cert_sha256: me.cert_sha256.clone(),
        region: me.region.clone(),
        capacity: me.capacity,
        live_sessions: live,
        load: if me.capacity == 0 {
            1.0
        } else {
            f64::from(live) / f64::from(me.capacity)
        },
        draining,
        updated_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
    }
}
