//! What every session sends, identical on the relayed and the direct path: screen frames
//! (key frames plus deltas) carrying their intended send time, and reliable chat and
//! input alongside.

use std::time::Duration;

use kakehashi_proto::pb;
use prost::Message;

use super::pacer::Tick;

/// Bytes at the start of `ScreenFrame.data` that the load test owns: intended send time
/// (µs since the pacer's epoch, little-endian) and whether the frame is counted.
pub const STAMP_LEN: usize = 9;

/// The traffic of one session.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Traffic {
    pub fps: u32,
    /// `ScreenFrame.data` bytes of a delta frame.
    pub frame_bytes: usize,
    /// `ScreenFrame.data` bytes of a key frame.
    pub key_frame_bytes: usize,
    /// Every this many frames is a key frame (and whenever the relay asks for one).
    pub key_interval: u64,
    /// Chat lines per second, each direction.
    pub chat_per_sec: f64,
    /// Input events per second, operator to customer.
    pub input_per_sec: f64,
}

impl Default for Traffic {
    fn default() -> Self {
        Self {
            fps: 30,
            frame_bytes: 10_000,
            key_frame_bytes: 60_000,
            key_interval: 60,
            chat_per_sec: 1.0,
            input_per_sec: 10.0,
        }
    }
}

impl Traffic {
    pub fn period(&self) -> Duration {
        Duration::from_secs(1) / self.fps.max(1)
    }

    /// The average `ScreenFrame.data` bytes per frame.
    pub fn mean_frame_bytes(&self) -> f64 {
        let k = self.key_interval.max(1) as f64;
        (self.key_frame_bytes as f64 + (k - 1.0) * self.frame_bytes as f64) / k
    }

    pub fn chat_period(&self) -> Option<Duration> {
        rate_period(self.chat_per_sec)
    }

    pub fn input_period(&self) -> Option<Duration> {
        rate_period(self.input_per_sec)
    }
}

fn rate_period(per_sec: f64) -> Option<Duration> {
    (per_sec > 0.0 && per_sec.is_finite()).then(|| Duration::from_secs_f64(1.0 / per_sec))
}

/// Incompressible-looking filler, made once and copied into every frame.
pub fn filler(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Builds the screen frame for `tick`. `key_wanted`: the relay asked for a key frame.
pub fn screen_frame(
    traffic: &Traffic,
    tick: &Tick,
    key_wanted: bool,
    filler: &[u8],
) -> pb::ScreenFrame {
    let key = key_wanted || tick.index.is_multiple_of(traffic.key_interval.max(1));
    let len = if key {
        traffic.key_frame_bytes
    } else {
        traffic.frame_bytes
    }
    .max(STAMP_LEN);
    let mut data = Vec::with_capacity(len);
    data.extend_from_slice(&tick.intended_us.to_le_bytes());
    data.push(u8::from(tick.counted));
    let rest = len - STAMP_LEN;
    data.extend_from_slice(&filler[..rest.min(filler.len())]);
    data.resize(len, 0);
    pb::ScreenFrame {
        width: 1280,
        height: 720,
        key_frame: key,
        data,
        group_key: None,
    }
}

/// The stamp a received frame carries: (intended µs, counted). `None` if the frame is
/// too short to be one of ours.
pub fn stamp(frame: &pb::ScreenFrame) -> Option<(u64, bool)> {
    let head: [u8; 8] = frame.data.get(..8)?.try_into().ok()?;
    let counted = *frame.data.get(8)? != 0;
    Some((u64::from_le_bytes(head), counted))
}

/// Bytes a sealed screen frame occupies on the wire: header, protobuf, AEAD tag.
pub fn wire_len(frame: &pb::ScreenFrame) -> u64 {
    (kakehashi_proto::frame::HEADER_LEN + frame.encoded_len() + kakehashi_agent::crypto::TAG_LEN)
        as u64
}

pub fn input_event(n: u64) -> pb::InputEvent {
    pb::InputEvent {
        kind: Some(pb::input_event::Kind::PointerMove(pb::PointerMove {
            x: (n % 1280) as i32,
            y: (n % 720) as i32,
        })),
    }
}

pub fn chat_line(n: u64) -> String {
    format!("load chat line {n}: 画面が見えますか？")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_their_stamp_and_size() {
        let t = Traffic {
            frame_bytes: 100,
            key_frame_bytes: 1000,
            key_interval: 10,
            ..Traffic::default()
        };
        let fill = filler(2000);
        let tick = Tick {
            intended_us: 123_456,
            index: 3,
            counted: true,
        };
        let f = screen_frame(&t, &tick, false, &fill);
        assert_eq!(f.data.len(), 100);
        assert!(!f.key_frame);
        assert_eq!(stamp(&f), Some((123_456, true)));
        let key = screen_frame(&t, &Tick { index: 10, ..tick }, false, &fill);
        assert!(key.key_frame);
        assert_eq!(key.data.len(), 1000);
        assert!(screen_frame(&t, &tick, true, &fill).key_frame);
        assert_eq!(t.mean_frame_bytes(), 190.0);
        assert_eq!(
            stamp(&pb::ScreenFrame {
                data: vec![1, 2],
                ..Default::default()
            }),
            None
        );
    }
}
