//! `kakehashi device init|run|monitor`: unattended access and telework monitoring on an
//! installed device (part of the `kakehashi` binary, not the library; the logic is
//! `kakehashi_agent::device` and `kakehashi_agent::monitor`).
//!
//! `run` hosts each unattended session exactly as `kakehashi host` does (same screen,
//! overlay and end handling: it calls [`super::host`]), with the code from the poll and
//! `--approve` set to what the session allows, so nobody is asked.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use kakehashi_agent::AgentError;
use kakehashi_agent::device::{self, DeviceKey, Poller};
use kakehashi_agent::monitor::{Monitor, MonitorConfig, MonitorStats, SnapshotSource};

use crate::{DEFAULT_COORDINATOR, HostArgs, ScreenKind};

#[derive(Debug, Args)]
pub(crate) struct DeviceArgs {
    #[command(subcommand)]
    command: DeviceCommand,
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Make this device's key (a new file, mode 0600) and print the device id and
    /// public key an admin enrols with AdminService.EnrollDevice.
    Init {
        #[arg(long, env = "KAKEHASHI_DEVICE_KEY_FILE")]
        key_file: PathBuf,
    },
    /// Wait for unattended connections and host each without a code or a prompt.
    Run(RunArgs),
    /// Telework monitoring: presence events and periodic screen snapshots, signed with
    /// the device key, buffered on disk while offline (up to 500 snapshots, oldest
    /// overwritten) and uploaded to the evidence sink the coordinator names.
    Monitor(MonitorArgs),
}

#[derive(Debug, Args)]
struct MonitorArgs {
    #[arg(long, env = "KAKEHASHI_DEVICE_KEY_FILE")]
    key_file: PathBuf,
    #[arg(long, env = "KAKEHASHI_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    coordinator: String,
    /// The offline buffer's directory (made 0700; keep it across restarts).
    #[arg(long, env = "KAKEHASHI_MONITOR_SPOOL")]
    spool: PathBuf,
    /// What to picture: `x11` (the real screen, fitted within 1920x1080) or `synthetic`
    /// (generated pictures, for tests and demos).
    #[arg(long, env = "KAKEHASHI_SCREEN", value_enum, default_value_t = ScreenKind::X11)]
    screen: ScreenKind,
    /// X display for --screen x11 (default: $DISPLAY).
    #[arg(long, env = "KAKEHASHI_DISPLAY")]
    display: Option<String>,
    /// Take a snapshot this often, seconds, whatever the coordinator says (default:
    /// the coordinator's interval).
    #[arg(long, env = "KAKEHASHI_SNAPSHOT_INTERVAL_SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    snapshot_interval_secs: Option<u64>,
    /// With --screen x11: no keyboard or pointer input for this long is reported as
    /// IDLE (and the next input as ACTIVE), seconds.
    #[arg(long, env = "KAKEHASHI_IDLE_AFTER_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(10..=86_400))]
    idle_after_secs: u64,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[arg(long, env = "KAKEHASHI_DEVICE_KEY_FILE")]
    key_file: PathBuf,
    #[arg(long, env = "KAKEHASHI_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    coordinator: String,
    /// Pause between two polls for waiting sessions, milliseconds.
    #[arg(long, env = "KAKEHASHI_POLL_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    poll_interval_ms: u64,
    /// `kakehashi host` flags for every session (e.g. `--screen x11`); `--code` and
    /// `--approve` come from the poll.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "HOST FLAGS"
    )]
    host_flags: Vec<String>,
}

/// `kakehashi host`'s flags, parsed on their own for each session.
#[derive(Debug, Parser)]
#[command(name = "kakehashi device run")]
struct HostFlags {
    #[command(flatten)]
    host: HostArgs,
}

impl RunArgs {
    /// The host flags for one session: the user's, then the coordinator and the code.
    fn host_args(&self, code: &str) -> Result<HostArgs> {
        let argv = ["kakehashi device run"]
            .into_iter()
            .map(str::to_owned)
            .chain(self.host_flags.iter().cloned())
            .chain([
                "--coordinator".to_owned(),
                self.coordinator.clone(),
                "--code".to_owned(),
                code.to_owned(),
            ]);
        Ok(HostFlags::try_parse_from(argv)
            .context("the host flags after `device run`")?
            .host)
    }
}

pub(crate) async fn device(args: DeviceArgs) -> Result<()> {
    match args.command {
        DeviceCommand::Init { key_file } => {
            let key = DeviceKey::create_file(&key_file)?;
            println!("Wrote the device key to {}.", key_file.display());
            println!("device_id:  {}", key.device_id());
            println!("public_key: {}", hex::encode(key.public_key()));
            println!(
                "An admin enrols it with AdminService.EnrollDevice (device_id, public_key, name)."
            );
            Ok(())
        }
        DeviceCommand::Run(args) => run(args).await,
        DeviceCommand::Monitor(args) => monitor(args).await,
    }
}

fn snapshot_source(args: &MonitorArgs) -> Result<Box<dyn SnapshotSource + Send>> {
    #[cfg(feature = "media")]
    match args.screen {
        ScreenKind::Synthetic => Ok(Box::new(kakehashi_agent::monitor::SyntheticSnapshots::new(
            640, 360,
        ))),
        ScreenKind::X11 => Ok(Box::new(
            kakehashi_agent::monitor::X11Snapshots::open(args.display.clone())
                .context("--screen x11")?,
        )),
    }
    #[cfg(not(feature = "media"))]
    {
        let _ = args;
        bail!("`device monitor` needs a build with the media feature (PNG snapshots)")
    }
}

/// The status line: what changed for the person running the monitor.
fn status_line(s: &MonitorStats) -> String {
    let state = if s.monitoring_denied {
        "monitoring is off for this device (coordinator said PERMISSION_DENIED)"
    } else if s.online {
        "online"
    } else {
        "offline (buffering)"
    };
    format!(
        "{state}: {} snapshots taken, {} buffered, {} overwritten, stored through seq {}",
        s.snapshots_taken, s.buffered_snapshots, s.overwritten_total, s.stored_through_seq
    )
}

async fn monitor(args: MonitorArgs) -> Result<()> {
    let key = DeviceKey::load(&args.key_file)?;
    let source = snapshot_source(&args)?;
    let mut config = MonitorConfig::new(args.coordinator.clone(), key, args.spool.clone(), source);
    config.snapshot_interval = args.snapshot_interval_secs.map(Duration::from_secs);
    config.idle_after = Duration::from_secs(args.idle_after_secs);
    #[cfg(feature = "media")]
    if args.screen == ScreenKind::X11 {
        config.idle = Some(Box::new(kakehashi_agent::monitor::X11Idle::new(
            args.display.clone(),
        )));
    }
    let monitor = Monitor::start(config).await?;
    println!(
        "Device {}: monitoring, buffering in {} (Ctrl-C stops).",
        monitor.device_id(),
        args.spool.display()
    );
    let mut stats = monitor.watch();
    let mut shown = String::new();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        // Counters that move every snapshot are not worth a line each; state is.
        let line = {
            let s = stats.borrow_and_update();
            let key = (
                s.online,
                s.monitoring_denied,
                s.buffered_snapshots,
                s.overwritten_total,
            );
            (format!("{key:?}"), status_line(&s))
        };
        if line.0 != shown {
            println!("{}", line.1);
            shown = line.0;
        }
        tokio::select! {
            _ = &mut ctrl_c => break,
            changed = stats.changed() => if changed.is_err() { break },
        }
    }
    println!("Stopping: recording STOPPED and delivering what is buffered (10 s at most).");
    let s = monitor.stop().await;
    println!("{}", status_line(&s));
    Ok(())
}

async fn run(args: RunArgs) -> Result<()> {
    if args.host_flags.iter().any(|f| {
        ["--code", "--approve", "--deny-all", "--coordinator"]
            .iter()
            .any(|x| f == x || f.starts_with(&format!("{x}=")))
    }) {
        bail!("--code, --approve, --deny-all and --coordinator are set by `device run`");
    }
    // Refuse bad host flags now, not when the first operator connects.
    args.host_args("0")?;
    let key = DeviceKey::load(&args.key_file)?;
    let mut poller = Poller::connect(&args.coordinator, key).await?;
    println!(
        "Device {}: waiting for unattended connections (Ctrl-C stops).",
        poller.device_id()
    );
    let mut tick = tokio::time::interval(Duration::from_millis(args.poll_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            _ = tick.tick() => {}
        }
        let waiting = match poller.poll().await {
            Ok(w) => w,
            Err(AgentError::Rpc { status, .. })
                if status.code() == tonic::Code::Unauthenticated =>
            {
                bail!(
                    "the coordinator refused this device: {} (is it enrolled, and is this clock right?)",
                    status.message()
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "device poll failed; retrying");
                continue;
            }
        };
        // One session at a time: the screen is shared with one operator. Sessions
        // waiting meanwhile stay in the coordinator until their code expires.
        for pending in waiting {
            println!(
                "Unattended connection by {} (session {})",
                pending.operator, pending.session_id
            );
            let mut host = args.host_args(&pending.code)?;
            host.approve = Some(device::allowed_permissions(&pending));
            host.deny_all = false;
            if let Err(e) = super::host(host).await {
                println!(
                    "The unattended session {} failed: {e:#}",
                    pending.session_id
                );
            }
            println!(
                "Device {}: waiting for unattended connections.",
                poller.device_id()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: DeviceCommand,
    }

    #[test]
    fn host_flags_pass_through() {
        let cli = Cli::try_parse_from([
            "kakehashi",
            "run",
            "--key-file",
            "/k",
            "--coordinator",
            "http://c:1",
            "--screen",
            "x11",
            "--no-overlay",
        ])
        .expect("parses");
        let DeviceCommand::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.host_flags, ["--screen", "x11", "--no-overlay"]);
        let host = run.host_args("1234567").expect("host flags");
        assert_eq!(host.code, "1234567");
        assert_eq!(host.coordinator, "http://c:1");
        assert!(host.no_overlay);
        assert!(run.host_args("1").is_ok());
        let bad = Cli::try_parse_from(["kakehashi", "run", "--key-file", "/k", "--fps", "0"])
            .expect("parses");
        let DeviceCommand::Run(bad) = bad.command else {
            panic!("not run")
        };
        assert!(
            bad.host_args("1").is_err(),
            "--fps 0 is refused by host's parser"
        );
    }

    #[test]
    fn monitor_flags_parse() {
        let cli = Cli::try_parse_from([
            "kakehashi",
            "monitor",
            "--key-file",
            "/k",
            "--spool",
            "/var/spool/k",
            "--screen",
            "synthetic",
            "--snapshot-interval-secs",
            "30",
        ])
        .expect("parses");
        let DeviceCommand::Monitor(m) = cli.command else {
            panic!("not monitor")
        };
        assert_eq!(m.screen, ScreenKind::Synthetic);
        assert_eq!(m.snapshot_interval_secs, Some(30));
        assert_eq!(m.idle_after_secs, 300);
        assert_eq!(m.coordinator, DEFAULT_COORDINATOR);
        let x11 =
            Cli::try_parse_from(["kakehashi", "monitor", "--key-file", "/k", "--spool", "/s"])
                .expect("parses");
        let DeviceCommand::Monitor(m) = x11.command else {
            panic!("not monitor")
        };
        assert_eq!(
            m.screen,
            ScreenKind::X11,
            "the real screen unless told otherwise"
        );
        assert!(
            Cli::try_parse_from([
                "kakehashi",
                "monitor",
                "--key-file",
                "/k",
                "--spool",
                "/s",
                "--snapshot-interval-secs",
                "0"
            ])
            .is_err()
        );
    }

    #[test]
    fn the_status_line_says_what_state_the_monitor_is_in() {
        let s = MonitorStats {
            snapshots_taken: 3,
            buffered_snapshots: 2,
            ..Default::default()
        };
        assert!(status_line(&s).starts_with("offline (buffering): 3 snapshots taken, 2 buffered"));
    }
}
