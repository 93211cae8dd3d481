//! `kakehashi sink` (the evidence sink for telework monitoring) and `kakehashi evidence
//! export` (a device's stored evidence as PNG files and a log, for a reviewer). Part of
//! the `kakehashi` binary; the logic is `kakehashi_agent::sink`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kakehashi_agent::recording::{KEY_FILE_ENV, RecordingKey, RetentionPolicy};
use kakehashi_agent::sink::{self, Evidence, Sink, SinkConfig};

use crate::recording_cli::{DAY, parse_tenant_days};

#[derive(Debug, Args)]
pub(crate) struct SinkArgs {
    /// Where devices upload (plain HTTP/2 gRPC: terminate TLS in front of it).
    #[arg(long, env = "KAKEHASHI_SINK_LISTEN", default_value = "127.0.0.1:7800")]
    listen: SocketAddr,
    /// The evidence directory (created if missing); one sink per directory.
    #[arg(long, env = "KAKEHASHI_SINK_DIR")]
    dir: PathBuf,
    /// The coordinators' Ed25519 public key, 64 hex digits (printed by the
    /// coordinator): monitoring tickets must be signed by it.
    #[arg(long, env = "KAKEHASHI_COORDINATOR_KEY")]
    coordinator_key: String,
    /// The cluster's recording key: 64 hex digits (`recording keygen` makes one).
    #[arg(long, env = KEY_FILE_ENV)]
    recording_key_file: PathBuf,
    #[arg(long, env = "KAKEHASHI_RETENTION_DAYS", default_value_t = 90)]
    retention_days: u64,
    /// A tenant's own retention, TENANT=DAYS; repeatable.
    #[arg(long = "tenant-retention", value_parser = parse_tenant_days)]
    tenant_retention: Vec<(String, u64)>,
    /// How often expired evidence is deleted (also once at start).
    #[arg(long, env = "KAKEHASHI_SINK_PRUNE_EVERY_SECS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    prune_every_secs: u64,
}

#[derive(Debug, Args)]
pub(crate) struct EvidenceArgs {
    #[command(subcommand)]
    command: EvidenceCommand,
}

#[derive(Debug, Subcommand)]
enum EvidenceCommand {
    /// Verify a device's evidence files and write each snapshot as OUT/<seq>.png and
    /// the presence events and gaps to OUT/presence.log, one line each.
    Export {
        #[arg(long, env = "KAKEHASHI_SINK_DIR")]
        dir: PathBuf,
        /// The device id (32 hex digits).
        #[arg(long)]
        device: String,
        /// A new or empty directory; existing files are never overwritten.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, env = KEY_FILE_ENV)]
        recording_key_file: PathBuf,
    },
}

fn parse_coordinator_key(hex_key: &str) -> Result<ed25519_dalek::VerifyingKey> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex_key.trim(), &mut key)
        .context("--coordinator-key must be 64 hex digits")?;
    ed25519_dalek::VerifyingKey::from_bytes(&key)
        .context("--coordinator-key is not a valid Ed25519 public key")
}

/// Serves until SIGINT or SIGTERM, then lets stores in flight finish.
pub(crate) async fn sink(args: SinkArgs) -> Result<()> {
    let config = SinkConfig {
        listen: args.listen,
        dir: args.dir,
        recording_key: RecordingKey::from_hex_file(&args.recording_key_file)?,
        coordinator_key: parse_coordinator_key(&args.coordinator_key)?,
        retention: RetentionPolicy {
            default: Duration::from_secs(args.retention_days.saturating_mul(DAY)),
            per_tenant: args
                .tenant_retention
                .into_iter()
                .map(|(t, d)| (t, Duration::from_secs(d.saturating_mul(DAY))))
                .collect(),
        },
        prune_every: Duration::from_secs(args.prune_every_secs),
    };
    let dir = config.dir.clone();
    let sink = Sink::bind(config).await?;
    println!(
        "Evidence sink listening on {} (gRPC), storing in {}.",
        sink.addr(),
        dir.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => { r.context("waiting for SIGINT")?; }
        _ = term.recv() => {}
    }
    tracing::info!("stopping the evidence sink");
    tokio::time::timeout(Duration::from_secs(30), sink.shutdown())
        .await
        .context("the sink did not stop within 30 s")?;
    Ok(())
}

pub(crate) fn evidence(args: EvidenceArgs) -> Result<()> {
    match args.command {
        EvidenceCommand::Export {
            dir,
            device,
            out,
            recording_key_file,
        } => export(
            &dir,
            &device,
            &out,
            &RecordingKey::from_hex_file(&recording_key_file)?,
        ),
    }
}

fn create_new(path: &Path) -> Result<std::fs::File> {
    std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

fn export(dir: &Path, device: &str, out: &Path, key: &RecordingKey) -> Result<()> {
    let items = sink::read_device(dir, key, device)
        .with_context(|| format!("reading the evidence of device {device}"))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let log_path = out.join("presence.log");
    let mut log = std::io::BufWriter::new(create_new(&log_path)?);
    let (mut pictures, mut lines) = (0u64, 0u64);
    for item in &items {
        match item {
            Evidence::Snapshot { seq, png, .. } => {
                let path = out.join(format!("{seq}.png"));
                let mut f = create_new(&path)?;
                f.write_all(png)
                    .and_then(|()| f.sync_all())
                    .with_context(|| format!("writing {}", path.display()))?;
                pictures += 1;
            }
            Evidence::Presence { .. } | Evidence::Gap { .. } => {
                writeln!(log, "{}", item.describe())
                    .with_context(|| format!("writing {}", log_path.display()))?;
                lines += 1;
            }
        }
    }
    log.flush()
        .with_context(|| format!("writing {}", log_path.display()))?;
    println!(
        "Verified {} items of device {device}: {pictures} snapshots as PNG, {lines} presence and gap lines in {}.",
        items.len(),
        log_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_key_must_be_a_key() {
        let k = ed25519_dalek::SigningKey::from_bytes(&[5; 32]).verifying_key();
        assert_eq!(
            parse_coordinator_key(&hex::encode(k.as_bytes())).unwrap(),
            k
        );
        assert!(parse_coordinator_key("abcd").is_err());
    }

    #[test]
    fn export_writes_pngs_and_the_log_and_never_overwrites() {
        use kakehashi_proto::monitor::{MonitorTicket, sign_item};
        use kakehashi_proto::pb;

        let mut r = [0u8; 8];
        getrandom::fill(&mut r).unwrap();
        let dir = std::env::temp_dir().join(format!("kkh-export-{}", hex::encode(r)));
        let (store_dir, out) = (dir.join("store"), dir.join("out"));
        let key = RecordingKey::from_bytes([3; 32]);
        let dev = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
        let public_key = dev.verifying_key().to_bytes();
        let ticket = MonitorTicket {
            device_id: kakehashi_proto::device::device_id_of(&public_key),
            public_key,
            tenant: "acme".into(),
            issued_at: 0,
            expires_at: u64::MAX,
        };
        let mut items = vec![
            pb::EvidenceItem {
                seq: 1,
                captured_at_unix_ms: 1000,
                body: Some(pb::evidence_item::Body::Snapshot(pb::Snapshot {
                    width: 2,
                    height: 2,
                    format: "png".into(),
                    data: b"picture one".to_vec(),
                })),
                signature: Vec::new(),
            },
            pb::EvidenceItem {
                seq: 2,
                captured_at_unix_ms: 2000,
                body: Some(pb::evidence_item::Body::Presence(pb::Presence {
                    state: pb::PresenceState::Idle as i32,
                    idle_secs: 300,
                    offline_secs: 0,
                    detail: "two\nlines".into(),
                })),
                signature: Vec::new(),
            },
        ];
        for item in &mut items {
            sign_item(&ticket.device_id, &dev, item);
        }
        let store = sink::EvidenceStore::open(&store_dir, key.clone()).unwrap();
        store.store(&ticket, 4, &items).unwrap();

        export(&store_dir, &ticket.device_id, &out, &key).unwrap();
        assert_eq!(std::fs::read(out.join("1.png")).unwrap(), b"picture one");
        let log = std::fs::read_to_string(out.join("presence.log")).unwrap();
        assert_eq!(
            log,
            "gap: 4 snapshots overwritten in the device's offline buffer before seq=1\n\
             seq=2 captured_at_ms=2000 presence state=idle idle_secs=300 offline_secs=0 detail=\"two\\nlines\"\n"
        );
        assert!(export(&store_dir, &ticket.device_id, &out, &key).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
