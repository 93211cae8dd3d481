//! Relay loss without data loss, through a real cluster (real coordinator, two real
//! relays, real agents): the relay carrying a live session goes away while both sides
//! stream chat, input and screen; the session resumes on the other relay and every
//! reliable message arrives exactly once, in order, byte for byte.
//!
//! Two ways for a relay to go: a graceful shutdown (the relay tells its participants),
//! and a silent death (a UDP proxy in front of it drops everything, as a crashed machine
//! or a cut cable would; the agents notice through the QUIC idle timeout).
//!
//! Each run prints how long the move took (from the loss to the `Resumed` event), for
//! the README's measurements; nothing is asserted about time.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kakehashi_agent::{Consent, Host, HostConfig, HostEvent, Viewer, ViewerConfig, ViewerEvent};
use kakehashi_loadtest::LocalCluster;
use kakehashi_proto::pb::{self, session_service_client::SessionServiceClient};
use kakehashi_proto::{Channel, Permissions};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::timeout;

/// Messages per stream (viewer chat, viewer input, host chat).
const MESSAGES: usize = 3000;
/// Generous: a silent death takes the idle timeout plus a resume; this only stops a
/// hung test.
const WAIT: Duration = Duration::from_secs(90);
/// What a drained relay gives its sessions to leave; the agents need milliseconds.
const DRAIN_GRACE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// `RelayHandle::shutdown`: the relay ends its sessions with RELAY_SHUTDOWN and
    /// closes with SHUTDOWN.
    Shutdown,
    /// The relay's proxy drops every datagram both ways; the relay itself lives on.
    Silent,
    /// `RelayHandle::drain`: the relay sends `Drain` and waits for its sessions to
    /// leave before shutting down.
    Drain,
    /// Only the host's path breaks (the relay and the viewer's path are fine): the host
    /// resumes elsewhere and the viewer, seeing its peer leave, follows.
    HostOnly,
}

/// One move: how long each side took from noticing to `Resumed`, and from the loss to
/// the later of the two `Resumed` events.
#[derive(Debug)]
struct Timing {
    host_ms: u64,
    viewer_ms: u64,
    wall_ms: u64,
}

/// The drain under way, if any; pending forever otherwise.
async fn poll_drain(draining: &mut Option<Pin<Box<dyn Future<Output = usize>>>>) -> usize {
    match draining {
        Some(d) => d.await,
        None => std::future::pending().await,
    }
}

fn text_input(t: String) -> pb::InputEvent {
    pb::InputEvent {
        kind: Some(pb::input_event::Kind::Text(pb::TypeText { text: t })),
    }
}

/// Takes the event receiver out of an agent, so the agent itself can be shared by the
/// sending tasks while the test reads its events.
fn take_events<T>(rx: &mut mpsc::Receiver<T>) -> mpsc::Receiver<T> {
    let (_, empty) = mpsc::channel(1);
    std::mem::replace(rx, empty)
}

async fn watch_events(url: String, sid: String, out: mpsc::UnboundedSender<pb::SessionEvent>) {
    let Ok(mut api) = SessionServiceClient::connect(url).await else {
        return;
    };
    let Ok(resp) = api
        .watch_session(pb::WatchSessionRequest { session_id: sid })
        .await
    else {
        return;
    };
    let mut stream = resp.into_inner();
    while let Ok(Some(ev)) = stream.message().await {
        if out.send(ev).is_err() {
            return;
        }
    }
}

/// Runs one session through `plan`: each loss strikes the relay the session is on
/// once both sides have resumed from the previous one and a further share of the
/// messages is out. Asserts exactly-once delivery, a key frame after each move, and the
/// watch stream's RELAY_MIGRATED events; returns each move's timing.
async fn run_moves(plan: &[Loss]) -> Result<Vec<Timing>> {
    let builder = LocalCluster::builder().relays(plan.len() + 1);
    let builder = if plan.contains(&Loss::Silent) {
        builder.proxied()
    } else {
        builder
    };
    let mut cluster = builder.start().await?;
    let url = cluster.coordinator_url();

    let mut api = SessionServiceClient::connect(url.clone()).await?;
    let created = api
        .create_session(pb::CreateSessionRequest {
            device_id: String::new(),
            tenant: "acme".into(),
            operator: "op-resume".into(),
            mode: pb::SessionMode::Control as i32,
            permissions: 0,
            max_duration_secs: 600,
        })
        .await?
        .into_inner();
    let session = created.session.clone().context("no session")?;
    let sid = session.session_id.clone();
    let first_relay = session.relay.context("no relay")?.relay_id;

    let (events_tx, mut session_events) = mpsc::unbounded_channel();
    let mut background = JoinSet::new();
    background.spawn(watch_events(url.clone(), sid.clone(), events_tx));

    let mut viewer = Viewer::join(
        &url,
        &sid,
        &created.operator_ticket,
        ViewerConfig {
            request_on_join: Some((Permissions::CONTROL, "resume test".into())),
            supervisor: false,
            recorder: false,
        },
    )
    .await?;
    let mut host = Host::join(
        &url,
        &created.code,
        HostConfig {
            consent: Consent::Approve(Permissions::VIEW | Permissions::CONTROL),
        },
    )
    .await?;
    let mut viewer_events = take_events(viewer.events());
    let mut host_events = take_events(host.events());
    timeout(WAIT, async {
        while let Some(ev) = viewer_events.recv().await {
            if let ViewerEvent::GrantsChanged(g) = ev
                && g.contains(Permissions::VIEW | Permissions::CONTROL)
            {
                return Ok(());
            }
        }
        bail!("viewer events ended before control was granted")
    })
    .await
    .context("control never granted")??;
    let host = Arc::new(host);
    let viewer = Arc::new(viewer);

    // Senders: numbered messages on three reliable streams, and a screen at ~100 fps.
    // Progress is published so the relay can be made to vanish mid-stream.
    let (progress_tx, mut progress) = watch::channel(0usize);
    let stop_screen = tokio_util::sync::CancellationToken::new();
    let mut senders: JoinSet<Result<()>> = JoinSet::new();
    {
        let viewer = viewer.clone();
        senders.spawn(async move {
            for i in 0..MESSAGES {
                viewer.send_chat(&format!("viewer chat #{i:05}")).await?;
                let _ = progress_tx.send(i + 1);
                if i % 8 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            Ok(())
        });
    }
    {
        let viewer = viewer.clone();
        senders.spawn(async move {
            for i in 0..MESSAGES {
                let sent = viewer
                    .send_input(text_input(format!("input #{i:05}")))
                    .await?;
                ensure!(sent, "input #{i} withheld although control is granted");
                if i % 8 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            Ok(())
        });
    }
    {
        let host = host.clone();
        senders.spawn(async move {
            for i in 0..MESSAGES {
                host.send_chat(&format!("host chat #{i:05} ✓")).await?;
                if i % 8 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            Ok(())
        });
    }
    {
        let host = host.clone();
        let stop = stop_screen.clone();
        senders.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut n = 0u32;
            while !stop.is_cancelled() {
                tick.tick().await;
                let key = host.wants_key_frame() || n.is_multiple_of(100);
                let frame = pb::ScreenFrame {
                    width: 640,
                    height: 480,
                    key_frame: key,
                    data: vec![(n % 251) as u8; 2000],
                    group_key: None,
                };
                // Withheld or failed while the session moves: the next one is a key frame.
                if let Ok(true) = host.send_screen(frame).await {
                    n += 1;
                }
            }
            Ok(())
        });
    }

    // Collect until everything arrived and both sides resumed from every loss; strike
    // each loss when its share of the viewer's chat is out.
    let mut host_inputs = Vec::new();
    let mut host_chats = Vec::new();
    let mut viewer_chats = Vec::new();
    let mut host_resumed: Vec<(String, u64, Instant)> = Vec::new();
    let mut viewer_resumed: Vec<(String, u64, Instant)> = Vec::new();
    // Per move: the screen frames the viewer saw after it resumed, (key, seq).
    let mut screens_after: Vec<Vec<(bool, u64)>> = Vec::new();
    let mut struck: Vec<(String, Instant)> = Vec::new();
    let mut shutdowns: JoinSet<Option<usize>> = JoinSet::new();
    let mut draining: Option<Pin<Box<dyn Future<Output = usize>>>> = None;
    let mut drained = Vec::new();
    let mut retired_proxies = Vec::new();
    let collected = timeout(WAIT, async {
        loop {
            let k = struck.len();
            // Settled: both sides resumed from the last loss and the screen is back.
            let settled = host_resumed.len() == k
                && viewer_resumed.len() == k
                && screens_after.last().is_none_or(|s| s.len() >= 5);
            if k < plan.len() && settled && *progress.borrow() >= (k + 1) * MESSAGES / (plan.len() + 1) {
                let on = host_resumed.last().map_or(first_relay.clone(), |r| r.0.clone());
                let idx = cluster
                    .relays
                    .iter()
                    .position(|r| r.relay_id() == on)
                    .context("the session is on an unknown relay")?;
                match plan[k] {
                    Loss::Shutdown => {
                        let relay = cluster.relays.remove(idx);
                        if !cluster.proxies.is_empty() {
                            // Kept forwarding: the relay's goodbye must reach the agents.
                            retired_proxies.push(cluster.proxies.remove(idx));
                        }
                        shutdowns.spawn(async move {
                            relay.shutdown().await;
                            None
                        });
                    }
                    Loss::Drain => {
                        let relay = cluster.relays.remove(idx);
                        if !cluster.proxies.is_empty() {
                            retired_proxies.push(cluster.proxies.remove(idx));
                        }
                        // Not `Send` (it holds a watch borrow across an await), so it is
                        // polled here rather than spawned.
                        draining = Some(Box::pin(relay.drain(DRAIN_GRACE)));
                    }
                    Loss::Silent => cluster.proxies[idx].blackhole(true),
                    Loss::HostOnly => host.force_resume(),
                }
                struck.push((on, Instant::now()));
                continue;
            }
            let done = host_inputs.len() == MESSAGES
                && host_chats.len() == MESSAGES
                && viewer_chats.len() == MESSAGES
                && host_resumed.len() == plan.len()
                && viewer_resumed.len() == plan.len()
                && screens_after.last().is_none_or(|s| s.len() >= 5);
            if done {
                return Ok(());
            }
            tokio::select! {
                left = poll_drain(&mut draining) => {
                    draining = None;
                    drained.push(left);
                }
                changed = progress.changed() => {
                    if changed.is_err() {
                        // The chat sender finished: progress is final. Park this branch.
                        progress = watch::channel(MESSAGES).1;
                    }
                }
                ev = host_events.recv() => match ev.context("host events ended")? {
                    HostEvent::Input(i) => match i.kind {
                        Some(pb::input_event::Kind::Text(t)) => host_inputs.push(t.text),
                        other => bail!("unexpected input {other:?}"),
                    },
                    HostEvent::Chat(t) => host_chats.push(t),
                    HostEvent::Resumed { relay_id, after_ms } => {
                        host_resumed.push((relay_id, after_ms, Instant::now()));
                    }
                    HostEvent::Ended { reason, detail } => bail!("host: session ended: {reason:?} {detail}"),
                    _ => {}
                },
                ev = viewer_events.recv() => match ev.context("viewer events ended")? {
                    ViewerEvent::Chat(t) => viewer_chats.push(t),
                    ViewerEvent::Screen { frame, seq, .. } => {
                        if let Some(s) = screens_after.last_mut() {
                            s.push((frame.key_frame, seq));
                        }
                    }
                    ViewerEvent::Resumed { relay_id, after_ms } => {
                        viewer_resumed.push((relay_id, after_ms, Instant::now()));
                        screens_after.push(Vec::new());
                    }
                    ViewerEvent::Ended { reason, detail } => bail!("viewer: session ended: {reason:?} {detail}"),
                    _ => {}
                },
            }
        }
    })
    .await;
    stop_screen.cancel();
    let counts = format!(
        "host inputs {}/{MESSAGES}, host chats {}/{MESSAGES}, viewer chats {}/{MESSAGES}, struck {:?}, host resumed {:?}, viewer resumed {:?}",
        host_inputs.len(),
        host_chats.len(),
        viewer_chats.len(),
        struck.iter().map(|s| &s.0).collect::<Vec<_>>(),
        host_resumed.iter().map(|r| (&r.0, r.1)).collect::<Vec<_>>(),
        viewer_resumed
            .iter()
            .map(|r| (&r.0, r.1))
            .collect::<Vec<_>>(),
    );
    collected
        .with_context(|| format!("timed out: {counts}"))?
        .with_context(|| counts.clone())?;
    while let Some(r) = senders.join_next().await {
        r??;
    }

    // Exactly once, in order, byte for byte.
    let expect = |f: &dyn Fn(usize) -> String| (0..MESSAGES).map(f).collect::<Vec<_>>();
    assert_eq!(host_inputs, expect(&|i| format!("input #{i:05}")));
    assert_eq!(host_chats, expect(&|i| format!("viewer chat #{i:05}")));
    assert_eq!(viewer_chats, expect(&|i| format!("host chat #{i:05} ✓")));
    // The screen comes back with a key frame after every move.
    for (k, screens) in screens_after.iter().enumerate() {
        assert_eq!(
            screens.first().map(|s| s.0),
            Some(true),
            "move {k}: first screen frame after the move must be a key frame; (key, seq): {:?}; unread {}",
            &screens[..screens.len().min(8)],
            viewer.unread_screen_frames(),
        );
    }
    // Both met on a relay not yet lost, every time.
    let mut timings = Vec::new();
    for (k, ((h, v), (lost, at))) in host_resumed
        .iter()
        .zip(&viewer_resumed)
        .zip(&struck)
        .enumerate()
    {
        assert_eq!(h.0, v.0, "move {k}: both sides met on one relay");
        assert!(
            struck[..=k].iter().all(|s| s.0 != h.0),
            "move {k}: resumed on {} which was lost before",
            h.0
        );
        assert_ne!(&h.0, lost);
        timings.push(Timing {
            host_ms: h.1,
            viewer_ms: v.1,
            wall_ms: h.2.max(v.2).duration_since(*at).as_millis() as u64,
        });
    }
    assert_eq!(host.resumes(), plan.len() as u64);
    assert_eq!(viewer.resumes(), plan.len() as u64);
    // Nothing is left waiting for an ack once everything was delivered and acked.
    for ch in [Channel::Chat, Channel::Input, Channel::Control] {
        timeout(WAIT, async {
            while host.unacked(ch) + viewer.unacked(ch) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .with_context(|| format!("{} frames never acknowledged", ch.name()))?;
    }

    // The call-center software saw every move.
    let mut migrated = 0;
    timeout(WAIT, async {
        while migrated < plan.len() {
            match session_events.recv().await {
                Some(ev) if ev.kind() == pb::EventKind::RelayMigrated => migrated += 1,
                Some(_) => {}
                None => bail!("watch stream ended after {migrated} RELAY_MIGRATED events"),
            }
        }
        Ok(())
    })
    .await
    .context("RELAY_MIGRATED events missing")??;

    eprintln!(
        "resume {plan:?}: {timings:?}; duplicates dropped: host {}, viewer {}; out of order: host {}, viewer {}",
        host.duplicate_frames(),
        viewer.duplicate_frames(),
        host.out_of_order_frames(),
        viewer.out_of_order_frames(),
    );
    drop(senders);
    if let Some(d) = draining.take() {
        drained.push(d.await);
    }
    assert!(
        drained.iter().all(|left| *left == 0),
        "a drained relay still held sessions at its deadline: {drained:?}"
    );
    while let Some(left) = shutdowns.join_next().await {
        if let Some(left) = left? {
            assert_eq!(
                left, 0,
                "the drained relay still held sessions at its deadline"
            );
        }
    }
    drop(retired_proxies);
    drop(host);
    drop(viewer);
    cluster.shutdown().await;
    Ok(timings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_relay_shutdown_moves_the_session_without_losing_a_byte() -> Result<()> {
    run_moves(&[Loss::Shutdown]).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_relay_death_moves_the_session_without_losing_a_byte() -> Result<()> {
    run_moves(&[Loss::Silent]).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_relay_hands_its_session_over_without_losing_a_byte() -> Result<()> {
    run_moves(&[Loss::Drain]).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_follows_a_host_whose_own_path_broke() -> Result<()> {
    run_moves(&[Loss::HostOnly]).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_survives_two_relay_losses_in_a_row() -> Result<()> {
    run_moves(&[Loss::Silent, Loss::Shutdown]).await.map(|_| ())
}

/// Resume time over many runs, for the README: `RESUME_RUNS=20 cargo test --release
/// -p kakehashi-loadtest --test resume -- --ignored --nocapture resume_time`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test: run it by name"]
async fn resume_time_over_many_runs() -> Result<()> {
    let runs: usize = std::env::var("RESUME_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    for loss in [Loss::Shutdown, Loss::Drain, Loss::Silent, Loss::HostOnly] {
        let mut wall = Vec::new();
        let mut noticed = Vec::new();
        for _ in 0..runs {
            for t in run_moves(&[loss]).await? {
                wall.push(t.wall_ms);
                noticed.push(t.host_ms.max(t.viewer_ms));
            }
        }
        wall.sort_unstable();
        noticed.sort_unstable();
        let pct = |v: &[u64], p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
        eprintln!(
            "{loss:?} x{}: loss -> both resumed p50 {} ms, p99 {} ms, max {} ms; noticed -> resumed p50 {} ms, max {} ms",
            wall.len(),
            pct(&wall, 0.5),
            pct(&wall, 0.99),
            wall[wall.len() - 1],
            pct(&noticed, 0.5),
            noticed[noticed.len() - 1],
        );
    }
    Ok(())
}
