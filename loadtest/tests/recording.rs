//! Recording end to end: a recorder joins a real cluster's session, the customer is
//! asked, the recorder sees the screen only while recording is allowed, writes what it
//! sees to an encrypted, hash-chained file, and that file verifies, plays back the exact
//! frames and fails verification at the segment where one byte was changed.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use kakehashi_agent::recording::{
    self, FrameRecord, Player, Record, RecordingKey, RecordingMeta, RecordingWriter, VerifyError,
};
use kakehashi_agent::{HostEvent, Viewer, ViewerConfig, ViewerEvent};
use kakehashi_loadtest::LocalCluster;
use kakehashi_loadtest::testkit::{
    Attached, SessionSpec, host_until, manual_pair, next_picture, picture, within,
};
use kakehashi_proto::Permissions;
use kakehashi_proto::pb;

/// Frames recorded while the customer allows it, and sent after it is revoked.
const RECORDED: usize = 8;
const AFTER_REVOKE: usize = 4;
const PICTURE_BYTES: usize = 20_000;

/// The recorder's loop, one step: writes every event it sees until `pick` says stop,
/// as `kakehashi record` does.
async fn record_until<T>(
    recorder: &mut Viewer,
    writer: &mut RecordingWriter,
    mut pick: impl FnMut(&ViewerEvent) -> Option<T>,
) -> Result<T> {
    within("a recorder event", async {
        while let Some(ev) = recorder.next_event().await {
            write(writer, &ev)?;
            if let Some(v) = pick(&ev) {
                return Ok(v);
            }
            if matches!(ev, ViewerEvent::Ended { .. }) {
                bail!("recorder: session ended: {ev:?}");
            }
        }
        bail!("recorder event stream closed")
    })
    .await?
}

fn write(writer: &mut RecordingWriter, ev: &ViewerEvent) -> Result<()> {
    let now = SystemTime::now();
    match ev {
        ViewerEvent::Screen {
            frame,
            seq,
            latency_us,
        } => {
            writer.write_frame(&FrameRecord::from_screen(frame, *seq, *latency_us, now))?;
            // A segment per frame, so the tamper check below has segments to aim at.
            writer.flush()?;
        }
        ev => {
            if let Some(rec) = recording::event_record(ev, now) {
                writer.write_event(&rec)?;
            }
        }
    }
    Ok(())
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).map_err(|e| anyhow::anyhow!("random: {e}"))?;
        let p = std::env::temp_dir().join(format!("kkh-rec-e2e-{}", hex::encode(r)));
        std::fs::create_dir(&p)?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where each segment of a recording starts and ends, read from the documented layout
/// (header, then segments of 45 header bytes and a ciphertext of the length in them).
fn segments(bytes: &[u8], meta: &RecordingMeta) -> Vec<(usize, usize)> {
    let tenant = meta.tenant.as_deref().unwrap_or("").len();
    let mut at = 8 + 2 + 8 + 8 + 2 + meta.session_id.len() + 2 + tenant + 12 + 48;
    let mut out = Vec::new();
    while at + 45 <= bytes.len() {
        let len = u32::from_le_bytes([
            bytes[at + 41],
            bytes[at + 42],
            bytes[at + 43],
            bytes[at + 44],
        ]) as usize;
        out.push((at, at + 45 + len));
        at += 45 + len;
    }
    out
}

#[tokio::test]
async fn a_recorder_records_only_while_the_customer_allows_and_the_file_proves_it() -> Result<()> {
    let dir = TempDir::new()?;
    let cluster = LocalCluster::builder().start().await?;
    let url = cluster.coordinator_url();
    let spec = SessionSpec::mode(pb::SessionMode::View)
        .permissions(Permissions::VIEW | Permissions::RECORDING);
    let Attached {
        created,
        sid,
        mut host,
        viewer: mut operator,
    } = manual_pair(&url, &spec).await?;

    // The recorder attaches; the customer is asked about recording.
    let mut recorder = Viewer::join(
        &url,
        &sid,
        &created.operator_ticket,
        ViewerConfig {
            recorder: true,
            ..ViewerConfig::default()
        },
    )
    .await
    .context("recorder joins")?;
    ensure!(recorder.is_recorder());
    let key = RecordingKey::generate()?;
    let meta = RecordingMeta::new(
        &recorder.session().session_id,
        Some(recorder.session().tenant.as_str()),
        SystemTime::now(),
    );
    ensure!(meta.tenant.as_deref() == Some("acme"), "{meta:?}");
    let path = dir.0.join("session.kkrec");
    let mut writer = RecordingWriter::create(&path, &key, &meta)?;

    let recorder_id = host_until(&mut host, |ev| match ev {
        HostEvent::RecorderJoined { participant_id } => Some(participant_id),
        _ => None,
    })
    .await?;
    ensure!(recorder_id == recorder.participant_id());
    let asked = host_until(&mut host, |ev| match ev {
        HostEvent::ConsentRequested { permissions, .. } => Some(permissions),
        _ => None,
    })
    .await?;
    ensure!(asked == Permissions::RECORDING, "asked {asked}");
    ensure!(
        !host.is_recording(),
        "recording before the customer said yes"
    );

    // Before the answer: the operator watches, the recorder gets nothing.
    let key_frame = host.wants_key_frame();
    ensure!(
        host.send_screen(picture(0, PICTURE_BYTES, key_frame))
            .await?,
        "withheld"
    );
    let (_, got) = next_picture(&mut operator).await?;
    ensure!(got == picture(0, PICTURE_BYTES, false).data);

    // The customer allows recording: the indicator's hook turns on.
    host.answer(Permissions::RECORDING)?;
    host_until(&mut host, |ev| match ev {
        HostEvent::GrantsChanged(g) if g.contains(Permissions::RECORDING) => Some(()),
        _ => None,
    })
    .await?;
    within("the host to show recording", async {
        while !host.is_recording() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await?;
    // The recorder learns the grant; nothing the host sent before reached it.
    let mut early_frames = 0;
    record_until(&mut recorder, &mut writer, |ev| match ev {
        ViewerEvent::Screen { .. } => {
            early_frames += 1;
            None
        }
        ViewerEvent::GrantsChanged(g) if g.contains(Permissions::RECORDING) => Some(()),
        _ => None,
    })
    .await?;
    ensure!(
        early_frames == 0,
        "the recorder saw {early_frames} frames before consent"
    );

    // Recorded pictures, in step with both watchers (a key frame first: it carries the
    // group key to the recorder).
    let mut sent = Vec::new();
    for n in 1..=RECORDED {
        let key_frame = host.wants_key_frame();
        ensure!(n > 1 || key_frame, "consent to record needs a key frame");
        let frame = picture(n, PICTURE_BYTES, key_frame);
        ensure!(
            host.send_screen(frame.clone()).await?,
            "picture {n} withheld"
        );
        let (op_seq, op_pic) = next_picture(&mut operator).await?;
        let (seq, data) = record_until(&mut recorder, &mut writer, |ev| match ev {
            ViewerEvent::Screen { frame, seq, .. } => Some((*seq, frame.data.clone())),
            _ => None,
        })
        .await?;
        ensure!(
            seq == op_seq && data == op_pic && data == frame.data,
            "picture {n}"
        );
        sent.push((seq, data));
    }

    // The customer withdraws consent: the recorder is cut off at once.
    let left = host.revoke(Permissions::RECORDING).await?;
    ensure!(!left.contains(Permissions::RECORDING), "left {left}");
    ensure!(!host.is_recording(), "still recording after the revoke");
    record_until(&mut recorder, &mut writer, |ev| match ev {
        ViewerEvent::GrantsChanged(g) if !g.contains(Permissions::RECORDING) => Some(()),
        ViewerEvent::Screen { seq, .. } => {
            panic!("frame {seq} reached the recorder after the revoke")
        }
        _ => None,
    })
    .await?;
    for n in 0..AFTER_REVOKE {
        let key_frame = host.wants_key_frame();
        let frame = picture(RECORDED + 1 + n, PICTURE_BYTES, key_frame);
        ensure!(
            host.send_screen(frame.clone()).await?,
            "withheld after revoke"
        );
        let (_, got) = next_picture(&mut operator).await?;
        ensure!(got == frame.data);
    }
    // Whatever reached the recorder is in its queue by now: no picture.
    while let Ok(ev) = recorder.events().try_recv() {
        ensure!(
            !matches!(ev, ViewerEvent::Screen { .. }),
            "the recorder saw the screen after the revoke: {ev:?}"
        );
        write(&mut writer, &ev)?;
    }
    drop(recorder);
    let written = writer.finish()?;
    ensure!(written == path);

    // The file verifies and plays back exactly the recorded frames and the grants.
    let summary = recording::verify(&path, &key)?;
    println!("recording: {summary}");
    ensure!(summary.frames == RECORDED as u64, "{summary}");
    ensure!(summary.meta == meta, "{summary}");
    let mut frames = Vec::new();
    let mut grants = Vec::new();
    for record in Player::open(&path, &key)? {
        match record? {
            Record::Frame(f) => frames.push((f.seq, f.data)),
            Record::Event(e) if e.kind == "grants" => grants.push(e.detail),
            Record::Event(_) => {}
        }
    }
    ensure!(
        frames == sent,
        "played back frames differ from what was recorded"
    );
    // The grant the recorder found on joining (view), then recording allowed and
    // withdrawn.
    ensure!(
        grants.ends_with(&["view,recording".to_owned(), "view".to_owned()])
            && grants[..grants.len() - 2].iter().all(|g| g == "view"),
        "grant events: {grants:?}"
    );

    // One changed byte in the middle of a segment fails verification at that segment;
    // the wrong key is told apart.
    let good = std::fs::read(&path)?;
    let segs = segments(&good, &meta);
    ensure!(segs.len() > RECORDED, "{} segments", segs.len());
    let target = 3;
    let (start, end) = segs[target];
    let mut bad = good.clone();
    bad[(start + end) / 2] ^= 0x20;
    let bad_path: &Path = &dir.0.join("altered.kkrec");
    std::fs::write(bad_path, &bad)?;
    match recording::verify(bad_path, &key) {
        Err(VerifyError::Tampered { segment }) if segment == target as u64 => {}
        other => bail!("altered segment {target}: {other:?}"),
    }
    match recording::verify(&path, &RecordingKey::generate()?) {
        Err(VerifyError::WrongKey { .. }) => {}
        other => bail!("another key: {other:?}"),
    }
    cluster.shutdown().await;
    Ok(())
}
