//! `kakehashi-loadtest run`: flags, and what the command prints and writes.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};

use super::capacity::{self, CapacityConfig};
use super::{LoadConfig, Traffic};
use crate::proxy::Impairment;

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Relayed sessions (host + viewer pairs; one viewer per session, which is all the
    /// agent supports today).
    #[arg(long, env = "KAKEHASHI_LOAD_SESSIONS", default_value_t = 50)]
    sessions: usize,
    /// Direct (no relay) baseline sessions run at the same time; default a quarter of
    /// --sessions, at least 1.
    #[arg(long, env = "KAKEHASHI_LOAD_BASELINE_SESSIONS")]
    baseline_sessions: Option<usize>,
    /// Screen frames per second per session.
    #[arg(long, env = "KAKEHASHI_LOAD_FPS", default_value_t = 30)]
    fps: u32,
    /// Bytes of screen data in a delta frame.
    #[arg(long, env = "KAKEHASHI_LOAD_FRAME_BYTES", default_value_t = 10_000)]
    frame_bytes: usize,
    /// Bytes of screen data in a key frame.
    #[arg(long, env = "KAKEHASHI_LOAD_KEY_FRAME_BYTES", default_value_t = 60_000)]
    key_frame_bytes: usize,
    /// Every this many frames is a key frame (and whenever the relay asks for one).
    #[arg(long, env = "KAKEHASHI_LOAD_KEY_INTERVAL", default_value_t = 60)]
    key_interval: u64,
    /// Chat lines per second, each direction (reliable).
    #[arg(long, env = "KAKEHASHI_LOAD_CHAT_PER_SEC", default_value_t = 1.0)]
    chat_per_sec: f64,
    /// Input events per second, operator to customer (reliable).
    #[arg(long, env = "KAKEHASHI_LOAD_INPUT_PER_SEC", default_value_t = 10.0)]
    input_per_sec: f64,
    /// New sessions per second while ramping up.
    #[arg(long, env = "KAKEHASHI_LOAD_ARRIVAL_RATE", default_value_t = 100.0)]
    arrival_rate: f64,
    /// Measurement window, seconds (after every session is up and the warm-up).
    #[arg(long, env = "KAKEHASHI_LOAD_DURATION", default_value_t = 20.0)]
    duration: f64,
    /// Warm-up between the last session coming up and the window, seconds.
    #[arg(long, env = "KAKEHASHI_LOAD_WARMUP", default_value_t = 2.0)]
    warmup: f64,
    /// Time in-flight frames and reliable bytes get to arrive after the window, seconds.
    #[arg(long, env = "KAKEHASHI_LOAD_DRAIN", default_value_t = 3.0)]
    drain: f64,
    /// An external coordinator (http://HOST:PORT) instead of the embedded cluster.
    #[arg(long, env = "KAKEHASHI_LOAD_COORDINATOR")]
    coordinator: Option<String>,
    /// With --coordinator: the relay's PID, to report its CPU per forwarded Gbit.
    #[arg(long, env = "KAKEHASHI_LOAD_RELAY_PID")]
    relay_pid: Option<u32>,
    /// Worker threads of the embedded cluster's runtime.
    #[arg(long, env = "KAKEHASHI_LOAD_CLUSTER_THREADS", default_value_t = 2)]
    cluster_threads: usize,
    /// WAN profile on both paths through the UDP impairment proxy: lan, broadband,
    /// mobile, intercontinental, or DELAY_MS/JITTER_MS/LOSS_PERCENT (e.g. 10/0/0.1);
    /// applied at each proxy hop, each direction.
    #[arg(long, env = "KAKEHASHI_LOAD_WAN")]
    wan: Option<String>,
    /// Write the JSON report here, and the latency plot beside it (same stem, .svg).
    #[arg(long, env = "KAKEHASHI_LOAD_REPORT")]
    report: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Ramp sessions (from --sessions) until p99 or drops pass their limits; report the knee.
    #[arg(long)]
    find_capacity: bool,
    /// Capacity search: a step fails when the relayed p99 passes this, milliseconds. It is
    /// end to end (generator included), so on a shared machine keep it above the noise.
    #[arg(long, env = "KAKEHASHI_LOAD_P99_LIMIT_MS", default_value_t = 50.0)]
    p99_limit_ms: f64,
    /// Capacity search: a step fails when more than this fraction of frames drops.
    #[arg(long, env = "KAKEHASHI_LOAD_DROP_LIMIT", default_value_t = 0.001)]
    drop_limit: f64,
    /// Capacity search: never more sessions than this.
    #[arg(long, env = "KAKEHASHI_LOAD_MAX_SESSIONS", default_value_t = 4000)]
    max_sessions: usize,
}

fn secs(name: &str, v: f64) -> Result<Duration> {
    if !(v.is_finite() && v >= 0.0) {
        bail!("--{name} must be a non-negative number of seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

/// A named profile, or `DELAY_MS/JITTER_MS/LOSS_PERCENT`.
fn parse_wan(spec: &str) -> Result<Impairment> {
    if let Some(i) = Impairment::profile(spec) {
        return Ok(i);
    }
    let bad = || {
        anyhow::anyhow!(
            "--wan {spec:?} is neither a profile ({}) nor DELAY_MS/JITTER_MS/LOSS_PERCENT",
            Impairment::PROFILES.join(", ")
        )
    };
    let parts: Vec<f64> = spec
        .split('/')
        .map(|p| p.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    let [delay, jitter, loss] = parts[..] else {
        return Err(bad());
    };
    if ![delay, jitter, loss]
        .iter()
        .all(|v| v.is_finite() && *v >= 0.0)
        || loss > 100.0
    {
        return Err(bad());
    }
    Ok(Impairment {
        delay: Duration::from_secs_f64(delay / 1000.0),
        jitter: Duration::from_secs_f64(jitter / 1000.0),
        loss: loss / 100.0,
    })
}

impl RunArgs {
    pub fn config(&self) -> Result<LoadConfig> {
        let wan = match &self.wan {
            None => None,
            Some(spec) => Some((spec.clone(), parse_wan(spec)?)),
        };
        Ok(LoadConfig {
            sessions: self.sessions,
            baseline_sessions: self
                .baseline_sessions
                .unwrap_or(self.sessions.div_ceil(4).max(1)),
            traffic: Traffic {
                fps: self.fps,
                frame_bytes: self.frame_bytes,
                key_frame_bytes: self.key_frame_bytes,
                key_interval: self.key_interval,
                chat_per_sec: self.chat_per_sec,
                input_per_sec: self.input_per_sec,
            },
            arrival_rate: self.arrival_rate,
            warmup: secs("warmup", self.warmup)?,
            duration: secs("duration", self.duration)?,
            drain: secs("drain", self.drain)?,
            coordinator: self.coordinator.clone(),
            relay_pid: self.relay_pid,
            cluster_threads: self.cluster_threads,
            wan,
            progress: !self.quiet,
        })
    }
}

pub async fn main(args: RunArgs) -> Result<()> {
    let cfg = args.config()?;
    if args.find_capacity {
        let cap = CapacityConfig {
            start: cfg.sessions,
            max: args.max_sessions,
            p99_limit: Duration::from_secs_f64(args.p99_limit_ms.max(0.0) / 1000.0),
            drop_limit: args.drop_limit,
            baseline_fraction: cfg.baseline_sessions as f64 / cfg.sessions.max(1) as f64,
            ..CapacityConfig::default()
        };
        let report = capacity::find(&cfg, &cap, |s| {
            println!(
                "step: {} sessions: p50 {} µs, p99 {} µs (direct p99 {} µs), drops {:.3} %: {}",
                s.sessions,
                s.latency_us.p50,
                s.latency_us.p99,
                s.baseline_latency_us.p99,
                s.drop_ratio * 100.0,
                s.reason.as_deref().unwrap_or("pass")
            )
        })
        .await?;
        println!();
        print!("{}", report.table());
        if let Some(k) = &report.knee {
            println!("\nat the knee:");
            print!("{}", k.table());
        }
        if let Some(path) = &args.report {
            let svg = report.write(path)?;
            println!("report: {} and {}", path.display(), svg.display());
        }
        return Ok(());
    }
    let report = super::run(&cfg).await?;
    print!("{}", report.table());
    if let Some(path) = &args.report {
        let svg = report.write(path)?;
        println!("report: {} and {}", path.display(), svg.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wan_specs_parse_or_say_what_is_wrong() {
        assert_eq!(
            parse_wan("broadband").ok(),
            Impairment::profile("broadband")
        );
        let i = parse_wan("10/2/0.5").expect("custom spec");
        assert_eq!(i.delay, Duration::from_millis(10));
        assert_eq!(i.jitter, Duration::from_millis(2));
        assert!((i.loss - 0.005).abs() < 1e-12);
        for bad in ["nope", "10/2", "10/x/1", "10/2/101", "-1/0/0"] {
            let e = parse_wan(bad).expect_err(bad).to_string();
            assert!(e.contains("DELAY_MS"), "{e}");
        }
    }
}
