//! The relay-kill scenario: live sessions on a cluster of separate relay processes,
//! reliable chat flowing both ways, and the relay carrying them SIGKILLed again and
//! again. Measures how long each session takes to resume on another relay (from the kill,
//! so detection is included) and counts every reliable byte sent, delivered and
//! duplicated.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use kakehashi_agent::{Consent, Host, HostConfig, HostEvent, Viewer, ViewerConfig, ViewerEvent};
use kakehashi_proto::Permissions;
use kakehashi_proto::pb::{self, session_service_client::SessionServiceClient};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::latency::LatencyRecorder;
use crate::procs::{Launcher, ProcClusterBuilder};
use crate::services;

#[derive(Debug, Clone)]
pub struct KillOptions {
    pub kills: u32,
    pub sessions: u32,
    pub relays: usize,
    /// Chat messages per second in each direction of each session.
    pub chat_rate: u32,
    /// Bytes per chat message.
    pub chat_bytes: usize,
    /// Time between a session set resuming and the next kill.
    pub settle: Duration,
    /// The program to run relays and coordinators with (`kakehashi-loadtest`).
    pub program: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct ResumeSummary {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    pub count: u64,
}

#[derive(Debug, Serialize)]
pub struct ReliableBytes {
    pub sent: u64,
    pub delivered: u64,
    pub duplicated: u64,
    pub lost: u64,
}

#[derive(Debug, Serialize)]
pub struct KillReport {
    pub kills: u32,
    pub sessions: u32,
    pub relays: usize,
    /// Kill → participant resumed on another relay, per participant and kill, in ms.
    pub resume_ms: ResumeSummary,
    pub reliable_bytes: ReliableBytes,
    pub messages_out_of_order: u64,
    pub duration_s: f64,
}

/// Counters for one direction of one session's chat.
#[derive(Default)]
struct Flow {
    sent_msgs: AtomicU64,
    sent_bytes: AtomicU64,
    delivered_msgs: AtomicU64,
    delivered_bytes: AtomicU64,
    duplicated_bytes: AtomicU64,
    out_of_order: AtomicU64,
}

impl Flow {
    /// Records a received message `n` (1-based, in send order) of `len` bytes.
    fn receive(&self, last: &mut u64, n: u64, len: usize) {
        if n <= *last {
            self.duplicated_bytes
                .fetch_add(len as u64, Ordering::Relaxed);
            return;
        }
        if n != *last + 1 {
            self.out_of_order.fetch_add(1, Ordering::Relaxed);
        }
        *last = n;
        self.delivered_msgs.fetch_add(1, Ordering::Relaxed);
        self.delivered_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
    }
}

fn message(n: u64, size: usize) -> String {
    let head = format!("{n}:");
    let pad = size.saturating_sub(head.len());
    format!("{head}{}", "x".repeat(pad))
}

fn parse(text: &str) -> Option<u64> {
    text.split(':').next()?.parse().ok()
}

/// A participant resumed: which session, and when it said so.
struct Resumed {
    at: Instant,
}

pub async fn run(opts: KillOptions) -> Result<KillReport> {
    ensure!(
        opts.relays >= 2,
        "--relays must be at least 2: sessions need somewhere to go"
    );
    ensure!(
        opts.sessions >= 1 && opts.kills >= 1,
        "--sessions and --kills must be positive"
    );
    let etcd = services::etcd()?.context("etcd is needed for the relay-kill scenario")?;
    let mut cluster = ProcClusterBuilder::new(Launcher::loadtest(&opts.program))
        .coordinators(1)
        .relays(opts.relays)
        .etcd([etcd.url.clone()])
        .start()
        .context("starting the process cluster")?;
    let url = cluster
        .coordinator_urls()
        .into_iter()
        .next()
        .context("no coordinator")?;
    println!(
        "cluster: 1 coordinator, {} relay processes, etcd {}",
        opts.relays, etcd.url
    );

    let started = Instant::now();
    let stop = CancellationToken::new();
    let (resumed_tx, mut resumed_rx) = mpsc::unbounded_channel::<Resumed>();
    let mut tasks = JoinSet::new();
    let mut flows = Vec::new();
    let mut session_ids = Vec::new();
    let mut api = SessionServiceClient::connect(url.clone()).await?;
    for _ in 0..opts.sessions {
        let created = api
            .create_session(pb::CreateSessionRequest {
                device_id: String::new(),
                tenant: "killtest".into(),
                operator: "op".into(),
                mode: pb::SessionMode::Control as i32,
                permissions: 0,
                max_duration_secs: 3600,
            })
            .await?
            .into_inner();
        let sid = created
            .session
            .as_ref()
            .context("no session")?
            .session_id
            .clone();
        let viewer = Viewer::join(
            &url,
            &sid,
            &created.operator_ticket,
            ViewerConfig::default(),
        )
        .await?;
        let host = Host::join(
            &url,
            &created.code,
            HostConfig {
                consent: Consent::Approve(Permissions::VIEW),
            },
        )
        .await?;
        let to_host = Arc::new(Flow::default());
        let to_viewer = Arc::new(Flow::default());
        flows.push(to_host.clone());
        flows.push(to_viewer.clone());
        session_ids.push(sid);
        let period = Duration::from_secs(1) / opts.chat_rate.max(1);
        tasks.spawn(drive(
            host,
            to_viewer.clone(),
            to_host.clone(),
            period,
            opts.chat_bytes,
            stop.clone(),
            resumed_tx.clone(),
        ));
        tasks.spawn(drive(
            viewer,
            to_host,
            to_viewer,
            period,
            opts.chat_bytes,
            stop.clone(),
            resumed_tx.clone(),
        ));
    }

    let mut resume = LatencyRecorder::new();
    for k in 1..=opts.kills {
        tokio::time::sleep(opts.settle).await;
        // The relay carrying the first session (sessions spread; this kills the busiest
        // one often enough and always one that carries live sessions).
        let victim = current_relay(&mut api, &session_ids[0]).await?;
        let carried: u64 = {
            let mut n = 0;
            for sid in &session_ids {
                if current_relay(&mut api, sid).await? == victim {
                    n += 2;
                }
            }
            n
        };
        let relay = cluster
            .relay(&victim)
            .with_context(|| format!("relay {victim} is not one of ours"))?;
        let killed_at = Instant::now();
        relay.proc.kill();
        let mut seen = 0;
        while seen < carried {
            let r = tokio::time::timeout(Duration::from_secs(60), resumed_rx.recv())
                .await
                .with_context(|| {
                    format!(
                        "kill {k}: {seen} of {carried} participants on {victim} resumed within 60 s"
                    )
                })?
                .context("participants gone")?;
            resume.record_us(r.at.saturating_duration_since(killed_at).as_micros() as u64);
            seen += 1;
        }
        println!(
            "kill {k}/{}: {victim} SIGKILLed; {carried} participants resumed elsewhere (slowest {} ms)",
            opts.kills,
            resume.summary().max / 1000
        );
        relay
            .proc
            .restart()
            .context("restarting the killed relay")?;
    }

    // Stop sending and let everything in flight arrive.
    stop.cancel();
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let done = flows.iter().all(|f| {
                f.delivered_msgs.load(Ordering::Relaxed) >= f.sent_msgs.load(Ordering::Relaxed)
            });
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if drained.is_err() {
        eprintln!("warning: not every reliable message arrived within 30 s of the last kill");
    }
    tasks.shutdown().await;
    let sum = |f: fn(&Flow) -> &AtomicU64| -> u64 {
        flows.iter().map(|x| f(x).load(Ordering::Relaxed)).sum()
    };
    let sent = sum(|f| &f.sent_bytes);
    let delivered = sum(|f| &f.delivered_bytes);
    let r = resume.summary();
    Ok(KillReport {
        kills: opts.kills,
        sessions: opts.sessions,
        relays: opts.relays,
        resume_ms: ResumeSummary {
            p50: r.p50 / 1000,
            p99: r.p99 / 1000,
            max: r.max / 1000,
            count: r.count,
        },
        reliable_bytes: ReliableBytes {
            sent,
            delivered,
            duplicated: sum(|f| &f.duplicated_bytes),
            lost: sent.saturating_sub(delivered),
        },
        messages_out_of_order: sum(|f| &f.out_of_order),
        duration_s: started.elapsed().as_secs_f64(),
    })
}

async fn current_relay(
    api: &mut SessionServiceClient<tonic::transport::Channel>,
    sid: &str,
) -> Result<String> {
    let s = api
        .get_session(pb::GetSessionRequest {
            session_id: sid.into(),
        })
        .await?
        .into_inner();
    Ok(s.relay.map(|r| r.relay_id).unwrap_or_default())
}

/// What the scenario needs of a participant: send a chat line, see what happens.
trait ChatPeer: Send + 'static {
    fn chat(&self, text: &str) -> impl Future<Output = bool> + Send;
    fn next(&mut self) -> impl Future<Output = Seen> + Send;
}

enum Seen {
    Chat(String),
    Resumed,
    Ended,
    Other,
}

impl ChatPeer for Host {
    async fn chat(&self, text: &str) -> bool {
        self.send_chat(text).await.is_ok()
    }

    async fn next(&mut self) -> Seen {
        match self.next_event().await {
            Some(HostEvent::Chat(text)) => Seen::Chat(text),
            Some(HostEvent::Resumed { .. }) => Seen::Resumed,
            Some(HostEvent::Ended { .. }) | None => Seen::Ended,
            Some(_) => Seen::Other,
        }
    }
}

impl ChatPeer for Viewer {
    async fn chat(&self, text: &str) -> bool {
        self.send_chat(text).await.is_ok()
    }

    async fn next(&mut self) -> Seen {
        match self.next_event().await {
            Some(ViewerEvent::Chat(text)) => Seen::Chat(text),
            Some(ViewerEvent::Resumed { .. }) => Seen::Resumed,
            Some(ViewerEvent::Ended { .. }) | None => Seen::Ended,
            Some(_) => Seen::Other,
        }
    }
}

/// Sends numbered chat lines at `period` until `stop`, and records what arrives and
/// every resumption, until the session ends or the task is shut down.
async fn drive(
    mut peer: impl ChatPeer,
    out: Arc<Flow>,
    inbound: Arc<Flow>,
    period: Duration,
    size: usize,
    stop: CancellationToken,
    resumed: mpsc::UnboundedSender<Resumed>,
) {
    let mut tick = tokio::time::interval(period);
    let mut last_in = 0u64;
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick(), if !stop.is_cancelled() => {
                let text = message(n + 1, size);
                if peer.chat(&text).await {
                    n += 1;
                    out.sent_msgs.fetch_add(1, Ordering::Relaxed);
                    out.sent_bytes.fetch_add(text.len() as u64, Ordering::Relaxed);
                }
            }
            seen = peer.next() => match seen {
                Seen::Chat(text) => {
                    if let Some(k) = parse(&text) {
                        inbound.receive(&mut last_in, k, text.len());
                    }
                }
                Seen::Resumed => {
                    let _ = resumed.send(Resumed { at: Instant::now() });
                }
                Seen::Ended => return,
                Seen::Other => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_counts_duplicates_and_gaps() {
        let f = Flow::default();
        let mut last = 0;
        f.receive(&mut last, 1, 10);
        f.receive(&mut last, 2, 10);
        f.receive(&mut last, 2, 10);
        f.receive(&mut last, 4, 10);
        assert_eq!(f.delivered_bytes.load(Ordering::Relaxed), 30);
        assert_eq!(f.duplicated_bytes.load(Ordering::Relaxed), 10);
        assert_eq!(f.out_of_order.load(Ordering::Relaxed), 1);
        assert_eq!(parse(&message(42, 100)), Some(42));
        assert_eq!(message(42, 100).len(), 100);
    }
}
