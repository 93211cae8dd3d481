//! The dev command: starts a coordinator and a relay on the embedded backends, then
//! drives one real session through them — create, code, join, consent, frames both
//! ways, end — printing each step and the frame-latency percentiles; then a short run
//! of telework monitoring (snapshots buffered while the evidence sink is down, then
//! delivered).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kakehashi_agent::{Consent, Host, HostConfig, HostEvent, Viewer, ViewerConfig, ViewerEvent};
use kakehashi_proto::Permissions;
use kakehashi_proto::pb::{self, session_service_client::SessionServiceClient};
use tokio::time::timeout;

use crate::cluster::LocalCluster;
use crate::latency::{LatencyRecorder, Percentiles};

/// What the dev session sends.
#[derive(Debug, Clone, Copy)]
pub struct DevOptions {
    pub frames: u32,
    pub fps: u32,
    pub frame_bytes: usize,
}

impl Default for DevOptions {
    fn default() -> Self {
        Self {
            frames: 150,
            fps: 30,
            frame_bytes: 20_000,
        }
    }
}

/// What the dev session measured.
#[derive(Debug, Clone)]
pub struct DevReport {
    pub latency: Percentiles,
    pub frames_sent: u32,
    pub frames_received: u64,
    /// Screen frames the supervisor (a second, watch-only viewer) received.
    pub supervisor_frames: u64,
    /// Screen frames the host sealed: once each, however many watch.
    pub frames_sealed: u64,
    pub inputs_delivered: u32,
    pub chats_delivered: u32,
    pub events: Vec<String>,
    /// The telework-monitoring step, once it ran.
    pub monitoring: Option<MonitoringReport>,
}

const STEP_TIMEOUT: Duration = Duration::from_secs(15);

fn step(n: u32, text: impl AsRef<str>) {
    println!("[{n}] {}", text.as_ref());
}

pub async fn run(opts: DevOptions) -> Result<DevReport> {
    ensure!(
        opts.fps > 0 && opts.frames > 0,
        "--fps and --frames must be positive"
    );
    // The evidence sink's address, reserved before the cluster so the coordinator can
    // hand it out; the sink itself starts later (it needs the cluster's public key), which
    // is also what lets the device show its offline buffer.
    let sink_addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").context("no loopback port")?;
        probe.local_addr()?
    };
    let sink_url = format!("http://{sink_addr}");
    let cluster = LocalCluster::builder()
        .coordinator_config(move |c| c.evidence_sink_url = sink_url.clone())
        .start()
        .await?;
    let result = match drive(&cluster, opts).await {
        Ok(mut report) => monitoring(&cluster, sink_addr).await.map(|m| {
            report.monitoring = Some(m);
            report
        }),
        Err(e) => Err(e),
    };
    cluster.shutdown().await;
    result
}

/// What the telework-monitoring step saw.
#[derive(Debug, Clone, Copy)]
pub struct MonitoringReport {
    pub snapshots_taken: u64,
    pub overwritten: u64,
    pub delivered: u64,
}

/// Telework monitoring in brief: a device enrolled with `monitoring` takes snapshots
/// while the evidence sink is down (a small buffer here, 5 instead of 500, so the
/// overwriting shows), then delivers them once the sink is up; the sink's files are
/// read back, verified and checked against what was taken.
async fn monitoring(
    cluster: &LocalCluster,
    sink_addr: std::net::SocketAddr,
) -> Result<MonitoringReport> {
    use kakehashi_agent::device::DeviceKey;
    use kakehashi_agent::monitor::{Monitor, MonitorConfig, SyntheticSnapshots};
    use kakehashi_agent::recording::{RecordingKey, RetentionPolicy};
    use kakehashi_agent::sink::{Evidence, Sink, SinkConfig, read_device};
    use kakehashi_proto::pb::admin_service_client::AdminServiceClient;

    const BUFFER: usize = 5;
    let url = cluster.coordinator_url();
    let mut admin = AdminServiceClient::connect(url.clone())
        .await
        .context("connecting to AdminService")?;
    admin
        .set_tenant_policy(pb::SetTenantPolicyRequest {
            policy: Some(pb::TenantPolicy {
                tenant: "dev-tenant".into(),
                monitoring_enabled: true,
                ..Default::default()
            }),
        })
        .await
        .context("SetTenantPolicy")?;
    let device = DeviceKey::generate()?;
    let device_id = device.device_id();
    admin
        .enroll_device(pb::EnrollDeviceRequest {
            tenant: "dev-tenant".into(),
            device_id: device_id.clone(),
            name: "home-office-pc".into(),
            public_key: device.public_key().to_vec(),
            allowed_operators: vec![],
            monitoring: true,
        })
        .await
        .context("EnrollDevice")?;
    step(
        10,
        format!("telework monitoring: device {device_id} enrolled with monitoring in dev-tenant"),
    );

    let scratch = std::env::temp_dir().join(format!(
        "kakehashi-dev-monitoring-{}",
        crate::testkit::hex_random::<8>()?
    ));
    let (spool, evidence) = (scratch.join("spool"), scratch.join("evidence"));
    std::fs::create_dir_all(&evidence)
        .with_context(|| format!("creating {}", evidence.display()))?;
    let result = async {
        let mut config = MonitorConfig::new(
            url.clone(),
            device,
            &spool,
            Box::new(SyntheticSnapshots::new(320, 180)),
        );
        config.snapshot_interval = Some(Duration::from_millis(25));
        config.max_snapshots = BUFFER;
        let monitor = Monitor::start(config).await?;
        let mut stats = monitor.watch();
        let offline = timeout(
            STEP_TIMEOUT,
            stats.wait_for(|s| s.snapshots_taken >= 2 * BUFFER as u64),
        )
        .await
        .context("the monitor took no snapshots")??
        .clone();
        step(
            11,
            format!(
                "the sink is down: {} snapshots taken, the newest {} kept in the device's spool, {} overwritten",
                offline.snapshots_taken, offline.buffered_snapshots, offline.overwritten_total
            ),
        );
        let recording_key = RecordingKey::generate()?;
        let sink = Sink::bind(SinkConfig {
            listen: sink_addr,
            dir: evidence.clone(),
            recording_key: recording_key.clone(),
            coordinator_key: cluster.signing_key.verifying_key(),
            retention: RetentionPolicy::default(),
            prune_every: Duration::from_secs(3600),
        })
        .await?;
        timeout(
            STEP_TIMEOUT,
            stats.wait_for(|s| s.uploads_ok > 0 && s.buffered_snapshots == 0),
        )
        .await
        .context("the device did not deliver its buffer")??;
        let end = monitor.stop().await;
        sink.shutdown().await;
        let stored = read_device(&evidence, &recording_key, &device_id)?;
        let (mut delivered, mut gaps, mut presences) = (0u64, 0u64, 0u64);
        for e in &stored {
            match e {
                Evidence::Snapshot { .. } => delivered += 1,
                Evidence::Gap { overwritten, .. } => gaps += overwritten,
                Evidence::Presence { .. } => presences += 1,
            }
        }
        ensure!(
            end.buffered_items == 0 && delivered + gaps == end.snapshots_taken,
            "snapshots went missing: taken {}, at the sink {delivered}, reported overwritten {gaps}, still buffered {}",
            end.snapshots_taken,
            end.buffered_items
        );
        step(
            12,
            format!(
                "the sink came up and the device delivered: of {} snapshots taken the sink holds the newest {delivered} and a gap of {gaps} (overwritten while offline), and {presences} presence events; every file verified (encrypted, hash-chained, signed by the device)",
                end.snapshots_taken
            ),
        );
        Ok(MonitoringReport {
            snapshots_taken: end.snapshots_taken,
            overwritten: gaps,
            delivered,
        })
    }
    .await;
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

async fn drive(cluster: &LocalCluster, opts: DevOptions) -> Result<DevReport> {
    let url = cluster.coordinator_url();
    let relay = &cluster.relays[0];
    step(
        1,
        format!(
            "cluster up: coordinator {url} (embedded backends), relay {} at {} (cert sha256 {}…)",
            relay.relay_id(),
            relay.quic_addr(),
            &hex::encode(relay.cert_sha256())[..16]
        ),
    );

    let mut api = SessionServiceClient::connect(url.clone())
        .await
        .context("connect to the coordinator")?;
    let created = api
        .create_session(pb::CreateSessionRequest {
            device_id: String::new(),
            tenant: "demo-callcenter".into(),
            operator: "operator-1".into(),
            mode: pb::SessionMode::Control as i32,
            permissions: 0,
            max_duration_secs: 600,
        })
        .await
        .context("CreateSession")?
        .into_inner();
    let session = created
        .session
        .context("CreateSession returned no session")?;
    step(
        2,
        format!(
            "call-center software created session {} (mode control); code to read to the customer: {}",
            session.session_id, created.code
        ),
    );

    let mut watch = api
        .watch_session(pb::WatchSessionRequest {
            session_id: session.session_id.clone(),
        })
        .await
        .context("WatchSession")?
        .into_inner();
    let watcher = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(Some(ev)) = watch.message().await {
            let kind = ev
                .kind()
                .as_str_name()
                .trim_start_matches("EVENT_KIND_")
                .to_owned();
            println!("    event #{}: {kind}", ev.seq);
            let ended = ev.kind() == pb::EventKind::Ended;
            seen.push(if ended {
                format!("{kind}({})", ev.end_reason().as_str_name())
            } else {
                kind
            });
            if ended {
                break;
            }
        }
        seen
    });

    let mut viewer = Viewer::join(
        &url,
        &session.session_id,
        &created.operator_ticket,
        ViewerConfig {
            request_on_join: Some((Permissions::CONTROL, "to change your settings".into())),
            supervisor: false,
            recorder: false,
        },
    )
    .await
    .context("operator's viewer failed to join")?;
    step(
        3,
        "operator's viewer attached to the relay (asks for control on join)",
    );

    let mut host = Host::join(
        &url,
        &created.code,
        HostConfig {
            consent: Consent::Approve(Permissions::VIEW | Permissions::CONTROL),
        },
    )
    .await
    .context("customer's agent failed to join by code")?;
    step(
        4,
        "customer's agent entered the code and attached (scripted approval: view, control)",
    );

    // Wait for both to verify each other and for the grants to reach the viewer.
    let wanted = Permissions::VIEW | Permissions::CONTROL;
    let (mut host_sas, mut viewer_sas) = (None, None);
    let deadline = Instant::now() + STEP_TIMEOUT;
    while host_sas.is_none() || viewer_sas.is_none() || !viewer.granted().contains(wanted) {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            ev = host.next_event() => match ev.context("host ended early")? {
                HostEvent::PeerJoined { sas, .. } => host_sas = Some(sas),
                HostEvent::Ended { reason, detail } => bail!("session ended early: {reason:?} {detail}"),
                _ => {}
            },
            ev = viewer.next_event() => match ev.context("viewer ended early")? {
                ViewerEvent::PeerJoined { sas } => viewer_sas = Some(sas),
                ViewerEvent::Ended { reason, detail } => bail!("session ended early: {reason:?} {detail}"),
                _ => {}
            },
            _ = tokio::time::sleep(left) => bail!("consent did not complete within {STEP_TIMEOUT:?}"),
        }
    }
    ensure!(
        host_sas == viewer_sas,
        "SAS mismatch: {host_sas:?} vs {viewer_sas:?}"
    );
    step(
        5,
        format!(
            "both sides show SAS {} — the customer said yes: granted {}",
            host_sas.unwrap_or_default(),
            viewer.granted()
        ),
    );

    // A supervisor joins with the same ticket; the customer's scripted answer (view)
    // admits it, and it gets the screen's group key with the first key frame.
    let mut supervisor = Viewer::join(
        &url,
        &session.session_id,
        &created.operator_ticket,
        ViewerConfig {
            supervisor: true,
            ..ViewerConfig::default()
        },
    )
    .await
    .context("supervisor failed to join")?;
    let admitted = timeout(STEP_TIMEOUT, async {
        while let Some(ev) = host.next_event().await {
            match ev {
                HostEvent::SupervisorAnswered { admitted, .. } => return Ok(admitted),
                HostEvent::Ended { reason, detail } => {
                    bail!("session ended early: {reason:?} {detail}")
                }
                _ => {}
            }
        }
        bail!("host ended early")
    })
    .await
    .context("the customer was not asked about the supervisor")??;
    ensure!(admitted, "the scripted customer refused the supervisor");
    let supervisor_sas = timeout(STEP_TIMEOUT, async {
        while let Some(ev) = supervisor.next_event().await {
            if let ViewerEvent::PeerJoined { sas } = ev {
                return Ok(sas);
            }
        }
        bail!("supervisor ended early")
    })
    .await
    .context("the supervisor did not verify the customer's key")??;
    step(
        6,
        format!(
            "a supervisor joined with the same ticket (watch only, SAS {}); the customer admitted it",
            supervisor_sas
        ),
    );

    step(
        7,
        format!(
            "streaming {} screen frames of {} B at {} fps host → operator and supervisor (one ciphertext each), with input and chat both ways",
            opts.frames, opts.frame_bytes, opts.fps
        ),
    );
    let mut latency = LatencyRecorder::new();
    let mut frames_received = 0u64;
    let mut supervisor_frames = 0u64;
    let sealed_before = host.screen_frames_sealed();
    let (mut inputs, mut host_chats, mut viewer_chats) = (0u32, 0u32, 0u32);
    let mut inputs_sent = 0u32;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / opts.fps);
    let mut sent = 0u32;
    let pattern: Vec<u8> = (0..opts.frame_bytes).map(|i| (i % 251) as u8).collect();
    host.send_chat("こんにちは、画面が見えますか？").await?;
    viewer
        .send_chat("はい、見えます。設定を開きますね。")
        .await?;
    loop {
        tokio::select! {
            _ = tick.tick(), if sent < opts.frames => {
                let frame = pb::ScreenFrame {
                    width: 1280,
                    height: 720,
                    key_frame: sent.is_multiple_of(30) || host.wants_key_frame(),
                    data: pattern.clone(),
                    group_key: None,
                };
                if !host.send_screen(frame).await? {
                    // Withheld (nobody could decode it yet): the next one is a key frame.
                    continue;
                }
                sent += 1;
                if sent.is_multiple_of(10) {
                    let input = pb::InputEvent {
                        kind: Some(pb::input_event::Kind::PointerMove(pb::PointerMove {
                            x: sent as i32,
                            y: 100,
                        })),
                    };
                    if viewer.send_input(input).await? {
                        inputs_sent += 1;
                    }
                }
            }
            ev = host.next_event() => match ev.context("host ended early")? {
                HostEvent::Input(_) => inputs += 1,
                HostEvent::Chat(_) => host_chats += 1,
                HostEvent::Ended { reason, detail } => bail!("session ended early: {reason:?} {detail}"),
                _ => {}
            },
            ev = viewer.next_event() => match ev.context("viewer ended early")? {
                ViewerEvent::Screen { latency_us, .. } => {
                    frames_received += 1;
                    latency.record_us(latency_us.max(0) as u64);
                }
                ViewerEvent::Chat(_) => viewer_chats += 1,
                ViewerEvent::Ended { reason, detail } => bail!("session ended early: {reason:?} {detail}"),
                _ => {}
            },
            ev = supervisor.next_event() => match ev.context("supervisor ended early")? {
                ViewerEvent::Screen { .. } => supervisor_frames += 1,
                ViewerEvent::Ended { reason, detail } => bail!("session ended early: {reason:?} {detail}"),
                _ => {}
            },
        }
        if sent >= opts.frames
            && frames_received >= u64::from(sent)
            && supervisor_frames >= u64::from(sent)
            && inputs >= inputs_sent
            && host_chats >= 1
            && viewer_chats >= 1
        {
            break;
        }
    }
    let summary = latency.summary();
    let frames_sealed = host.screen_frames_sealed() - sealed_before;
    step(
        8,
        format!(
            "operator received {frames_received}/{sent} frames, supervisor {supervisor_frames}/{sent}, host sealed {frames_sealed}; host received {inputs}/{inputs_sent} input events; chat delivered both ways"
        ),
    );

    api.end_session(pb::EndSessionRequest {
        session_id: session.session_id.clone(),
        detail: "issue resolved".into(),
    })
    .await
    .context("EndSession")?;
    let host_end = wait_host_end(&mut host).await?;
    let viewer_end = wait_viewer_end(&mut viewer).await?;
    step(
        9,
        format!(
            "operator ended the session via the API: customer saw {}, operator saw {}",
            host_end.as_str_name(),
            viewer_end.as_str_name()
        ),
    );
    let events = timeout(STEP_TIMEOUT, watcher)
        .await
        .context("watch stream did not close after the session ended")?
        .context("watch task failed")?;

    println!();
    println!("frame latency host → relay → viewer (µs, same clock): {summary}");
    Ok(DevReport {
        latency: summary,
        frames_sent: sent,
        frames_received,
        supervisor_frames,
        frames_sealed,
        inputs_delivered: inputs,
        chats_delivered: host_chats + viewer_chats,
        events,
        monitoring: None,
    })
}

async fn wait_host_end(host: &mut Host) -> Result<pb::EndReason> {
    timeout(STEP_TIMEOUT, async {
        while let Some(ev) = host.next_event().await {
            if let HostEvent::Ended { reason, .. } = ev {
                return Ok(reason);
            }
        }
        bail!("host event stream closed without an end")
    })
    .await
    .context("host did not see the end")?
}

async fn wait_viewer_end(viewer: &mut Viewer) -> Result<pb::EndReason> {
    timeout(STEP_TIMEOUT, async {
        while let Some(ev) = viewer.next_event().await {
            if let ViewerEvent::Ended { reason, .. } = ev {
                return Ok(reason);
            }
        }
        bail!("viewer event stream closed without an end")
    })
    .await
    .context("viewer did not see the end")?
}
