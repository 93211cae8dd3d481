//! `kakehashi recording keygen|verify|play|prune` as an operator runs them: exit codes
//! and what they print, on recordings written through the library.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use kakehashi_agent::recording::{
    EventRecord, FrameRecord, RecordingKey, RecordingMeta, RecordingWriter,
};

const BIN: &str = env!("CARGO_BIN_EXE_kakehashi");

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).unwrap();
        let p = std::env::temp_dir().join(format!("kkh-rec-cli-{}", hex::encode(r)));
        std::fs::create_dir(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("KAKEHASHI_RECORDING_KEY_FILE")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn recording(path: &Path, key: &RecordingKey, tenant: &str, created_at: SystemTime) {
    let meta = RecordingMeta::new("sess-cli", Some(tenant), created_at);
    let mut w = RecordingWriter::create(path, key, &meta).unwrap();
    w.write_event(&EventRecord::new("grants", "view,recording", created_at))
        .unwrap();
    for n in 0..3u64 {
        w.write_frame(&FrameRecord {
            seq: n,
            sent_at_us: 1,
            received_at_us: 2,
            key_frame: n == 0,
            width: 64,
            height: 48,
            data: vec![n as u8; 100],
        })
        .unwrap();
        w.flush().unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn keygen_verify_play_and_prune() {
    let dir = TempDir::new();
    let key_file = dir.0.join("rec.key");
    let kf = key_file.to_str().unwrap();
    let out = run(&["recording", "keygen", kf]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A key file is never overwritten.
    assert!(!run(&["recording", "keygen", kf]).status.success());
    let key = RecordingKey::from_hex_file(&key_file).unwrap();

    let store = dir.0.join("store");
    std::fs::create_dir(&store).unwrap();
    let path = store.join("a.kkrec");
    let p = path.to_str().unwrap();
    recording(&path, &key, "acme", SystemTime::now());

    let out = run(&["recording", "verify", p, "--key-file", kf]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.starts_with("OK ") && said.contains("3 frames"),
        "{said}"
    );

    let out = run(&["recording", "play", p, "--key-file", kf]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("event grants view,recording"), "{said}");
    assert_eq!(said.matches(" frame seq ").count(), 3, "{said}");

    // One byte changed in the last data segment (just before the trailer, whose
    // ciphertext is 64 + 16 bytes after a 45-byte header).
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - (45 + 64 + 16) - 5;
    bytes[at] ^= 1;
    let bad = dir.0.join("bad.kkrec");
    std::fs::write(&bad, &bytes).unwrap();
    let out = run(&[
        "recording",
        "verify",
        bad.to_str().unwrap(),
        "--key-file",
        kf,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let said = text(&out.stderr);
    assert!(said.contains("segment 2 was altered"), "{said}");

    // Retention: a tenant with 7 days loses its 8-day-old recording; the 90-day
    // default keeps the other tenant's.
    let old = SystemTime::now() - Duration::from_secs(8 * 24 * 3600);
    recording(&store.join("brief-old.kkrec"), &key, "brief", old);
    recording(&store.join("acme-old.kkrec"), &key, "acme", old);
    let out = run(&[
        "recording",
        "prune",
        "--dir",
        store.to_str().unwrap(),
        "--key-file",
        kf,
        "--tenant-retention",
        "brief=7",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("1 deleted, 2 kept"), "{said}");
    assert!(!store.join("brief-old.kkrec").exists());
    assert!(store.join("acme-old.kkrec").exists() && path.exists());
}
