//! Session recordings on disk: encrypted at rest and tamper-evident.
//!
//! A file is a header, then segments, then a trailer segment:
//!
//! ```text
//! header   magic "KKHREC\r\n", version u16, key id [8], created_at u64 (unix s),
//!          session id (u16 len + bytes), tenant (u16 len + bytes, empty = unknown),
//!          wrap nonce [12], data key wrapped with AES-256-GCM under the recording key
//!          (associated data: every header byte before the nonce)
//! segment  kind u8 (1 data, 2 trailer), index u64, SHA-256 of the previous segment's
//!          bytes (of the header for segment 0) [32], ciphertext length u32,
//!          ciphertext: AES-256-GCM under the data key, nonce = kind and index,
//!          associated data = these 45 header bytes
//! trailer  a segment of kind 2 whose plaintext holds the number of data segments,
//!          frames, events and frame bytes, and the chain head (the last data
//!          segment's hash)
//! records  a data segment's plaintext is records back to back:
//!          frame: 1, seq u64, sent_at_us u64 (host clock), received_at_us u64,
//!                 key flag u8, width u32, height u32, length u32, bytes
//!          event: 2, at_us u64, kind (u16 len + UTF-8), detail (u32 len + UTF-8)
//! ```
//!
//! All integers are little-endian. Limits: a frame's bytes ≤ [`MAX_FRAME_DATA`], an
//! event's kind ≤ [`MAX_EVENT_KIND`] and detail ≤ [`MAX_EVENT_DETAIL`] bytes, a
//! segment's plaintext ≤ [`MAX_SEGMENT_PLAINTEXT`]; a reader refuses larger lengths
//! before allocating.
//!
//! Every byte is covered: the header by the key wrap, each segment by its own tag, the
//! order by the index in the nonce and the hash chain, the end by the trailer. So an
//! altered byte, a removed or reordered segment, a cut file and a wrong key each fail
//! [`verify`] with their own [`VerifyError`], naming the segment.
//!
//! The writer writes to `NAME.partial` and renames to `NAME` once the trailer is on
//! disk and synced: a crash leaves no file that looks complete.
//!
//! # Layout
//! - `format`: byte layout of headers, segments and records (no I/O, no keys).
//! - `retention`: [`prune`], deleting recordings past their tenant's retention.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key};
use sha2::{Digest, Sha256};

mod format;
mod retention;
#[cfg(test)]
mod tests;

pub use format::{
    EventRecord, FrameRecord, MAX_EVENT_DETAIL, MAX_EVENT_KIND, MAX_FRAME_DATA,
    MAX_SEGMENT_PLAINTEXT, Record, RecordingMeta, unix_us,
};
pub use retention::{DEFAULT_RETENTION, PruneError, PruneReport, RetentionPolicy, prune};

use format::{
    KEY_ID_LEN, KIND_DATA, KIND_TRAILER, MAGIC, MAX_NAME, NONCE_LEN, SEGMENT_HEADER_LEN,
    SEGMENT_TARGET, SegmentHeader, TAG_LEN, Trailer, VERSION, WRAPPED_KEY_LEN,
};

/// The environment variable the CLI reads the recording key file's path from.
pub const KEY_FILE_ENV: &str = "KAKEHASHI_RECORDING_KEY_FILE";
/// What a finished recording's name ends with; the writer's temporary name adds
/// [`PARTIAL_SUFFIX`].
pub const PARTIAL_SUFFIX: &str = ".partial";

/// The cluster operator's 32-byte key that wraps each recording's data key. Whoever
/// holds it can read and verify recordings; nobody without it can do either.
#[derive(Clone)]
pub struct RecordingKey([u8; 32]);

impl std::fmt::Debug for RecordingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecordingKey(id {})", hex::encode(self.id()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the recording key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("recording key file {path} does not hold hex: {reason}")]
    NotHex { path: PathBuf, reason: String },
    #[error(
        "recording key file {path} holds {len} bytes; a recording key is 32 bytes (64 hex digits)"
    )]
    Length { path: PathBuf, len: usize },
    #[error("no random numbers for a new key: {0}")]
    Random(getrandom::Error),
}

impl RecordingKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A new random key (to write to a key file with [`RecordingKey::to_hex`]).
    pub fn generate() -> Result<Self, KeyError> {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).map_err(KeyError::Random)?;
        Ok(Self(k))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Reads 64 hex digits (surrounding whitespace allowed) from `path`.
    pub fn from_hex_file(path: &Path) -> Result<Self, KeyError> {
        let mut text = String::new();
        File::open(path)
            .and_then(|f| f.take(1024).read_to_string(&mut text))
            .map_err(|source| KeyError::Io {
                path: path.to_owned(),
                source,
            })?;
        let bytes = hex::decode(text.trim()).map_err(|e| KeyError::NotHex {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let len = bytes.len();
        let key: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Length {
            path: path.to_owned(),
            len,
        })?;
        Ok(Self(key))
    }

    /// A fingerprint stored in each header, so a wrong key is told apart from an
    /// altered header. It reveals nothing about the key.
    fn id(&self) -> [u8; KEY_ID_LEN] {
        let mut h = Sha256::new();
        h.update(b"kakehashi recording key id v1");
        h.update(self.0);
        let d = h.finalize();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&d[..KEY_ID_LEN]);
        id
    }

    fn aead(&self) -> Aes256Gcm {
        Aes256Gcm::new(&Key::<Aes256Gcm>::from(self.0))
    }
}

/// Writing a recording failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("recording {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("recording {0} already exists; a recording is never overwritten")]
    Exists(PathBuf),
    #[error("{what} is {len} bytes, more than the {limit} a recording takes")]
    TooLarge {
        what: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("no random numbers for the data key: {0}")]
    Random(getrandom::Error),
    #[error("segment {0} could not be encrypted")]
    Seal(u64),
}

/// Verifying or reading a recording failed. Each failure of the file itself names the
/// segment where it was found (0 is the first segment after the header).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read recording {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a recording (no recording header)")]
    NotARecording,
    #[error("recording format version {0} is not supported (this build reads version 1)")]
    Version(u16),
    #[error("recording header is malformed: {0}")]
    HeaderMalformed(&'static str),
    #[error(
        "recording was written under another recording key (key id {found}, this key's id {expected})"
    )]
    WrongKey { expected: String, found: String },
    #[error("recording header was altered: the data key does not unwrap")]
    HeaderTampered,
    #[error("recording is cut short in segment {segment}: {what}")]
    Truncated { segment: u64, what: &'static str },
    #[error("segment {segment} is malformed: {reason}")]
    SegmentMalformed { segment: u64, reason: &'static str },
    #[error(
        "segment {segment} expected, found segment {found}: a segment was removed or reordered"
    )]
    Sequence { segment: u64, found: u64 },
    #[error("segment {segment} does not follow the segment before it (hash chain broken)")]
    ChainBroken { segment: u64 },
    #[error("segment {segment} was altered: it fails authentication")]
    Tampered { segment: u64 },
    #[error("trailer (segment {segment}) does not match the recording: {reason}")]
    TrailerMismatch { segment: u64, reason: &'static str },
    #[error("bytes follow the trailer (segment {segment})")]
    TrailingData { segment: u64 },
}

impl VerifyError {
    /// The segment the failure was found in; `None` for the header, the key or I/O.
    pub fn segment(&self) -> Option<u64> {
        match self {
            Self::Truncated { segment, .. }
            | Self::SegmentMalformed { segment, .. }
            | Self::Sequence { segment, .. }
            | Self::ChainBroken { segment }
            | Self::Tampered { segment }
            | Self::TrailerMismatch { segment, .. }
            | Self::TrailingData { segment } => Some(*segment),
            _ => None,
        }
    }
}

/// What a verified recording holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub meta: RecordingMeta,
    /// Data segments (the trailer not counted).
    pub segments: u64,
    pub frames: u64,
    pub events: u64,
    pub frame_bytes: u64,
    /// SHA-256 of the last data segment: the head of the hash chain, in hex.
    pub chain_head: String,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "session {} tenant {} created_at {} (unix s): {} segments, {} frames ({} bytes), {} events, chain head {}",
            self.meta.session_id,
            self.meta.tenant.as_deref().unwrap_or("-"),
            self.meta.created_at,
            self.segments,
            self.frames,
            self.frame_bytes,
            self.events,
            self.chain_head
        )
    }
}

/// Writes one recording. Records are gathered into segments of about 1 MiB; call
/// [`RecordingWriter::flush`] to close a segment early (so a crash loses less), and
/// [`RecordingWriter::finish`] at the end: without it the file keeps its temporary
/// `.partial` name and does not verify.
pub struct RecordingWriter {
    file: BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    aead: Aes256Gcm,
    prev: [u8; 32],
    next_index: u64,
    pending: Vec<u8>,
    frames: u64,
    events: u64,
    frame_bytes: u64,
}

impl std::fmt::Debug for RecordingWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingWriter")
            .field("path", &self.path)
            .field("segments", &self.next_index)
            .field("frames", &self.frames)
            .field("events", &self.events)
            .finish()
    }
}

impl RecordingWriter {
    /// Starts a recording to be named `path` (written as `path.partial` until
    /// [`RecordingWriter::finish`]). Refuses to overwrite either name.
    pub fn create(
        path: &Path,
        key: &RecordingKey,
        meta: &RecordingMeta,
    ) -> Result<Self, RecordingError> {
        for (what, s) in [
            ("session id", meta.session_id.as_str()),
            ("tenant", meta.tenant.as_deref().unwrap_or("")),
        ] {
            if s.len() > MAX_NAME {
                return Err(RecordingError::TooLarge {
                    what,
                    len: s.len(),
                    limit: MAX_NAME,
                });
            }
        }
        if path.exists() {
            return Err(RecordingError::Exists(path.to_owned()));
        }
        let tmp = partial_path(path);
        let io = |source| RecordingError::Io {
            path: tmp.clone(),
            source,
        };
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => RecordingError::Exists(tmp.clone()),
                _ => io(e),
            })?;
        let mut data_key = [0u8; 32];
        let mut wrap_nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut data_key).map_err(RecordingError::Random)?;
        getrandom::fill(&mut wrap_nonce).map_err(RecordingError::Random)?;
        let mut header = format::header_prefix(meta, &key.id());
        let wrapped = key
            .aead()
            .encrypt(
                &wrap_nonce.into(),
                Payload {
                    msg: &data_key,
                    aad: &header,
                },
            )
            .map_err(|_| RecordingError::Seal(0))?;
        header.extend_from_slice(&wrap_nonce);
        header.extend_from_slice(&wrapped);
        let mut file = BufWriter::new(file);
        file.write_all(&header).map_err(io)?;
        Ok(Self {
            file,
            path: path.to_owned(),
            aead: Aes256Gcm::new(&Key::<Aes256Gcm>::from(data_key)),
            prev: Sha256::digest(&header).into(),
            next_index: 0,
            pending: Vec::new(),
            frames: 0,
            events: 0,
            frame_bytes: 0,
            tmp,
        })
    }

    pub fn write_frame(&mut self, frame: &FrameRecord) -> Result<(), RecordingError> {
        if frame.data.len() > MAX_FRAME_DATA {
            return Err(RecordingError::TooLarge {
                what: "a screen frame",
                len: frame.data.len(),
                limit: MAX_FRAME_DATA,
            });
        }
        self.frames += 1;
        self.frame_bytes += frame.data.len() as u64;
        // One copy of the picture; recordings are written as frames arrive.
        self.add(&Record::Frame(frame.clone()))
    }

    pub fn write_event(&mut self, event: &EventRecord) -> Result<(), RecordingError> {
        for (what, len, limit) in [
            ("an event kind", event.kind.len(), MAX_EVENT_KIND),
            ("an event detail", event.detail.len(), MAX_EVENT_DETAIL),
        ] {
            if len > limit {
                return Err(RecordingError::TooLarge { what, len, limit });
            }
        }
        self.events += 1;
        self.add(&Record::Event(event.clone()))
    }

    fn add(&mut self, record: &Record) -> Result<(), RecordingError> {
        if !self.pending.is_empty()
            && self.pending.len() + format::record_len(record) > SEGMENT_TARGET
        {
            self.flush()?;
        }
        format::encode_record(record, &mut self.pending);
        if self.pending.len() >= SEGMENT_TARGET {
            self.flush()?;
        }
        Ok(())
    }

    /// Closes the current segment (if it holds anything) and hands it to the OS.
    pub fn flush(&mut self) -> Result<(), RecordingError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let plaintext = std::mem::take(&mut self.pending);
        self.write_segment(KIND_DATA, &plaintext)?;
        self.file.flush().map_err(|source| RecordingError::Io {
            path: self.tmp.clone(),
            source,
        })
    }

    fn write_segment(&mut self, kind: u8, plaintext: &[u8]) -> Result<(), RecordingError> {
        let index = self.next_index;
        let len = plaintext.len() + TAG_LEN;
        let header = SegmentHeader {
            kind,
            index,
            prev: self.prev,
            len: len as u32,
        }
        .encode();
        let ct = self
            .aead
            .encrypt(
                &format::segment_nonce(kind, index).into(),
                Payload {
                    msg: plaintext,
                    aad: &header,
                },
            )
            .map_err(|_| RecordingError::Seal(index))?;
        let io = |source| RecordingError::Io {
            path: self.tmp.clone(),
            source,
        };
        self.file.write_all(&header).map_err(io)?;
        self.file.write_all(&ct).map_err(io)?;
        let mut h = Sha256::new();
        h.update(header);
        h.update(&ct);
        self.prev = h.finalize().into();
        self.next_index += 1;
        Ok(())
    }

    /// Records written so far: (frames, events).
    pub fn counts(&self) -> (u64, u64) {
        (self.frames, self.events)
    }

    /// Writes the trailer, syncs the file and gives it its final name. Returns that
    /// name.
    pub fn finish(mut self) -> Result<PathBuf, RecordingError> {
        self.flush()?;
        let trailer = Trailer {
            segments: self.next_index,
            frames: self.frames,
            events: self.events,
            frame_bytes: self.frame_bytes,
            head: self.prev,
        }
        .encode();
        self.write_segment(KIND_TRAILER, &trailer)?;
        let io = |path: &Path, source| RecordingError::Io {
            path: path.to_owned(),
            source,
        };
        self.file.flush().map_err(|e| io(&self.tmp, e))?;
        self.file
            .get_ref()
            .sync_all()
            .map_err(|e| io(&self.tmp, e))?;
        if self.path.exists() {
            return Err(RecordingError::Exists(self.path.clone()));
        }
        std::fs::rename(&self.tmp, &self.path).map_err(|e| io(&self.path, e))?;
        // The rename itself must survive a crash too.
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io(dir, e))?;
        }
        Ok(self.path.clone())
    }
}

/// The temporary name a recording has while it is written.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(PARTIAL_SUFFIX);
    PathBuf::from(s)
}

/// A recording's header, read and authenticated (the data key unwrapped).
struct Opened {
    meta: RecordingMeta,
    aead: Aes256Gcm,
    /// SHA-256 of the header bytes: segment 0's "previous".
    hash: [u8; 32],
}

fn read_header(r: &mut impl Read, key: &RecordingKey) -> Result<Opened, VerifyError> {
    let io_short = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => VerifyError::NotARecording,
        _ => VerifyError::Io {
            path: PathBuf::new(),
            source: e,
        },
    };
    let mut fixed = [0u8; 8 + 2 + KEY_ID_LEN + 8];
    r.read_exact(&mut fixed).map_err(io_short)?;
    if &fixed[..8] != MAGIC {
        return Err(VerifyError::NotARecording);
    }
    let version = u16::from_le_bytes([fixed[8], fixed[9]]);
    if version != VERSION {
        return Err(VerifyError::Version(version));
    }
    let mut header = fixed.to_vec();
    let mut names = Vec::with_capacity(2);
    for _ in 0..2 {
        let mut len = [0u8; 2];
        r.read_exact(&mut len)
            .map_err(|_| VerifyError::HeaderMalformed("cut short"))?;
        let n = u16::from_le_bytes(len) as usize;
        if n > MAX_NAME {
            return Err(VerifyError::HeaderMalformed(
                "a name is longer than 256 bytes",
            ));
        }
        let mut s = vec![0u8; n];
        r.read_exact(&mut s)
            .map_err(|_| VerifyError::HeaderMalformed("cut short"))?;
        header.extend_from_slice(&len);
        header.extend_from_slice(&s);
        names.push(s);
    }
    let mut wrap = [0u8; NONCE_LEN + WRAPPED_KEY_LEN];
    r.read_exact(&mut wrap)
        .map_err(|_| VerifyError::HeaderMalformed("cut short"))?;
    let mut found = [0u8; KEY_ID_LEN];
    found.copy_from_slice(&fixed[10..10 + KEY_ID_LEN]);
    if found != key.id() {
        return Err(VerifyError::WrongKey {
            expected: hex::encode(key.id()),
            found: hex::encode(found),
        });
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&wrap[..NONCE_LEN]);
    let data_key = key
        .aead()
        .decrypt(
            &nonce.into(),
            Payload {
                msg: &wrap[NONCE_LEN..],
                aad: &header,
            },
        )
        .map_err(|_| VerifyError::HeaderTampered)?;
    let data_key: [u8; 32] = data_key
        .try_into()
        .map_err(|_| VerifyError::HeaderTampered)?;
    // Authenticated from here on.
    let [session, tenant] =
        <[Vec<u8>; 2]>::try_from(names).map_err(|_| VerifyError::HeaderMalformed("names"))?;
    let session_id = String::from_utf8(session)
        .map_err(|_| VerifyError::HeaderMalformed("session id is not UTF-8"))?;
    let tenant = String::from_utf8(tenant)
        .map_err(|_| VerifyError::HeaderMalformed("tenant is not UTF-8"))?;
    header.extend_from_slice(&wrap);
    let mut created = [0u8; 8];
    created.copy_from_slice(&fixed[10 + KEY_ID_LEN..]);
    Ok(Opened {
        meta: RecordingMeta {
            session_id,
            tenant: (!tenant.is_empty()).then_some(tenant),
            created_at: u64::from_le_bytes(created),
        },
        aead: Aes256Gcm::new(&Key::<Aes256Gcm>::from(data_key)),
        hash: Sha256::digest(&header).into(),
    })
}

/// Reads only the authenticated header: the recording's session, tenant and creation
/// time. What retention dates a file by; the segments are not checked.
pub fn read_meta(path: &Path, key: &RecordingKey) -> Result<RecordingMeta, VerifyError> {
    let mut r = open(path)?;
    read_header(&mut r, key)
        .map(|o| o.meta)
        .map_err(|e| with_path(e, path))
}

fn open(path: &Path) -> Result<BufReader<File>, VerifyError> {
    File::open(path)
        .map(|f| BufReader::with_capacity(256 * 1024, f))
        .map_err(|source| VerifyError::Io {
            path: path.to_owned(),
            source,
        })
}

fn with_path(e: VerifyError, path: &Path) -> VerifyError {
    match e {
        VerifyError::Io { source, .. } => VerifyError::Io {
            path: path.to_owned(),
            source,
        },
        e => e,
    }
}

/// Reads segments in order, checking each as it goes.
struct Segments<R> {
    r: R,
    aead: Aes256Gcm,
    prev: [u8; 32],
    next_index: u64,
    frames: u64,
    events: u64,
    frame_bytes: u64,
    done: bool,
}

impl<R: Read> Segments<R> {
    fn new(r: R, opened: Opened) -> Self {
        Self {
            r,
            aead: opened.aead,
            prev: opened.hash,
            next_index: 0,
            frames: 0,
            events: 0,
            frame_bytes: 0,
            done: false,
        }
    }

    /// The next data segment's records, or `None` after a trailer that matches.
    fn next(&mut self) -> Result<Option<Vec<Record>>, VerifyError> {
        if self.done {
            return Ok(None);
        }
        let segment = self.next_index;
        let mut hb = [0u8; SEGMENT_HEADER_LEN];
        match read_full(&mut self.r, &mut hb) {
            Ok(0) => {
                return Err(VerifyError::Truncated {
                    segment,
                    what: "the file ends before the trailer",
                });
            }
            Ok(n) if n < SEGMENT_HEADER_LEN => {
                return Err(VerifyError::Truncated {
                    segment,
                    what: "the file ends inside a segment header",
                });
            }
            Ok(_) => {}
            Err(source) => {
                return Err(VerifyError::Io {
                    path: PathBuf::new(),
                    source,
                });
            }
        }
        let h = SegmentHeader::decode(&hb);
        if h.index != segment {
            return Err(VerifyError::Sequence {
                segment,
                found: h.index,
            });
        }
        if h.kind != KIND_DATA && h.kind != KIND_TRAILER {
            return Err(VerifyError::SegmentMalformed {
                segment,
                reason: "unknown segment kind",
            });
        }
        let len = h.len as usize;
        if !(TAG_LEN..=MAX_SEGMENT_PLAINTEXT + TAG_LEN).contains(&len) {
            return Err(VerifyError::SegmentMalformed {
                segment,
                reason: "segment length out of bounds",
            });
        }
        if h.prev != self.prev {
            return Err(VerifyError::ChainBroken { segment });
        }
        let mut ct = vec![0u8; len];
        match read_full(&mut self.r, &mut ct) {
            Ok(n) if n < len => {
                return Err(VerifyError::Truncated {
                    segment,
                    what: "the file ends inside a segment",
                });
            }
            Ok(_) => {}
            Err(source) => {
                return Err(VerifyError::Io {
                    path: PathBuf::new(),
                    source,
                });
            }
        }
        let plaintext = self
            .aead
            .decrypt(
                &format::segment_nonce(h.kind, segment).into(),
                Payload { msg: &ct, aad: &hb },
            )
            .map_err(|_| VerifyError::Tampered { segment })?;
        let mut hash = Sha256::new();
        hash.update(hb);
        hash.update(&ct);
        let head = self.prev;
        self.prev = hash.finalize().into();
        self.next_index += 1;
        if h.kind == KIND_TRAILER {
            self.done = true;
            let t = Trailer::decode(&plaintext).ok_or(VerifyError::TrailerMismatch {
                segment,
                reason: "trailer is malformed",
            })?;
            let mismatch = |reason| VerifyError::TrailerMismatch { segment, reason };
            if t.segments != segment {
                return Err(mismatch("segment count differs"));
            }
            if (t.frames, t.events, t.frame_bytes) != (self.frames, self.events, self.frame_bytes) {
                return Err(mismatch("record counts differ"));
            }
            if t.head != head {
                return Err(mismatch("chain head differs"));
            }
            let mut extra = [0u8; 1];
            return match read_full(&mut self.r, &mut extra) {
                Ok(0) => Ok(None),
                Ok(_) => Err(VerifyError::TrailingData { segment }),
                Err(source) => Err(VerifyError::Io {
                    path: PathBuf::new(),
                    source,
                }),
            };
        }
        let records = format::decode_records(&plaintext)
            .map_err(|reason| VerifyError::SegmentMalformed { segment, reason })?;
        for r in &records {
            match r {
                Record::Frame(f) => {
                    self.frames += 1;
                    self.frame_bytes += f.data.len() as u64;
                }
                Record::Event(_) => self.events += 1,
            }
        }
        Ok(Some(records))
    }
}

/// Reads until `buf` is full or the input ends; the number of bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Checks every byte of the recording at `path`: the header, each segment's
/// authentication, the order, the hash chain and the trailer.
pub fn verify(path: &Path, key: &RecordingKey) -> Result<Summary, VerifyError> {
    verify_reader(open(path)?, key).map_err(|e| with_path(e, path))
}

fn verify_reader(mut r: impl Read, key: &RecordingKey) -> Result<Summary, VerifyError> {
    let opened = read_header(&mut r, key)?;
    let meta = opened.meta.clone();
    let mut segs = Segments::new(r, opened);
    let mut head = segs.prev;
    while segs.next()?.is_some() {
        head = segs.prev;
    }
    Ok(Summary {
        meta,
        segments: segs.next_index - 1,
        frames: segs.frames,
        events: segs.events,
        frame_bytes: segs.frame_bytes,
        chain_head: hex::encode(head),
    })
}

/// Plays a recording back: [`Player::open`] verifies the whole file first, then the
/// player yields its records in order, checking each segment again as it reads it (the
/// file could change between the two passes).
pub struct Player {
    segments: Segments<BufReader<File>>,
    queue: VecDeque<Record>,
    path: PathBuf,
    summary: Summary,
}

impl std::fmt::Debug for Player {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Player").field("path", &self.path).finish()
    }
}

impl Player {
    pub fn open(path: &Path, key: &RecordingKey) -> Result<Self, VerifyError> {
        let summary = verify(path, key)?;
        let mut r = open(path)?;
        let opened = read_header(&mut r, key).map_err(|e| with_path(e, path))?;
        Ok(Self {
            segments: Segments::new(r, opened),
            queue: VecDeque::new(),
            path: path.to_owned(),
            summary,
        })
    }

    pub fn summary(&self) -> &Summary {
        &self.summary
    }
}

impl Iterator for Player {
    type Item = Result<Record, VerifyError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(r) = self.queue.pop_front() {
                return Some(Ok(r));
            }
            match self.segments.next() {
                Ok(Some(records)) => self.queue.extend(records),
                Ok(None) => return None,
                Err(e) => {
                    // Stop after the first failure.
                    self.segments.done = true;
                    return Some(Err(with_path(e, &self.path)));
                }
            }
        }
    }
}

/// The record of a viewer event, as the recorder keeps it; `None` for screen frames
/// (written as [`FrameRecord`]s). File contents and system information are not kept:
/// only that they passed.
pub fn event_record(ev: &crate::ViewerEvent, at: std::time::SystemTime) -> Option<EventRecord> {
    use crate::ViewerEvent as E;
    let (kind, detail) = match ev {
        E::Screen { .. } => return None,
        E::PeerJoined { sas } => ("peer_joined", format!("security code {sas}")),
        E::Admitted => ("admitted", String::new()),
        E::Chat(text) => ("chat", text.clone()),
        E::GrantsChanged(p) => ("grants", p.to_string()),
        E::SharingPaused => ("sharing_paused", String::new()),
        E::SharingResumed => ("sharing_resumed", String::new()),
        E::ConsentAnswer {
            granted,
            denied,
            revoked,
        } => (
            "consent",
            format!("granted {granted} denied {denied} revoked {revoked}"),
        ),
        E::SystemInfo { full, .. } => (
            "system_info",
            if *full { "full" } else { "view subset" }.to_owned(),
        ),
        E::TimeWarning { remaining_secs } => ("time_warning", format!("{remaining_secs} s left")),
        E::FileReceived {
            transfer_id,
            name,
            data,
        } => (
            "file_received",
            format!("#{transfer_id} {name:?} {} bytes", data.len()),
        ),
        E::FileCancelled {
            transfer_id,
            reason,
        } => ("file_cancelled", format!("#{transfer_id} {reason}")),
        E::Resumed { relay_id, after_ms } => {
            ("relay_moved", format!("to {relay_id} after {after_ms} ms"))
        }
        E::Ended { reason, detail } => ("ended", format!("{} {detail}", reason.as_str_name())),
    };
    let mut detail = detail;
    if detail.len() > MAX_EVENT_DETAIL {
        let mut cut = MAX_EVENT_DETAIL;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
    }
    Some(EventRecord::new(kind, &detail, at))
}
