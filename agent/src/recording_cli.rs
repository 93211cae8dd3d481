//! `kakehashi record` and `kakehashi recording verify|play|prune|keygen`: the recorder
//! participant and the tools around its files (part of the `kakehashi` binary, not the
//! library).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use kakehashi_agent::recording::{
    self, FrameRecord, KEY_FILE_ENV, Player, Record, RecordingKey, RecordingMeta, RecordingWriter,
    RetentionPolicy,
};
use kakehashi_agent::{Viewer, ViewerConfig, ViewerEvent};

use crate::DEFAULT_COORDINATOR;

#[derive(Debug, Args)]
pub(crate) struct RecordArgs {
    #[arg(long, env = "KAKEHASHI_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    coordinator: String,
    #[arg(long, env = "KAKEHASHI_SESSION")]
    session: String,
    /// The operator ticket from `ctl create` (the session must allow recording).
    #[arg(long, env = "KAKEHASHI_TICKET")]
    ticket: String,
    /// The recording to write; never overwritten. Written as FILE.partial until the
    /// session ends.
    #[arg(long, env = "KAKEHASHI_RECORDING_OUT")]
    out: PathBuf,
    /// The cluster's recording key: 64 hex digits (`recording keygen` makes one).
    #[arg(long, env = KEY_FILE_ENV)]
    key_file: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct RecordingArgs {
    #[command(subcommand)]
    command: RecordingCommand,
}

#[derive(Debug, Subcommand)]
enum RecordingCommand {
    /// Check every byte of a recording; exit 1 naming the failing segment.
    Verify {
        file: PathBuf,
        #[arg(long, env = KEY_FILE_ENV)]
        key_file: PathBuf,
    },
    /// Verify a recording, then list its frames and events with their times.
    Play {
        file: PathBuf,
        #[arg(long, env = KEY_FILE_ENV)]
        key_file: PathBuf,
        /// Decode H.264 frames to DIR/frame-NNNNN.png (other frames are listed only).
        #[arg(long)]
        png_dir: Option<PathBuf>,
    },
    /// Delete recordings in DIR older than their tenant's retention (the retention
    /// job: run it daily from a timer or CronJob).
    Prune {
        #[arg(long, env = "KAKEHASHI_RECORDING_DIR")]
        dir: PathBuf,
        #[arg(long, env = KEY_FILE_ENV)]
        key_file: PathBuf,
        #[arg(long, env = "KAKEHASHI_RETENTION_DAYS", default_value_t = 90)]
        retention_days: u64,
        /// A tenant's own retention, TENANT=DAYS; repeatable.
        #[arg(long = "tenant-retention", value_parser = parse_tenant_days)]
        tenant_retention: Vec<(String, u64)>,
    },
    /// Write a new random recording key (64 hex digits) to a new file, mode 0600.
    Keygen { out: PathBuf },
}

pub(crate) fn parse_tenant_days(s: &str) -> Result<(String, u64), String> {
    let (tenant, days) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected TENANT=DAYS"))?;
    if tenant.is_empty() {
        return Err(format!("{s:?}: empty tenant"));
    }
    let days = days
        .parse::<u64>()
        .map_err(|e| format!("{s:?}: days: {e}"))?;
    Ok((tenant.to_owned(), days))
}

fn key(path: &Path) -> Result<RecordingKey> {
    Ok(RecordingKey::from_hex_file(path)?)
}

pub(crate) const DAY: u64 = 24 * 3600;

/// Joins as the recorder and writes what it sees until the session ends or Ctrl-C.
pub(crate) async fn record(args: RecordArgs) -> Result<()> {
    let key = key(&args.key_file)?;
    let config = ViewerConfig {
        recorder: true,
        ..ViewerConfig::default()
    };
    let mut viewer = Viewer::join(&args.coordinator, &args.session, &args.ticket, config)
        .await
        .context("could not join the session as its recorder")?;
    let session = viewer.session().clone();
    let meta = RecordingMeta::new(
        &session.session_id,
        Some(session.tenant.as_str()),
        SystemTime::now(),
    );
    let mut writer = RecordingWriter::create(&args.out, &key, &meta)?;
    println!(
        "Recording session {} to {}. Waiting for the customer to allow recording...",
        session.session_id,
        args.out.display()
    );
    // A segment at least every second: a crash loses at most that much.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let why = loop {
        tokio::select! {
            ev = viewer.next_event() => {
                let Some(ev) = ev else { break "the session's event stream stopped".to_owned() };
                let now = SystemTime::now();
                if let ViewerEvent::Screen { frame, seq, latency_us } = &ev {
                    writer.write_frame(&FrameRecord::from_screen(frame, *seq, *latency_us, now))?;
                    continue;
                }
                if let Some(rec) = recording::event_record(&ev, now) {
                    println!("{}", format!("{} {}", rec.kind, rec.detail).trim_end());
                    writer.write_event(&rec)?;
                }
                if let ViewerEvent::Ended { reason, detail } = ev {
                    break format!("the session ended ({}): {detail}", reason.as_str_name());
                }
            }
            _ = tick.tick() => writer.flush()?,
            _ = &mut ctrl_c => break "Ctrl-C: the recorder left (the session goes on)".to_owned(),
        }
    };
    // Leaving first: the recorder stops receiving before the file is closed.
    drop(viewer);
    let (frames, events) = writer.counts();
    let path = writer.finish()?;
    println!("{why}");
    println!(
        "Recording written to {} ({frames} frames, {events} events).",
        path.display()
    );
    Ok(())
}

pub(crate) fn recording(args: RecordingArgs) -> Result<()> {
    match args.command {
        RecordingCommand::Verify { file, key_file } => {
            let summary = recording::verify(&file, &key(&key_file)?)
                .with_context(|| format!("recording {} FAILED verification", file.display()))?;
            println!("OK {}: {summary}", file.display());
            Ok(())
        }
        RecordingCommand::Play {
            file,
            key_file,
            png_dir,
        } => play(&file, &key(&key_file)?, png_dir.as_deref()),
        RecordingCommand::Prune {
            dir,
            key_file,
            retention_days,
            tenant_retention,
        } => {
            let policy = RetentionPolicy {
                default: Duration::from_secs(retention_days.saturating_mul(DAY)),
                per_tenant: tenant_retention
                    .into_iter()
                    .map(|(t, d)| (t, Duration::from_secs(d.saturating_mul(DAY))))
                    .collect(),
            };
            let report = recording::prune(&dir, &key(&key_file)?, &policy, SystemTime::now())?;
            for (path, age) in &report.deleted {
                println!("deleted {} ({} days old)", path.display(), age / DAY);
            }
            for (path, why) in &report.unreadable {
                println!("kept {} (cannot date it: {why})", path.display());
            }
            for (path, why) in &report.failed {
                println!("FAILED to delete {}: {why}", path.display());
            }
            println!(
                "{} deleted, {} kept within retention, {} undatable kept, {} failed",
                report.deleted.len(),
                report.kept.len(),
                report.unreadable.len(),
                report.failed.len()
            );
            if report.failed.is_empty() {
                Ok(())
            } else {
                bail!(
                    "{} expired recordings could not be deleted",
                    report.failed.len()
                )
            }
        }
        RecordingCommand::Keygen { out } => keygen(&out),
    }
}

fn keygen(out: &Path) -> Result<()> {
    let key = RecordingKey::generate()?;
    let mut opts = std::fs::File::options();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(out)
        .with_context(|| format!("creating key file {}", out.display()))?;
    writeln!(f, "{}", key.to_hex()).with_context(|| format!("writing {}", out.display()))?;
    f.sync_all()
        .with_context(|| format!("writing {}", out.display()))?;
    println!("Wrote a new recording key to {} ({key:?}).", out.display());
    Ok(())
}

fn play(file: &Path, key: &RecordingKey, png_dir: Option<&Path>) -> Result<()> {
    let player = Player::open(file, key)
        .with_context(|| format!("recording {} FAILED verification", file.display()))?;
    println!("OK {}: {}", file.display(), player.summary());
    let mut pngs = Pictures::new(png_dir)?;
    let mut out = std::io::stdout().lock();
    let mut start: Option<u64> = None;
    for record in player {
        let record = record.with_context(|| format!("reading {}", file.display()))?;
        let at = match &record {
            Record::Frame(f) => f.received_at_us,
            Record::Event(e) => e.at_us,
        };
        let t0 = *start.get_or_insert(at);
        let rel = at.saturating_sub(t0) as f64 / 1e6;
        let line = match record {
            Record::Frame(f) => {
                let png = pngs.push(&f);
                // The host's clock: the difference is only meaningful when the two
                // clocks agree.
                let delay_ms = (f.received_at_us as f64 - f.sent_at_us as f64) / 1e3;
                format!(
                    "+{rel:9.3}s frame seq {} {}x{}{} {} B (sent {delay_ms:.1} ms before){png}",
                    f.seq,
                    f.width,
                    f.height,
                    if f.key_frame { " key" } else { "" },
                    f.data.len(),
                )
            }
            Record::Event(e) if e.detail.is_empty() => format!("+{rel:9.3}s event {}", e.kind),
            Record::Event(e) => format!("+{rel:9.3}s event {} {}", e.kind, e.detail),
        };
        match writeln!(out, "{line}") {
            Ok(()) => {}
            // Piped into `head`: the reader has seen enough.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("writing to stdout"),
        }
    }
    Ok(())
}

/// H.264 frames decoded to PNG files, in order (a delta needs the frames before it).
struct Pictures {
    dir: Option<PathBuf>,
    written: u64,
    #[cfg(feature = "media")]
    decoder: Option<kakehashi_agent::media::decoder::ScreenDecoder>,
}

impl Pictures {
    fn new(dir: Option<&Path>) -> Result<Self> {
        if let Some(d) = dir {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        #[cfg(not(feature = "media"))]
        if dir.is_some() {
            bail!("--png-dir needs the media feature (this build has no H.264 decoder)");
        }
        Ok(Self {
            dir: dir.map(Path::to_owned),
            written: 0,
            #[cfg(feature = "media")]
            decoder: None,
        })
    }

    /// Decodes `f` if it is H.264 and pictures are wanted; what to print after it.
    #[cfg(feature = "media")]
    fn push(&mut self, f: &FrameRecord) -> String {
        let Some(dir) = self.dir.clone() else {
            return String::new();
        };
        if !is_annex_b(&f.data) {
            return " (not H.264: listed only)".into();
        }
        if self.decoder.is_none() {
            match kakehashi_agent::media::decoder::ScreenDecoder::new() {
                Ok(d) => self.decoder = Some(d),
                Err(e) => return format!(" (no decoder: {e})"),
            }
        }
        let Some(decoder) = self.decoder.as_mut() else {
            return String::new();
        };
        match decoder.push(&f.to_screen()) {
            Ok(Some(img)) => {
                let path = dir.join(format!("frame-{:05}.png", self.written));
                match img.write_png(&path) {
                    Ok(()) => {
                        self.written += 1;
                        format!(" -> {}", path.display())
                    }
                    Err(e) => format!(" (PNG not written: {e})"),
                }
            }
            Ok(None) => " (no picture yet)".into(),
            Err(e) => format!(" (does not decode: {e})"),
        }
    }

    #[cfg(not(feature = "media"))]
    fn push(&mut self, _f: &FrameRecord) -> String {
        let _ = (&self.dir, self.written);
        String::new()
    }
}

/// Whether `data` starts like an H.264 Annex B stream (a start code).
#[cfg_attr(not(feature = "media"), allow(dead_code))]
fn is_annex_b(data: &[u8]) -> bool {
    data.starts_with(&[0, 0, 0, 1]) || data.starts_with(&[0, 0, 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_retention_parses() {
        assert_eq!(parse_tenant_days("acme=30"), Ok(("acme".to_owned(), 30)));
        assert!(parse_tenant_days("acme").is_err());
        assert!(parse_tenant_days("=3").is_err());
        assert!(parse_tenant_days("acme=x").is_err());
    }

    #[test]
    fn annex_b_is_recognised() {
        assert!(is_annex_b(&[0, 0, 0, 1, 0x67]));
        assert!(is_annex_b(&[0, 0, 1, 0x65]));
        assert!(!is_annex_b(&[1, 2, 3, 4]));
    }
}
