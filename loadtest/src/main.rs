//! `kakehashi-loadtest`: the dev command (one session through a local cluster) and, in
//! its own issue, load generation.

use anyhow::{Result, ensure};
use clap::{Parser, Subcommand};
use kakehashi_loadtest::dev::{self, DevOptions};
use tracing_subscriber::EnvFilter;

mod capture_bench;
mod codes_bench;

#[derive(Debug, Parser)]
#[command(version, about = "Kakehashi local cluster and load tests")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a coordinator and a relay in-process (embedded backends) and drive one real
    /// session through them end to end.
    Dev {
        /// Screen frames to send.
        #[arg(long, env = "KAKEHASHI_DEV_FRAMES", default_value_t = 150)]
        frames: u32,
        #[arg(long, env = "KAKEHASHI_DEV_FPS", default_value_t = 30)]
        fps: u32,
        /// Payload bytes per screen frame.
        #[arg(long, env = "KAKEHASHI_DEV_FRAME_BYTES", default_value_t = 20_000)]
        frame_bytes: usize,
    },
    /// Load test: many concurrent sessions through a cluster beside a no-relay baseline,
    /// per-frame latency measured open-loop; or, with --find-capacity, the knee.
    Run(Box<kakehashi_loadtest::load::cli::RunArgs>),
    /// Benchmark: code allocations + redemptions per second through the coordinator's
    /// Redis code store, beside `redis-benchmark -t set` on the same Redis, as a ratio.
    CodesBench(codes_bench::Options),
    /// Benchmark: screen capture + H.264 encode time per frame and bitrate on a private
    /// Xvfb (1920x1080 by default), office-like typing, scrolling and a still screen.
    CaptureBench(capture_bench::Options),
    /// Relay-kill scenario: live sessions on separate relay processes (real etcd), the
    /// relay carrying them SIGKILLed repeatedly; resume times and reliable bytes lost.
    RelayKill {
        #[arg(long, default_value_t = 20)]
        kills: u32,
        #[arg(long, default_value_t = 4)]
        sessions: u32,
        #[arg(long, default_value_t = 3)]
        relays: usize,
        /// Chat messages per second in each direction of each session.
        #[arg(long, default_value_t = 50)]
        chat_rate: u32,
        #[arg(long, default_value_t = 200)]
        chat_bytes: usize,
        /// Milliseconds between the sessions resuming and the next kill.
        #[arg(long, default_value_t = 1000)]
        settle_ms: u64,
        /// Write the JSON report here.
        #[arg(long)]
        report: Option<std::path::PathBuf>,
    },
    /// Run a relay node: exactly `kakehashi-relay` (same flags), so process-level tests
    /// can start one from this package's own binary.
    Relay(Box<kakehashi_relay::cli::Args>),
    /// Run a coordinator replica: exactly `kakehashi-coordinator` (same flags).
    Coordinator(Box<kakehashi_coordinator::cli::Args>),
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    match Args::parse().command {
        Command::Dev {
            frames,
            fps,
            frame_bytes,
        } => {
            let report = dev::run(DevOptions {
                frames,
                fps,
                frame_bytes,
            })
            .await?;
            ensure!(
                report.frames_received == u64::from(report.frames_sent)
                    && report.supervisor_frames == u64::from(report.frames_sent),
                "lost screen frames on an unloaded loopback path"
            );
            ensure!(
                report.frames_sealed == u64::from(report.frames_sent),
                "the host sealed {} frames for {} sent to two viewers",
                report.frames_sealed,
                report.frames_sent
            );
            println!("dev session OK");
        }
        Command::Run(args) => kakehashi_loadtest::load::cli::main(*args).await?,
        Command::CodesBench(opts) => codes_bench::run(opts).await?,
        Command::CaptureBench(opts) => {
            tokio::task::spawn_blocking(move || capture_bench::run(opts)).await??
        }
        Command::RelayKill {
            kills,
            sessions,
            relays,
            chat_rate,
            chat_bytes,
            settle_ms,
            report,
        } => {
            let out =
                kakehashi_loadtest::relay_kill::run(kakehashi_loadtest::relay_kill::KillOptions {
                    kills,
                    sessions,
                    relays,
                    chat_rate,
                    chat_bytes,
                    settle: std::time::Duration::from_millis(settle_ms),
                    program: std::env::current_exe()?,
                })
                .await?;
            let json = serde_json::to_string_pretty(&out)?;
            println!("{json}");
            if let Some(path) = report {
                std::fs::write(&path, &json)?;
            }
            ensure!(
                out.reliable_bytes.lost == 0 && out.reliable_bytes.duplicated == 0,
                "reliable bytes were lost or duplicated"
            );
        }
        Command::Relay(args) => kakehashi_relay::cli::run(*args).await?,
        Command::Coordinator(args) => kakehashi_coordinator::cli::run(*args).await?,
    }
    Ok(())
}
