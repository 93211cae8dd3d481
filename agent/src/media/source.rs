//! The capture abstraction: one trait for every platform's screen grabber, and the
//! synthetic screen behind the same trait for load tests.

use std::time::Duration;

use super::frame::{Frame, scaled_size};
use crate::host::SyntheticScreen;

/// How often and at what size a source captures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CaptureConfig {
    /// Frames per second the caller intends to pull (at least 1); the encoder's rate
    /// control is set from it.
    pub fps: u32,
    /// Output size relative to the screen, 0 < scale ≤ 1 (1 = native).
    pub scale: f32,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            fps: 15,
            scale: 1.0,
        }
    }
}

impl CaptureConfig {
    /// Time between captures.
    pub fn period(&self) -> Duration {
        Duration::from_secs(1) / self.fps.max(1)
    }
}

/// Why a capture failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot connect to X display {display:?}: {source}")]
    Connect {
        display: String,
        #[source]
        source: x11rb::errors::ConnectError,
    },
    #[error("X connection to {display:?} failed: {source}")]
    Connection {
        display: String,
        #[source]
        source: x11rb::errors::ConnectionError,
    },
    #[error("X request on {display:?} failed: {source}")]
    Request {
        display: String,
        #[source]
        source: x11rb::errors::ReplyError,
    },
    #[error("X display {display:?} has no screen {screen}")]
    NoScreen { display: String, screen: usize },
    #[error(
        "X display {display:?}: unsupported pixel layout (depth {depth}, {bits_per_pixel} bpp, {byte_order})"
    )]
    UnsupportedFormat {
        display: String,
        depth: u8,
        bits_per_pixel: u8,
        byte_order: &'static str,
    },
    #[error(
        "X display {display:?} returned {actual} image bytes for {width}x{height}, expected {expected}"
    )]
    ShortImage {
        display: String,
        width: u16,
        height: u16,
        expected: usize,
        actual: usize,
    },
}

/// A screen that can be captured. Implementations block while capturing (run them on
/// a thread of their own or under `spawn_blocking`); the caller paces them at
/// [`CaptureConfig::fps`].
///
/// Every frame is tightly packed BGRA with even width and height; a frame the source
/// knows to equal the previous one has `changed == false` (and still carries the
/// pixels, so a late key frame can be encoded from it).
pub trait ScreenSource: Send {
    /// Size of the frames [`capture`](Self::capture) returns (after scaling).
    fn size(&self) -> (u32, u32);
    /// The settings this source was opened with.
    fn config(&self) -> CaptureConfig;
    /// Captures the screen now.
    fn capture(&mut self) -> Result<Frame, CaptureError>;
}

/// The synthetic screen of [`crate::host`] as real pixels: an office-like page whose
/// "cursor line" moves each frame, or that stands still, so the encoder and the skip
/// logic can be exercised without a display server.
pub struct SyntheticSource {
    width: u32,
    height: u32,
    config: CaptureConfig,
    moving: bool,
    frame_no: u64,
    page: Vec<u8>,
}

impl SyntheticSource {
    /// A source the size of `screen` (scaled by `config.scale`); `moving` makes every
    /// frame differ from the last.
    pub fn new(screen: SyntheticScreen, config: CaptureConfig, moving: bool) -> Self {
        let (width, height) = scaled_size(screen.width, screen.height, config.scale);
        Self {
            width,
            height,
            config,
            moving,
            frame_no: 0,
            page: office_page(width, height),
        }
    }
}

impl ScreenSource for SyntheticSource {
    fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    fn config(&self) -> CaptureConfig {
        self.config
    }

    fn capture(&mut self) -> Result<Frame, CaptureError> {
        let mut data = self.page.clone();
        let changed = self.moving || self.frame_no == 0;
        if self.moving {
            // A caret-like bar walking down the page: small damage, like typing.
            let (w, h) = (self.width as usize, self.height as usize);
            let row = (self.frame_no as usize * 7) % h.max(1);
            let x0 = (self.frame_no as usize * 13) % w.max(1);
            for y in row..(row + 12).min(h) {
                for x in x0..(x0 + 40).min(w) {
                    data[(y * w + x) * 4..(y * w + x) * 4 + 4].copy_from_slice(&[40, 40, 200, 255]);
                }
            }
        }
        // Virtual time, one period per frame: the encoder's rate control sees the same
        // spacing on every run, however loaded the machine is (tests stay deterministic).
        let timestamp = self.config.period() * u32::try_from(self.frame_no).unwrap_or(u32::MAX);
        self.frame_no += 1;
        let mut frame = Frame::bgra(self.width, self.height, data, timestamp).map_err(|e| {
            CaptureError::ShortImage {
                display: "synthetic".into(),
                width: e.width as u16,
                height: e.height as u16,
                expected: e.needed,
                actual: e.actual,
            }
        })?;
        frame.changed = changed;
        Ok(frame)
    }
}

/// A white page with a title bar, a sidebar and lines of "text" (dark runs of varying
/// length), the kind of picture a support session mostly shows.
pub fn office_page(width: u32, height: u32) -> Vec<u8> {
    let (w, h) = (width as usize, height as usize);
    let mut px = vec![0xffu8; w * h * 4];
    let mut fill = |x0: usize, y0: usize, x1: usize, y1: usize, bgra: [u8; 4]| {
        for y in y0.min(h)..y1.min(h) {
            for x in x0.min(w)..x1.min(w) {
                px[(y * w + x) * 4..(y * w + x) * 4 + 4].copy_from_slice(&bgra);
            }
        }
    };
    fill(0, 0, w, 32, [0x80, 0x50, 0x20, 0xff]);
    fill(0, 32, w / 6, h, [0xee, 0xe8, 0xe4, 0xff]);
    let mut seed: u32 = 0x1234_5678;
    let mut y = 48;
    while y + 10 < h {
        let mut x = w / 6 + 16;
        while x + 8 < w.saturating_sub(16) {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let word = 8 + (seed >> 27) as usize * 3;
            fill(x, y, x + word, y + 9, [0x30, 0x30, 0x30, 0xff]);
            x += word + 6;
            if seed & 0x3f == 0 {
                break;
            }
        }
        y += 18;
    }
    px
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_frames_are_even_bgra_and_flag_changes() {
        let screen = SyntheticScreen {
            width: 101,
            height: 61,
            ..Default::default()
        };
        let mut still = SyntheticSource::new(screen, CaptureConfig::default(), false);
        assert_eq!(still.size(), (100, 60));
        let a = still.capture().unwrap();
        let b = still.capture().unwrap();
        assert!(a.changed && !b.changed);
        assert_eq!(a.data, b.data);
        assert_eq!(a.data.len(), 100 * 60 * 4);

        let mut moving = SyntheticSource::new(screen, CaptureConfig::default(), true);
        let a = moving.capture().unwrap();
        let b = moving.capture().unwrap();
        assert!(a.changed && b.changed);
        assert_ne!(a.data, b.data);
    }

    #[test]
    fn period_follows_fps() {
        let c = CaptureConfig { fps: 0, scale: 1.0 };
        assert_eq!(c.period(), Duration::from_secs(1));
    }
}
