//! The sink against a real gRPC client on 127.0.0.1:0, and its store directly.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ed25519_dalek::SigningKey;
use kakehashi_proto::device::device_id_of;
use kakehashi_proto::monitor::{MAX_ITEMS_PER_UPLOAD, MonitorTicket, sign_item};
use kakehashi_proto::pb;
use kakehashi_proto::pb::evidence_service_client::EvidenceServiceClient;
use tonic::Code;

use super::*;
use crate::recording::{self, RecordingKey, RetentionPolicy};

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).unwrap();
        let p = std::env::temp_dir().join(format!("kkh-sink-{}", hex::encode(r)));
        std::fs::create_dir(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn coordinator() -> SigningKey {
    SigningKey::from_bytes(&[11; 32])
}

fn device() -> SigningKey {
    SigningKey::from_bytes(&[22; 32])
}

fn rec_key() -> RecordingKey {
    RecordingKey::from_bytes([33; 32])
}

fn now_secs() -> u64 {
    store::unix_secs(SystemTime::now())
}

fn ticket_of(dev: &SigningKey) -> MonitorTicket {
    let public_key = dev.verifying_key().to_bytes();
    MonitorTicket {
        device_id: device_id_of(&public_key),
        public_key,
        tenant: "acme".into(),
        issued_at: now_secs() - 10,
        expires_at: now_secs() + 3600,
    }
}

fn signed(ticket: &MonitorTicket, by: &SigningKey) -> Vec<u8> {
    ticket.sign(by).unwrap()
}

fn snapshot(dev: &SigningKey, seq: u64) -> pb::EvidenceItem {
    let mut item = pb::EvidenceItem {
        seq,
        captured_at_unix_ms: 1_700_000_000_000 + seq as i64 * 1000,
        body: Some(pb::evidence_item::Body::Snapshot(pb::Snapshot {
            width: 1920,
            height: 1080,
            format: "png".into(),
            data: format!("\u{89}PNG picture {seq}").into_bytes(),
        })),
        signature: Vec::new(),
    };
    sign_item(
        &device_id_of(&dev.verifying_key().to_bytes()),
        dev,
        &mut item,
    );
    item
}

fn presence(dev: &SigningKey, seq: u64, detail: &str) -> pb::EvidenceItem {
    let mut item = pb::EvidenceItem {
        seq,
        captured_at_unix_ms: 1_700_000_000_000 + seq as i64 * 1000,
        body: Some(pb::evidence_item::Body::Presence(pb::Presence {
            state: pb::PresenceState::Idle as i32,
            idle_secs: 300,
            offline_secs: 0,
            detail: detail.into(),
        })),
        signature: Vec::new(),
    };
    sign_item(
        &device_id_of(&dev.verifying_key().to_bytes()),
        dev,
        &mut item,
    );
    item
}

async fn start(dir: &Path) -> Sink {
    Sink::bind(SinkConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        dir: dir.to_owned(),
        recording_key: rec_key(),
        coordinator_key: coordinator().verifying_key(),
        retention: RetentionPolicy::default(),
        prune_every: Duration::from_secs(3600),
    })
    .await
    .unwrap()
}

async fn client(sink: &Sink) -> EvidenceServiceClient<tonic::transport::Channel> {
    EvidenceServiceClient::connect(format!("http://{}", sink.addr()))
        .await
        .unwrap()
}

fn request(
    ticket: Vec<u8>,
    items: Vec<pb::EvidenceItem>,
    overwritten: u64,
) -> pb::UploadEvidenceRequest {
    pb::UploadEvidenceRequest {
        ticket,
        items,
        snapshots_overwritten: overwritten,
    }
}

/// The evidence files in `dir`, by name.
fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn as_evidence(item: &pb::EvidenceItem) -> Evidence {
    match item.body.as_ref().unwrap() {
        pb::evidence_item::Body::Snapshot(s) => Evidence::Snapshot {
            seq: item.seq,
            captured_at_ms: item.captured_at_unix_ms,
            width: s.width,
            height: s.height,
            png: s.data.clone(),
            signature: item.signature.clone(),
        },
        pb::evidence_item::Body::Presence(p) => Evidence::Presence {
            seq: item.seq,
            captured_at_ms: item.captured_at_unix_ms,
            state: pb::PresenceState::try_from(p.state).unwrap(),
            idle_secs: p.idle_secs,
            offline_secs: p.offline_secs,
            detail: p.detail.clone(),
            signature: item.signature.clone(),
        },
    }
}

#[tokio::test]
async fn an_upload_reads_back_as_sent_with_its_gap() {
    let dir = TempDir::new();
    let sink = start(&dir.0).await;
    let mut c = client(&sink).await;
    let dev = device();
    let t = ticket_of(&dev);
    let items = vec![
        presence(&dev, 4, "back after a break\nsecond line, spaces  kept"),
        snapshot(&dev, 5),
        snapshot(&dev, 7),
    ];
    let resp = c
        .upload(request(signed(&t, &coordinator()), items.clone(), 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp,
        pb::UploadEvidenceResponse {
            stored_through_seq: 7,
            stored: 3,
            duplicates: 0
        }
    );
    let mut want = vec![Evidence::Gap {
        overwritten: 3,
        before_seq: 4,
    }];
    want.extend(items.iter().map(as_evidence));
    let got = read_device(&dir.0, &rec_key(), &t.device_id).unwrap();
    assert_eq!(got, want);
    // What was read back is what the device signed.
    for (e, item) in got[1..].iter().zip(&items) {
        assert_eq!(e.to_item().as_ref(), Some(item));
    }
    // The file is an ordinary recording.
    let name = file_name(&t.device_id, 4, 7);
    assert_eq!(files(&dir.0), vec![name.clone()]);
    let summary = recording::verify(&dir.0.join(&name), &rec_key()).unwrap();
    assert_eq!(summary.meta.session_id, session_id_of(&t.device_id));
    assert_eq!(summary.meta.tenant.as_deref(), Some("acme"));
    assert_eq!(summary.frames, 2);
    // Device, gap, presence, three signatures.
    assert_eq!(summary.events, 6);
}

#[tokio::test]
async fn a_resent_upload_is_all_duplicates_and_writes_nothing() {
    let dir = TempDir::new();
    let sink = start(&dir.0).await;
    let mut c = client(&sink).await;
    let dev = device();
    let t = signed(&ticket_of(&dev), &coordinator());
    let items: Vec<_> = (1..=5).map(|s| snapshot(&dev, s)).collect();
    let first = c
        .upload(request(t.clone(), items.clone(), 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.stored, first.duplicates), (5, 0));
    let again = c
        .upload(request(t.clone(), items.clone(), 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again,
        pb::UploadEvidenceResponse {
            stored_through_seq: 5,
            stored: 0,
            duplicates: 5
        }
    );
    assert_eq!(files(&dir.0).len(), 1);
    // The gap is recorded once, with the first upload.
    let got = read_device(&dir.0, &rec_key(), &ticket_of(&dev).device_id).unwrap();
    assert_eq!(
        got.iter()
            .filter(|e| matches!(e, Evidence::Gap { .. }))
            .count(),
        1
    );
    assert_eq!(got.len(), 6);
}

#[tokio::test]
async fn a_restarted_sink_keeps_dedupe() {
    let dir = TempDir::new();
    let dev = device();
    let t = signed(&ticket_of(&dev), &coordinator());
    let items: Vec<_> = (1..=5).map(|s| snapshot(&dev, s)).collect();
    {
        let sink = start(&dir.0).await;
        let mut c = client(&sink).await;
        c.upload(request(t.clone(), items.clone(), 0))
            .await
            .unwrap();
        sink.shutdown().await;
    }
    // A stray `.partial` and an unrelated file do not confuse the restart.
    std::fs::write(
        dir.0.join(format!(
            "{}.partial",
            file_name(&ticket_of(&dev).device_id, 6, 9)
        )),
        b"cut",
    )
    .unwrap();
    std::fs::write(dir.0.join("notes.txt"), b"x").unwrap();
    let sink = start(&dir.0).await;
    assert_eq!(sink.store().high_water(&ticket_of(&dev).device_id), Some(5));
    let mut c = client(&sink).await;
    let mut more = items.clone();
    more.extend((6..=7).map(|s| snapshot(&dev, s)));
    let resp = c
        .upload(request(t.clone(), more, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp,
        pb::UploadEvidenceResponse {
            stored_through_seq: 7,
            stored: 2,
            duplicates: 5
        }
    );
    let got = read_device(&dir.0, &rec_key(), &ticket_of(&dev).device_id).unwrap();
    assert_eq!(
        got.iter().map(Evidence::seq).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_foreign_or_expired_ticket_is_unauthenticated() {
    let dir = TempDir::new();
    let sink = start(&dir.0).await;
    let mut c = client(&sink).await;
    let dev = device();
    let items = vec![snapshot(&dev, 1)];

    let foreign = signed(&ticket_of(&dev), &SigningKey::from_bytes(&[99; 32]));
    let err = c
        .upload(request(foreign, items.clone(), 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.message().contains("signature"), "{err}");

    let mut old = ticket_of(&dev);
    old.issued_at = now_secs() - 7200;
    old.expires_at = now_secs() - 3600;
    let err = c
        .upload(request(signed(&old, &coordinator()), items, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.message().contains("expired"), "{err}");
    assert!(files(&dir.0).is_empty());
}

#[tokio::test]
async fn one_bad_item_refuses_the_whole_upload() {
    let dir = TempDir::new();
    let sink = start(&dir.0).await;
    let mut c = client(&sink).await;
    let dev = device();
    let t = signed(&ticket_of(&dev), &coordinator());

    let mut items: Vec<_> = (1..=4).map(|s| snapshot(&dev, s)).collect();
    if let Some(pb::evidence_item::Body::Snapshot(s)) = items[2].body.as_mut() {
        s.data[0] ^= 1;
    }
    let err = c.upload(request(t.clone(), items, 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("item 3"), "{err}");

    // Another device's items under this ticket do not verify either.
    let other = SigningKey::from_bytes(&[44; 32]);
    let err = c
        .upload(request(t.clone(), vec![snapshot(&other, 1)], 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    let unordered = vec![snapshot(&dev, 2), snapshot(&dev, 2)];
    let err = c
        .upload(request(t.clone(), unordered, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("strictly increase"), "{err}");

    let many: Vec<_> = (1..=MAX_ITEMS_PER_UPLOAD as u64 + 1)
        .map(|s| presence(&dev, s, ""))
        .collect();
    let err = c.upload(request(t, many, 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    assert!(files(&dir.0).is_empty());
    assert_eq!(sink.store().high_water(&ticket_of(&dev).device_id), None);
}

#[test]
fn a_flipped_byte_fails_reading_naming_file_and_segment() {
    let dir = TempDir::new();
    let store = EvidenceStore::open(&dir.0, rec_key()).unwrap();
    let dev = device();
    let t = ticket_of(&dev);
    let items: Vec<_> = (1..=3).map(|s| snapshot(&dev, s)).collect();
    let out = store.store(&t, 0, &items).unwrap();
    let path = out.path.unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - 120;
    bytes[at] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let err = read_device(&dir.0, &rec_key(), &t.device_id).unwrap_err();
    let SinkError::Verify { path: p, source } = &err else {
        panic!("not a verify error: {err}");
    };
    assert_eq!(p, &path);
    assert!(source.segment().is_some(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("segment") && text.contains(&file_name(&t.device_id, 1, 3)),
        "{text}"
    );
}

#[test]
fn prune_removes_exactly_the_expired_files() {
    let dir = TempDir::new();
    let store = EvidenceStore::open(&dir.0, rec_key()).unwrap();
    let dev = device();
    let t = ticket_of(&dev);
    let now = SystemTime::now();
    let day = Duration::from_secs(24 * 3600);
    let old = store
        .store_at(&t, 0, &[snapshot(&dev, 1)], now - 91 * day)
        .unwrap()
        .path
        .unwrap();
    let recent = store
        .store_at(&t, 0, &[snapshot(&dev, 2)], now - 89 * day)
        .unwrap()
        .path
        .unwrap();
    let report = recording::prune(&dir.0, &rec_key(), &RetentionPolicy::default(), now).unwrap();
    assert_eq!(
        report.deleted.iter().map(|d| &d.0).collect::<Vec<_>>(),
        vec![&old]
    );
    assert_eq!(report.kept, vec![recent]);
    let got = read_device(&dir.0, &rec_key(), &t.device_id).unwrap();
    assert_eq!(got.iter().map(Evidence::seq).collect::<Vec<_>>(), vec![2]);
}

#[test]
fn a_leftover_partial_does_not_block_a_retry() {
    let dir = TempDir::new();
    let store = EvidenceStore::open(&dir.0, rec_key()).unwrap();
    let dev = device();
    let t = ticket_of(&dev);
    let partial = recording::partial_path(&dir.0.join(file_name(&t.device_id, 1, 2)));
    std::fs::write(&partial, b"crashed mid-write").unwrap();
    let out = store
        .store(&t, 0, &[snapshot(&dev, 1), snapshot(&dev, 2)])
        .unwrap();
    assert_eq!(out.stored, 2);
    assert!(!partial.exists());
    assert_eq!(
        read_device(&dir.0, &rec_key(), &t.device_id).unwrap().len(),
        2
    );
}

#[test]
fn a_renamed_file_is_caught() {
    let dir = TempDir::new();
    let store = EvidenceStore::open(&dir.0, rec_key()).unwrap();
    let dev = device();
    let t = ticket_of(&dev);
    let path = store
        .store(&t, 0, &[snapshot(&dev, 1)])
        .unwrap()
        .path
        .unwrap();
    // Claimed as the evidence of another device: its header says otherwise.
    let other = "0123456789abcdef0123456789abcdef";
    std::fs::rename(&path, dir.0.join(file_name(other, 1, 1))).unwrap();
    let err = read_device(&dir.0, &rec_key(), other).unwrap_err();
    assert!(matches!(err, SinkError::Malformed { .. }), "{err}");
}

#[test]
fn file_names_round_trip_and_others_are_ignored() {
    let id = "0123456789abcdef0123456789abcdef";
    let name = file_name(id, 3, 500);
    assert_eq!(parse_file_name(&name), Some((id.to_owned(), 3, 500)));
    assert_eq!(parse_file_name(&format!("{name}.partial")), None);
    assert_eq!(parse_file_name(&file_name("ABC", 1, 2)), None);
    assert_eq!(parse_file_name(&file_name(id, 5, 4)), None);
    assert_eq!(parse_file_name("notes.txt"), None);
}

#[tokio::test]
async fn a_disk_error_is_unavailable_and_the_retry_stores() {
    let dir = TempDir::new();
    let sink = start(&dir.0).await;
    let mut c = client(&sink).await;
    let dev = device();
    let t = signed(&ticket_of(&dev), &coordinator());
    let items: Vec<_> = (1..=3).map(|s| snapshot(&dev, s)).collect();
    // The directory vanishes under the sink (an unmounted volume, say).
    std::fs::remove_dir(&dir.0).unwrap();
    let err = c
        .upload(request(t.clone(), items.clone(), 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert_eq!(sink.store().high_water(&ticket_of(&dev).device_id), None);
    std::fs::create_dir(&dir.0).unwrap();
    let resp = c.upload(request(t, items, 0)).await.unwrap().into_inner();
    assert_eq!((resp.stored, resp.stored_through_seq), (3, 3));
}

#[test]
fn every_presence_state_reads_back_and_verifies() {
    let dir = TempDir::new();
    let store = EvidenceStore::open(&dir.0, rec_key()).unwrap();
    let dev = device();
    let t = ticket_of(&dev);
    let states = [
        pb::PresenceState::Online,
        pb::PresenceState::Active,
        pb::PresenceState::Idle,
        pb::PresenceState::Offline,
        pb::PresenceState::Stopped,
    ];
    let items: Vec<_> = states
        .iter()
        .zip(1u64..)
        .map(|(state, seq)| {
            let mut item = presence(&dev, seq, "detail=with an equals sign ");
            if let Some(pb::evidence_item::Body::Presence(p)) = item.body.as_mut() {
                p.state = *state as i32;
                p.offline_secs = 42;
            }
            sign_item(&t.device_id, &dev, &mut item);
            item
        })
        .collect();
    store.store(&t, 0, &items).unwrap();
    let got = read_device(&dir.0, &rec_key(), &t.device_id).unwrap();
    assert_eq!(got, items.iter().map(as_evidence).collect::<Vec<_>>());
}
