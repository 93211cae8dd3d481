//! `EvidenceService` over gRPC, and [`Sink`]: the listener, the service and the prune
//! task, owned together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ed25519_dalek::VerifyingKey;
use kakehashi_proto::monitor::{self, MAX_ITEMS_PER_UPLOAD, MAX_UPLOAD_BYTES, MonitorTicket};
use kakehashi_proto::pb;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::SinkError;
use super::store::{EvidenceStore, unix_secs};
use crate::recording::{self, RecordingKey, RetentionPolicy};

/// Uploads stored at once across all devices: each holds a decoded request (up to
/// [`MAX_UPLOAD_BYTES`]) and a disk writer. More wait their turn.
pub const MAX_CONCURRENT_STORES: usize = 8;
/// Requests in flight on one connection (a device sends one at a time).
const PER_CONNECTION_LIMIT: usize = 4;
/// The longest a request may take, waiting included: a device retries after this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// What [`Sink::bind`] needs.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Where to serve gRPC (port 0: any free port; see [`Sink::addr`]).
    pub listen: SocketAddr,
    /// The evidence directory (created if missing).
    pub dir: PathBuf,
    /// Encrypts the files at rest; the same key `kakehashi recording verify` takes.
    pub recording_key: RecordingKey,
    /// The coordinator's token key: what monitoring tickets are signed with.
    pub coordinator_key: VerifyingKey,
    /// Retention, as for recordings (default 90 days).
    pub retention: RetentionPolicy,
    /// How often the prune task runs (also once at start).
    pub prune_every: Duration,
}

/// A running evidence sink. Dropping it stops the server and the prune task.
pub struct Sink {
    addr: SocketAddr,
    store: Arc<EvidenceStore>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").field("addr", &self.addr).finish()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.cancel.cancel();
        // The JoinSet aborts what is left when it drops.
    }
}

impl Sink {
    /// Opens the directory (rebuilding dedupe state from its files), binds the
    /// listener and starts serving; returns once connections are accepted.
    pub async fn bind(config: SinkConfig) -> Result<Self, SinkError> {
        let SinkConfig {
            listen,
            dir,
            recording_key,
            coordinator_key,
            retention,
            prune_every,
        } = config;
        let store = {
            let key = recording_key.clone();
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || EvidenceStore::open(&dir, key))
                .await
                .map_err(|e| SinkError::Task(e.to_string()))??
        };
        let store = Arc::new(store);
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| SinkError::Bind {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| SinkError::Bind {
            addr: listen,
            source,
        })?;
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let api = EvidenceApi {
            store: store.clone(),
            coordinator_key,
            stores: Arc::new(Semaphore::new(MAX_CONCURRENT_STORES)),
        };
        let service = pb::evidence_service_server::EvidenceServiceServer::new(api)
            .max_decoding_message_size(MAX_UPLOAD_BYTES);
        let router = tonic::transport::Server::builder()
            .concurrency_limit_per_connection(PER_CONNECTION_LIMIT)
            .timeout(REQUEST_TIMEOUT)
            .add_service(service);
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let stop = cancel.clone();
        tasks.spawn(async move {
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "evidence sink gRPC server failed");
            }
        });
        tasks.spawn(prune_loop(
            dir.clone(),
            recording_key,
            retention,
            prune_every,
            cancel.clone(),
        ));
        tracing::info!(%addr, dir = %dir.display(), "evidence sink started");
        Ok(Self {
            addr,
            store,
            cancel,
            tasks,
        })
    }

    /// The address the sink serves on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The store behind the service (its directory and high-water marks).
    pub fn store(&self) -> &EvidenceStore {
        &self.store
    }

    /// Stops accepting, lets requests in flight finish (each one's file is finished
    /// or removed by the blocking task that writes it), and returns once every task
    /// has stopped.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Runs [`recording::prune`] on the directory every `every`, starting now.
async fn prune_loop(
    dir: PathBuf,
    key: RecordingKey,
    policy: RetentionPolicy,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (dir, key, policy) = (dir.clone(), key.clone(), policy.clone());
        let report = tokio::task::spawn_blocking(move || {
            recording::prune(&dir, &key, &policy, SystemTime::now())
        })
        .await;
        match report {
            Ok(Ok(r)) => {
                for (path, why) in &r.failed {
                    tracing::error!(path = %path.display(), %why, "expired evidence could not be deleted");
                }
                for (path, why) in &r.unreadable {
                    tracing::warn!(path = %path.display(), %why, "file in the evidence directory cannot be dated; kept");
                }
                tracing::info!(
                    deleted = r.deleted.len(),
                    kept = r.kept.len(),
                    unreadable = r.unreadable.len(),
                    failed = r.failed.len(),
                    "evidence retention pass"
                );
            }
            Ok(Err(e)) => tracing::error!(error = %e, "evidence retention pass failed"),
            Err(e) => tracing::error!(error = %e, "evidence retention task failed"),
        }
    }
}

struct EvidenceApi {
    store: Arc<EvidenceStore>,
    coordinator_key: VerifyingKey,
    stores: Arc<Semaphore>,
}

/// Checks a request whole: the ticket, then the items. Nothing is stored on error.
fn check(
    req: &pb::UploadEvidenceRequest,
    coordinator_key: &VerifyingKey,
    now_secs: u64,
) -> Result<MonitorTicket, Status> {
    let ticket = MonitorTicket::verify(&req.ticket, coordinator_key, now_secs)
        .map_err(|e| Status::unauthenticated(e.to_string()))?;
    if req.items.len() > MAX_ITEMS_PER_UPLOAD {
        return Err(Status::invalid_argument(format!(
            "{} items in one upload; the most is {MAX_ITEMS_PER_UPLOAD}",
            req.items.len()
        )));
    }
    for pair in req.items.windows(2) {
        if pair[1].seq <= pair[0].seq {
            return Err(Status::invalid_argument(format!(
                "item {} follows item {}: seqs must strictly increase",
                pair[1].seq, pair[0].seq
            )));
        }
    }
    for item in &req.items {
        monitor::check_item(&ticket, item).map_err(|e| Status::invalid_argument(e.to_string()))?;
    }
    Ok(ticket)
}

#[tonic::async_trait]
impl pb::evidence_service_server::EvidenceService for EvidenceApi {
    async fn upload(
        &self,
        request: Request<pb::UploadEvidenceRequest>,
    ) -> Result<Response<pb::UploadEvidenceResponse>, Status> {
        let req = request.into_inner();
        let ticket = match check(&req, &self.coordinator_key, unix_secs(SystemTime::now())) {
            Ok(t) => t,
            Err(status) => {
                tracing::info!(code = ?status.code(), reason = status.message(), "evidence upload refused");
                return Err(status);
            }
        };
        let permit = self
            .stores
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("the evidence sink is shutting down"))?;
        let store = self.store.clone();
        let device = ticket.device_id.clone();
        let overwritten = req.snapshots_overwritten;
        // Blocking disk work; it runs to the end even if the device hangs up, so a file
        // is always finished or removed, and the high-water mark always matches disk.
        let stored = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            store.store(&ticket, req.snapshots_overwritten, &req.items)
        })
        .await;
        let outcome = match stored {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                tracing::error!(%device, error = %e, "evidence could not be stored");
                return Err(Status::unavailable(
                    "the evidence sink could not store the upload; keep it and retry",
                ));
            }
            Err(e) => {
                tracing::error!(%device, error = %e, "evidence storing task failed");
                return Err(Status::unavailable(
                    "the evidence sink could not store the upload; keep it and retry",
                ));
            }
        };
        tracing::info!(
            %device,
            stored = outcome.stored,
            duplicates = outcome.duplicates,
            stored_through_seq = outcome.stored_through_seq,
            overwritten,
            "evidence upload stored"
        );
        Ok(Response::new(pb::UploadEvidenceResponse {
            stored_through_seq: outcome.stored_through_seq,
            stored: outcome.stored,
            duplicates: outcome.duplicates,
        }))
    }
}
