//! The sink's directory: one recording per accepted upload, named by device and seq
//! range, and the per-device high-water mark that makes re-sent items duplicates.
//!
//! A file `mon-<device_id>-<first_seq:020>-<last_seq:020>.kkhrec` holds, in order:
//! an event `device` (`id=<device id> public_key=<hex> tenant=<tenant>`), an event
//! `gap` when the upload reported overwritten snapshots, then per item its record (a
//! frame for a snapshot, an event `presence` for a presence) followed by an event
//! `signature` (`seq=N captured_at_ms=M ed25519=<hex>`). The device's public key and
//! each signature are kept so a reader can show, long after the ticket expired, that
//! every stored item is exactly what the device signed.
//!
//! Names only drive dedupe and ordering; what a file holds is authenticated by the
//! recording format, and [`read_device`] checks that each file's header names the
//! device its file name does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use ed25519_dalek::VerifyingKey;
use kakehashi_proto::monitor::{MonitorTicket, SNAPSHOT_FORMAT_PNG, item_message};
use kakehashi_proto::pb;

use super::SinkError;
use crate::recording::{
    self, EventRecord, FrameRecord, PARTIAL_SUFFIX, Player, Record, RecordingKey, RecordingMeta,
    RecordingWriter, unix_us,
};

/// What every evidence file's name starts with.
pub const FILE_PREFIX: &str = "mon-";
/// What every evidence file's name ends with.
pub const FILE_SUFFIX: &str = ".kkhrec";

const KIND_DEVICE: &str = "device";
const KIND_GAP: &str = "gap";
const KIND_PRESENCE: &str = "presence";
const KIND_SIGNATURE: &str = "signature";

/// The session id an evidence file's header carries for `device_id`.
pub fn session_id_of(device_id: &str) -> String {
    format!("monitor-{device_id}")
}

/// The file name of a device's items `first..=last`.
pub fn file_name(device_id: &str, first: u64, last: u64) -> String {
    format!("{FILE_PREFIX}{device_id}-{first:020}-{last:020}{FILE_SUFFIX}")
}

/// `(device id, first seq, last seq)` of a finished evidence file's name; `None` for
/// any other name (a `.partial`, a stray file).
pub fn parse_file_name(name: &str) -> Option<(String, u64, u64)> {
    let rest = name.strip_prefix(FILE_PREFIX)?.strip_suffix(FILE_SUFFIX)?;
    let mut parts = rest.split('-');
    let (device, first, last) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !is_device_id(device) || first.len() != 20 || last.len() != 20 {
        return None;
    }
    let (first, last) = (first.parse().ok()?, last.parse().ok()?);
    (first <= last).then(|| (device.to_owned(), first, last))
}

/// Whether `s` is a device id as tickets carry it: 32 lowercase hex digits.
fn is_device_id(s: &str) -> bool {
    s.len() == kakehashi_proto::device::DEVICE_ID_HEX
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What one [`EvidenceStore::store`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOutcome {
    /// Items written now.
    pub stored: u32,
    /// Items at or below the device's high-water mark: acknowledged, not written.
    pub duplicates: u32,
    /// The device's high-water mark after this upload (0 when nothing is stored).
    pub stored_through_seq: u64,
    /// The new file, when anything was written.
    pub path: Option<PathBuf>,
}

/// The evidence directory: writes uploads, remembers each device's highest stored seq.
/// One process per directory (the high-water marks live in this process's memory).
pub struct EvidenceStore {
    dir: PathBuf,
    key: RecordingKey,
    /// Per device, its highest stored seq behind its own lock: one device's uploads
    /// are written one at a time, so dedupe is exact; devices do not wait for each
    /// other.
    devices: Mutex<HashMap<String, Arc<Mutex<Option<u64>>>>>,
}

impl std::fmt::Debug for EvidenceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvidenceStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl EvidenceStore {
    /// Opens `dir` (created if missing) and rebuilds each device's high-water mark from
    /// the names of its finished files.
    pub fn open(dir: &Path, key: RecordingKey) -> Result<Self, SinkError> {
        let io = |source| SinkError::Io {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut high: HashMap<String, Arc<Mutex<Option<u64>>>> = HashMap::new();
        for (device, _, last, _) in list(dir)? {
            let slot = high.entry(device).or_default();
            let mut hw = lock(slot);
            *hw = Some(hw.map_or(last, |h| h.max(last)));
        }
        Ok(Self {
            dir: dir.to_owned(),
            key,
            devices: Mutex::new(high),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The highest seq stored for `device_id`, if any.
    pub fn high_water(&self, device_id: &str) -> Option<u64> {
        let slot = lock(&self.devices).get(device_id).cloned()?;
        *lock(&slot)
    }

    /// Stores the items of one upload, already checked (ticket and every item), in
    /// increasing seq order. See [`EvidenceStore::store_at`].
    pub fn store(
        &self,
        ticket: &MonitorTicket,
        snapshots_overwritten: u64,
        items: &[pb::EvidenceItem],
    ) -> Result<StoreOutcome, SinkError> {
        self.store_at(ticket, snapshots_overwritten, items, SystemTime::now())
    }

    /// [`EvidenceStore::store`] with the clock given: `now` dates the file (its
    /// authenticated `created_at`, what retention goes by) and the receive times.
    /// Items at or below the device's high-water mark are duplicates; the rest go into
    /// one new file, finished (synced, renamed) before the mark is raised. The gap is
    /// recorded only with at least one new item, so a retried upload does not record
    /// it twice.
    pub fn store_at(
        &self,
        ticket: &MonitorTicket,
        snapshots_overwritten: u64,
        items: &[pb::EvidenceItem],
        now: SystemTime,
    ) -> Result<StoreOutcome, SinkError> {
        if !is_device_id(&ticket.device_id) {
            return Err(SinkError::Malformed {
                path: self.dir.clone(),
                reason: format!("device id {:?} is not 32 hex digits", ticket.device_id),
            });
        }
        let slot = lock(&self.devices)
            .entry(ticket.device_id.clone())
            .or_default()
            .clone();
        let mut high = lock(&slot);
        let fresh: Vec<&pb::EvidenceItem> = items
            .iter()
            .filter(|i| high.is_none_or(|h| i.seq > h))
            .collect();
        let duplicates = (items.len() - fresh.len()) as u32;
        let (Some(first), Some(last)) = (fresh.first(), fresh.last()) else {
            return Ok(StoreOutcome {
                stored: 0,
                duplicates,
                stored_through_seq: high.unwrap_or(0),
                path: None,
            });
        };
        let path = self
            .dir
            .join(file_name(&ticket.device_id, first.seq, last.seq));
        // Under the device's lock nobody else writes this name: a `.partial` here is
        // left from a crash or a failed attempt, and would block every retry.
        let partial = recording::partial_path(&path);
        if partial.exists() {
            std::fs::remove_file(&partial).map_err(|source| SinkError::Io {
                path: partial.clone(),
                source,
            })?;
        }
        let written = write_file(
            &path,
            &self.key,
            ticket,
            snapshots_overwritten,
            first.seq,
            &fresh,
            now,
        );
        let path = match written {
            Ok(p) => p,
            Err(e) => {
                if path.exists() {
                    // Renamed, but the directory sync failed: the file is complete, so
                    // a retry must find these items stored rather than write them
                    // again under another name.
                    *high = Some(last.seq);
                } else {
                    // Best effort: the next attempt removes it anyway.
                    let _ = std::fs::remove_file(&partial);
                }
                return Err(e);
            }
        };
        *high = Some(last.seq);
        Ok(StoreOutcome {
            stored: fresh.len() as u32,
            duplicates,
            stored_through_seq: last.seq,
            path: Some(path),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves only a seq or a map behind: still valid.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_file(
    path: &Path,
    key: &RecordingKey,
    ticket: &MonitorTicket,
    snapshots_overwritten: u64,
    first_seq: u64,
    items: &[&pb::EvidenceItem],
    now: SystemTime,
) -> Result<PathBuf, SinkError> {
    let werr = |source| SinkError::Write {
        path: path.to_owned(),
        source,
    };
    let meta = RecordingMeta::new(
        &session_id_of(&ticket.device_id),
        Some(ticket.tenant.as_str()),
        now,
    );
    let mut w = RecordingWriter::create(path, key, &meta).map_err(werr)?;
    let now_us = unix_us(now);
    let event = |kind: &str, detail: String| EventRecord {
        at_us: now_us,
        kind: kind.to_owned(),
        detail,
    };
    w.write_event(&event(
        KIND_DEVICE,
        format!(
            "id={} public_key={} tenant={}",
            ticket.device_id,
            hex::encode(ticket.public_key),
            ticket.tenant
        ),
    ))
    .map_err(werr)?;
    if snapshots_overwritten > 0 {
        w.write_event(&event(
            KIND_GAP,
            format!(
                "{snapshots_overwritten} snapshots overwritten in the device's offline buffer before seq={first_seq}"
            ),
        ))
        .map_err(werr)?;
    }
    for item in items {
        match &item.body {
            Some(pb::evidence_item::Body::Snapshot(s)) => w
                .write_frame(&FrameRecord {
                    seq: item.seq,
                    sent_at_us: u64::try_from(item.captured_at_unix_ms)
                        .unwrap_or(0)
                        .saturating_mul(1000),
                    received_at_us: now_us,
                    key_frame: true,
                    width: s.width,
                    height: s.height,
                    data: s.data.clone(),
                })
                .map_err(werr)?,
            Some(pb::evidence_item::Body::Presence(p)) => w
                .write_event(&event(
                    KIND_PRESENCE,
                    presence_detail(item.seq, item.captured_at_unix_ms, p),
                ))
                .map_err(werr)?,
            None => {
                return Err(SinkError::Malformed {
                    path: path.to_owned(),
                    reason: format!("item {} has no body", item.seq),
                });
            }
        }
        w.write_event(&event(
            KIND_SIGNATURE,
            format!(
                "seq={} captured_at_ms={} ed25519={}",
                item.seq,
                item.captured_at_unix_ms,
                hex::encode(&item.signature)
            ),
        ))
        .map_err(werr)?;
    }
    w.finish().map_err(werr)
}

/// The stored line of a presence: fixed fields, then the device's free text verbatim
/// to the end (so it reads back exactly, and the device's signature still verifies).
fn presence_detail(seq: u64, captured_at_ms: i64, p: &pb::Presence) -> String {
    format!(
        "seq={seq} captured_at_ms={captured_at_ms} state={} idle_secs={} offline_secs={} detail={}",
        state_name(p.state),
        p.idle_secs,
        p.offline_secs,
        p.detail
    )
}

fn state_name(state: i32) -> String {
    match pb::PresenceState::try_from(state) {
        Ok(s) => s
            .as_str_name()
            .trim_start_matches("PRESENCE_STATE_")
            .to_ascii_lowercase(),
        Err(_) => state.to_string(),
    }
}

fn state_from_name(name: &str) -> Option<pb::PresenceState> {
    pb::PresenceState::from_str_name(&format!("PRESENCE_STATE_{}", name.to_ascii_uppercase()))
}

/// The finished evidence files in `dir`: (device, first seq, last seq, path).
fn list(dir: &Path) -> Result<Vec<(String, u64, u64, PathBuf)>, SinkError> {
    let io = |source| SinkError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(PARTIAL_SUFFIX) || !entry.file_type().map_err(io)?.is_file() {
            continue;
        }
        if let Some((device, first, last)) = parse_file_name(name) {
            out.push((device, first, last, entry.path()));
        }
    }
    out.sort_by(|a, b| (&a.0, a.1, a.2).cmp(&(&b.0, b.1, b.2)));
    Ok(out)
}

/// One stored item of a device, as [`read_device`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evidence {
    Snapshot {
        seq: u64,
        /// The device's clock, unix milliseconds.
        captured_at_ms: i64,
        width: u32,
        height: u32,
        png: Vec<u8>,
        /// The device's Ed25519 signature (checked by [`read_device`]).
        signature: Vec<u8>,
    },
    Presence {
        seq: u64,
        captured_at_ms: i64,
        state: pb::PresenceState,
        idle_secs: u32,
        offline_secs: u32,
        detail: String,
        signature: Vec<u8>,
    },
    /// The device's offline buffer overwrote `overwritten` snapshots (the oldest)
    /// before the item `before_seq` was taken off it.
    Gap { overwritten: u64, before_seq: u64 },
}

impl Evidence {
    /// The item's seq; a gap's is the seq of the first item after it.
    pub fn seq(&self) -> u64 {
        match self {
            Self::Snapshot { seq, .. } | Self::Presence { seq, .. } => *seq,
            Self::Gap { before_seq, .. } => *before_seq,
        }
    }

    /// The item as the device uploaded it (signature included); `None` for a gap.
    pub fn to_item(&self) -> Option<pb::EvidenceItem> {
        use pb::evidence_item::Body;
        let (seq, captured_at_unix_ms, body, signature) = match self {
            Self::Snapshot {
                seq,
                captured_at_ms,
                width,
                height,
                png,
                signature,
            } => (
                *seq,
                *captured_at_ms,
                Body::Snapshot(pb::Snapshot {
                    width: *width,
                    height: *height,
                    format: SNAPSHOT_FORMAT_PNG.to_owned(),
                    data: png.clone(),
                }),
                signature,
            ),
            Self::Presence {
                seq,
                captured_at_ms,
                state,
                idle_secs,
                offline_secs,
                detail,
                signature,
            } => (
                *seq,
                *captured_at_ms,
                Body::Presence(pb::Presence {
                    state: *state as i32,
                    idle_secs: *idle_secs,
                    offline_secs: *offline_secs,
                    detail: detail.clone(),
                }),
                signature,
            ),
            Self::Gap { .. } => return None,
        };
        Some(pb::EvidenceItem {
            seq,
            captured_at_unix_ms,
            body: Some(body),
            signature: signature.clone(),
        })
    }

    /// One line for a person (what `kakehashi evidence export` writes to
    /// `presence.log`); the device's free text is quoted, so the line stays one line.
    pub fn describe(&self) -> String {
        match self {
            Self::Snapshot {
                seq,
                captured_at_ms,
                width,
                height,
                png,
                ..
            } => format!(
                "seq={seq} captured_at_ms={captured_at_ms} snapshot {width}x{height} {} bytes",
                png.len()
            ),
            Self::Presence {
                seq,
                captured_at_ms,
                state,
                idle_secs,
                offline_secs,
                detail,
                ..
            } => format!(
                "seq={seq} captured_at_ms={captured_at_ms} presence state={} idle_secs={idle_secs} offline_secs={offline_secs} detail={detail:?}",
                state_name(*state as i32)
            ),
            Self::Gap {
                overwritten,
                before_seq,
            } => format!(
                "gap: {overwritten} snapshots overwritten in the device's offline buffer before seq={before_seq}"
            ),
        }
    }
}

/// Every stored item of `device_id` in `dir`, in seq order (a gap just before the item
/// it precedes). Each file is verified whole first ([`recording::Player`]: a flipped
/// byte fails naming the file and segment), its header must name the device its file
/// name does, and each item's signature must verify under the device key the file
/// records, whose id must be `device_id`.
pub fn read_device(
    dir: &Path,
    key: &RecordingKey,
    device_id: &str,
) -> Result<Vec<Evidence>, SinkError> {
    if !is_device_id(device_id) {
        return Err(SinkError::Malformed {
            path: dir.to_owned(),
            reason: format!("device id {device_id:?} is not 32 lowercase hex digits"),
        });
    }
    let mut out: Vec<Evidence> = Vec::new();
    let mut last_seq: Option<u64> = None;
    for (_, first, last, path) in list(dir)?.into_iter().filter(|f| f.0 == device_id) {
        let items = read_file(&path, key, device_id)?;
        let bad = |reason: String| SinkError::Malformed {
            path: path.clone(),
            reason,
        };
        let mut seqs = items.iter().filter(|e| !matches!(e, Evidence::Gap { .. }));
        let (Some(lo), Some(hi)) = (seqs.next().map(Evidence::seq), items.last()) else {
            return Err(bad("the file holds no item".into()));
        };
        if (lo, hi.seq()) != (first, last) {
            return Err(bad(format!(
                "holds seq {lo}..={} but its name says {first}..={last}",
                hi.seq()
            )));
        }
        if let Some(prev) = last_seq.filter(|&p| p >= first) {
            return Err(bad(format!(
                "starts at seq {first}, not after seq {prev} of an earlier file"
            )));
        }
        last_seq = Some(last);
        out.extend(items);
    }
    Ok(out)
}

/// One file's items, checked.
fn read_file(path: &Path, key: &RecordingKey, device_id: &str) -> Result<Vec<Evidence>, SinkError> {
    let verr = |source| SinkError::Verify {
        path: path.to_owned(),
        source,
    };
    let bad = |reason: String| SinkError::Malformed {
        path: path.to_owned(),
        reason,
    };
    let player = Player::open(path, key).map_err(verr)?;
    if player.summary().meta.session_id != session_id_of(device_id) {
        return Err(bad(format!(
            "its header is of {:?}, not of device {device_id}",
            player.summary().meta.session_id
        )));
    }
    let mut device_key: Option<VerifyingKey> = None;
    let mut out = Vec::new();
    // The item read last, waiting for its signature event.
    let mut pending: Option<Evidence> = None;
    let mut last: Option<u64> = None;
    for record in player {
        let record = record.map_err(verr)?;
        if let Some(item) = pending.take() {
            let Record::Event(e) = &record else {
                return Err(bad(format!("item {} has no signature", item.seq())));
            };
            if e.kind != KIND_SIGNATURE {
                return Err(bad(format!("item {} has no signature", item.seq())));
            }
            let item = with_signature(item, &e.detail).map_err(&bad)?;
            let dk = device_key
                .as_ref()
                .ok_or_else(|| bad("no device record before the items".into()))?;
            check_signature(dk, device_id, &item).map_err(&bad)?;
            if last.is_some_and(|l| l >= item.seq()) {
                return Err(bad(format!("seq {} does not increase", item.seq())));
            }
            last = Some(item.seq());
            out.push(item);
            continue;
        }
        match record {
            Record::Frame(f) => {
                pending = Some(Evidence::Snapshot {
                    seq: f.seq,
                    captured_at_ms: 0,
                    width: f.width,
                    height: f.height,
                    png: f.data,
                    signature: Vec::new(),
                })
            }
            Record::Event(e) => match e.kind.as_str() {
                KIND_DEVICE => {
                    device_key = Some(parse_device(&e.detail, device_id).map_err(&bad)?);
                }
                KIND_GAP => out.push(parse_gap(&e.detail).map_err(&bad)?),
                KIND_PRESENCE => pending = Some(parse_presence(&e.detail).map_err(&bad)?),
                other => return Err(bad(format!("unexpected event {other:?}"))),
            },
        }
    }
    if let Some(item) = pending {
        return Err(bad(format!("item {} has no signature", item.seq())));
    }
    Ok(out)
}

/// `key=value` fields of a stored line, in the order given; the last takes the rest.
fn fields<'a, const N: usize>(detail: &'a str, names: [&str; N]) -> Result<[&'a str; N], String> {
    let mut out = [""; N];
    let mut rest = detail;
    for (i, name) in names.iter().enumerate() {
        let tail = rest
            .strip_prefix(name)
            .and_then(|r| r.strip_prefix('='))
            .ok_or_else(|| format!("{detail:?}: no {name}= field"))?;
        if i + 1 == N {
            out[i] = tail;
        } else {
            let (v, r) = tail
                .split_once(' ')
                .ok_or_else(|| format!("{detail:?}: field {name} is cut short"))?;
            out[i] = v;
            rest = r;
        }
    }
    Ok(out)
}

fn num<T: std::str::FromStr>(v: &str, what: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{what} {v:?} is not a number"))
}

fn parse_device(detail: &str, device_id: &str) -> Result<VerifyingKey, String> {
    let [id, public_key, _tenant] = fields(detail, ["id", "public_key", "tenant"])?;
    if id != device_id {
        return Err(format!("it records device {id}, not {device_id}"));
    }
    let bytes: [u8; 32] = hex::decode(public_key)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("device public key {public_key:?} is not 64 hex digits"))?;
    if kakehashi_proto::device::device_id_of(&bytes) != device_id {
        return Err(format!(
            "device public key {public_key} is not the key of device {device_id}"
        ));
    }
    VerifyingKey::from_bytes(&bytes).map_err(|_| "device public key is not a valid key".into())
}

fn parse_gap(detail: &str) -> Result<Evidence, String> {
    let malformed = || format!("gap record {detail:?} is malformed");
    let (n, _) = detail.split_once(' ').ok_or_else(malformed)?;
    let (_, seq) = detail.rsplit_once("seq=").ok_or_else(malformed)?;
    Ok(Evidence::Gap {
        overwritten: num(n, "overwritten count")?,
        before_seq: num(seq, "gap seq")?,
    })
}

fn parse_presence(detail: &str) -> Result<Evidence, String> {
    let [seq, at, state, idle, offline, text] = fields(
        detail,
        [
            "seq",
            "captured_at_ms",
            "state",
            "idle_secs",
            "offline_secs",
            "detail",
        ],
    )?;
    Ok(Evidence::Presence {
        seq: num(seq, "seq")?,
        captured_at_ms: num(at, "captured_at_ms")?,
        state: state_from_name(state).ok_or_else(|| format!("presence state {state:?}"))?,
        idle_secs: num(idle, "idle_secs")?,
        offline_secs: num(offline, "offline_secs")?,
        detail: text.to_owned(),
        signature: Vec::new(),
    })
}

/// Fills in the signature and capture time from the item's `signature` event.
fn with_signature(mut item: Evidence, detail: &str) -> Result<Evidence, String> {
    let [seq, at, sig] = fields(detail, ["seq", "captured_at_ms", "ed25519"])?;
    let seq: u64 = num(seq, "seq")?;
    if seq != item.seq() {
        return Err(format!(
            "signature of seq {seq} follows item {}",
            item.seq()
        ));
    }
    let at: i64 = num(at, "captured_at_ms")?;
    let sig = hex::decode(sig).map_err(|_| format!("signature of seq {seq} is not hex"))?;
    match &mut item {
        Evidence::Snapshot {
            captured_at_ms,
            signature,
            ..
        } => {
            *captured_at_ms = at;
            *signature = sig;
        }
        Evidence::Presence {
            captured_at_ms,
            signature,
            ..
        } => {
            if *captured_at_ms != at {
                return Err(format!("seq {seq}: two capture times"));
            }
            *signature = sig;
        }
        Evidence::Gap { .. } => return Err("a gap has no signature".into()),
    }
    Ok(item)
}

fn check_signature(key: &VerifyingKey, device_id: &str, item: &Evidence) -> Result<(), String> {
    let seq = item.seq();
    let pb_item = item.to_item().ok_or("a gap has no signature")?;
    let message =
        item_message(device_id, &pb_item).ok_or_else(|| format!("item {seq} has no body"))?;
    let sig = ed25519_dalek::Signature::from_slice(&pb_item.signature)
        .map_err(|_| format!("item {seq}: the stored signature is malformed"))?;
    // The check the sink applied on upload (`check_item`), so what was accepted reads.
    ed25519_dalek::Verifier::verify(key, &message, &sig)
        .map_err(|_| format!("item {seq}: the device's signature does not verify"))
}

/// Seconds since the Unix epoch (0 before it).
pub(super) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
