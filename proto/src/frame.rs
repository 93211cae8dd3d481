//! The data-plane frame: a fixed 24-byte header the relay reads, then a payload it
//! forwards without reading (AES-256-GCM ciphertext on every channel but `Signal`).
//!
//! ```text
//!  0       1         2       3          4               8                16               24
//!  +-------+---------+-------+----------+---------------+----------------+----------------+
//!  | ver=1 | channel | flags | reserved | payload len   | sequence       | sender time µs |
//!  +-------+---------+-------+----------+---------------+----------------+----------------+
//!    u8      u8        u8      u8 = 0     u32 BE          u64 BE           u64 BE
//! ```
//!
//! Each QUIC stream carries frames of exactly one channel, in order. Decoding never
//! panics and never allocates more than the channel's payload bound.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 24;

/// Key frame (screen): a viewer that lost frames can start decoding here.
pub const FLAG_KEY_FRAME: u8 = 0b0000_0001;
const KNOWN_FLAGS: u8 = FLAG_KEY_FRAME;

/// Channels, each with its own delivery rules at the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Channel {
    /// Participant <-> relay messages (`pb::Signal`), the only plaintext channel.
    Signal = 0,
    /// Latency-first: stale delta frames may be dropped for a slow viewer.
    Screen = 1,
    /// Operator input; reliable, ordered, only with a control grant.
    Input = 2,
    /// End-to-end control messages (permission requests); reliable, ordered.
    Control = 3,
    /// Chat; reliable, ordered.
    Chat = 4,
    /// Pointer hints drawn on the customer's screen; allowed in view-only sessions.
    Pointer = 5,
    /// File transfer; reliable, only with a file-transfer grant.
    File = 6,
    /// End-to-end cumulative acks of the peer's reliable channels (`pb::Ack`). Never
    /// acked or replayed itself: a later ack supersedes an earlier one.
    Ack = 7,
    /// The host's system information (`pb::SystemInfo`); reliable, only with a
    /// system-info grant.
    SystemInfo = 8,
}

impl Channel {
    pub const ALL: [Channel; 9] = [
        Channel::Signal,
        Channel::Screen,
        Channel::Input,
        Channel::Control,
        Channel::Chat,
        Channel::Pointer,
        Channel::File,
        Channel::Ack,
        Channel::SystemInfo,
    ];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(usize::from(v)).copied()
    }

    /// Largest payload accepted on this channel. Screen key frames are the big ones.
    pub fn max_payload(self) -> u32 {
        match self {
            Channel::Signal => 16 * 1024,
            Channel::Screen => 4 * 1024 * 1024,
            Channel::File => 256 * 1024,
            Channel::Input | Channel::Control | Channel::Chat | Channel::Pointer => 64 * 1024,
            Channel::SystemInfo => 64 * 1024,
            Channel::Ack => 4 * 1024,
        }
    }

    /// Whether the relay must deliver every frame (never dropped for a slow reader).
    pub fn is_reliable(self) -> bool {
        !matches!(self, Channel::Screen)
    }

    /// Whether senders keep this channel's frames until acked and replay them after a
    /// relay move: the channels whose bytes must never be lost or duplicated.
    pub fn is_replayed(self) -> bool {
        matches!(
            self,
            Channel::Input | Channel::Control | Channel::Chat | Channel::File | Channel::SystemInfo
        )
    }

    /// QUIC stream priority for this channel's stream, the same at every sender: input
    /// and control never queue behind a large screen frame, files go last.
    pub fn priority(self) -> i32 {
        match self {
            Channel::Signal | Channel::Input | Channel::Control | Channel::Ack => 3,
            Channel::Chat | Channel::Pointer | Channel::SystemInfo => 2,
            Channel::Screen => 1,
            Channel::File => 0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Channel::Signal => "signal",
            Channel::Screen => "screen",
            Channel::Input => "input",
            Channel::Control => "control",
            Channel::Chat => "chat",
            Channel::Pointer => "pointer",
            Channel::File => "file",
            Channel::Ack => "ack",
            Channel::SystemInfo => "system_info",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub channel: Channel,
    pub flags: u8,
    pub len: u32,
    pub seq: u64,
    pub timestamp_us: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unsupported frame version {0} (this build speaks version {VERSION})")]
    Version(u8),
    #[error("unknown channel {0}")]
    UnknownChannel(u8),
    #[error("unknown flag bits {0:#04x}")]
    UnknownFlags(u8),
    #[error("reserved header byte is {0}, must be 0")]
    Reserved(u8),
    #[error("{channel:?} payload of {len} bytes exceeds the channel's limit of {max}")]
    TooLarge {
        channel: Channel,
        len: u32,
        max: u32,
    },
    #[error("frame on channel {got:?} arrived on a {expected:?} stream")]
    WrongChannel { expected: Channel, got: Channel },
    #[error("stream ended inside a frame")]
    Truncated,
}

impl FrameHeader {
    pub fn new(channel: Channel, flags: u8, seq: u64, timestamp_us: u64, len: u32) -> Self {
        Self {
            channel,
            flags,
            len,
            seq,
            timestamp_us,
        }
    }

    pub fn is_key_frame(&self) -> bool {
        self.flags & FLAG_KEY_FRAME != 0
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = VERSION;
        out[1] = self.channel as u8;
        out[2] = self.flags;
        out[3] = 0;
        out[4..8].copy_from_slice(&self.len.to_be_bytes());
        out[8..16].copy_from_slice(&self.seq.to_be_bytes());
        out[16..24].copy_from_slice(&self.timestamp_us.to_be_bytes());
        out
    }

    /// Parses and validates a header, including the channel's payload bound.
    pub fn decode(buf: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        if buf[0] != VERSION {
            return Err(FrameError::Version(buf[0]));
        }
        let channel = Channel::from_u8(buf[1]).ok_or(FrameError::UnknownChannel(buf[1]))?;
        let flags = buf[2];
        if flags & !KNOWN_FLAGS != 0 {
            return Err(FrameError::UnknownFlags(flags & !KNOWN_FLAGS));
        }
        if buf[3] != 0 {
            return Err(FrameError::Reserved(buf[3]));
        }
        let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let max = channel.max_payload();
        if len > max {
            return Err(FrameError::TooLarge { channel, len, max });
        }
        let seq = u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes"));
        let timestamp_us = u64::from_be_bytes(buf[16..24].try_into().expect("8 bytes"));
        Ok(Self {
            channel,
            flags,
            len,
            seq,
            timestamp_us,
        })
    }
}

/// A whole frame: `raw` holds header and payload contiguously, so the relay forwards it
/// with one write and no re-encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: FrameHeader,
    pub raw: Bytes,
}

impl Frame {
    pub fn new(header: FrameHeader, payload: &[u8]) -> Self {
        debug_assert_eq!(header.len as usize, payload.len());
        let mut raw = BytesMut::with_capacity(HEADER_LEN + payload.len());
        raw.extend_from_slice(&header.encode());
        raw.extend_from_slice(payload);
        Self {
            header,
            raw: raw.freeze(),
        }
    }

    pub fn payload(&self) -> &[u8] {
        &self.raw[HEADER_LEN..]
    }

    /// The header bytes, used as AEAD associated data so nobody can re-label a payload.
    pub fn header_bytes(&self) -> &[u8] {
        &self.raw[..HEADER_LEN]
    }
}

/// I/O-free incremental decoder: feed bytes, take frames. Used by tests and fuzzing; the
/// async shells use [`read_frame`], which shares the header validation.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    expected: Option<Channel>,
}

impl FrameDecoder {
    /// A decoder for a stream that must carry only `channel`.
    pub fn for_channel(channel: Channel) -> Self {
        Self {
            expected: Some(channel),
        }
    }

    /// Takes one frame off the front of `buf`, or `Ok(None)` if more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let head: &[u8; HEADER_LEN] = buf[..HEADER_LEN].try_into().expect("checked length");
        let header = FrameHeader::decode(head)?;
        self.check_channel(header.channel)?;
        let total = HEADER_LEN + header.len as usize;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let raw = buf.split_to(total).freeze();
        Ok(Some(Frame { header, raw }))
    }

    fn check_channel(&mut self, got: Channel) -> Result<(), FrameError> {
        match self.expected {
            Some(expected) if expected != got => Err(FrameError::WrongChannel { expected, got }),
            Some(_) => Ok(()),
            None => {
                self.expected = Some(got);
                Ok(())
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one frame from an async stream. `Ok(None)` is a clean end of stream at a frame
/// boundary; an end inside a frame is [`FrameError::Truncated`].
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    decoder: &mut FrameDecoder,
) -> Result<Option<Frame>, ReadError> {
    let mut head = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        let n = reader.read(&mut head[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated.into())
            };
        }
        filled += n;
    }
    let header = FrameHeader::decode(&head)?;
    decoder.check_channel(header.channel)?;
    let total = HEADER_LEN + header.len as usize;
    // Read into spare capacity rather than zero-filling a buffer that is overwritten at
    // once; `limit` keeps the read inside this frame.
    let mut raw = BytesMut::with_capacity(total);
    raw.extend_from_slice(&head);
    while raw.len() < total {
        let want = total - raw.len();
        if reader.read_buf(&mut (&mut raw).limit(want)).await? == 0 {
            return Err(FrameError::Truncated.into());
        }
    }
    Ok(Some(Frame {
        header,
        raw: raw.freeze(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_header() -> impl Strategy<Value = FrameHeader> {
        (
            0u8..7,
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
            0u32..2048,
        )
            .prop_map(|(ch, key, seq, ts, len)| {
                let channel = Channel::from_u8(ch).expect("in range");
                let flags = if key { FLAG_KEY_FRAME } else { 0 };
                FrameHeader::new(channel, flags, seq, ts, len.min(channel.max_payload()))
            })
    }

    proptest! {
        #[test]
        fn header_roundtrips(h in arb_header()) {
            prop_assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn decoder_never_panics_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut buf = BytesMut::from(&data[..]);
            let mut dec = FrameDecoder::default();
            // Either frames, a need for more bytes, or an error: never a panic.
            while let Ok(Some(_)) = dec.decode(&mut buf) {}
        }

        #[test]
        fn frames_survive_arbitrary_splits(
            headers in proptest::collection::vec(arb_header(), 1..8),
            split in 1usize..64,
        ) {
            let frames: Vec<Frame> = headers
                .iter()
                .map(|h| {
                    let h = FrameHeader { channel: Channel::Chat, ..*h };
                    let h = FrameHeader { len: h.len.min(Channel::Chat.max_payload()), ..h };
                    Frame::new(h, &vec![0xAB; h.len as usize])
                })
                .collect();
            let wire: Vec<u8> = frames.iter().flat_map(|f| f.raw.iter().copied()).collect();
            let mut dec = FrameDecoder::for_channel(Channel::Chat);
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for chunk in wire.chunks(split) {
                buf.extend_from_slice(chunk);
                while let Some(f) = dec.decode(&mut buf).expect("valid frames") {
                    out.push(f);
                }
            }
            prop_assert_eq!(out, frames);
        }
    }

    #[test]
    fn oversized_header_is_refused_before_allocating() {
        let h = FrameHeader::new(Channel::Chat, 0, 1, 1, 0);
        let mut bytes = h.encode();
        bytes[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            FrameHeader::decode(&bytes),
            Err(FrameError::TooLarge {
                channel: Channel::Chat,
                ..
            })
        ));
    }

    #[test]
    fn mixed_channels_on_one_stream_are_refused() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&Frame::new(FrameHeader::new(Channel::Chat, 0, 1, 0, 0), &[]).raw);
        buf.extend_from_slice(&Frame::new(FrameHeader::new(Channel::Input, 0, 1, 0, 0), &[]).raw);
        let mut dec = FrameDecoder::default();
        assert!(dec.decode(&mut buf).expect("first").is_some());
        assert_eq!(
            dec.decode(&mut buf),
            Err(FrameError::WrongChannel {
                expected: Channel::Chat,
                got: Channel::Input
            })
        );
    }

    #[tokio::test]
    async fn read_frame_reports_truncation() {
        let f = Frame::new(FrameHeader::new(Channel::Chat, 0, 1, 0, 4), b"abcd");
        let mut short = &f.raw[..HEADER_LEN + 2];
        let err = read_frame(&mut short, &mut FrameDecoder::default())
            .await
            .expect_err("truncated");
        assert!(matches!(err, ReadError::Frame(FrameError::Truncated)));
        let mut whole = &f.raw[..];
        let got = read_frame(&mut whole, &mut FrameDecoder::default())
            .await
            .expect("ok");
        assert_eq!(got, Some(f));
    }
}
