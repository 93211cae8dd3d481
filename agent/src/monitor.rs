//! Telework monitoring, the device's side (`kakehashi device monitor`): presence events
//! and periodic evidence snapshots of the screen, signed with the device key, kept in
//! an on-disk ring of at most 500 snapshots while the sink cannot be reached (oldest
//! overwritten first, counted) and uploaded oldest first when it can.
//!
//! # Layout
//! - [`ring`]: the buffer's bookkeeping without I/O (bounds, eviction, batches,
//!   acknowledgement, the overwritten count).
//! - [`spool`]: the ring on disk, one synced file per item, rebuilt on start.
//! - [`snapshot`]: [`SnapshotSource`], the synthetic source and (feature `media`) the
//!   X11 screen fitted within 1920x1080.
//! - [`presence`]: ACTIVE/IDLE from the input idle time.
//! - this file: [`Monitor`], two owned tasks (three with an [`IdleSource`]). The capturer takes a snapshot every
//!   interval whatever the network does; the uploader gets a ticket from the
//!   coordinator (`AgentService.GetMonitorTicket`), renews it before it expires, and
//!   uploads to the ticket's sink (`EvidenceService.Upload`), deleting only what the
//!   sink's `stored_through_seq` covers.
//!
//! # Presence events
//! ONLINE when the monitor starts; OFFLINE on the first successful upload after
//! failures, dated when the failures began and carrying how long they lasted; STOPPED
//! on [`Monitor::stop`]. IDLE when no keyboard or pointer input came for
//! [`MonitorConfig::idle_after`] (5 minutes by default), ACTIVE at the next input, from
//! an [`IdleSource`] ([`X11Idle`]: the X server's MIT-SCREEN-SAVER idle time) read
//! every [`MonitorConfig::idle_poll`].
//!
//! # Invariants
//! - An item leaves the device's disk only when the sink said it holds it (or when the
//!   ring overwrote it, which is counted and reported to the sink).
//! - Sequence numbers strictly increase across restarts (see [`spool`]); one monitor
//!   at a time uses a spool directory (a lock file, flock).
//! - While the coordinator answers PERMISSION_DENIED (monitoring is off for this
//!   device or its tenant) nothing is captured and nothing uploaded; the monitor asks
//!   again every minute, since policy may change.

pub mod presence;
pub mod ring;
pub mod snapshot;
pub mod spool;
#[cfg(test)]
mod tests;
mod ticket;
mod upload;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kakehashi_proto::monitor::{OFFLINE_BUFFER_SNAPSHOTS, sign_item};
use kakehashi_proto::pb;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use crate::device::DeviceKey;
#[cfg(feature = "media")]
pub use presence::X11Idle;
pub use presence::{DEFAULT_IDLE_AFTER, DEFAULT_IDLE_POLL, IdleSource, IdleTracker};
pub use snapshot::{SnapshotError, SnapshotSource, fit_within};
#[cfg(feature = "media")]
pub use snapshot::{SyntheticSnapshots, X11Snapshots};
pub use spool::{Spool, SpoolError};
use ticket::CoordinatorTickets;
use ticket::TicketSource;
pub use ticket::ticket_request;
#[cfg(test)]
use ticket::{Ticket, TicketError};
use upload::Uploader;

/// The snapshot interval until a ticket names one.
pub const DEFAULT_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(60);
/// How long [`Monitor::stop`] tries to deliver what is buffered.
const STOP_FLUSH: Duration = Duration::from_secs(10);
/// Answers from the coordinator and the sink are small.
pub(crate) const MAX_RESPONSE_BYTES: usize = 64 * 1024;
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`Monitor::start`] needs.
pub struct MonitorConfig {
    /// The coordinator's gRPC URL (tickets come from there).
    pub coordinator_url: String,
    /// The enrolled device's key: proves the device to the coordinator, signs items.
    pub key: DeviceKey,
    /// The spool directory (made 0700 if missing); it survives restarts.
    pub spool_dir: PathBuf,
    pub source: Box<dyn SnapshotSource + Send>,
    /// `None`: the ticket's interval ([`DEFAULT_SNAPSHOT_INTERVAL`] until there is one);
    /// `Some`: this one whatever the ticket says (tests, demos).
    pub snapshot_interval: Option<Duration>,
    /// Snapshots kept while offline ([`OFFLINE_BUFFER_SNAPSHOTS`], 500, by default).
    pub max_snapshots: usize,
    /// Where the input idle time comes from (`None`: no ACTIVE/IDLE presence).
    pub idle: Option<Box<dyn IdleSource + Send>>,
    /// No input for this long is IDLE ([`DEFAULT_IDLE_AFTER`], 5 minutes).
    pub idle_after: Duration,
    /// How often the idle time is read ([`DEFAULT_IDLE_POLL`], 10 s).
    pub idle_poll: Duration,
}

impl MonitorConfig {
    pub fn new(
        coordinator_url: impl Into<String>,
        key: DeviceKey,
        spool_dir: impl Into<PathBuf>,
        source: Box<dyn SnapshotSource + Send>,
    ) -> Self {
        Self {
            coordinator_url: coordinator_url.into(),
            key,
            spool_dir: spool_dir.into(),
            source,
            snapshot_interval: None,
            max_snapshots: OFFLINE_BUFFER_SNAPSHOTS,
            idle: None,
            idle_after: DEFAULT_IDLE_AFTER,
            idle_poll: DEFAULT_IDLE_POLL,
        }
    }
}

/// What the monitor has done so far (since it started; the buffer counts include what
/// a previous run left in the spool).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MonitorStats {
    /// Snapshots captured and stored in the spool.
    pub snapshots_taken: u64,
    /// Captures that failed (logged; the next interval tries again).
    pub capture_failures: u64,
    /// Snapshots in the spool, not yet acknowledged by the sink.
    pub buffered_snapshots: usize,
    /// Items (snapshots and presence events) in the spool.
    pub buffered_items: usize,
    /// Snapshots the full buffer overwrote, lost to the sink.
    pub overwritten_total: u64,
    /// The sink's last `stored_through_seq` (0 before the first upload).
    pub stored_through_seq: u64,
    pub uploads_ok: u64,
    /// Failed ticket requests and uploads.
    pub uploads_failed: u64,
    /// Items the sink refused for good (logged and dropped).
    pub items_rejected: u64,
    /// The last upload (or ticket request) succeeded.
    pub online: bool,
    /// The coordinator says monitoring is off for this device (PERMISSION_DENIED).
    pub monitoring_denied: bool,
}

/// Why the monitor could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("coordinator URL {url:?} is not usable: {error}")]
    CoordinatorUrl {
        url: String,
        error: tonic::transport::Error,
    },
    #[error("the monitor's spool task failed: {0}")]
    Task(String),
}

/// What both tasks and the [`Monitor`] share.
pub(crate) struct Shared {
    spool: Mutex<Spool>,
    key: DeviceKey,
    device_id: String,
    stats: watch::Sender<MonitorStats>,
    /// Something new is in the spool.
    wake: Notify,
    /// The snapshot interval in force.
    interval: watch::Sender<Duration>,
    interval_override: bool,
}

impl Shared {
    /// Runs `f` on the spool on a blocking thread (it reads, writes and syncs files),
    /// then brings the buffer counts in the stats up to date.
    async fn spool<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Shared, &mut Spool) -> R + Send + 'static,
    ) -> Result<R, MonitorError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut spool = me.spool.lock().unwrap_or_else(|p| p.into_inner());
            let r = f(&me, &mut spool);
            let ring = spool.ring();
            let (snapshots, items, overwritten) =
                (ring.snapshots(), ring.len(), ring.overwritten_total());
            drop(spool);
            me.stats.send_if_modified(|s| {
                let changed = (s.buffered_snapshots, s.buffered_items, s.overwritten_total)
                    != (snapshots, items, overwritten);
                s.buffered_snapshots = snapshots;
                s.buffered_items = items;
                s.overwritten_total = overwritten;
                changed
            });
            r
        })
        .await
        .map_err(|e| MonitorError::Task(e.to_string()))
    }

    /// Signs and stores one item captured at `captured_at_unix_ms`.
    async fn append(
        self: &Arc<Self>,
        captured_at_unix_ms: i64,
        body: pb::evidence_item::Body,
    ) -> Result<u64, MonitorError> {
        let item = pb::EvidenceItem {
            seq: 0,
            captured_at_unix_ms,
            body: Some(body),
            signature: Vec::new(),
        };
        let seq = self
            .spool(move |me, spool| {
                spool.append(item, |item| {
                    sign_item(&me.device_id, me.key.signing_key(), item)
                })
            })
            .await??;
        self.wake.notify_one();
        Ok(seq)
    }

    async fn presence(self: &Arc<Self>, at_ms: i64, state: pb::PresenceState, offline_secs: u32) {
        self.presence_idle(at_ms, state, 0, offline_secs).await;
    }

    async fn presence_idle(
        self: &Arc<Self>,
        at_ms: i64,
        state: pb::PresenceState,
        idle_secs: u32,
        offline_secs: u32,
    ) {
        let body = pb::evidence_item::Body::Presence(pb::Presence {
            state: state as i32,
            idle_secs,
            offline_secs,
            detail: String::new(),
        });
        if let Err(e) = self.append(at_ms, body).await {
            warn!(error = %e, state = ?state, "could not store a presence event");
        }
    }
}

/// A running monitor. Dropping it stops its tasks at once (what is in the spool stays
/// there for the next start, and the spool is unlocked once the aborted tasks are
/// gone); [`Monitor::stop`] stops it cleanly and releases the spool on return.
pub struct Monitor {
    shared: Arc<Shared>,
    stats: watch::Receiver<MonitorStats>,
    cancel: CancellationToken,
    capturer: Option<AbortOnDropHandle<()>>,
    idle: Option<AbortOnDropHandle<()>>,
    uploader: Option<AbortOnDropHandle<Uploader>>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("device_id", &self.shared.device_id)
            .field("stats", &*self.stats.borrow())
            .finish_non_exhaustive()
    }
}

impl Monitor {
    /// Opens the spool, records ONLINE and starts capturing and uploading. Fails only
    /// on an unusable spool directory or coordinator URL: an unreachable coordinator
    /// or sink is waited out.
    pub async fn start(config: MonitorConfig) -> Result<Self, MonitorError> {
        let url = config.coordinator_url.clone();
        Self::start_with(config, move |shared| {
            Ok(Box::new(CoordinatorTickets::new(&url, shared)?) as Box<dyn TicketSource>)
        })
        .await
    }

    /// [`Monitor::start`] with tickets from elsewhere (tests).
    pub(crate) async fn start_with(
        config: MonitorConfig,
        tickets: impl FnOnce(Arc<Shared>) -> Result<Box<dyn TicketSource>, MonitorError>,
    ) -> Result<Self, MonitorError> {
        let MonitorConfig {
            key,
            spool_dir,
            source,
            snapshot_interval,
            max_snapshots,
            idle,
            idle_after,
            idle_poll,
            ..
        } = config;
        let spool = tokio::task::spawn_blocking(move || Spool::open(&spool_dir, max_snapshots))
            .await
            .map_err(|e| MonitorError::Task(e.to_string()))??;
        let (stats_tx, stats) = watch::channel(MonitorStats::default());
        let (interval, _) = watch::channel(
            snapshot_interval
                .unwrap_or(DEFAULT_SNAPSHOT_INTERVAL)
                .max(Duration::from_millis(1)),
        );
        let shared = Arc::new(Shared {
            spool: Mutex::new(spool),
            device_id: key.device_id(),
            key,
            stats: stats_tx,
            wake: Notify::new(),
            interval,
            interval_override: snapshot_interval.is_some(),
        });
        let tickets = tickets(shared.clone())?;
        shared
            .presence(unix_ms(), pb::PresenceState::Online, 0)
            .await;
        info!(device = %shared.device_id, "monitoring started");
        let cancel = CancellationToken::new();
        let capturer = AbortOnDropHandle::new(tokio::spawn(capture_loop(
            shared.clone(),
            source,
            cancel.clone(),
        )));
        let idle = idle.map(|source| {
            AbortOnDropHandle::new(tokio::spawn(idle_loop(
                shared.clone(),
                source,
                IdleTracker::new(idle_after),
                idle_poll.max(Duration::from_millis(1)),
                cancel.clone(),
            )))
        });
        let uploader = Uploader::new(shared.clone(), tickets);
        let uploader = AbortOnDropHandle::new(tokio::spawn(uploader.run(cancel.clone())));
        Ok(Self {
            shared,
            stats,
            cancel,
            capturer: Some(capturer),
            idle,
            uploader: Some(uploader),
        })
    }

    pub fn device_id(&self) -> &str {
        &self.shared.device_id
    }

    /// The counters now.
    pub fn stats(&self) -> MonitorStats {
        self.stats.borrow().clone()
    }

    /// A receiver that sees every change of the counters (for a status line, or a
    /// test waiting for a state with `wait_for`).
    pub fn watch(&self) -> watch::Receiver<MonitorStats> {
        self.stats.clone()
    }

    /// Stops capturing, records STOPPED and tries for up to 10 s to upload what is
    /// buffered; what is not delivered stays in the spool for the next start.
    pub async fn stop(mut self) -> MonitorStats {
        self.cancel.cancel();
        if let Some(capturer) = self.capturer.take() {
            let _ = capturer.await;
        }
        if let Some(idle) = self.idle.take() {
            let _ = idle.await;
        }
        let uploader = match self.uploader.take() {
            Some(u) => u.await.ok(),
            None => None,
        };
        self.shared
            .presence(unix_ms(), pb::PresenceState::Stopped, 0)
            .await;
        if let Some(mut uploader) = uploader
            && tokio::time::timeout(STOP_FLUSH, uploader.flush())
                .await
                .is_err()
        {
            warn!("monitor stopped with evidence still buffered: the sink did not take it in time");
        }
        info!(device = %self.shared.device_id, "monitoring stopped");
        self.stats()
    }
}

/// Reads the input idle time every `poll` and records ACTIVE/IDLE changes, until
/// cancelled. Nothing is read while monitoring is refused.
async fn idle_loop(
    shared: Arc<Shared>,
    source: Box<dyn IdleSource + Send>,
    mut tracker: IdleTracker,
    poll: Duration,
    cancel: CancellationToken,
) {
    let mut source = Some(source);
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if shared.stats.borrow().monitoring_denied {
            continue;
        }
        let Some(mut src) = source.take() else { return };
        let Ok((src, idle_for)) = tokio::task::spawn_blocking(move || {
            let d = src.idle();
            (src, d)
        })
        .await
        else {
            warn!("the idle time source failed; no more ACTIVE/IDLE presence");
            return;
        };
        source = Some(src);
        if let Some((state, idle_secs)) = idle_for.and_then(|d| tracker.observe(d)) {
            debug!(?state, idle_secs, "presence changed");
            shared.presence_idle(unix_ms(), state, idle_secs, 0).await;
        }
    }
}

/// Takes a snapshot now and then every interval, until cancelled. Failures are
/// counted and logged; the schedule does not depend on the network.
async fn capture_loop(
    shared: Arc<Shared>,
    source: Box<dyn SnapshotSource + Send>,
    cancel: CancellationToken,
) {
    let mut interval = shared.interval.subscribe();
    let mut source = Some(source);
    let mut last = Instant::now();
    let mut next = last;
    let mut denied_before = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
            Ok(()) = interval.changed() => {
                next = last + *interval.borrow_and_update();
                continue;
            }
        }
        last = Instant::now();
        next = last + *interval.borrow_and_update();
        let denied = shared.stats.borrow().monitoring_denied;
        if denied != denied_before {
            denied_before = denied;
            if denied {
                info!("snapshots paused: monitoring is off for this device");
            } else {
                info!("snapshots resumed");
            }
        }
        if denied {
            continue;
        }
        let Some(mut src) = source.take() else { return };
        let at_ms = unix_ms();
        let (src, result) = match tokio::task::spawn_blocking(move || {
            let r = src.capture();
            (src, r)
        })
        .await
        {
            Ok(pair) => pair,
            Err(e) => {
                warn!(error = %e, "the snapshot source failed; no more snapshots");
                shared.stats.send_modify(|s| s.capture_failures += 1);
                return;
            }
        };
        source = Some(src);
        match result {
            Ok(snapshot) => {
                match shared
                    .append(at_ms, pb::evidence_item::Body::Snapshot(snapshot))
                    .await
                {
                    Ok(seq) => {
                        debug!(seq, "snapshot stored");
                        shared.stats.send_modify(|s| s.snapshots_taken += 1);
                    }
                    Err(e) => {
                        warn!(error = %e, "could not store a snapshot");
                        shared.stats.send_modify(|s| s.capture_failures += 1);
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "snapshot failed");
                shared.stats.send_modify(|s| s.capture_failures += 1);
            }
        }
    }
}

pub(crate) fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
