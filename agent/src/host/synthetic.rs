//! A synthetic screen source for tests, demos and load: frames of a fixed size with
//! patterned bytes, key frames on a schedule.

use std::time::Duration;

use kakehashi_proto::pb;

/// What the synthetic screen looks like and how fast it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticScreen {
    pub width: u32,
    pub height: u32,
    /// Frames per second (at least 1).
    pub fps: u32,
    /// Payload bytes per frame.
    pub frame_bytes: usize,
    /// A key frame every this many frames (at least 1).
    pub key_interval: u32,
}

impl Default for SyntheticScreen {
    fn default() -> Self {
        Self {
            width: 1280,
            height: 720,
            fps: 15,
            frame_bytes: 20_000,
            key_interval: 30,
        }
    }
}

impl SyntheticScreen {
    pub fn period(&self) -> Duration {
        Duration::from_secs(1) / self.fps.max(1)
    }
}

/// Synthetic frames for an application that drives the screen itself.
pub struct Source {
    screen: SyntheticScreen,
    frame_no: u64,
    rng: u64,
}

impl Source {
    pub fn new(screen: SyntheticScreen) -> Self {
        Self {
            screen,
            frame_no: 0,
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// The frame to send now; a key frame on schedule or when `force_key`.
    pub fn next_frame(&mut self, force_key: bool) -> pb::ScreenFrame {
        let interval = u64::from(self.screen.key_interval.max(1));
        let key_frame = force_key || self.frame_no.is_multiple_of(interval);
        let mut data = Vec::with_capacity(self.screen.frame_bytes);
        while data.len() < self.screen.frame_bytes {
            // xorshift64: cheap bytes that do not compress, like a real encoded frame.
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let take = (self.screen.frame_bytes - data.len()).min(8);
            data.extend_from_slice(&self.rng.to_le_bytes()[..take]);
        }
        pb::ScreenFrame {
            width: self.screen.width,
            height: self.screen.height,
            key_frame,
            data,
            group_key: None,
        }
    }

    /// Counts a frame as sent, moving the key-frame schedule on.
    pub fn advance(&mut self) {
        self.frame_no += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_frames_on_schedule_and_on_demand() {
        let mut s = Source::new(SyntheticScreen {
            key_interval: 3,
            frame_bytes: 13,
            ..Default::default()
        });
        let mut keys = Vec::new();
        for i in 0..7 {
            let f = s.next_frame(i == 4);
            assert_eq!(f.data.len(), 13);
            keys.push(f.key_frame);
            s.advance();
        }
        assert_eq!(keys, [true, false, false, true, true, false, true]);
    }

    #[test]
    fn period_follows_fps() {
        let s = SyntheticScreen {
            fps: 10,
            ..Default::default()
        };
        assert_eq!(s.period(), Duration::from_millis(100));
        let s = SyntheticScreen {
            fps: 0,
            ..Default::default()
        };
        assert_eq!(s.period(), Duration::from_secs(1));
    }
}
