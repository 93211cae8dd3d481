//! Evidence snapshots: the [`SnapshotSource`] the monitor pulls a picture from every
//! interval, a synthetic one for tests and demos, and (feature `media`) the X11
//! screen, scaled down to fit 1920x1080 and PNG-encoded.

use kakehashi_proto::pb;

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[cfg(feature = "media")]
    #[error("screen capture: {0}")]
    Capture(#[from] crate::media::CaptureError),
    #[cfg(feature = "media")]
    #[error("PNG encoding: {0}")]
    Png(#[from] crate::media::image::PngError),
    #[error("the picture is {len} bytes as PNG even at {width}x{height}; the most is {max}")]
    TooLarge {
        width: u32,
        height: u32,
        len: usize,
        max: usize,
    },
    /// The source has no picture to give (sources outside this crate, tests).
    #[error("no snapshot: {0}")]
    Unavailable(String),
    #[error("captured frame of {width}x{height} needs {needed} bytes, has {actual}")]
    BadFrame {
        width: u32,
        height: u32,
        needed: usize,
        actual: usize,
    },
}

/// Something that can picture the screen. Implementations block (the monitor calls
/// them on a blocking thread) and return a PNG within the sink's limits
/// ([`kakehashi_proto::monitor::MAX_SNAPSHOT_WIDTH`] x `_HEIGHT`, `MAX_SNAPSHOT_BYTES`).
pub trait SnapshotSource: Send {
    fn capture(&mut self) -> Result<pb::Snapshot, SnapshotError>;
}

/// The size that fits `width`x`height` within `max_w`x`max_h` keeping the aspect
/// ratio (never larger than the input, never below 1x1).
pub fn fit_within(width: u32, height: u32, max_w: u32, max_h: u32) -> (u32, u32) {
    if width <= max_w && height <= max_h {
        return (width.max(1), height.max(1));
    }
    let (w, h) = (u64::from(width.max(1)), u64::from(height.max(1)));
    let (mw, mh) = (u64::from(max_w.max(1)), u64::from(max_h.max(1)));
    // Scale by the tighter of the two limits, rounding down so both fit.
    let (out_w, out_h) = if w * mh >= h * mw {
        (mw, h * mw / w)
    } else {
        (w * mh / h, mh)
    };
    (
        u32::try_from(out_w).unwrap_or(max_w).max(1),
        u32::try_from(out_h).unwrap_or(max_h).max(1),
    )
}

#[cfg(feature = "media")]
pub use media_sources::{SyntheticSnapshots, X11Snapshots};

#[cfg(feature = "media")]
mod media_sources {
    use kakehashi_proto::monitor::{
        MAX_SNAPSHOT_BYTES, MAX_SNAPSHOT_HEIGHT, MAX_SNAPSHOT_WIDTH, SNAPSHOT_FORMAT_PNG,
    };
    use kakehashi_proto::pb;

    use super::{SnapshotError, SnapshotSource, fit_within};
    use crate::media::frame::scale_bgra;
    use crate::media::image::RgbImage;
    use crate::media::{CaptureConfig, Frame, PixelFormat, ScreenSource, X11Source};

    /// How many times a picture is halved before a PNG over the byte limit is given up.
    const MAX_HALVINGS: u32 = 4;

    /// A generated picture, a different one each capture (a moving block and a
    /// changing tint over a gradient), for tests and `--screen synthetic`.
    #[derive(Debug, Clone)]
    pub struct SyntheticSnapshots {
        width: u32,
        height: u32,
        taken: u64,
    }

    impl SyntheticSnapshots {
        /// Pictures of `width`x`height`, fitted within 1920x1080.
        pub fn new(width: u32, height: u32) -> Self {
            let (width, height) =
                fit_within(width, height, MAX_SNAPSHOT_WIDTH, MAX_SNAPSHOT_HEIGHT);
            Self {
                width,
                height,
                taken: 0,
            }
        }
    }

    impl SnapshotSource for SyntheticSnapshots {
        fn capture(&mut self) -> Result<pb::Snapshot, SnapshotError> {
            let n = self.taken;
            self.taken += 1;
            let (w, h) = (self.width as usize, self.height as usize);
            let tint = (n.wrapping_mul(37) % 256) as u8;
            let mut data = Vec::with_capacity(w * h * 3);
            let (bx, by) = ((n as usize * 7) % w, (n as usize * 5) % h);
            for y in 0..h {
                for x in 0..w {
                    let in_block = x >= bx && x < bx + w / 8 + 1 && y >= by && y < by + h / 8 + 1;
                    if in_block {
                        data.extend_from_slice(&[200, 30, 30]);
                    } else {
                        data.extend_from_slice(&[
                            (x * 255 / w.max(1)) as u8,
                            (y * 255 / h.max(1)) as u8,
                            tint,
                        ]);
                    }
                }
            }
            let png = RgbImage {
                width: self.width,
                height: self.height,
                data,
            }
            .to_png()?;
            if png.len() > MAX_SNAPSHOT_BYTES {
                return Err(SnapshotError::TooLarge {
                    width: self.width,
                    height: self.height,
                    len: png.len(),
                    max: MAX_SNAPSHOT_BYTES,
                });
            }
            Ok(pb::Snapshot {
                width: self.width,
                height: self.height,
                format: SNAPSHOT_FORMAT_PNG.into(),
                data: png,
            })
        }
    }

    /// The X11 screen (`--screen x11`), through the host's capture ([`X11Source`]):
    /// scaled to fit 1920x1080, keeping the aspect ratio. The connection is opened on
    /// the first capture and again after a failure, so a display that comes and goes
    /// (a login screen, a restarted X server) costs snapshots, not the monitor.
    pub struct X11Snapshots {
        display: Option<String>,
        source: Option<X11Source>,
    }

    impl std::fmt::Debug for X11Snapshots {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("X11Snapshots")
                .field("display", &self.display)
                .field("source", &self.source)
                .finish()
        }
    }

    impl X11Snapshots {
        /// Captures `display` (`None`: `$DISPLAY`). Nothing is opened yet.
        pub fn new(display: Option<String>) -> Self {
            Self {
                display,
                source: None,
            }
        }

        /// Opens the display now (to report a wrong `--display` at start).
        pub fn open(display: Option<String>) -> Result<Self, SnapshotError> {
            let mut me = Self::new(display);
            me.source = Some(me.connect()?);
            Ok(me)
        }

        fn connect(&self) -> Result<X11Source, SnapshotError> {
            let config = CaptureConfig { fps: 1, scale: 1.0 };
            let source = X11Source::open(self.display.as_deref(), config)?;
            let (w, h) = source.size();
            if w <= MAX_SNAPSHOT_WIDTH && h <= MAX_SNAPSHOT_HEIGHT {
                return Ok(source);
            }
            // The capture scales on the grab (averaging, so text stays legible); the
            // limits are checked again on each picture.
            let scale =
                (MAX_SNAPSHOT_WIDTH as f32 / w as f32).min(MAX_SNAPSHOT_HEIGHT as f32 / h as f32);
            drop(source);
            let config = CaptureConfig { fps: 1, scale };
            Ok(X11Source::open(self.display.as_deref(), config)?)
        }

        fn picture(&mut self) -> Result<Frame, SnapshotError> {
            let source = match self.source.as_mut() {
                Some(s) => s,
                None => self.source.insert(self.connect()?),
            };
            match source.capture() {
                Ok(frame) => Ok(frame),
                Err(e) => {
                    self.source = None;
                    Err(e.into())
                }
            }
        }
    }

    impl SnapshotSource for X11Snapshots {
        fn capture(&mut self) -> Result<pb::Snapshot, SnapshotError> {
            let frame = self.picture()?;
            encode_fitted(&frame)
        }
    }

    /// `frame` as a PNG within the sink's limits: scaled to fit 1920x1080, then halved
    /// while the PNG is over the byte limit (a noisy 1080p screen can be).
    pub(super) fn encode_fitted(frame: &Frame) -> Result<pb::Snapshot, SnapshotError> {
        let size_error = |e: crate::media::frame::FrameSizeError| SnapshotError::BadFrame {
            width: e.width,
            height: e.height,
            needed: e.needed,
            actual: e.actual,
        };
        frame.check().map_err(size_error)?;
        // The scaler reads BGRA; X11 frames are that already.
        let converted;
        let (src, stride): (&[u8], u32) = match frame.format {
            PixelFormat::Bgra => (&frame.data, frame.stride),
            PixelFormat::I420 => {
                let rgb = frame.to_rgb().map_err(size_error)?;
                converted = rgb
                    .chunks_exact(3)
                    .flat_map(|p| [p[2], p[1], p[0], 0xff])
                    .collect::<Vec<u8>>();
                (&converted, frame.width * 4)
            }
        };
        let (mut w, mut h) = fit_within(
            frame.width,
            frame.height,
            MAX_SNAPSHOT_WIDTH,
            MAX_SNAPSHOT_HEIGHT,
        );
        let mut last = 0;
        for _ in 0..=MAX_HALVINGS {
            let scaled;
            let pixels: &[u8] = if (w, h) == (frame.width, frame.height) && stride == w * 4 {
                src
            } else {
                scaled = scale_bgra(src, frame.width, frame.height, stride, w, h);
                &scaled
            };
            let data = pixels
                .chunks_exact(4)
                .flat_map(|p| [p[2], p[1], p[0]])
                .collect();
            let png = RgbImage {
                width: w,
                height: h,
                data,
            }
            .to_png()?;
            if png.len() <= MAX_SNAPSHOT_BYTES {
                return Ok(pb::Snapshot {
                    width: w,
                    height: h,
                    format: SNAPSHOT_FORMAT_PNG.into(),
                    data: png,
                });
            }
            last = png.len();
            (w, h) = ((w / 2).max(1), (h / 2).max(1));
        }
        Err(SnapshotError::TooLarge {
            width: w,
            height: h,
            len: last,
            max: MAX_SNAPSHOT_BYTES,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fitting_keeps_the_aspect_ratio_within_the_limits() {
        assert_eq!(fit_within(3840, 2160, 1920, 1080), (1920, 1080));
        assert_eq!(fit_within(2560, 1600, 1920, 1080), (1728, 1080));
        assert_eq!(fit_within(3000, 1000, 1920, 1080), (1920, 640));
        assert_eq!(fit_within(1280, 720, 1920, 1080), (1280, 720));
        assert_eq!(fit_within(0, 0, 1920, 1080), (1, 1));
    }

    #[cfg(feature = "media")]
    #[test]
    fn synthetic_snapshots_are_pngs_that_differ() {
        let mut s = SyntheticSnapshots::new(4000, 2000);
        let a = s.capture().expect("capture");
        let b = s.capture().expect("capture");
        assert_eq!((a.width, a.height), (1920, 960));
        assert_eq!(a.format, "png");
        assert!(a.data.starts_with(b"\x89PNG"));
        assert_ne!(a.data, b.data);
    }

    #[cfg(feature = "media")]
    #[test]
    fn an_x11_screen_larger_than_1080p_is_fitted_within_it() {
        use crate::media::xvfb::Xvfb;
        let Some(x) = Xvfb::start_or_skip(2560, 1440).expect("Xvfb") else {
            return;
        };
        let mut source = X11Snapshots::open(Some(x.display().to_owned())).expect("open");
        let s = source.capture().expect("capture");
        assert_eq!((s.width, s.height), (1920, 1080));
        let mut reader = png::Decoder::new(std::io::Cursor::new(&s.data))
            .read_info()
            .expect("a PNG");
        let mut buf = vec![0; reader.output_buffer_size().expect("size")];
        let info = reader.next_frame(&mut buf).expect("decodes");
        assert_eq!((info.width, info.height), (1920, 1080));
        drop(x);
        // The display is gone: the capture fails, and the monitor carries on.
        assert!(source.capture().is_err());
    }

    #[cfg(feature = "media")]
    #[test]
    fn a_large_frame_is_fitted_and_a_noisy_one_halved_under_the_byte_limit() {
        use crate::media::Frame;
        // 2560x1440 of noise: over 4 MiB as PNG at 1920x1080, so it is halved.
        let (w, h) = (2560u32, 1440u32);
        let mut data = vec![0u8; (w * h * 4) as usize];
        let mut seed: u32 = 1;
        for b in data.iter_mut() {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *b = (seed >> 24) as u8;
        }
        let frame = Frame::bgra(w, h, data, std::time::Duration::ZERO).expect("frame");
        let s = media_sources::encode_fitted(&frame).expect("encoded");
        assert!(s.width <= 1920 && s.height <= 1080);
        assert_eq!(s.width * 9, s.height * 16);
        assert!(s.data.len() <= kakehashi_proto::monitor::MAX_SNAPSHOT_BYTES);
        assert!(s.width < 1920, "noise at 1920x1080 is over the limit");
    }
}
