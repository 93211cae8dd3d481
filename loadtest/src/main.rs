//! `kakehashi-loadtest`: the dev command (one session through a local cluster) and, in
//! its own issue, load generation.

use anyhow::{Result, ensure};
use clap::{Parser, Subcommand};
use kakehashi_loadtest::dev::{self, DevOptions};
use tracing_subscriber::EnvFilter;

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
                report.frames_received == u64::from(report.frames_sent),
                "lost screen frames on an unloaded loopback path"
            );
            println!("dev session OK");
        }
    }
    Ok(())
}
