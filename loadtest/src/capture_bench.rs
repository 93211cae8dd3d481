//! `capture-bench`: capture + H.264 encode time per frame and the bitrate it produces, on
//! a private Xvfb screen (1920×1080 by default) showing office-like content that is
//! being typed into, and the same page scrolling. Paced at the frame rate so the
//! encoder's rate control sees real time. A benchmark, not a test: it reports numbers
//! and asserts nothing about them.

use std::time::Instant;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use kakehashi_agent::media::codec::EncoderSettings;
use kakehashi_agent::media::xvfb::{Scene, Xvfb};
use kakehashi_agent::media::{CaptureConfig, EncodePipeline, H264Decoder, ScreenSource, X11Source};
use serde::Serialize;

/// Flags of `kakehashi-loadtest capture-bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    #[arg(long, default_value_t = 1920)]
    pub width: u32,
    #[arg(long, default_value_t = 1080)]
    pub height: u32,
    /// Frames per scenario.
    #[arg(long, default_value_t = 300)]
    pub frames: u32,
    #[arg(long, default_value_t = 30)]
    pub fps: u32,
    /// Encoder target bitrate, bits per second.
    #[arg(long, default_value_t = 2_000_000)]
    pub bitrate: u32,
    /// Capture scale, 0 < scale ≤ 1.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f32,
    /// Pixels the page moves per frame in the scrolling scenario.
    #[arg(long, default_value_t = 18)]
    pub scroll_px: u16,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,
    /// Decode the office scenario as the viewer would (outside the timings) and write
    /// its last picture here as PNG: the headless viewer's output.
    #[arg(long)]
    pub png: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// A few glyphs typed per frame at a moving caret.
    Office,
    /// The whole page moves up each frame.
    Scroll,
    /// Nothing changes: the cost of noticing that.
    Still,
}

#[derive(Debug, Serialize)]
struct ScenarioReport {
    scenario: &'static str,
    width: u32,
    height: u32,
    frames: u32,
    fps: u32,
    target_bitrate_bps: u32,
    shm: bool,
    damage: bool,
    capture_p50_ms: f64,
    capture_p99_ms: f64,
    encode_p50_ms: f64,
    encode_p99_ms: f64,
    total_p50_ms: f64,
    total_p99_ms: f64,
    encoded_frames: u64,
    unchanged_frames: u64,
    rate_skipped_frames: u64,
    key_frame_bytes: u64,
    bytes: u64,
    /// Over the stream's own duration (frames / fps).
    bitrate_bps: f64,
    kilobytes_per_second: f64,
    /// Frames whose capture + encode overran the frame period.
    late_frames: u32,
    /// This process's CPU time per frame (capture client side, scaling, encode), which
    /// other load on the machine does not inflate the way it does wall times.
    cpu_ms_per_frame: f64,
}

/// CPU time this process has used (all threads, OpenH264's included).
fn process_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn run_one(opts: &Options, scenario: Scenario) -> Result<ScenarioReport> {
    let x = Xvfb::start(opts.width, opts.height).context("start Xvfb (apt-get install xvfb)")?;
    let mut scene = Scene::open(x.display()).context("draw the page")?;
    let config = CaptureConfig {
        fps: opts.fps,
        scale: opts.scale,
    };
    let mut source = X11Source::open(Some(x.display()), config)?;
    let mut pipe = EncodePipeline::new(EncoderSettings {
        bitrate_bps: opts.bitrate,
        fps: opts.fps,
        key_interval: None,
    })?;
    let new_hist = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3);
    let (mut cap_h, mut enc_h, mut tot_h) = (new_hist()?, new_hist()?, new_hist()?);
    let period = config.period();
    let mut next = Instant::now();
    let mut late = 0;
    let mut key_bytes = 0;
    let mut viewer = match (&opts.png, scenario) {
        (Some(path), Scenario::Office) => Some((path, H264Decoder::new()?, None)),
        _ => None,
    };
    let mut viewer_cpu = std::time::Duration::ZERO;
    let cpu0 = process_cpu();
    for _ in 0..opts.frames {
        match scenario {
            Scenario::Office => scene.type_step()?,
            Scenario::Scroll => scene.scroll_step(opts.scroll_px)?,
            Scenario::Still => {}
        }
        let t0 = Instant::now();
        let frame = source.capture()?;
        let t1 = Instant::now();
        let out = pipe.push(&frame)?;
        let t2 = Instant::now();
        if let Some(out) = &out
            && out.key_frame
        {
            key_bytes += out.data.len() as u64;
        }
        cap_h.record((t1 - t0).as_micros().max(1) as u64)?;
        enc_h.record((t2 - t1).as_micros().max(1) as u64)?;
        tot_h.record((t2 - t0).as_micros().max(1) as u64)?;
        if let (Some((_, dec, last)), Some(out)) = (&mut viewer, &out) {
            // Decoding is the viewer's cost, not the host's: kept out of CPU/frame.
            let c = process_cpu();
            if let Some(img) = dec.decode(&out.data)? {
                *last = Some(img);
            }
            viewer_cpu += process_cpu().saturating_sub(c);
        }
        next += period;
        let now = Instant::now();
        if now > next {
            late += 1;
            next = now;
        } else {
            std::thread::sleep(next - now);
        }
    }
    let cpu = process_cpu()
        .saturating_sub(cpu0)
        .saturating_sub(viewer_cpu);
    if let Some((path, _, Some(img))) = &viewer {
        img.write_png(path)
            .with_context(|| format!("write {}", path.display()))?;
    }
    let stats = pipe.stats();
    let seconds = f64::from(opts.frames) / f64::from(opts.fps.max(1));
    let (width, height) = source.size();
    Ok(ScenarioReport {
        scenario: match scenario {
            Scenario::Office => "office",
            Scenario::Scroll => "scroll",
            Scenario::Still => "still",
        },
        width,
        height,
        frames: opts.frames,
        fps: opts.fps,
        target_bitrate_bps: opts.bitrate,
        shm: source.uses_shm(),
        damage: source.uses_damage(),
        capture_p50_ms: ms(&cap_h, 0.5),
        capture_p99_ms: ms(&cap_h, 0.99),
        encode_p50_ms: ms(&enc_h, 0.5),
        encode_p99_ms: ms(&enc_h, 0.99),
        total_p50_ms: ms(&tot_h, 0.5),
        total_p99_ms: ms(&tot_h, 0.99),
        encoded_frames: stats.encoded,
        unchanged_frames: stats.unchanged,
        rate_skipped_frames: stats.rate_skipped,
        key_frame_bytes: key_bytes,
        bytes: stats.bytes,
        bitrate_bps: stats.bytes as f64 * 8.0 / seconds,
        kilobytes_per_second: stats.bytes as f64 / 1000.0 / seconds,
        late_frames: late,
        cpu_ms_per_frame: cpu.as_secs_f64() * 1000.0 / f64::from(opts.frames.max(1)),
    })
}

/// Runs the office, scroll and still scenarios one after another and prints a table.
pub fn run(opts: Options) -> Result<()> {
    let mut reports = Vec::new();
    for s in [Scenario::Office, Scenario::Scroll, Scenario::Still] {
        reports.push(run_one(&opts, s)?);
    }
    println!(
        "capture-bench: {}x{} (scale {}) at {} fps, {} frames per scenario, target {:.2} Mbit/s, H.264 (OpenH264)",
        opts.width,
        opts.height,
        opts.scale,
        opts.fps,
        opts.frames,
        f64::from(opts.bitrate) / 1e6
    );
    println!(
        "{:<8} {:>17} {:>17} {:>17} {:>8} {:>9} {:>9} {:>8} {:>9} {:>7} {:>6}",
        "scenario",
        "capture p50/p99",
        "encode p50/p99",
        "total p50/p99",
        "CPU/frm",
        "Mbit/s",
        "KB/s",
        "encoded",
        "unchanged",
        "rc-skip",
        "late"
    );
    for r in &reports {
        println!(
            "{:<8} {:>7.2}/{:>6.2} ms {:>7.2}/{:>6.2} ms {:>7.2}/{:>6.2} ms {:>5.1} ms {:>9.3} {:>9.1} {:>8} {:>9} {:>7} {:>6}",
            r.scenario,
            r.capture_p50_ms,
            r.capture_p99_ms,
            r.encode_p50_ms,
            r.encode_p99_ms,
            r.total_p50_ms,
            r.total_p99_ms,
            r.cpu_ms_per_frame,
            r.bitrate_bps / 1e6,
            r.kilobytes_per_second,
            r.encoded_frames,
            r.unchanged_frames,
            r.rate_skipped_frames,
            r.late_frames
        );
    }
    if let Some(first) = reports.first() {
        println!("(MIT-SHM: {}, XDamage: {})", first.shm, first.damage);
    }
    if let Some(path) = &opts.report {
        std::fs::write(path, serde_json::to_vec_pretty(&reports)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}
