//! The etcd-backed relay directory: a watch-fed view of the relays registered under
//! `<namespace>relays/` (each under its own lease, rewritten about every second by the
//! relay itself), and placement on it.
//!
//! Placement never writes to etcd: load comes from the relays' own refreshes plus this
//! process's recent placements ([`Accounting::ReportedPlusRecent`]), so etcd's load
//! grows with relays, not with sessions.
//!
//! When etcd cannot be reached the view is kept for [`EtcdDirectoryConfig::stale_grace`]
//! (losing one member of three costs a reconnect, not an outage); after that placement
//! answers [`BackendError::DirectoryUnavailable`] until the watch is back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use kakehashi_proto::membership;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::relays::{Accounting, RelayDirectory, RelayInfo, RelayView};
use super::{BackendError, BoxFuture};
use crate::config::validate_relay;

/// How the directory reaches etcd and places.
#[derive(Debug, Clone)]
pub struct EtcdDirectoryConfig {
    pub endpoints: Vec<String>,
    /// Key namespace shared with the relays (`kakehashi_proto::membership`).
    pub namespace: String,
    /// Relays in this region are preferred while they have room.
    pub preferred_region: String,
    /// How long the last view stays usable without contact with etcd.
    pub stale_grace: Duration,
    /// How long this process's own placements count on top of a relay's report.
    pub recent_window: Duration,
}

impl EtcdDirectoryConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            namespace: membership::DEFAULT_NAMESPACE.into(),
            preferred_region: String::new(),
            stale_grace: Duration::from_secs(5),
            recent_window: Duration::from_secs(5),
        }
    }
}

/// Budget of one etcd call.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the watch asks etcd for a progress notice, so a silent (stopped, cut off)
/// etcd is noticed even when no relay writes.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Counter of lost watches (connection errors, timeouts, cancellations).
pub const DIRECTORY_ERRORS: &str = "coordinator_relay_directory_errors_total";

/// Longest wait between reconnects.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// etcd client options shared by the directory and the leader election: bounded calls,
/// HTTP/2 keep-alive to notice dead members, and no answers from a member that has lost
/// its leader (a partitioned member would serve a stale view).
pub fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(CALL_TIMEOUT)
        .with_timeout(CALL_TIMEOUT)
        .with_keep_alive(Duration::from_secs(1), CALL_TIMEOUT)
        .with_keep_alive_while_idle(true)
        .with_require_leader(true)
}

struct Shared {
    view: RelayView,
    /// When etcd last answered the watch (an event, a progress notice or a read).
    last_contact: Option<Instant>,
    last_error: String,
}

/// Relays from etcd. Cheap to share behind an `Arc`; dropping it stops the watch.
pub struct EtcdRelayDirectory {
    config: EtcdDirectoryConfig,
    shared: Arc<Mutex<Shared>>,
    synced: watch::Receiver<u64>,
    _tasks: JoinSet<()>,
}

impl EtcdRelayDirectory {
    /// Starts watching etcd. Never fails: until etcd answers, placement reports the
    /// directory unavailable. Must be called inside a tokio runtime.
    pub fn start(config: EtcdDirectoryConfig) -> Self {
        metrics::describe_counter!(
            DIRECTORY_ERRORS,
            "Times the relay directory lost its etcd watch and had to reconnect"
        );
        let seed = crate::random::u64().unwrap_or(0x9E37_79B9_7F4A_7C15);
        let shared = Arc::new(Mutex::new(Shared {
            view: RelayView::new(Accounting::ReportedPlusRecent(config.recent_window), seed),
            last_contact: None,
            last_error: "not connected yet".into(),
        }));
        let (synced_tx, synced) = watch::channel(0);
        let mut tasks = JoinSet::new();
        tasks.spawn(watch_loop(config.clone(), shared.clone(), synced_tx));
        Self {
            config,
            shared,
            synced,
            _tasks: tasks,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // The view is plain data; a panic elsewhere leaves it usable.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the view has been read from etcd `n` times in all (1 = the first
    /// full read). For tests and start-up logging.
    pub async fn wait_synced(&self, n: u64) {
        let mut rx = self.synced.clone();
        let _ = rx.wait_for(|s| *s >= n).await;
    }

    /// Every known relay with what placement knows of it: (relay, capacity, reported
    /// live sessions, draining). Sorted by id.
    pub fn snapshot(&self) -> Vec<(RelayInfo, u64, u64, bool)> {
        self.lock()
            .view
            .entries()
            .into_iter()
            .map(|e| (e.info.clone(), e.capacity, e.reported, e.draining))
            .collect()
    }

    fn usable(&self, shared: &Shared) -> Result<(), BackendError> {
        match shared.last_contact {
            Some(t) if t.elapsed() <= self.config.stale_grace => Ok(()),
            Some(t) => Err(BackendError::DirectoryUnavailable(format!(
                "no contact with etcd for {:.1} s (last error: {})",
                t.elapsed().as_secs_f64(),
                shared.last_error
            ))),
            None => Err(BackendError::DirectoryUnavailable(format!(
                "etcd has not been reached yet (last error: {})",
                shared.last_error
            ))),
        }
    }
}

impl RelayDirectory for EtcdRelayDirectory {
    fn list(&self) -> BoxFuture<'_, Result<Vec<RelayInfo>, BackendError>> {
        Box::pin(async move {
            let shared = self.lock();
            self.usable(&shared)?;
            Ok(shared
                .view
                .entries()
                .into_iter()
                .filter(|e| !e.draining)
                .map(|e| e.info.clone())
                .collect())
        })
    }

    fn pick<'a>(
        &'a self,
        avoid: Option<&'a str>,
    ) -> BoxFuture<'a, Result<RelayInfo, BackendError>> {
        Box::pin(async move {
            let mut shared = self.lock();
            self.usable(&shared)?;
            shared
                .view
                .pick(avoid, &self.config.preferred_region, Instant::now())
                .ok_or(BackendError::NoRelays)
        })
    }

    fn release<'a>(&'a self, relay_id: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.lock().view.release(relay_id);
            Ok(())
        })
    }
}

#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the watch was cancelled by etcd: {0}")]
    Cancelled(String),
    #[error("the watch stream ended")]
    Ended,
}

async fn bounded<T>(
    limit: Duration,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, WatchError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(WatchError::Timeout(limit)),
    }
}

async fn watch_loop(
    config: EtcdDirectoryConfig,
    shared: Arc<Mutex<Shared>>,
    synced: watch::Sender<u64>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let error = match read_and_watch(&config, &shared, &synced, &mut backoff).await {
            Ok(never) => match never {},
            Err(e) => e,
        };
        metrics::counter!(DIRECTORY_ERRORS).increment(1);
        crate::telemetry::backend_error("etcd");
        warn!(error = %error, retry_in = ?backoff, "relay directory lost its etcd watch; reconnecting");
        if let Ok(mut s) = shared.lock() {
            s.last_error = error.to_string();
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn decode(namespace: &str, key: &[u8], value: &[u8]) -> Option<(RelayInfo, u64, u64, bool)> {
    let id = membership::relay_id_of(namespace, key)?;
    let reg = match membership::decode_registration(value) {
        Ok(r) => r,
        Err(e) => {
            warn!(relay = id, error = %e, "ignoring an unreadable relay registration");
            return None;
        }
    };
    let mut cert = [0u8; 32];
    if reg.relay_id != id || reg.cert_sha256.len() != 32 {
        warn!(
            relay = id,
            "ignoring a registration whose id or certificate hash is malformed"
        );
        return None;
    }
    cert.copy_from_slice(&reg.cert_sha256);
    let info = RelayInfo {
        relay_id: reg.relay_id,
        quic_addr: reg.quic_address,
        admin_url: reg.admin_url,
        server_name: reg.server_name,
        cert_sha256: cert,
        region: reg.region,
    };
    if let Err(e) = validate_relay(&info) {
        warn!(relay = id, error = %e, "ignoring an invalid relay registration");
        return None;
    }
    Some((
        info,
        u64::from(reg.capacity),
        u64::from(reg.live_sessions),
        reg.draining,
    ))
}

/// Reads every registration, then follows changes from the revision read. Returns
/// only with an error; the caller reconnects and reads afresh.
async fn read_and_watch(
    config: &EtcdDirectoryConfig,
    shared: &Arc<Mutex<Shared>>,
    synced: &watch::Sender<u64>,
    backoff: &mut Duration,
) -> Result<std::convert::Infallible, WatchError> {
    let prefix = membership::relays_prefix(&config.namespace);
    let mut client = bounded(
        CALL_TIMEOUT,
        Client::connect(&config.endpoints, Some(connect_options())),
    )
    .await?;
    let resp = bounded(
        CALL_TIMEOUT,
        client.get(prefix.as_bytes(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let relays: Vec<_> = resp
        .kvs()
        .iter()
        .filter_map(|kv| decode(&config.namespace, kv.key(), kv.value()))
        .collect();
    let count = relays.len();
    {
        let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
        s.view.replace_all(relays);
        s.last_contact = Some(Instant::now());
    }
    synced.send_modify(|n| *n += 1);
    info!(relays = count, revision, "relay directory read from etcd");
    *backoff = Duration::from_millis(100);

    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let stream = bounded(CALL_TIMEOUT, client.watch(prefix.as_bytes(), Some(options))).await?;
    let (mut requests, mut responses) = stream.split();
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Silence longer than this means etcd is gone even if the connection is not.
    let silence = PROGRESS_EVERY * 3;
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            _ = progress.tick() => {
                if last_heard.elapsed() > silence {
                    return Err(WatchError::Timeout(silence));
                }
                bounded(CALL_TIMEOUT, requests.request_progress()).await?;
            }
            msg = responses.message() => {
                let Some(msg) = msg? else { return Err(WatchError::Ended) };
                last_heard = Instant::now();
                if msg.canceled() {
                    return Err(WatchError::Cancelled(msg.cancel_reason().to_owned()));
                }
                // The first response only confirms the watch ("created", no events);
                // progress notices carry no events either. Both prove etcd is there.
                let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
                s.last_contact = Some(last_heard);
                for event in msg.events() {
                    let Some(kv) = event.kv() else { continue };
                    match event.event_type() {
                        EventType::Put => {
                            if let Some((info, capacity, live, draining)) =
                                decode(&config.namespace, kv.key(), kv.value())
                            {
                                if s.view.get(&info.relay_id).is_none() {
                                    info!(relay = %info.relay_id, addr = %info.quic_addr, region = %info.region, "relay joined");
                                }
                                s.view.upsert(info, capacity, live, draining);
                            }
                        }
                        EventType::Delete => {
                            if let Some(id) = membership::relay_id_of(&config.namespace, kv.key())
                                && s.view.remove(id)
                            {
                                info!(relay = id, "relay left (lease expired or revoked)");
                            }
                        }
                    }
                }
                debug!(events = msg.events().len(), "relay directory updated");
            }
        }
    }
}
