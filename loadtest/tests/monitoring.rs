//! Telework monitoring through a real coordinator and a real evidence sink: an admin
//! enables monitoring for a tenant and enrols a device with `monitoring`; the device's
//! monitor gets a ticket from the coordinator, takes snapshots while the sink is down,
//! keeps only the newest 500 (the oldest overwritten and counted) in its on-disk spool,
//! and delivers them, in order, once the sink is back on the same address. The sink's
//! files verify; the gap and the offline period are in them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kakehashi_agent::device::DeviceKey;
use kakehashi_agent::media::image::RgbImage;
use kakehashi_agent::monitor::{
    Monitor, MonitorConfig, MonitorStats, SnapshotError, SnapshotSource,
};
use kakehashi_agent::recording::{RecordingKey, RetentionPolicy};
use kakehashi_agent::sink::{Evidence, Sink, SinkConfig, read_device};
use kakehashi_loadtest::LocalCluster;
use kakehashi_loadtest::testkit::{api_key, authed, hex_random, within_for};
use kakehashi_proto::pb::{self, admin_service_client::AdminServiceClient};
use tokio::sync::watch;

/// Pictures the test can recognise afterwards: each capture is a distinct PNG,
/// remembered in order; after `limit` captures the source has nothing more to give
/// (each further capture fails and is skipped), so the count is exact.
struct CountedPictures {
    made: Arc<Mutex<Vec<Vec<u8>>>>,
    limit: usize,
}

impl SnapshotSource for CountedPictures {
    fn capture(&mut self) -> Result<pb::Snapshot, SnapshotError> {
        let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        if made.len() >= self.limit {
            return Err(SnapshotError::Unavailable(
                "the test's pictures are used up".into(),
            ));
        }
        let n = made.len() as u32;
        let (width, height) = (32u32, 18u32);
        let data = (0..width * height)
            .flat_map(|i| {
                let [a, b, c, _] = (n.wrapping_mul(2_654_435_761) ^ i).to_le_bytes();
                [a, b, c]
            })
            .collect();
        let png = RgbImage {
            width,
            height,
            data,
        }
        .to_png()?;
        made.push(png.clone());
        Ok(pb::Snapshot {
            width,
            height,
            format: "png".into(),
            data: png,
        })
    }
}

fn temp_dir(what: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("kakehashi-{what}-{}", hex_random::<8>()?));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn stats_until(
    rx: &mut watch::Receiver<MonitorStats>,
    what: &str,
    f: impl Fn(&MonitorStats) -> bool,
) -> Result<MonitorStats> {
    let seen = within_for(Duration::from_secs(60), what, rx.wait_for(|s| f(s))).await?;
    Ok(seen.context("the monitor is gone")?.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_overflow_keeps_the_newest_500_and_delivers_them_after_reconnect() -> Result<()> {
    const TAKEN: usize = 520;
    const KEPT: usize = 500;
    let evidence_dir = temp_dir("evidence")?;
    let spool_dir = temp_dir("spool")?;
    let recording_key = RecordingKey::generate()?;

    // Where the sink will listen: bound once to learn a free port, then stopped, so the
    // coordinator hands out a URL on which nobody answers yet.
    let root = api_key()?;
    let sink_addr = {
        let probe = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = probe.local_addr()?;
        drop(probe);
        addr
    };
    let sink_url = format!("http://{sink_addr}");
    let url_for_config = sink_url.clone();
    let cluster = LocalCluster::builder()
        .api_keys(root.clone())
        .coordinator_config(move |c| {
            c.evidence_sink_url = url_for_config.clone();
            c.monitor_snapshot_interval = Duration::from_secs(1);
        })
        .start()
        .await?;
    let sink_config = || SinkConfig {
        listen: sink_addr,
        dir: evidence_dir.clone(),
        recording_key: recording_key.clone(),
        coordinator_key: cluster.signing_key.verifying_key(),
        retention: RetentionPolicy::default(),
        prune_every: Duration::from_secs(3600),
    };

    let mut admin = AdminServiceClient::connect(cluster.coordinator_url()).await?;
    admin
        .set_tenant_policy(authed(
            pb::SetTenantPolicyRequest {
                policy: Some(pb::TenantPolicy {
                    tenant: "acme".into(),
                    monitoring_enabled: true,
                    ..Default::default()
                }),
            },
            &root,
        ))
        .await?;
    let device = DeviceKey::generate()?;
    let device_id = device.device_id();
    admin
        .enroll_device(authed(
            pb::EnrollDeviceRequest {
                tenant: "acme".into(),
                device_id: device_id.clone(),
                name: "home-office-pc".into(),
                public_key: device.public_key().to_vec(),
                allowed_operators: vec![],
                monitoring: true,
            },
            &root,
        ))
        .await?;

    // The sink is down: every snapshot stays in the spool; past 500 the oldest goes.
    let made = Arc::new(Mutex::new(Vec::new()));
    let mut config = MonitorConfig::new(
        cluster.coordinator_url(),
        device,
        &spool_dir,
        Box::new(CountedPictures {
            made: made.clone(),
            limit: TAKEN,
        }),
    );
    config.snapshot_interval = Some(Duration::from_millis(2));
    let monitor = Monitor::start(config).await?;
    let mut stats = monitor.watch();
    let offline = stats_until(&mut stats, "520 snapshots taken offline", |s| {
        s.snapshots_taken >= TAKEN as u64
    })
    .await?;
    ensure!(
        offline.uploads_ok == 0,
        "uploaded with no sink: {offline:?}"
    );
    assert_eq!(offline.buffered_snapshots, KEPT, "{offline:?}");
    assert_eq!(
        offline.overwritten_total,
        (TAKEN - KEPT) as u64,
        "{offline:?}"
    );
    // Nothing is lost by the spool: it holds exactly the newest 500 files' worth.
    let spooled = std::fs::read_dir(&spool_dir)?.count();
    ensure!(spooled >= KEPT, "only {spooled} files in the spool");

    // The sink comes up on the address the ticket names; the device delivers.
    let sink = Sink::bind(sink_config()).await?;
    let online = stats_until(&mut stats, "the buffer delivered", |s| {
        s.online && s.buffered_snapshots == 0 && s.uploads_ok > 0
    })
    .await?;
    assert_eq!(online.overwritten_total, (TAKEN - KEPT) as u64);

    let stored = read_device(&evidence_dir, &recording_key, &device_id)
        .context("reading back the evidence")?;
    let pictures: Vec<&[u8]> = stored
        .iter()
        .filter_map(|e| match e {
            Evidence::Snapshot { png, .. } => Some(png.as_slice()),
            _ => None,
        })
        .collect();
    let made = made.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(made.len(), TAKEN);
    assert_eq!(pictures.len(), KEPT, "snapshots at the sink");
    assert!(
        pictures
            .iter()
            .copied()
            .eq(made[TAKEN - KEPT..].iter().map(Vec::as_slice)),
        "the sink holds other pictures than the newest 500, in order"
    );
    // The sink knows how many were lost, and that the device was offline.
    let gaps: u64 = stored
        .iter()
        .map(|e| match e {
            Evidence::Gap { overwritten, .. } => *overwritten,
            _ => 0,
        })
        .sum();
    assert_eq!(gaps, (TAKEN - KEPT) as u64);
    let states: Vec<pb::PresenceState> = stored
        .iter()
        .filter_map(|e| match e {
            Evidence::Presence { state, .. } => Some(*state),
            _ => None,
        })
        .collect();
    ensure!(
        states.first() == Some(&pb::PresenceState::Online),
        "presence {states:?}"
    );
    ensure!(
        states.contains(&pb::PresenceState::Offline),
        "no OFFLINE presence in {states:?}"
    );
    let seqs: Vec<u64> = stored.iter().map(Evidence::seq).collect();
    ensure!(
        seqs.windows(2).all(|w| w[0] <= w[1]),
        "out of order: {seqs:?}"
    );

    // A clean stop reports STOPPED; what the sink holds is still exactly what it had
    // plus that.
    let end = monitor.stop().await;
    ensure!(end.buffered_items == 0, "left behind: {end:?}");
    let after = read_device(&evidence_dir, &recording_key, &device_id)?;
    ensure!(
        matches!(
            after.last(),
            Some(Evidence::Presence {
                state: pb::PresenceState::Stopped,
                ..
            })
        ),
        "no STOPPED at the end: {:?}",
        after.last()
    );
    sink.shutdown().await;
    cluster.shutdown().await;
    std::fs::remove_dir_all(&evidence_dir)?;
    std::fs::remove_dir_all(&spool_dir)?;
    Ok(())
}
