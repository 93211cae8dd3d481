//! The monitor's loop against a real gRPC evidence sink (in this test, on
//! 127.0.0.1:0) that checks tickets and item signatures as the real one does, records
//! what it stores and can be told to fail. Tickets are handed over directly (the
//! [`TicketSource`] seam); the loadtest's end-to-end test gets them from a real
//! coordinator.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use ed25519_dalek::SigningKey;
use kakehashi_proto::monitor::{MonitorTicket, check_item};
use kakehashi_proto::pb;
use tokio::task::JoinSet;

use super::*;

/// Bound on every wait in these tests: a hang fails, a slow machine does not.
const WAIT: Duration = Duration::from_secs(60);

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).expect("randomness");
        Self(std::env::temp_dir().join(format!("kakehashi-monitor-{}", hex::encode(r))))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the test sink stored.
#[derive(Debug, Default)]
struct Stored {
    items: Vec<pb::EvidenceItem>,
    overwritten: u64,
    high_water: u64,
}

#[derive(Clone)]
struct TestSink {
    coordinator: ed25519_dalek::VerifyingKey,
    stored: Arc<Mutex<Stored>>,
    failing: Arc<AtomicBool>,
    uploads: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl pb::evidence_service_server::EvidenceService for TestSink {
    async fn upload(
        &self,
        request: tonic::Request<pb::UploadEvidenceRequest>,
    ) -> Result<tonic::Response<pb::UploadEvidenceResponse>, tonic::Status> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(tonic::Status::unavailable("test sink is failing"));
        }
        let req = request.into_inner();
        let ticket = MonitorTicket::verify(&req.ticket, &self.coordinator, unix_ms() as u64 / 1000)
            .map_err(|e| tonic::Status::unauthenticated(e.to_string()))?;
        if req.items.is_empty() || req.items.len() > kakehashi_proto::monitor::MAX_ITEMS_PER_UPLOAD
        {
            return Err(tonic::Status::invalid_argument("item count"));
        }
        let mut last = 0;
        for item in &req.items {
            check_item(&ticket, item)
                .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
            if item.seq <= last {
                return Err(tonic::Status::invalid_argument("seqs not increasing"));
            }
            last = item.seq;
        }
        self.uploads.fetch_add(1, Ordering::SeqCst);
        let mut stored = self.stored.lock().expect("lock");
        let (mut new, mut dup) = (0, 0);
        for item in req.items {
            if item.seq <= stored.high_water {
                dup += 1;
            } else {
                stored.high_water = item.seq;
                stored.items.push(item);
                new += 1;
            }
        }
        stored.overwritten += req.snapshots_overwritten;
        Ok(tonic::Response::new(pb::UploadEvidenceResponse {
            stored_through_seq: stored.high_water,
            stored: new,
            duplicates: dup,
        }))
    }
}

struct Harness {
    sink: TestSink,
    url: String,
    coordinator: SigningKey,
    _tasks: JoinSet<()>,
}

impl Harness {
    async fn start() -> Result<Self> {
        let coordinator = SigningKey::from_bytes(&[11; 32]);
        let sink = TestSink {
            coordinator: coordinator.verifying_key(),
            stored: Arc::default(),
            failing: Arc::default(),
            uploads: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let service = pb::evidence_service_server::EvidenceServiceServer::new(sink.clone())
            .max_decoding_message_size(kakehashi_proto::monitor::MAX_UPLOAD_BYTES);
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        Ok(Self {
            sink,
            url,
            coordinator,
            _tasks: tasks,
        })
    }

    fn ticket_for(&self, key: &DeviceKey) -> Result<Ticket> {
        let now = unix_ms() as u64 / 1000;
        let bytes = MonitorTicket {
            device_id: key.device_id(),
            public_key: key.public_key(),
            tenant: "acme".into(),
            issued_at: now,
            expires_at: now + 3600,
        }
        .sign(&self.coordinator)?;
        Ok(Ticket {
            bytes,
            sink_url: self.url.clone(),
            interval: Duration::from_secs(3600),
            expires_at_unix_ms: (now as i64 + 3600) * 1000,
        })
    }

    fn stored(&self) -> std::sync::MutexGuard<'_, Stored> {
        self.sink.stored.lock().expect("lock")
    }
}

/// Tickets from a list of answers; the last one repeats.
struct Tickets(VecDeque<Result<Ticket, String>>);

impl TicketSource for Tickets {
    fn fetch(&mut self) -> ticket::TicketFuture<'_> {
        let answer = if self.0.len() > 1 {
            self.0.pop_front()
        } else {
            self.0.front().cloned()
        };
        Box::pin(async move {
            match answer {
                Some(Ok(t)) => Ok(t),
                Some(Err(denied)) => Err(TicketError::Denied(denied)),
                None => Err(TicketError::Failed("no tickets".into())),
            }
        })
    }
}

/// Tiny "pictures" (the sink checks limits and signatures, not PNG): `budget`
/// captures succeed, later ones fail until the budget is raised. A capture listed in
/// `oversized` (by its number, from 0) is 4000 pixels wide, which the sink refuses.
#[derive(Clone, Default)]
struct Pictures {
    budget: Arc<AtomicU64>,
    taken: Arc<AtomicU64>,
    oversized: Option<u64>,
}

impl SnapshotSource for Pictures {
    fn capture(&mut self) -> Result<pb::Snapshot, SnapshotError> {
        let n = self.taken.load(Ordering::SeqCst);
        if n >= self.budget.load(Ordering::SeqCst) {
            return Err(SnapshotError::Unavailable("out of pictures".into()));
        }
        self.taken.store(n + 1, Ordering::SeqCst);
        Ok(pb::Snapshot {
            width: if self.oversized == Some(n) { 4000 } else { 2 },
            height: 2,
            format: "png".into(),
            data: n.to_be_bytes().to_vec(),
        })
    }
}

fn picture_no(item: &pb::EvidenceItem) -> Option<u64> {
    match &item.body {
        Some(pb::evidence_item::Body::Snapshot(s)) => {
            Some(u64::from_be_bytes(s.data.as_slice().try_into().ok()?))
        }
        _ => None,
    }
}

fn presence_of(item: &pb::EvidenceItem) -> Option<pb::PresenceState> {
    match &item.body {
        Some(pb::evidence_item::Body::Presence(p)) => pb::PresenceState::try_from(p.state).ok(),
        _ => None,
    }
}

async fn start(
    dir: &std::path::Path,
    key: [u8; 32],
    pictures: &Pictures,
    max_snapshots: usize,
    tickets: Vec<Result<Ticket, String>>,
) -> Result<Monitor> {
    let mut config = MonitorConfig::new(
        "http://unused.invalid",
        DeviceKey::from_secret(key),
        dir,
        Box::new(pictures.clone()),
    );
    config.snapshot_interval = Some(Duration::from_millis(5));
    config.max_snapshots = max_snapshots;
    Ok(Monitor::start_with(config, move |_| {
        Ok(Box::new(Tickets(tickets.into())) as Box<dyn TicketSource>)
    })
    .await?)
}

async fn wait_for(
    monitor: &Monitor,
    what: &str,
    pred: impl FnMut(&MonitorStats) -> bool,
) -> Result<MonitorStats> {
    let mut rx = monitor.watch();
    let stats = tokio::time::timeout(WAIT, rx.wait_for(pred))
        .await
        .with_context(|| format!("waiting for {what}: {:?}", monitor.stats()))??
        .clone();
    Ok(stats)
}

#[tokio::test]
async fn an_overflowing_buffer_keeps_the_newest_and_delivers_them_after_reconnect() -> Result<()> {
    let harness = Harness::start().await?;
    let tmp = TempDir::new();
    let key = [5u8; 32];
    let ticket = harness.ticket_for(&DeviceKey::from_secret(key))?;
    harness.sink.failing.store(true, Ordering::SeqCst);
    let pictures = Pictures::default();
    pictures.budget.store(25, Ordering::SeqCst);
    let monitor = start(&tmp.0, key, &pictures, 10, vec![Ok(ticket)]).await?;

    // The sink is down: 25 snapshots into a ring of 10.
    // (An eviction during a failing upload is counted once that upload has failed.)
    let s = wait_for(&monitor, "25 snapshots while offline", |s| {
        s.snapshots_taken == 25 && s.uploads_failed > 0 && s.overwritten_total == 15
    })
    .await?;
    assert_eq!(s.buffered_snapshots, 10);
    assert!(!s.online);
    assert!(harness.stored().items.is_empty());

    // Back online: everything buffered goes, then the OFFLINE event.
    harness.sink.failing.store(false, Ordering::SeqCst);
    let s = wait_for(&monitor, "the buffer to drain", |s| {
        s.online && s.buffered_items == 0 && s.uploads_ok >= 2
    })
    .await?;
    assert_eq!(s.items_rejected, 0);
    {
        let stored = harness.stored();
        let pictures: Vec<u64> = stored.items.iter().filter_map(picture_no).collect();
        assert_eq!(
            pictures,
            (15..25).collect::<Vec<_>>(),
            "the newest 10, in order"
        );
        assert_eq!(stored.overwritten, 15, "the gap is reported once");
        let states: Vec<_> = stored.items.iter().filter_map(presence_of).collect();
        assert_eq!(
            states,
            [pb::PresenceState::Online, pb::PresenceState::Offline]
        );
        assert!(stored.items.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(s.stored_through_seq, stored.high_water);
    }

    // A clean stop delivers STOPPED.
    let s = monitor.stop().await;
    assert_eq!(s.buffered_items, 0);
    let stored = harness.stored();
    assert_eq!(
        stored.items.last().and_then(presence_of),
        Some(pb::PresenceState::Stopped)
    );
    Ok(())
}

#[tokio::test]
async fn a_restart_while_offline_loses_nothing() -> Result<()> {
    let harness = Harness::start().await?;
    let tmp = TempDir::new();
    let key = [6u8; 32];
    let ticket = harness.ticket_for(&DeviceKey::from_secret(key))?;
    harness.sink.failing.store(true, Ordering::SeqCst);
    let pictures = Pictures::default();
    pictures.budget.store(3, Ordering::SeqCst);
    let monitor = start(&tmp.0, key, &pictures, 500, vec![Ok(ticket.clone())]).await?;
    wait_for(&monitor, "3 snapshots", |s| s.snapshots_taken == 3).await?;
    // Stopped while the sink is down: STOPPED joins the spool, nothing leaves it.
    // (In one process a restart follows `stop`: a dropped monitor's spool stays
    // locked until its aborted tasks are gone.)
    let s = monitor.stop().await;
    assert_eq!(s.buffered_snapshots, 3);

    harness.sink.failing.store(false, Ordering::SeqCst);
    // A source of its own, as a new process would have.
    let pictures = Pictures::default();
    pictures.taken.store(3, Ordering::SeqCst);
    pictures.budget.store(4, Ordering::SeqCst);
    let monitor = start(&tmp.0, key, &pictures, 500, vec![Ok(ticket)]).await?;
    let s = wait_for(&monitor, "everything delivered", |s| {
        s.snapshots_taken == 1 && s.buffered_items == 0 && s.online
    })
    .await?;
    assert_eq!(s.overwritten_total, 0);
    let stored = harness.stored();
    assert_eq!(
        stored
            .items
            .iter()
            .filter_map(picture_no)
            .collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    assert!(
        stored
            .items
            .iter()
            .filter_map(presence_of)
            .any(|p| p == pb::PresenceState::Stopped)
    );
    assert_eq!(
        stored
            .items
            .iter()
            .filter_map(presence_of)
            .filter(|p| *p == pb::PresenceState::Online)
            .count(),
        2
    );
    Ok(())
}

#[tokio::test]
async fn an_item_the_sink_refuses_is_dropped_and_the_rest_delivered() -> Result<()> {
    let harness = Harness::start().await?;
    let tmp = TempDir::new();
    let key = [7u8; 32];
    let ticket = harness.ticket_for(&DeviceKey::from_secret(key))?;
    harness.sink.failing.store(true, Ordering::SeqCst);
    let pictures = Pictures {
        oversized: Some(2),
        ..Default::default()
    };
    pictures.budget.store(5, Ordering::SeqCst);
    let monitor = start(&tmp.0, key, &pictures, 500, vec![Ok(ticket)]).await?;
    // All five in one batch once the sink is back: it refuses the batch, the monitor
    // finds the bad item one by one.
    wait_for(&monitor, "5 snapshots", |s| s.snapshots_taken == 5).await?;
    harness.sink.failing.store(false, Ordering::SeqCst);
    let s = wait_for(&monitor, "everything else delivered", |s| {
        s.buffered_items == 0 && s.online
    })
    .await?;
    assert_eq!(s.items_rejected, 1);
    let stored = harness.stored();
    assert_eq!(
        stored
            .items
            .iter()
            .filter_map(picture_no)
            .collect::<Vec<_>>(),
        [0, 1, 3, 4]
    );
    Ok(())
}

#[tokio::test]
async fn a_refused_device_captures_and_uploads_nothing() -> Result<()> {
    let harness = Harness::start().await?;
    let tmp = TempDir::new();
    let pictures = Pictures::default();
    pictures.budget.store(1000, Ordering::SeqCst);
    let monitor = start(
        &tmp.0,
        [8; 32],
        &pictures,
        500,
        vec![Err("tenant policy disables monitoring".into())],
    )
    .await?;
    let s = wait_for(&monitor, "the refusal", |s| s.monitoring_denied).await?;
    assert!(!s.online);
    // Captures stop: once denied, the count stays put over many 5 ms intervals (one
    // capture may have been under way when the refusal came). An absence cannot be
    // awaited, so this watches for a while.
    let before = pictures.taken.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(pictures.taken.load(Ordering::SeqCst) <= before + 1);
    assert_eq!(harness.sink.uploads.load(Ordering::SeqCst), 0);
    Ok(())
}

/// Idle readings from a script; the last one repeats.
struct ScriptedIdle(VecDeque<Duration>);

impl IdleSource for ScriptedIdle {
    fn idle(&mut self) -> Option<Duration> {
        if self.0.len() > 1 {
            self.0.pop_front()
        } else {
            self.0.front().copied()
        }
    }
}

#[tokio::test]
async fn idle_and_active_presence_reach_the_sink() -> Result<()> {
    let harness = Harness::start().await?;
    let tmp = TempDir::new();
    let key = DeviceKey::from_secret([10; 32]);
    let ticket = harness.ticket_for(&key)?;
    let mut config = MonitorConfig::new(
        "http://unused.invalid",
        key,
        &tmp.0,
        Box::new(Pictures::default()),
    );
    config.snapshot_interval = Some(Duration::from_secs(3600));
    config.idle = Some(Box::new(ScriptedIdle(
        [0, 400, 500, 1].map(Duration::from_secs).into(),
    )));
    config.idle_after = Duration::from_secs(300);
    config.idle_poll = Duration::from_millis(5);
    let monitor = Monitor::start_with(config, move |_| {
        Ok(Box::new(Tickets(vec![Ok(ticket)].into())) as Box<dyn TicketSource>)
    })
    .await?;
    // ONLINE, IDLE, ACTIVE.
    wait_for(&monitor, "three presence events delivered", |s| {
        s.uploads_ok >= 1 && s.buffered_items == 0 && s.stored_through_seq > 0
    })
    .await?;
    let mut rx = monitor.watch();
    let sink = harness.sink.stored.clone();
    tokio::time::timeout(
        WAIT,
        rx.wait_for(|_| sink.lock().map(|s| s.items.len() >= 3).unwrap_or(false)),
    )
    .await
    .context("waiting for IDLE and ACTIVE at the sink")??;
    let stored = harness.stored();
    let presence: Vec<(pb::PresenceState, u32)> = stored
        .items
        .iter()
        .filter_map(|i| match &i.body {
            Some(pb::evidence_item::Body::Presence(p)) => {
                Some((pb::PresenceState::try_from(p.state).ok()?, p.idle_secs))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        presence,
        [
            (pb::PresenceState::Online, 0),
            (pb::PresenceState::Idle, 400),
            (pb::PresenceState::Active, 500)
        ]
    );
    Ok(())
}
