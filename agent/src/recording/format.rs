//! The byte layout of a recording: the file header, segment headers and the records
//! inside a segment's plaintext. Pure functions over byte slices; no I/O, no keys.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kakehashi_proto::pb;

pub(super) const MAGIC: &[u8; 8] = b"KKHREC\r\n";
pub(super) const VERSION: u16 = 1;

/// Session ids and tenants are short; anything longer is not a header of ours.
pub(super) const MAX_NAME: usize = 256;
/// Bytes of a screen frame's picture: the data plane's frames are smaller than this.
pub const MAX_FRAME_DATA: usize = 4 * 1024 * 1024;
pub const MAX_EVENT_KIND: usize = 64;
pub const MAX_EVENT_DETAIL: usize = 64 * 1024;
/// The writer closes a segment once its records reach this many bytes.
pub(super) const SEGMENT_TARGET: usize = 1024 * 1024;
/// No segment's plaintext is larger: one largest frame record, or the target plus one
/// largest record.
pub const MAX_SEGMENT_PLAINTEXT: usize = SEGMENT_TARGET + MAX_FRAME_DATA + 64;
pub(super) const TAG_LEN: usize = 16;
pub(super) const WRAPPED_KEY_LEN: usize = 32 + TAG_LEN;
pub(super) const NONCE_LEN: usize = 12;
pub(super) const KEY_ID_LEN: usize = 8;
/// kind (1) + index (8) + previous segment's SHA-256 (32) + ciphertext length (4).
pub(super) const SEGMENT_HEADER_LEN: usize = 1 + 8 + 32 + 4;
pub(super) const TRAILER_LEN: usize = 8 * 4 + 32;

pub(super) const KIND_DATA: u8 = 1;
pub(super) const KIND_TRAILER: u8 = 2;

const RECORD_FRAME: u8 = 1;
const RECORD_EVENT: u8 = 2;

/// What a recording is of. Stored in the header, authenticated with the data key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordingMeta {
    pub session_id: String,
    /// The call center whose session this is, when the recorder knows it: retention
    /// may differ per tenant.
    pub tenant: Option<String>,
    /// Whole seconds since the Unix epoch: what retention dates the file by.
    pub created_at: u64,
}

impl RecordingMeta {
    pub fn new(session_id: &str, tenant: Option<&str>, created_at: SystemTime) -> Self {
        Self {
            session_id: session_id.to_owned(),
            tenant: tenant.filter(|t| !t.is_empty()).map(str::to_owned),
            created_at: created_at
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs(),
        }
    }
}

/// One screen frame as the recorder received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRecord {
    /// The host's sequence number for the frame.
    pub seq: u64,
    /// When the host sent it, microseconds since the Unix epoch by the host's clock.
    pub sent_at_us: u64,
    /// When the recorder received it, by the recorder's clock (the clock event times
    /// use, so frames and events order on one timeline).
    pub received_at_us: u64,
    pub key_frame: bool,
    pub width: u32,
    pub height: u32,
    /// The picture as the host encoded it (H.264, or synthetic bytes).
    pub data: Vec<u8>,
}

impl FrameRecord {
    /// A frame from a viewer event: `latency_us` is the viewer's now minus the host's
    /// send time, so the send time is recovered from the recorder's clock.
    pub fn from_screen(
        frame: &pb::ScreenFrame,
        seq: u64,
        latency_us: i64,
        now: SystemTime,
    ) -> Self {
        let now_us = unix_us(now);
        Self {
            seq,
            sent_at_us: now_us.saturating_add_signed(-latency_us),
            received_at_us: now_us,
            key_frame: frame.key_frame,
            width: frame.width,
            height: frame.height,
            data: frame.data.clone(),
        }
    }

    pub fn to_screen(&self) -> pb::ScreenFrame {
        pb::ScreenFrame {
            width: self.width,
            height: self.height,
            key_frame: self.key_frame,
            data: self.data.clone(),
            group_key: None,
        }
    }
}

/// Something that happened in the session (a grant, a pause, the end), as the recorder
/// saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Microseconds since the Unix epoch by the recorder's clock.
    pub at_us: u64,
    /// A short name (`grants`, `paused`, `ended`, ...), at most [`MAX_EVENT_KIND`] bytes.
    pub kind: String,
    /// Free text, at most [`MAX_EVENT_DETAIL`] bytes.
    pub detail: String,
}

impl EventRecord {
    pub fn new(kind: &str, detail: &str, at: SystemTime) -> Self {
        Self {
            at_us: unix_us(at),
            kind: kind.to_owned(),
            detail: detail.to_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Frame(FrameRecord),
    Event(EventRecord),
}

pub fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The header's bytes up to (not including) the wrapping nonce: the associated data the
/// data key is wrapped with, so none of it can change unnoticed.
pub(super) fn header_prefix(meta: &RecordingMeta, key_id: &[u8; KEY_ID_LEN]) -> Vec<u8> {
    let tenant = meta.tenant.as_deref().unwrap_or("");
    let mut out = Vec::with_capacity(40 + meta.session_id.len() + tenant.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(key_id);
    out.extend_from_slice(&meta.created_at.to_le_bytes());
    for s in [meta.session_id.as_str(), tenant] {
        // Callers check MAX_NAME first.
        out.extend_from_slice(&(s.len() as u16).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    out
}

pub(super) struct SegmentHeader {
    pub kind: u8,
    pub index: u64,
    pub prev: [u8; 32],
    pub len: u32,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut out = [0u8; SEGMENT_HEADER_LEN];
        out[0] = self.kind;
        out[1..9].copy_from_slice(&self.index.to_le_bytes());
        out[9..41].copy_from_slice(&self.prev);
        out[41..45].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    pub fn decode(b: &[u8; SEGMENT_HEADER_LEN]) -> Self {
        let mut prev = [0u8; 32];
        prev.copy_from_slice(&b[9..41]);
        Self {
            kind: b[0],
            index: u64::from_le_bytes(le8(&b[1..9])),
            prev,
            len: u32::from_le_bytes([b[41], b[42], b[43], b[44]]),
        }
    }
}

/// The segment's nonce: its kind and index. The data key is new for every file, so
/// (key, nonce) never repeats.
pub(super) fn segment_nonce(kind: u8, index: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[0] = kind;
    n[4..].copy_from_slice(&index.to_be_bytes());
    n
}

/// The trailer's plaintext: how many data segments, frames and events came before it
/// and the hash of the last data segment (the chain head).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Trailer {
    pub segments: u64,
    pub frames: u64,
    pub events: u64,
    pub frame_bytes: u64,
    pub head: [u8; 32],
}

impl Trailer {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(TRAILER_LEN);
        for n in [self.segments, self.frames, self.events, self.frame_bytes] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&self.head);
        out
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != TRAILER_LEN {
            return None;
        }
        let n = |i: usize| u64::from_le_bytes(le8(&b[i * 8..i * 8 + 8]));
        let mut head = [0u8; 32];
        head.copy_from_slice(&b[32..64]);
        Some(Self {
            segments: n(0),
            frames: n(1),
            events: n(2),
            frame_bytes: n(3),
            head,
        })
    }
}

/// Appends `record` to a segment's plaintext. Sizes are checked by the caller.
pub(super) fn encode_record(record: &Record, out: &mut Vec<u8>) {
    match record {
        Record::Frame(f) => {
            out.push(RECORD_FRAME);
            out.extend_from_slice(&f.seq.to_le_bytes());
            out.extend_from_slice(&f.sent_at_us.to_le_bytes());
            out.extend_from_slice(&f.received_at_us.to_le_bytes());
            out.push(u8::from(f.key_frame));
            out.extend_from_slice(&f.width.to_le_bytes());
            out.extend_from_slice(&f.height.to_le_bytes());
            out.extend_from_slice(&(f.data.len() as u32).to_le_bytes());
            out.extend_from_slice(&f.data);
        }
        Record::Event(e) => {
            out.push(RECORD_EVENT);
            out.extend_from_slice(&e.at_us.to_le_bytes());
            out.extend_from_slice(&(e.kind.len() as u16).to_le_bytes());
            out.extend_from_slice(e.kind.as_bytes());
            out.extend_from_slice(&(e.detail.len() as u32).to_le_bytes());
            out.extend_from_slice(e.detail.as_bytes());
        }
    }
}

/// The encoded size of a record, to decide before encoding whether it fits.
pub(super) fn record_len(record: &Record) -> usize {
    match record {
        Record::Frame(f) => 1 + 8 + 8 + 8 + 1 + 4 + 4 + 4 + f.data.len(),
        Record::Event(e) => 1 + 8 + 2 + e.kind.len() + 4 + e.detail.len(),
    }
}

/// Parses a segment's plaintext into its records; the reason on failure.
pub(super) fn decode_records(mut b: &[u8]) -> Result<Vec<Record>, &'static str> {
    let mut out = Vec::new();
    while let Some((&tag, rest)) = b.split_first() {
        b = rest;
        match tag {
            RECORD_FRAME => {
                let seq = take_u64(&mut b)?;
                let sent_at_us = take_u64(&mut b)?;
                let received_at_us = take_u64(&mut b)?;
                let key_frame = match take(&mut b, 1)?[0] {
                    0 => false,
                    1 => true,
                    _ => return Err("frame record's key flag is not 0 or 1"),
                };
                let width = take_u32(&mut b)?;
                let height = take_u32(&mut b)?;
                let len = take_u32(&mut b)? as usize;
                if len > MAX_FRAME_DATA {
                    return Err("frame record larger than the limit");
                }
                let data = take(&mut b, len)?.to_vec();
                out.push(Record::Frame(FrameRecord {
                    seq,
                    sent_at_us,
                    received_at_us,
                    key_frame,
                    width,
                    height,
                    data,
                }));
            }
            RECORD_EVENT => {
                let at_us = take_u64(&mut b)?;
                let klen = u16::from_le_bytes([take(&mut b, 1)?[0], take(&mut b, 1)?[0]]) as usize;
                if klen > MAX_EVENT_KIND {
                    return Err("event kind longer than the limit");
                }
                let kind = std::str::from_utf8(take(&mut b, klen)?)
                    .map_err(|_| "event kind is not UTF-8")?
                    .to_owned();
                let dlen = take_u32(&mut b)? as usize;
                if dlen > MAX_EVENT_DETAIL {
                    return Err("event detail longer than the limit");
                }
                let detail = std::str::from_utf8(take(&mut b, dlen)?)
                    .map_err(|_| "event detail is not UTF-8")?
                    .to_owned();
                out.push(Record::Event(EventRecord {
                    at_us,
                    kind,
                    detail,
                }));
            }
            _ => return Err("unknown record type"),
        }
    }
    Ok(out)
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], &'static str> {
    if b.len() < n {
        return Err("record cut short");
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Ok(head)
}

fn take_u64(b: &mut &[u8]) -> Result<u64, &'static str> {
    Ok(u64::from_le_bytes(le8(take(b, 8)?)))
}

fn take_u32(b: &mut &[u8]) -> Result<u32, &'static str> {
    let s = take(b, 4)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le8(s: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&s[..8]);
    a
}
