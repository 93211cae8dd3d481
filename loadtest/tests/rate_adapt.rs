//! Bitrate adaptation on a real path: a private Xvfb shows busy content (small random
//! coloured blocks appearing all over it), the host
//! shares it through a real relay over QUIC, and the host's way to the relay goes through
//! the loadtest's UDP proxy. With a bandwidth bottleneck on that way the encoder's target
//! bitrate comes down below where it started; once the bottleneck is lifted it climbs
//! again. Directions only, never timings. Without Xvfb the test skips, except under
//! CI=true, where it fails.
//!
//! The ignored `bitrate_trace` prints target and actual bitrate second by second over a
//! run with the bottleneck switched on and off (the README's figure):
//! `cargo test --release -p kakehashi-loadtest --test rate_adapt -- --ignored --nocapture`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kakehashi_agent::host::{ScreenOptions, ScreenShare};
use kakehashi_agent::media::CaptureConfig;
use kakehashi_agent::media::xvfb::Xvfb;
use kakehashi_agent::{Host, Viewer};
use kakehashi_loadtest::LocalCluster;
use kakehashi_loadtest::proxy::RateLimit;
use kakehashi_loadtest::testkit::{self, Attached, SessionSpec};
use kakehashi_proto::Permissions;
use kakehashi_proto::pb;
use tokio::task::JoinSet;

/// Failure guard for anything that must happen; not a timing.
const WAIT: Duration = Duration::from_secs(90);
const START_BPS: u32 = 2_000_000;
/// Blocks painted per frame at 640×480 in the test: busy enough that the content wants
/// far more than the bottleneck carries, yet not full-screen noise (which no encoder
/// sends in less than a whole frame's worth of bits, whatever the target).
const TEST_BLOCKS: usize = 150;
/// Blocks per frame at 1280×720 in the trace.
const TRACE_BLOCKS: usize = 300;
const MIN_BPS: u32 = 50_000;
/// The bottleneck: far below what a scrolling page costs at the start bitrate.
const SQUEEZED: RateLimit = RateLimit {
    bits_per_second: 200_000,
    queue: Duration::from_millis(200),
};

/// Polls a value the adaptation task updates; it has no event to await.
async fn until(what: &str, cond: impl Fn() -> bool) -> Result<()> {
    testkit::until_for(WAIT, what, cond).await
}

/// A session with the viewer attached and VIEW granted, the viewer waiting for the grant.
async fn attached_pair(cluster: &LocalCluster) -> Result<(Host, Viewer)> {
    let Attached { host, viewer, .. } = testkit::attached_pair(
        &cluster.coordinator_url(),
        &SessionSpec::mode(pb::SessionMode::View),
        Permissions::VIEW,
    )
    .await?;
    Ok((host, viewer))
}

/// Paints random coloured blocks over the root window of `display` every frame period
/// until dropped: content no encoder squeezes into a few kbit/s, unlike a scrolling page,
/// which H.264 sends as cheap motion.
struct Painter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Painter {
    fn start(display: &str, fps: u32, blocks: usize) -> Result<Self> {
        use x11rb::connection::Connection;
        use x11rb::protocol::xproto::{ChangeGCAux, ConnectionExt as _, CreateGCAux, Rectangle};
        let (conn, screen_num) = x11rb::connect(Some(display))?;
        let screen = conn
            .setup()
            .roots
            .get(screen_num)
            .context("no X screen")?
            .clone();
        let (root, w, h) = (
            screen.root,
            i32::from(screen.width_in_pixels),
            i32::from(screen.height_in_pixels),
        );
        let gc = conn.generate_id()?;
        conn.create_gc(
            gc,
            root,
            &CreateGCAux::new()
                .subwindow_mode(x11rb::protocol::xproto::SubwindowMode::INCLUDE_INFERIORS),
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let period = Duration::from_secs(1) / fps.max(1);
        let mut seed = 0x2545_f491_u32;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let thread = std::thread::Builder::new()
            .name("painter".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    for _ in 0..blocks {
                        let size = 4 + (rand() % 16) as i32;
                        let rect = Rectangle {
                            x: (rand() as i32 % w) as i16,
                            y: (rand() as i32 % h) as i16,
                            width: size as u16,
                            height: size as u16,
                        };
                        conn.change_gc(gc, &ChangeGCAux::new().foreground(rand() & 0xff_ffff))?;
                        conn.poly_fill_rectangle(root, gc, &[rect])?;
                    }
                    conn.get_input_focus()?.reply()?;
                    std::thread::sleep(period);
                }
                Ok(())
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Painter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Err(e)) => eprintln!("painter stopped: {e}"),
                Err(_) => eprintln!("painter panicked"),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// A cluster behind a proxy, a session, a scrolling screen shared with adaptation on,
/// and both participants' events drained (an undrained host stalls its driver).
struct Rig {
    share: ScreenShare,
    cluster: LocalCluster,
    _painter: Painter,
    _tasks: JoinSet<()>,
    _x: Xvfb,
}

async fn rig(width: u32, height: u32, fps: u32, blocks: usize) -> Result<Option<Rig>> {
    let Some(x) = Xvfb::start_or_skip(width, height)? else {
        return Ok(None);
    };
    let painter = Painter::start(x.display(), fps, blocks)?;
    let cluster = LocalCluster::builder().proxied().start().await?;
    let (mut host, mut viewer) = attached_pair(&cluster).await?;
    let share = host.share_x11_screen(&ScreenOptions {
        display: Some(x.display().to_owned()),
        capture: CaptureConfig { fps, scale: 1.0 },
        bitrate_bps: START_BPS,
        adapt_bitrate: true,
        min_bitrate_bps: MIN_BPS,
        max_bitrate_bps: Some(START_BPS),
        inject_input: false,
    })?;
    let mut tasks = JoinSet::new();
    tasks.spawn(async move { while host.next_event().await.is_some() {} });
    tasks.spawn(async move { while viewer.next_event().await.is_some() {} });
    Ok(Some(Rig {
        share,
        cluster,
        _painter: painter,
        _tasks: tasks,
        _x: x,
    }))
}

impl Rig {
    async fn shutdown(self) {
        let Rig {
            share,
            cluster,
            _tasks: tasks,
            ..
        } = self;
        drop(share);
        drop(tasks);
        cluster.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bottleneck_lowers_the_bitrate_and_lifting_it_raises_it_again() -> Result<()> {
    let Some(rig) = rig(640, 480, 15, TEST_BLOCKS).await? else {
        return Ok(());
    };
    let share = &rig.share;
    let stream = share.stream();
    until("frames flowing", || stream.stats().sent >= 10).await?;
    // No assertion that the target is still at the start here: on a loaded machine even
    // loopback can show a delay spike, and reacting to it is the controller's job.

    rig.cluster.proxies[0].set_upstream_limit(Some(SQUEEZED));
    until("the target below the start", || {
        share.bitrate_bps() < START_BPS
    })
    .await?;
    // Not a token step: the bottleneck is far below the start, so the target keeps
    // coming down (the path carries 200 kbit/s, the floor is half of what it delivers).
    until("the target at half the start or lower", || {
        share.bitrate_bps() <= START_BPS / 2
    })
    .await?;
    let squeezed = share.bitrate_bps();
    let changes = share.bitrate_changes();
    eprintln!("squeezed to {squeezed} bit/s after {changes} changes");
    assert!(squeezed >= MIN_BPS);
    assert!(changes >= 2);

    rig.cluster.proxies[0].set_upstream_limit(None);
    let lifted = share.bitrate_bps();
    until("the target climbing back", || share.bitrate_bps() > lifted).await?;
    eprintln!(
        "climbing: {} bit/s after {} changes",
        share.bitrate_bps(),
        share.bitrate_changes()
    );
    assert!(share.bitrate_bps() <= START_BPS);
    rig.shutdown().await;
    Ok(())
}

/// One line of the trace: second, phase, target and actual bit/s, frames dropped on the
/// host so far.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints a bitrate trace, asserts nothing"]
async fn bitrate_trace() -> Result<()> {
    let Some(rig) = rig(1280, 720, 15, TRACE_BLOCKS).await? else {
        return Ok(());
    };
    let share = &rig.share;
    let stream = share.stream();
    until("frames flowing", || stream.stats().sent >= 10).await?;
    let limit = RateLimit {
        bits_per_second: 400_000,
        queue: Duration::from_millis(200),
    };
    println!(
        "# 1280x720, {TRACE_BLOCKS} random blocks per frame at 15 fps, start = max = {START_BPS} bit/s, min = {MIN_BPS} bit/s"
    );
    println!(
        "# bottleneck {} bit/s, {} ms drop-tail queue, on the host's way to the relay",
        limit.bits_per_second,
        limit.queue.as_millis()
    );
    println!("t_s\tphase\ttarget_bps\tactual_bps\tlocal_drops");
    let phases = [("clean", 10), ("squeezed", 25), ("clean", 30)];
    let t0 = Instant::now();
    let mut last = stream.stats();
    let mut at = Instant::now();
    for (phase, secs) in phases {
        rig.cluster.proxies[0].set_upstream_limit((phase == "squeezed").then_some(limit));
        for _ in 0..secs {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = Instant::now();
            let s = stream.stats();
            let bps = (s.bytes - last.bytes) as f64 * 8.0 / (now - at).as_secs_f64();
            println!(
                "{:.0}\t{phase}\t{}\t{:.0}\t{}",
                (now - t0).as_secs_f64(),
                share.bitrate_bps(),
                bps,
                s.dropped
            );
            (last, at) = (s, now);
        }
    }
    println!("# {} target changes", share.bitrate_changes());
    rig.shutdown().await;
    Ok(())
}
