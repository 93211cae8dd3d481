//! The load generator: many concurrent sessions through a relay cluster, beside a
//! no-relay baseline in the same run, measured open-loop per frame.
//!
//! # How a run goes
//! 1. A cluster: an embedded [`LocalCluster`] on its own tokio runtime (threads named
//!    `kk-cluster`, so the relay's CPU time can be read apart from the generator's), or
//!    an external coordinator.
//! 2. Sessions arrive at `arrival_rate`: each relayed one is created through
//!    `SessionService`, joined by a real agent `Viewer` and `Host`, consented; each
//!    baseline one is a [`direct`] QUIC pair with the same crypto and encoding.
//! 3. Once every session has settled (up or failed), a warm-up, then the measurement
//!    window. The [`pacer`] thread gives each frame an intended send time; the frame
//!    carries it, and the viewer records `receipt − intended` in µs (coordinated-omission
//!    corrected: a late sender makes latency worse, never the sample smaller). Only
//!    frames intended inside the window count.
//! 4. After the window, senders stop, in-flight frames and reliable bytes drain (bounded),
//!    and the counters and histograms become a [`LoadReport`].
//!
//! # Layout
//! - [`pacer`]: the schedule thread and the shared clock.
//! - [`traffic`]: frame mix, the intended-time stamp, chat and input.
//! - [`relayed`] / [`direct`]: one session on each path.
//! - [`stats`]: counters, histograms, CPU time.
//! - [`capacity`]: the ramp that finds the knee.

pub mod capacity;
pub mod cli;
pub mod direct;
pub mod pacer;
pub mod relayed;
pub mod stats;
pub mod traffic;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kakehashi_proto::pb::session_service_client::SessionServiceClient;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use kakehashi_relay::RelayStats;

use crate::cluster::LocalCluster;
use crate::proxy::Impairment;
use crate::report::{Counts, CpuReport, Generator, LoadReport, PathReport, ReliableBytes, SetupMs};
use pacer::Pacer;
use stats::{PathStats, percentiles};
pub use traffic::Traffic;

/// Thread-name prefix of the embedded cluster's runtime.
pub const CLUSTER_THREAD: &str = "kk-cluster";

/// Everything one run does.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Relayed sessions (host + viewer pairs).
    pub sessions: usize,
    /// Direct (no relay) sessions running at the same time, with the same traffic.
    pub baseline_sessions: usize,
    pub traffic: Traffic,
    /// New sessions per second while ramping up.
    pub arrival_rate: f64,
    /// Between the last session settling and the start of the measurement window.
    pub warmup: Duration,
    /// The measurement window.
    pub duration: Duration,
    /// How long in-flight frames and reliable bytes may take to arrive after the window.
    pub drain: Duration,
    /// An external coordinator instead of the embedded cluster.
    pub coordinator: Option<String>,
    /// An external relay process to read CPU time from (`/proc/PID`).
    pub relay_pid: Option<u32>,
    /// Worker threads of the embedded cluster's runtime.
    pub cluster_threads: usize,
    /// A named WAN impairment on both paths (embedded cluster only).
    pub wan: Option<(String, Impairment)>,
    /// Show a live progress bar (it is hidden anyway when stdout is not a terminal).
    pub progress: bool,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            sessions: 50,
            baseline_sessions: 13,
            traffic: Traffic::default(),
            arrival_rate: 100.0,
            warmup: Duration::from_secs(2),
            duration: Duration::from_secs(20),
            drain: Duration::from_secs(3),
            coordinator: None,
            relay_pid: None,
            cluster_threads: 2,
            wan: None,
            progress: true,
        }
    }
}

/// What every session task shares.
pub struct SessionCtx {
    pub pacer: Pacer,
    pub traffic: Traffic,
    pub filler: Vec<u8>,
    pub relayed: PathStats,
    pub direct: PathStats,
    pub wan: Option<Impairment>,
    /// The window is over: stop sending, keep receiving.
    pub sending_over: CancellationToken,
    /// The run is over: stop everything.
    pub stop: CancellationToken,
    settled: AtomicUsize,
    settled_notify: Notify,
}

impl SessionCtx {
    /// A session finished setting up, successfully or not.
    pub fn settled(&self, ok: bool) {
        if !ok {
            debug!("session setup failed");
        }
        self.settled.fetch_add(1, Ordering::Relaxed);
        self.settled_notify.notify_one();
    }
}

/// Ticks an optional interval; never completes for `None`.
pub async fn maybe_tick(i: &mut Option<tokio::time::Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The embedded cluster on its own runtime, or nothing for an external one.
struct Cluster {
    url: String,
    local: Option<(tokio::runtime::Runtime, LocalCluster)>,
}

impl Cluster {
    async fn start(cfg: &LoadConfig) -> Result<Self> {
        if let Some(url) = &cfg.coordinator {
            return Ok(Self {
                url: url.clone(),
                local: None,
            });
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.cluster_threads.max(1))
            .thread_name(CLUSTER_THREAD)
            .enable_all()
            .build()
            .context("cannot start the cluster runtime")?;
        let proxied = cfg.wan.is_some();
        let cluster = rt
            .spawn(async move {
                let b = LocalCluster::builder();
                let b = if proxied { b.proxied() } else { b };
                b.start().await
            })
            .await
            .context("cluster start task failed")??;
        if let Some((_, imp)) = &cfg.wan {
            for p in &cluster.proxies {
                p.set_impairment(*imp);
            }
        }
        Ok(Self {
            url: cluster.coordinator_url(),
            local: Some((rt, cluster)),
        })
    }

    /// The embedded relays' forward-latency counters (sum in ns, samples); none for an
    /// external cluster.
    fn forward_counters(&self) -> Option<(u64, u64)> {
        let (_, cluster) = self.local.as_ref()?;
        Some(cluster.relays.iter().fold((0, 0), |(ns, n), r| {
            let s = r.stats();
            (
                ns + RelayStats::get(&s.forward_latency_ns),
                n + RelayStats::get(&s.forward_latency_samples),
            )
        }))
    }

    async fn shutdown(self) {
        if let Some((rt, cluster)) = self.local {
            let _ = rt.spawn(cluster.shutdown()).await;
            // Dropping a runtime inside async code would block; let it wind down alone.
            rt.shutdown_background();
        }
    }
}

fn cpu_now(cfg: &LoadConfig) -> (Option<u64>, u64) {
    let relay = match (cfg.relay_pid, &cfg.coordinator) {
        (Some(pid), _) => stats::threads_cpu_ns(Some(pid), ""),
        (None, None) => stats::threads_cpu_ns(None, CLUSTER_THREAD),
        (None, Some(_)) => None,
    };
    (relay, stats::process_cpu_ns())
}

/// Runs one load test and reports what it measured.
pub async fn run(cfg: &LoadConfig) -> Result<LoadReport> {
    ensure!(cfg.sessions > 0, "--sessions must be at least 1");
    ensure!(cfg.traffic.fps > 0, "--fps must be positive");
    ensure!(
        cfg.arrival_rate > 0.0 && cfg.arrival_rate.is_finite(),
        "--arrival-rate must be positive"
    );
    ensure!(
        cfg.wan.is_none() || cfg.coordinator.is_none(),
        "--wan needs the embedded cluster (the proxy sits in front of its relay)"
    );
    let cluster = Cluster::start(cfg).await?;
    let probe = || cluster.forward_counters();
    let result = drive(cfg, &cluster.url, &probe).await;
    cluster.shutdown().await;
    result
}

/// Reads the embedded relays' forward-latency sum (ns) and sample count, if embedded.
type ForwardProbe<'a> = &'a (dyn Fn() -> Option<(u64, u64)> + Sync);

async fn drive(cfg: &LoadConfig, url: &str, probe: ForwardProbe<'_>) -> Result<LoadReport> {
    let api = SessionServiceClient::connect(url.to_owned())
        .await
        .with_context(|| format!("cannot reach the coordinator at {url}"))?;
    let t = cfg.traffic;
    let ctx = Arc::new(SessionCtx {
        pacer: Pacer::start()?,
        traffic: t,
        filler: traffic::filler(t.frame_bytes.max(t.key_frame_bytes)),
        relayed: PathStats::default(),
        direct: PathStats::default(),
        wan: cfg.wan.as_ref().map(|(_, i)| *i),
        sending_over: CancellationToken::new(),
        stop: CancellationToken::new(),
        settled: AtomicUsize::new(0),
        settled_notify: Notify::new(),
    });
    let total = cfg.sessions + cfg.baseline_sessions;
    let bar = progress_bar(cfg);
    bar.set_message("setting up sessions");

    // Arrivals: baseline sessions interleaved evenly among the relayed ones.
    let (err_tx, mut err_rx) = mpsc::unbounded_channel::<String>();
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    let gap = Duration::from_secs_f64(1.0 / cfg.arrival_rate);
    let mut direct_started = 0usize;
    let mut n = 0u32;
    for i in 0..cfg.sessions {
        let mut kinds = vec![true];
        if (i + 1) * cfg.baseline_sessions / cfg.sessions > direct_started {
            direct_started += 1;
            kinds.push(false);
        }
        for relayed in kinds {
            tokio::time::sleep_until((started + gap * n).into()).await;
            n += 1;
            let task_ctx = ctx.clone();
            let err_tx = err_tx.clone();
            let (url, api) = (url.to_owned(), api.clone());
            tasks.spawn(async move {
                let r = if relayed {
                    relayed::run(task_ctx, url, api).await
                } else {
                    direct::run(task_ctx).await
                };
                if let Err(e) = r {
                    let _ = err_tx.send(format!(
                        "{}: {e:#}",
                        if relayed { "relayed" } else { "direct" }
                    ));
                }
            });
            bar.set_message(format!(
                "setting up: {}/{} relayed, {}/{} direct up",
                ctx_up(&ctx.relayed),
                cfg.sessions,
                ctx_up(&ctx.direct),
                cfg.baseline_sessions
            ));
        }
    }
    drop(err_tx);
    while ctx.settled.load(Ordering::Relaxed) < total {
        tokio::select! {
            _ = ctx.settled_notify.notified() => {}
            // A lost wake-up costs at most this; a session task cannot hang setup
            // longer than its own timeout.
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        bar.set_message(format!(
            "setting up: {}/{} relayed, {}/{} direct up",
            ctx_up(&ctx.relayed),
            cfg.sessions,
            ctx_up(&ctx.direct),
            cfg.baseline_sessions
        ));
    }
    let setup_errors = collect_errors(&mut err_rx);
    ensure!(
        ctx_up(&ctx.relayed) > 0,
        "no relayed session came up; first errors: {setup_errors:?}"
    );

    let window_start = Instant::now() + cfg.warmup;
    let window_end = window_start + cfg.duration;
    ctx.pacer.set_window(window_start, window_end);
    bar.set_message("warming up");
    tokio::time::sleep_until(window_start.into()).await;
    let cpu0 = cpu_now(cfg);
    let fwd0 = probe();
    let ticker = {
        let ctx = ctx.clone();
        let bar = bar.clone();
        let len = cfg.duration;
        async move {
            loop {
                let el = window_start.elapsed().min(len);
                bar.set_position(el.as_millis() as u64);
                bar.set_message(format!(
                    "relayed {} up, frames {}/{} | direct {} up, frames {}/{}",
                    ctx_up(&ctx.relayed),
                    stats::get(&ctx.relayed.frames_received),
                    stats::get(&ctx.relayed.frames_sent),
                    ctx_up(&ctx.direct),
                    stats::get(&ctx.direct.frames_received),
                    stats::get(&ctx.direct.frames_sent),
                ));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    tokio::select! {
        _ = tokio::time::sleep_until(window_end.into()) => {}
        _ = ticker => {}
    }
    let cpu1 = cpu_now(cfg);
    let fwd1 = probe();
    ctx.sending_over.cancel();
    bar.set_message("draining");
    // The pacer stops each session's schedule at the window's end; frames sent before
    // it (and reliable bytes) get `drain` to arrive, longer over a slow WAN profile.
    let drain = cfg.drain
        + cfg
            .wan
            .as_ref()
            .map_or(Duration::ZERO, |(_, i)| 4 * (i.delay + i.jitter));
    let drain_deadline = Instant::now() + drain;
    while Instant::now() < drain_deadline && !drained(&ctx) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained_fully = drained(&ctx);
    ctx.stop.cancel();
    while tasks.join_next().await.is_some() {}
    bar.finish_and_clear();
    let mut errors = setup_errors;
    errors.extend(collect_errors(&mut err_rx));
    if !errors.is_empty() {
        warn!(count = errors.len(), first = %errors[0], "sessions failed");
    }

    let window_s = cfg.duration.as_secs_f64();
    let relay_cpu = match (cpu0.0, cpu1.0) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let relayed = path_report(&ctx.relayed, cfg.sessions, window_s);
    let direct = path_report(&ctx.direct, cfg.baseline_sessions, window_s);
    let forwarded_bits = stats::get(&ctx.relayed.wire_bytes_received) as f64 * 8.0;
    let cpu = CpuReport {
        relay_cpu_s: relay_cpu.map(|ns| ns as f64 / 1e9),
        relay_gbit_per_cpu_s: relay_cpu
            .filter(|ns| *ns > 0)
            .map(|ns| forwarded_bits / 1e9 / (ns as f64 / 1e9)),
        process_cpu_s: cpu1.1.saturating_sub(cpu0.1) as f64 / 1e9,
        scope: cpu_scope(cfg),
        relay_forward_mean_us: match (fwd0, fwd1) {
            (Some((ns0, n0)), Some((ns1, n1))) if n1 > n0 => {
                Some(ns1.saturating_sub(ns0) as f64 / 1e3 / (n1 - n0) as f64)
            }
            _ => None,
        },
    };
    Ok(LoadReport::new(
        cfg,
        relayed,
        direct,
        cpu,
        drained_fully,
        Generator {
            skipped_frames: ctx.pacer.skipped(),
            pacer_lateness_us: percentiles(&ctx.pacer.lateness()),
        },
        errors,
    ))
}

fn ctx_up(s: &PathStats) -> u64 {
    stats::get(&s.sessions_up)
}

fn drained(ctx: &SessionCtx) -> bool {
    let done = |s: &PathStats| {
        stats::get(&s.frames_received) + stats::get(&s.frames_unsent) >= stats::get(&s.frames_sent)
            && stats::get(&s.reliable_delivered) >= stats::get(&s.reliable_sent)
    };
    done(&ctx.relayed) && done(&ctx.direct)
}

fn collect_errors(rx: &mut mpsc::UnboundedReceiver<String>) -> Vec<String> {
    let mut v = Vec::new();
    while let Ok(e) = rx.try_recv() {
        v.push(e);
    }
    v
}

fn cpu_scope(cfg: &LoadConfig) -> String {
    match (cfg.relay_pid, &cfg.coordinator, &cfg.wan) {
        (Some(pid), _, _) => format!("all threads of process {pid} (/proc/{pid}/task/*/schedstat)"),
        (None, Some(_), _) => "not measured (external cluster; pass --relay-pid)".into(),
        (None, None, Some(_)) => format!(
            "threads named {CLUSTER_THREAD}: relay, coordinator (idle in the window) and the WAN proxy in front of the relay"
        ),
        (None, None, None) => format!(
            "threads named {CLUSTER_THREAD}: the embedded relay and coordinator (idle in the window); excludes the load generator"
        ),
    }
}

fn path_report(s: &PathStats, sessions: usize, window_s: f64) -> PathReport {
    let latency = s.latency();
    let setup = s.setup();
    let sent = stats::get(&s.frames_sent);
    let received = stats::get(&s.frames_received);
    let wire = stats::get(&s.wire_bytes_received);
    let ms = |q: f64| {
        if setup.is_empty() {
            0.0
        } else {
            setup.value_at_quantile(q) as f64 / 1000.0
        }
    };
    PathReport {
        sessions,
        sessions_up: stats::get(&s.sessions_up),
        sessions_failed: (sessions as u64).saturating_sub(stats::get(&s.sessions_up)),
        latency_us: percentiles(&latency),
        setup_ms: SetupMs {
            p50: ms(0.5),
            p99: ms(0.99),
            max: setup.max() as f64 / 1000.0,
        },
        frames: Counts {
            sent,
            received,
            dropped: sent.saturating_sub(received),
            unsent: stats::get(&s.frames_unsent),
        },
        reliable_bytes: ReliableBytes {
            sent: stats::get(&s.reliable_sent),
            delivered: stats::get(&s.reliable_delivered),
        },
        throughput_mbps: if window_s > 0.0 {
            wire as f64 * 8.0 / window_s / 1e6
        } else {
            0.0
        },
        histogram: latency,
    }
}

fn progress_bar(cfg: &LoadConfig) -> ProgressBar {
    use std::io::IsTerminal;
    let bar = ProgressBar::new(cfg.duration.as_millis() as u64);
    if !cfg.progress || !std::io::stdout().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) = ProgressStyle::with_template("{spinner} [{bar:30}] {elapsed:>4} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
