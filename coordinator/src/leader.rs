//! Coordinator leadership: any number of replicas serve requests at once; one of them,
//! elected through etcd's election API, also does cluster-wide chores.
//!
//! Fencing is by revision, not by lock: the leader holds the election key created
//! under its lease, and before each chore pass it checks in one etcd transaction that
//! the key still exists with the create revision it won with. A replica that lost its
//! lease (paused, cut off) fails that check and steps down before acting. The chores
//! themselves are idempotent compare-and-swap ends on the session store, so a pass that
//! overlaps a failover does no harm.
//!
//! Chores: notice relays that left placement (lease expired, revoked, or draining),
//! count and log them, and end sessions still placed on a relay that has been gone
//! longer than the resume window with `RELAY_SHUTDOWN` (participants that resumed were
//! already moved off it by `AgentService.ResumeSession`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};
use kakehashi_proto::{membership, pb};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backend::sessions::ListFilter;
use crate::error::ApiError;
use crate::service::Core;

/// How this replica takes part in the election.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    pub endpoints: Vec<String>,
    /// Key namespace shared with the relays (`kakehashi_proto::membership`).
    pub namespace: String,
    /// What this replica writes as its election value (shown by `etcdctl elect -l`).
    pub replica_id: String,
    /// Lease time-to-live: how long a dead leader blocks the next one at most.
    pub lease_ttl: Duration,
    /// How long sessions on a vanished relay wait for their participants to resume.
    pub resume_window: Duration,
    /// How often the leader runs its chores.
    pub chore_every: Duration,
}

impl LeaderConfig {
    pub fn new(endpoints: Vec<String>, replica_id: String) -> Self {
        Self {
            endpoints,
            namespace: membership::DEFAULT_NAMESPACE.into(),
            replica_id,
            lease_ttl: Duration::from_secs(5),
            resume_window: Duration::from_secs(60),
            chore_every: Duration::from_secs(1),
        }
    }
}

/// Metric names (described in [`describe`]).
pub const IS_LEADER: &str = "coordinator_is_leader";
pub const RELAYS_EXPIRED: &str = "coordinator_relays_expired_total";
pub const ORPHANS_ENDED: &str = "coordinator_orphaned_sessions_ended_total";
pub const LEADER_TERMS: &str = "coordinator_leader_terms_total";

pub fn describe() {
    metrics::describe_gauge!(IS_LEADER, "1 while this replica is the elected leader");
    metrics::describe_counter!(
        RELAYS_EXPIRED,
        "Relays the leader saw leave placement (lease expired, revoked, or draining)"
    );
    metrics::describe_counter!(
        ORPHANS_ENDED,
        "Sessions the leader ended because their relay was gone past the resume window"
    );
    metrics::describe_counter!(LEADER_TERMS, "Times this replica became the leader");
}

const CALL_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Most live sessions one sweep reads.
const SWEEP_LIMIT: usize = 10_000;
/// A full sweep for sessions on unknown relays runs at least this often, to catch
/// relays that vanished before this replica became the leader.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
enum TermError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {CALL_TIMEOUT:?}")]
    Timeout,
    #[error("the election lease {0:x} expired")]
    LeaseLost(i64),
    #[error("deposed: the election key no longer has create revision {0}")]
    Deposed(i64),
    #[error("etcd answered the campaign without a leader key")]
    NoLeaderKey,
}

async fn bounded<T>(
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, TermError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(TermError::Timeout),
    }
}

/// Campaigns, leads, and campaigns again after losing leadership, until `cancel`.
pub(crate) async fn run(
    config: LeaderConfig,
    core: Arc<Core>,
    status: watch::Sender<bool>,
    cancel: CancellationToken,
) {
    describe();
    let mut backoff = Duration::from_millis(100);
    // A lease a failed term could not revoke (etcd was unreachable). It may outlive the
    // outage (etcd restores leases on restart) and keep our old election key in front of
    // every campaign, ours included, until its TTL runs out; so it is revoked as soon as
    // etcd answers again.
    let mut stale_lease = None;
    loop {
        let result = term(&config, &core, &status, &cancel, &mut stale_lease).await;
        status.send_replace(false);
        metrics::gauge!(IS_LEADER).set(0.0);
        match result {
            Ok(()) => return,
            Err(e) => {
                crate::telemetry::backend_error("etcd");
                warn!(replica = %config.replica_id, error = %e, retry_in = ?backoff, "left the leader election; campaigning again");
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One lease: campaign, then lead until the lease or the fence fails. `Ok` only when
/// cancelled (the lease is revoked so another replica takes over at once).
async fn term(
    config: &LeaderConfig,
    core: &Arc<Core>,
    status: &watch::Sender<bool>,
    cancel: &CancellationToken,
    stale_lease: &mut Option<i64>,
) -> Result<(), TermError> {
    // No per-call timeout on this client: a campaign waits as long as another replica
    // leads. Liveness comes from the lease keep-alive below and HTTP/2 keep-alive.
    let options = ConnectOptions::new()
        .with_connect_timeout(CALL_TIMEOUT)
        .with_keep_alive(Duration::from_secs(1), CALL_TIMEOUT)
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    let mut client = bounded(Client::connect(&config.endpoints, Some(options))).await?;
    if let Some(old) = *stale_lease {
        match bounded(client.lease_revoke(old)).await {
            Ok(_) => {}
            // Already expired: nothing left to hand over.
            Err(TermError::Etcd(etcd_client::Error::GRpcStatus(s)))
                if s.code() == tonic::Code::NotFound => {}
            Err(e) => return Err(e),
        }
        *stale_lease = None;
    }
    let ttl = i64::try_from(config.lease_ttl.as_secs().max(2)).unwrap_or(i64::MAX);
    let lease = bounded(client.lease_grant(ttl, None)).await?.id();
    let mut keeper_tasks = JoinSet::new();
    keeper_tasks.spawn(keep_lease(client.clone(), lease, config.lease_ttl / 3));
    let election = membership::leader_election(&config.namespace);

    let result = async {
        let won = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            Some(r) = keeper_tasks.join_next() => return Err(flatten(r, lease)),
            r = client.campaign(election.as_bytes(), config.replica_id.as_bytes(), lease) => r?,
        };
        let key = won.leader().ok_or(TermError::NoLeaderKey)?;
        let (key, rev) = (key.key().to_vec(), key.rev());
        status.send_replace(true);
        metrics::gauge!(IS_LEADER).set(1.0);
        metrics::counter!(LEADER_TERMS).increment(1);
        info!(replica = %config.replica_id, revision = rev, "became the coordinators' leader");
        let mut chores = Chores::default();
        let mut tick = tokio::time::interval(config.chore_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                Some(r) = keeper_tasks.join_next() => return Err(flatten(r, lease)),
                _ = tick.tick() => {}
            }
            fence(&mut client, &key, rev).await?;
            chores.pass(config, core).await;
        }
    }
    .await;
    keeper_tasks.shutdown().await;
    // Hand leadership over now rather than after the TTL (best effort: if etcd is
    // unreachable the lease simply expires).
    if let Err(e) = bounded(client.lease_revoke(lease)).await {
        tracing::debug!(error = %e, "could not revoke the election lease; retrying after reconnecting");
        *stale_lease = Some(lease);
    }
    result
}

fn flatten(r: Result<TermError, tokio::task::JoinError>, lease: i64) -> TermError {
    r.unwrap_or(TermError::LeaseLost(lease))
}

/// Refreshes the lease until it fails; returns why.
async fn keep_lease(mut client: Client, lease: i64, every: Duration) -> TermError {
    let (mut keeper, mut acks) = match bounded(client.lease_keep_alive(lease)).await {
        Ok(k) => k,
        Err(e) => return e,
    };
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(200)));
    loop {
        tick.tick().await;
        if let Err(e) = bounded(keeper.keep_alive()).await {
            return e;
        }
        match bounded(acks.message()).await {
            Ok(Some(ack)) if ack.ttl() > 0 => {}
            Ok(_) => return TermError::LeaseLost(lease),
            Err(e) => return e,
        }
    }
}

/// Succeeds only while our election key exists with the revision we won with.
async fn fence(client: &mut Client, key: &[u8], rev: i64) -> Result<(), TermError> {
    let txn = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, rev)])
        .and_then([TxnOp::get(key, None)]);
    let resp = bounded(client.txn(txn)).await?;
    if resp.succeeded() {
        Ok(())
    } else {
        Err(TermError::Deposed(rev))
    }
}

/// What the leader remembers between passes.
#[derive(Default)]
struct Chores {
    /// Relays in placement at the last pass.
    present: HashSet<String>,
    /// Relays that sessions point at but placement no longer has, since when.
    gone: HashMap<String, Instant>,
    last_sweep: Option<Instant>,
}

impl Chores {
    async fn pass(&mut self, config: &LeaderConfig, core: &Core) {
        // Without a current view nothing can be said about relays; wait for etcd.
        let Ok(relays) = core.backends.relays.list().await else {
            return;
        };
        let now = Instant::now();
        let present: HashSet<String> = relays.into_iter().map(|r| r.relay_id).collect();
        for id in self.present.difference(&present) {
            metrics::counter!(RELAYS_EXPIRED).increment(1);
            warn!(relay = %id, "relay left placement (lease expired, revoked, or draining); its sessions have {:?} to resume elsewhere", config.resume_window);
            self.gone.entry(id.clone()).or_insert(now);
        }
        self.gone.retain(|id, _| !present.contains(id));
        self.present = present;

        let sweep_due = self
            .last_sweep
            .is_none_or(|t| now.duration_since(t) >= SWEEP_EVERY);
        if self.gone.is_empty() && !sweep_due {
            return;
        }
        self.last_sweep = Some(now);
        let live = match core
            .backends
            .sessions
            .list(ListFilter {
                tenant: None,
                include_ended: false,
                limit: SWEEP_LIMIT,
            })
            .await
        {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "leader could not list sessions; retrying next pass");
                return;
            }
        };
        let mut referenced = HashSet::new();
        for record in live {
            let relay = &record.relay.relay_id;
            if self.present.contains(relay) {
                continue;
            }
            referenced.insert(relay.clone());
            let since = *self.gone.entry(relay.clone()).or_insert(now);
            if now.duration_since(since) < config.resume_window {
                continue;
            }
            let detail = format!(
                "relay {relay} was lost and no participant resumed within {} s",
                config.resume_window.as_secs()
            );
            match core
                .end(record.id, pb::EndReason::RelayShutdown, &detail)
                .await
            {
                Ok(_) => {
                    metrics::counter!(ORPHANS_ENDED).increment(1);
                    info!(session = %record.id, relay = %relay, "ended a session left on a lost relay");
                }
                Err(ApiError::SessionEnded(_)) => {}
                Err(e) => {
                    warn!(session = %record.id, error = %e, "could not end a session left on a lost relay")
                }
            }
        }
        // Forget relays nothing points at any more.
        self.gone.retain(|id, _| referenced.contains(id));
    }
}
