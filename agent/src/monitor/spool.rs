//! The offline buffer on disk, so a reboot while offline loses nothing: a private
//! directory (0700) holding one file per buffered item (the signed, encoded
//! `EvidenceItem`, named by its sequence number and kind) and a small state file (the
//! next sequence number and the overwritten snapshots not yet reported). Every write
//! is a temporary file, synced, renamed into place, then the directory synced, so a
//! crash leaves either the old or the new file, never half of one.
//!
//! Sequence numbers strictly increase across restarts: the next one is the largest of
//! the state file's, one past the largest file's, and the clock in microseconds, so
//! even a lost state file cannot make the sink take new items for old duplicates.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use kakehashi_proto::pb;
use prost::Message;
use tracing::warn;

use super::ring::{Batch, Entry, ItemKind, Ring};

/// The state file's name in the spool directory.
const STATE_FILE: &str = "state";
/// Held locked (flock) while a spool is open: two monitors on one spool would hand
/// out the same sequence numbers.
const LOCK_FILE: &str = "lock";
const STATE_HEADER: &str = "kakehashi-monitor-spool v1";
/// A state file is three short lines; anything longer is not one.
const MAX_STATE_BYTES: u64 = 4096;
/// An item file holds one encoded item: a snapshot's data and a little more.
pub const MAX_ITEM_FILE_BYTES: u64 =
    kakehashi_proto::monitor::MAX_SNAPSHOT_BYTES as u64 + 64 * 1024;
/// How many presence events the spool keeps: a device that starts and stops every
/// minute for three days while offline still fits.
pub const MAX_PRESENCES: usize = 5000;

/// Why the spool could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("monitoring spool {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("evidence item has no body: nothing to store")]
    NoBody,
    #[error("monitoring spool {path} is in use by another monitor")]
    Locked { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |error| SpoolError::Io {
        path: path.to_owned(),
        error,
    }
}

/// A batch read back from disk: the items to upload, oldest first, and the count of
/// overwritten snapshots to report with them.
#[derive(Debug, Clone, PartialEq)]
pub struct Upload {
    pub items: Vec<pb::EvidenceItem>,
    pub overwritten: u64,
}

/// The spool: the [`Ring`] and the files it describes.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    ring: Ring,
    next_seq: u64,
    /// Open (and locked) for as long as the spool is.
    _lock: std::fs::File,
}

impl Spool {
    /// Opens (or makes, mode 0700) the spool directory and rebuilds the buffer from the
    /// files in it. Files that are not the spool's are left alone; leftovers of an
    /// interrupted write are removed; item files beyond the buffer's bounds are
    /// evicted as new ones would be.
    pub fn open(dir: &Path, max_snapshots: usize) -> Result<Self, SpoolError> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder.create(dir).map_err(io(dir))?;
        let lock = lock(dir)?;
        let (state_next, unreported) = read_state(&dir.join(STATE_FILE));
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                let path = entry.path();
                if let Err(e) = std::fs::remove_file(&path) {
                    warn!(path = %path.display(), error = %e, "could not remove a half-written spool file");
                }
                continue;
            }
            let Some((seq, kind)) = parse_item_name(name) else {
                continue;
            };
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            found.push(Entry {
                seq,
                kind,
                len: usize::try_from(len).unwrap_or(usize::MAX),
            });
        }
        found.sort_by_key(|e| e.seq);
        let mut ring = Ring::new(max_snapshots, MAX_PRESENCES);
        ring.set_unreported(unreported);
        let mut spool = Self {
            dir: dir.to_owned(),
            ring,
            next_seq: 0,
            _lock: lock,
        };
        let mut evicted = Vec::new();
        for entry in &found {
            evicted.extend(spool.ring.push(*entry));
        }
        spool.next_seq = state_next
            .max(spool.ring.last_seq().map_or(0, |s| s.saturating_add(1)))
            .max(found.last().map_or(0, |e| e.seq.saturating_add(1)))
            .max(clock_micros())
            .max(1);
        for seq in evicted {
            spool.remove_item(seq);
        }
        spool.save_state()?;
        Ok(spool)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Stores `item` under the next sequence number: `sign` is called after the
    /// number is set (the signature covers it). Returns the number. The state file
    /// moves past it first, so a crash after this never reuses it.
    pub fn append(
        &mut self,
        mut item: pb::EvidenceItem,
        sign: impl FnOnce(&mut pb::EvidenceItem),
    ) -> Result<u64, SpoolError> {
        let kind = match item.body {
            Some(pb::evidence_item::Body::Presence(_)) => ItemKind::Presence,
            Some(pb::evidence_item::Body::Snapshot(_)) => ItemKind::Snapshot,
            None => return Err(SpoolError::NoBody),
        };
        let seq = self.next_seq;
        self.next_seq = seq.saturating_add(1);
        self.save_state()?;
        item.seq = seq;
        sign(&mut item);
        let bytes = item.encode_to_vec();
        write_atomic(&self.dir, &item_name(seq, kind), &bytes)?;
        let evicted = self.ring.push(Entry {
            seq,
            kind,
            len: bytes.len(),
        });
        for old in &evicted {
            self.remove_item(*old);
        }
        if !evicted.is_empty() {
            // The overwritten count must survive a restart too.
            self.save_state()?;
        }
        Ok(seq)
    }

    /// Reads the oldest items for an upload (see [`Ring::next_batch`]). A file that
    /// cannot be read or decoded, or that holds another item than its name says, is
    /// logged, deleted and skipped: it can never be delivered.
    pub fn batch(&mut self, max_items: usize, max_bytes: usize) -> Upload {
        loop {
            let Batch {
                entries,
                overwritten,
            } = self.ring.next_batch(max_items, max_bytes);
            let mut items = Vec::with_capacity(entries.len());
            let mut bad = None;
            for e in &entries {
                match self.read_item(e) {
                    Ok(item) => items.push(item),
                    Err(what) => {
                        bad = Some((e.seq, what));
                        break;
                    }
                }
            }
            let Some((seq, what)) = bad else {
                return Upload { items, overwritten };
            };
            warn!(spool = %self.dir.display(), seq, what, "dropping an unreadable evidence item");
            self.ring.abandon();
            self.ring.discard(seq);
            self.remove_item(seq);
        }
    }

    fn read_item(&self, e: &Entry) -> Result<pb::EvidenceItem, String> {
        let path = self.dir.join(item_name(e.seq, e.kind));
        let file = std::fs::File::open(&path).map_err(|err| err.to_string())?;
        let mut bytes = Vec::new();
        file.take(MAX_ITEM_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|err| err.to_string())?;
        if bytes.len() as u64 > MAX_ITEM_FILE_BYTES {
            return Err(format!("longer than {MAX_ITEM_FILE_BYTES} bytes"));
        }
        let item = pb::EvidenceItem::decode(bytes.as_slice()).map_err(|err| err.to_string())?;
        let kind_ok = matches!(
            (&item.body, e.kind),
            (
                Some(pb::evidence_item::Body::Presence(_)),
                ItemKind::Presence
            ) | (
                Some(pb::evidence_item::Body::Snapshot(_)),
                ItemKind::Snapshot
            )
        );
        if item.seq != e.seq || !kind_ok {
            return Err("the file holds another item than its name says".into());
        }
        Ok(item)
    }

    /// The upload on its way failed (see [`Ring::abandon`]).
    pub fn abandon(&mut self) {
        self.ring.abandon();
    }

    /// The sink stored everything through `stored_through_seq` and recorded
    /// `reported` overwritten snapshots: their files go.
    pub fn acknowledge(
        &mut self,
        stored_through_seq: u64,
        reported: u64,
    ) -> Result<(), SpoolError> {
        let before = self.ring.unreported();
        for seq in self.ring.acknowledge(stored_through_seq, reported) {
            self.remove_item(seq);
        }
        if self.ring.unreported() != before {
            self.save_state()?;
        }
        Ok(())
    }

    /// Drops one item the sink refused for good.
    pub fn discard(&mut self, seq: u64) {
        self.ring.abandon();
        self.ring.discard(seq);
        self.remove_item(seq);
    }

    fn remove_item(&self, seq: u64) {
        for kind in [ItemKind::Snapshot, ItemKind::Presence] {
            let path = self.dir.join(item_name(seq, kind));
            match std::fs::remove_file(&path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "could not delete a spooled evidence item")
                }
            }
        }
    }

    fn save_state(&self) -> Result<(), SpoolError> {
        let text = format!(
            "{STATE_HEADER}\nnext_seq {}\nunreported_overwritten {}\n",
            self.next_seq,
            self.ring.unreported()
        );
        write_atomic(&self.dir, STATE_FILE, text.as_bytes())
    }
}

/// Opens and locks the spool's lock file; the lock goes with the file.
fn lock(dir: &Path) -> Result<std::fs::File, SpoolError> {
    let path = dir.join(LOCK_FILE);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let file = options.open(&path).map_err(io(&path))?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns for the call's duration.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::WouldBlock {
                return Err(SpoolError::Locked {
                    path: dir.to_owned(),
                });
            }
            return Err(SpoolError::Io { path, error });
        }
    }
    Ok(file)
}

fn item_name(seq: u64, kind: ItemKind) -> String {
    match kind {
        ItemKind::Snapshot => format!("{seq:020}.snapshot"),
        ItemKind::Presence => format!("{seq:020}.presence"),
    }
}

fn parse_item_name(name: &str) -> Option<(u64, ItemKind)> {
    let (seq, ext) = name.split_once('.')?;
    let kind = match ext {
        "snapshot" => ItemKind::Snapshot,
        "presence" => ItemKind::Presence,
        _ => return None,
    };
    if seq.len() != 20 || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((seq.parse().ok()?, kind))
}

/// The state file's next seq and unreported count; a missing or malformed file is
/// (0, 0), logged when malformed (the clock keeps sequence numbers increasing).
fn read_state(path: &Path) -> (u64, u64) {
    let text = match std::fs::File::open(path) {
        Ok(f) => {
            let mut text = String::new();
            match f.take(MAX_STATE_BYTES).read_to_string(&mut text) {
                Ok(_) => text,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "unreadable monitoring spool state; starting from the clock");
                    return (0, 0);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (0, 0),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "unreadable monitoring spool state; starting from the clock");
            return (0, 0);
        }
    };
    let mut lines = text.lines();
    let header_ok = lines.next() == Some(STATE_HEADER);
    let mut field = |name: &str| {
        lines
            .next()
            .and_then(|l| l.strip_prefix(name))
            .and_then(|v| v.strip_prefix(' '))
            .and_then(|v| v.parse::<u64>().ok())
    };
    match (
        header_ok,
        field("next_seq"),
        field("unreported_overwritten"),
    ) {
        (true, Some(next), Some(unreported)) => (next, unreported),
        _ => {
            warn!(path = %path.display(), "malformed monitoring spool state; starting from the clock");
            (0, 0)
        }
    }
}

fn clock_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Writes `name` in `dir` through a synced temporary file and a rename, then syncs the
/// directory so the rename itself survives a crash.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), SpoolError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let mut r = [0u8; 8];
            getrandom::fill(&mut r).expect("randomness");
            Self(std::env::temp_dir().join(format!("kakehashi-spool-{}", hex::encode(r))))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn snapshot(n: u8) -> pb::EvidenceItem {
        pb::EvidenceItem {
            seq: 0,
            captured_at_unix_ms: 1_700_000_000_000 + i64::from(n),
            body: Some(pb::evidence_item::Body::Snapshot(pb::Snapshot {
                width: 2,
                height: 2,
                format: "png".into(),
                data: vec![n; 10],
            })),
            signature: Vec::new(),
        }
    }

    fn presence() -> pb::EvidenceItem {
        pb::EvidenceItem {
            seq: 0,
            captured_at_unix_ms: 1,
            body: Some(pb::evidence_item::Body::Presence(pb::Presence {
                state: pb::PresenceState::Online as i32,
                ..Default::default()
            })),
            signature: Vec::new(),
        }
    }

    fn sign(item: &mut pb::EvidenceItem) {
        item.signature = item.seq.to_be_bytes().to_vec();
    }

    #[test]
    fn a_reopened_spool_has_what_it_had_and_newer_seqs() {
        let tmp = TempDir::new();
        let dir = tmp.0.join("spool");
        let mut seqs = Vec::new();
        let last;
        {
            let mut spool = Spool::open(&dir, 3).expect("open");
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&dir).expect("meta").permissions().mode();
                assert_eq!(mode & 0o777, 0o700);
            }
            seqs.push(spool.append(presence(), sign).expect("append"));
            for n in 0..5 {
                seqs.push(spool.append(snapshot(n), sign).expect("append"));
            }
            assert!(seqs.windows(2).all(|w| w[0] < w[1]));
            // 5 snapshots in a ring of 3: the first two are gone, files too.
            assert_eq!(spool.ring().snapshots(), 3);
            assert_eq!(spool.ring().unreported(), 2);
            last = *seqs.last().expect("seqs");
        }
        // A stray file and a half-written one: the first is left alone, the second goes.
        std::fs::write(dir.join("notes.txt"), "x").expect("write");
        std::fs::write(dir.join("00000000000000000009.snapshot.tmp"), "x").expect("write");
        let mut spool = Spool::open(&dir, 3).expect("reopen");
        assert_eq!(spool.ring().len(), 4);
        assert_eq!(spool.ring().unreported(), 2);
        assert!(!dir.join("00000000000000000009.snapshot.tmp").exists());
        assert!(dir.join("notes.txt").exists());
        let up = spool.batch(64, usize::MAX);
        assert_eq!(up.overwritten, 2);
        let got: Vec<u64> = up.items.iter().map(|i| i.seq).collect();
        assert_eq!(got, [seqs[0], seqs[3], seqs[4], seqs[5]]);
        assert!(up.items.iter().all(|i| i.signature == i.seq.to_be_bytes()));
        assert_eq!(up.items[3], {
            let mut s = snapshot(4);
            s.seq = seqs[5];
            sign(&mut s);
            s
        });
        let next = spool.append(presence(), sign).expect("append");
        assert!(next > last, "seqs increase across restarts");
        spool.acknowledge(seqs[3], up.overwritten).expect("ack");
        assert_eq!(spool.ring().len(), 3);
        drop(spool);

        // The acknowledgement and the reported count survive a restart; so does the
        // seq high-water mark even when every item was acknowledged.
        let mut spool = Spool::open(&dir, 3).expect("reopen");
        assert_eq!(spool.ring().unreported(), 0);
        assert_eq!(spool.ring().len(), 3);
        spool.acknowledge(next, 0).expect("ack");
        assert!(spool.ring().is_empty());
        drop(spool);
        let mut spool = Spool::open(&dir, 3).expect("reopen");
        assert!(spool.ring().is_empty());
        assert!(spool.append(presence(), sign).expect("append") > next);
    }

    #[test]
    fn malformed_files_are_skipped_and_the_rest_delivered() {
        let tmp = TempDir::new();
        let mut spool = Spool::open(&tmp.0, 500).expect("open");
        let a = spool.append(snapshot(1), sign).expect("append");
        let b = spool.append(snapshot(2), sign).expect("append");
        let c = spool.append(snapshot(3), sign).expect("append");
        drop(spool);
        std::fs::write(
            tmp.0.join(item_name(b, ItemKind::Snapshot)),
            b"\xff\xff junk",
        )
        .expect("corrupt");
        std::fs::write(tmp.0.join(STATE_FILE), "garbage").expect("corrupt state");
        let mut spool = Spool::open(&tmp.0, 500).expect("reopen");
        let up = spool.batch(64, usize::MAX);
        assert_eq!(up.items.iter().map(|i| i.seq).collect::<Vec<_>>(), [a, c]);
        assert!(!tmp.0.join(item_name(b, ItemKind::Snapshot)).exists());
        assert!(spool.append(presence(), sign).expect("append") > c);
    }

    #[test]
    fn a_spool_is_used_by_one_monitor_at_a_time() {
        let tmp = TempDir::new();
        let spool = Spool::open(&tmp.0, 10).expect("open");
        assert!(matches!(
            Spool::open(&tmp.0, 10),
            Err(SpoolError::Locked { .. })
        ));
        drop(spool);
        Spool::open(&tmp.0, 10).expect("free again");
    }

    #[test]
    fn item_names_round_trip() {
        assert_eq!(
            parse_item_name(&item_name(42, ItemKind::Presence)),
            Some((42, ItemKind::Presence))
        );
        assert_eq!(parse_item_name("42.snapshot"), None);
        assert_eq!(parse_item_name("state"), None);
    }
}
