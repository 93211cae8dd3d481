use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use super::format::{SEGMENT_HEADER_LEN, TAG_LEN};
use super::*;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).unwrap();
        let p = std::env::temp_dir().join(format!("kkh-rec-{}", hex::encode(r)));
        std::fs::create_dir(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn key(n: u8) -> RecordingKey {
    RecordingKey::from_bytes([n; 32])
}

fn meta(created_at: u64, tenant: Option<&str>) -> RecordingMeta {
    RecordingMeta {
        session_id: "sess-1".into(),
        tenant: tenant.map(str::to_owned),
        created_at,
    }
}

fn frame(n: u64, len: usize) -> FrameRecord {
    FrameRecord {
        seq: n,
        sent_at_us: 1_700_000_000_000_000 + n,
        received_at_us: 1_700_000_000_000_100 + n,
        key_frame: n == 0,
        width: 640,
        height: 480,
        data: (0..len).map(|i| (i as u64 * 31 + n) as u8).collect(),
    }
}

fn event(n: u64) -> EventRecord {
    EventRecord {
        at_us: 1_700_000_000_000_000 + n,
        kind: "grants".into(),
        detail: format!("view,recording #{n}"),
    }
}

/// A recording whose segments are closed by hand: `segments` data segments, each with
/// one frame and one event. Returns the records written.
fn write(path: &Path, k: &RecordingKey, segments: u64, frame_len: usize) -> Vec<Record> {
    let mut w = RecordingWriter::create(path, k, &meta(1_000, Some("acme"))).unwrap();
    let mut records = Vec::new();
    for n in 0..segments {
        let f = frame(n, frame_len);
        let e = event(n);
        w.write_frame(&f).unwrap();
        w.write_event(&e).unwrap();
        w.flush().unwrap();
        records.push(Record::Frame(f));
        records.push(Record::Event(e));
    }
    assert_eq!(w.finish().unwrap(), path);
    records
}

/// Byte offsets where each segment starts, and the header's length.
fn layout(bytes: &[u8]) -> (usize, Vec<(usize, usize)>) {
    // Header: 8 + 2 + 8 + 8 + (2 + 6 "sess-1") + (2 + 4 "acme") + 12 + 48.
    let header = 8 + 2 + 8 + 8 + 2 + 6 + 2 + 4 + 12 + 48;
    let mut segs = Vec::new();
    let mut at = header;
    while at < bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 41..at + 45].try_into().unwrap()) as usize;
        let end = at + SEGMENT_HEADER_LEN + len;
        segs.push((at, end));
        at = end;
    }
    assert_eq!(at, bytes.len());
    (header, segs)
}

#[test]
fn round_trip() {
    let dir = TempDir::new();
    let path = dir.0.join("r.kkrec");
    let k = key(1);
    let written = write(&path, &k, 3, 1000);
    assert!(!partial_path(&path).exists(), "the temporary name is gone");
    let summary = verify(&path, &k).unwrap();
    assert_eq!(summary.meta, meta(1_000, Some("acme")));
    assert_eq!(
        (
            summary.segments,
            summary.frames,
            summary.events,
            summary.frame_bytes
        ),
        (3, 3, 3, 3000)
    );
    let player = Player::open(&path, &k).unwrap();
    assert_eq!(player.summary(), &summary);
    let read: Vec<Record> = player.map(Result::unwrap).collect();
    assert_eq!(read, written);
}

#[test]
fn big_frames_split_into_segments_and_limits_hold() {
    let dir = TempDir::new();
    let path = dir.0.join("big.kkrec");
    let k = key(1);
    let mut w = RecordingWriter::create(&path, &k, &meta(5, None)).unwrap();
    let frames: Vec<FrameRecord> = (0..5).map(|n| frame(n, 700_000)).collect();
    for f in &frames {
        w.write_frame(f).unwrap();
    }
    assert!(matches!(
        w.write_frame(&frame(9, MAX_FRAME_DATA + 1)),
        Err(RecordingError::TooLarge { .. })
    ));
    let long = EventRecord {
        at_us: 0,
        kind: "x".repeat(MAX_EVENT_KIND + 1),
        detail: String::new(),
    };
    assert!(matches!(
        w.write_event(&long),
        Err(RecordingError::TooLarge { .. })
    ));
    w.finish().unwrap();
    let summary = verify(&path, &k).unwrap();
    assert!(summary.segments >= 3, "{summary}");
    assert_eq!(summary.meta.tenant, None);
    let read: Vec<Record> = Player::open(&path, &k)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        read,
        frames.into_iter().map(Record::Frame).collect::<Vec<_>>()
    );
}

#[test]
fn an_existing_recording_is_never_overwritten() {
    let dir = TempDir::new();
    let path = dir.0.join("r.kkrec");
    write(&path, &key(1), 1, 10);
    assert!(matches!(
        RecordingWriter::create(&path, &key(1), &meta(1, None)),
        Err(RecordingError::Exists(_))
    ));
}

#[test]
fn an_unfinished_recording_keeps_its_temporary_name_and_does_not_verify() {
    let dir = TempDir::new();
    let path = dir.0.join("r.kkrec");
    let k = key(1);
    let mut w = RecordingWriter::create(&path, &k, &meta(1, None)).unwrap();
    w.write_frame(&frame(0, 100)).unwrap();
    w.flush().unwrap();
    drop(w);
    assert!(!path.exists());
    let partial = partial_path(&path);
    assert!(matches!(
        verify(&partial, &k),
        Err(VerifyError::Truncated { segment: 1, .. })
    ));
    // Its header still dates it, for retention.
    assert_eq!(read_meta(&partial, &k).unwrap().created_at, 1);
}

#[test]
fn every_flipped_byte_fails_verification_at_its_segment() {
    let dir = TempDir::new();
    let path = dir.0.join("r.kkrec");
    let k = key(1);
    write(&path, &k, 3, 40);
    let good = std::fs::read(&path).unwrap();
    let (header, segs) = layout(&good);
    assert_eq!(segs.len(), 4, "three data segments and the trailer");
    let bad = dir.0.join("bad.kkrec");
    for i in 0..good.len() {
        for mask in [0x01u8, 0x80] {
            let mut bytes = good.clone();
            bytes[i] ^= mask;
            std::fs::write(&bad, &bytes).unwrap();
            let err = verify(&bad, &k).expect_err(&format!("byte {i} ^ {mask:#x} went unnoticed"));
            if i < header {
                assert_eq!(err.segment(), None, "byte {i} (header): {err}");
            } else {
                let seg = segs.iter().position(|&(s, e)| (s..e).contains(&i)).unwrap() as u64;
                assert_eq!(err.segment(), Some(seg), "byte {i}: {err}");
                // The ciphertext itself: an authentication failure, nothing else.
                let (s, _) = segs[seg as usize];
                if i >= s + SEGMENT_HEADER_LEN {
                    assert!(
                        matches!(err, VerifyError::Tampered { .. }),
                        "byte {i}: {err}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_cut_at_any_byte_is_noticed_at_its_segment() {
    let dir = TempDir::new();
    let path = dir.0.join("r.kkrec");
    let k = key(1);
    write(&path, &k, 3, 40);
    let good = std::fs::read(&path).unwrap();
    let (header, segs) = layout(&good);
    let bad = dir.0.join("cut.kkrec");
    for cut in 0..good.len() {
        std::fs::write(&bad, &good[..cut]).unwrap();
        let err = verify(&bad, &k).expect_err(&format!("cut at {cut} went unnoticed"));
        if cut < header {
            assert_eq!(err.segment(), None, "cut at {cut}: {err}");
            continue;
        }
        // The segment the cut falls in, or the one that should have started there.
        let seg = segs
            .iter()
            .position(|&(s, e)| (s..e).contains(&cut))
            .unwrap() as u64;
        assert!(
            matches!(err, VerifyError::Truncated { segment, .. } if segment == seg),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn removed_reordered_and_truncated_segments_and_a_wrong_key_are_named() {
    let dir = TempDir::new();
    let path = dir.0.join("r.kkrec");
    let k = key(1);
    write(&path, &k, 3, 40);
    let good = std::fs::read(&path).unwrap();
    let (header, segs) = layout(&good);
    let bad = dir.0.join("bad.kkrec");
    let check = |bytes: Vec<u8>| {
        std::fs::write(&bad, bytes).unwrap();
        verify(&bad, &k).unwrap_err()
    };
    let seg = |i: usize| good[segs[i].0..segs[i].1].to_vec();

    // Segment 1 removed.
    let mut b = good[..segs[1].0].to_vec();
    b.extend_from_slice(&good[segs[1].1..]);
    assert!(matches!(
        check(b),
        VerifyError::Sequence {
            segment: 1,
            found: 2
        }
    ));

    // Segments 1 and 2 swapped.
    let mut b = good[..segs[1].0].to_vec();
    b.extend(seg(2));
    b.extend(seg(1));
    b.extend(seg(3));
    assert!(matches!(
        check(b),
        VerifyError::Sequence {
            segment: 1,
            found: 2
        }
    ));

    // The trailer removed, or the last data segment with it.
    assert!(matches!(
        check(good[..segs[3].0].to_vec()),
        VerifyError::Truncated { segment: 3, .. }
    ));
    // Cut inside segment 2's header, and inside its ciphertext.
    assert!(matches!(
        check(good[..segs[2].0 + 10].to_vec()),
        VerifyError::Truncated { segment: 2, .. }
    ));
    assert!(matches!(
        check(good[..segs[2].1 - TAG_LEN].to_vec()),
        VerifyError::Truncated { segment: 2, .. }
    ));
    // Cut inside the header.
    assert!(matches!(
        check(good[..header - 5].to_vec()),
        VerifyError::HeaderMalformed(_)
    ));
    // Something appended.
    let mut b = good.clone();
    b.push(0);
    assert!(matches!(check(b), VerifyError::TrailingData { segment: 3 }));
    // A segment from another recording under the same key: its own data key fails.
    let other = dir.0.join("other.kkrec");
    write(&other, &k, 3, 40);
    let o = std::fs::read(&other).unwrap();
    let (_, osegs) = layout(&o);
    let mut b = good[..segs[1].0].to_vec();
    b.extend_from_slice(&o[osegs[1].0..osegs[1].1]);
    b.extend_from_slice(&good[segs[2].0..]);
    let e = check(b);
    assert_eq!(e.segment(), Some(1), "{e}");

    // Another key.
    assert!(matches!(
        verify(&path, &key(2)),
        Err(VerifyError::WrongKey { .. })
    ));
    assert!(matches!(
        Player::open(&path, &key(2)),
        Err(VerifyError::WrongKey { .. })
    ));
    std::fs::write(&bad, b"hello").unwrap();
    assert!(matches!(verify(&bad, &k), Err(VerifyError::NotARecording)));
    // The good file is still good.
    verify(&path, &k).unwrap();
}

#[test]
fn key_file_is_hex() {
    let dir = TempDir::new();
    let p = dir.0.join("key");
    let k = key(7);
    std::fs::write(&p, format!("{}\n", k.to_hex())).unwrap();
    assert_eq!(RecordingKey::from_hex_file(&p).unwrap().0, k.0);
    std::fs::write(&p, "abcd").unwrap();
    assert!(matches!(
        RecordingKey::from_hex_file(&p),
        Err(KeyError::Length { len: 2, .. })
    ));
    std::fs::write(&p, "zz").unwrap();
    assert!(matches!(
        RecordingKey::from_hex_file(&p),
        Err(KeyError::NotHex { .. })
    ));
    assert!(
        !format!("{k:?}").contains(&k.to_hex()),
        "Debug shows no key"
    );
}

#[test]
fn prune_removes_exactly_the_expired_recordings() {
    let dir = TempDir::new();
    let k = key(1);
    let day = 24 * 3600;
    let now_s = 1_000 * day;
    let now = UNIX_EPOCH + Duration::from_secs(now_s);
    let rec = |name: &str, age_days: u64, tenant: Option<&str>| {
        let path = dir.0.join(name);
        let w = RecordingWriter::create(&path, &k, &meta(now_s - age_days * day, tenant)).unwrap();
        w.finish().unwrap();
        path
    };
    let old = rec("old.kkrec", 91, Some("acme"));
    let edge = rec("edge.kkrec", 90, Some("acme"));
    let young = rec("young.kkrec", 10, None);
    let short_tenant = rec("short.kkrec", 8, Some("brief"));
    let short_kept = rec("short-young.kkrec", 6, Some("brief"));
    let long_tenant = rec("long.kkrec", 200, Some("keeper"));
    let untenanted_old = rec("none.kkrec", 100, None);
    // A crashed recording is dated by its header like any other.
    let mut w = RecordingWriter::create(
        &dir.0.join("crashed.kkrec"),
        &k,
        &meta(now_s - 95 * day, None),
    )
    .unwrap();
    w.write_event(&event(1)).unwrap();
    drop(w);
    let crashed = partial_path(&dir.0.join("crashed.kkrec"));
    // Files this key cannot date are kept.
    let other_key = dir.0.join("other-key.kkrec");
    RecordingWriter::create(&other_key, &key(9), &meta(0, None))
        .unwrap()
        .finish()
        .unwrap();
    let junk = dir.0.join("notes.txt");
    std::fs::write(&junk, "not a recording").unwrap();
    std::fs::create_dir(dir.0.join("sub")).unwrap();

    let mut policy = RetentionPolicy::default();
    policy
        .per_tenant
        .insert("brief".into(), Duration::from_secs(7 * day));
    policy
        .per_tenant
        .insert("keeper".into(), Duration::from_secs(365 * day));
    let report = prune(&dir.0, &k, &policy, now).unwrap();
    let mut deleted: Vec<PathBuf> = report.deleted.iter().map(|(p, _)| p.clone()).collect();
    deleted.sort();
    let mut expect = vec![old, short_tenant, untenanted_old, crashed];
    expect.sort();
    assert_eq!(deleted, expect);
    for p in &expect {
        assert!(!p.exists());
    }
    let mut kept = report.kept.clone();
    kept.sort();
    let mut expect_kept = vec![edge, young, short_kept, long_tenant];
    expect_kept.sort();
    assert_eq!(kept, expect_kept);
    let unreadable: Vec<&PathBuf> = report.unreadable.iter().map(|(p, _)| p).collect();
    assert_eq!(unreadable, vec![&junk, &other_key]);
    assert!(junk.exists() && other_key.exists());
    assert!(report.failed.is_empty());
    // Nothing more to do a second time.
    let again = prune(&dir.0, &k, &policy, now).unwrap();
    assert!(again.deleted.is_empty());
}

#[test]
fn garbage_never_panics_the_readers() {
    let dir = TempDir::new();
    let k = key(1);
    let path = dir.0.join("r.kkrec");
    write(&path, &k, 2, 30);
    let good = std::fs::read(&path).unwrap();
    let bad = dir.0.join("garbage.kkrec");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..500 {
        let len = (next() % 600) as usize;
        let noise: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Records parse (after authentication) without panicking on any input.
        let _ = super::format::decode_records(&noise);
        // A valid header followed by noise, and noise alone, fail cleanly.
        let mut bytes = if round % 2 == 0 {
            good[..120].to_vec()
        } else {
            Vec::new()
        };
        bytes.extend_from_slice(&noise);
        std::fs::write(&bad, &bytes).unwrap();
        assert!(verify(&bad, &k).is_err());
    }
}
