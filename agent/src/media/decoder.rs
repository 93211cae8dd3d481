//! The viewer's end of the SCREEN channel: H.264 access units in, in order, pictures
//! out. One type for every way the operator sees the screen (the headless viewer's PNG,
//! the viewer window), so they decode and count the same way.

use kakehashi_proto::pb;

use super::codec::{CodecError, H264Decoder};
use super::image::RgbImage;

/// Decodes SCREEN frames in the order the host sent them. Every frame must reach it:
/// a delta depends on the pictures before it, so callers drop decoded pictures when
/// they fall behind, never encoded frames.
#[derive(Debug)]
pub struct ScreenDecoder {
    decoder: H264Decoder,
    pictures: u64,
    errors: u64,
    size: Option<(u32, u32)>,
}

impl ScreenDecoder {
    pub fn new() -> Result<Self, CodecError> {
        Ok(Self {
            decoder: H264Decoder::new()?,
            pictures: 0,
            errors: 0,
            size: None,
        })
    }

    /// Decodes one frame; `None` when it completes no picture (a delta before the
    /// first key frame).
    pub fn push(&mut self, frame: &pb::ScreenFrame) -> Result<Option<RgbImage>, CodecError> {
        match self.decoder.decode(&frame.data) {
            Ok(Some(img)) => {
                self.pictures += 1;
                self.size = Some((img.width, img.height));
                Ok(Some(img))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.errors += 1;
                Err(e)
            }
        }
    }

    /// Pictures decoded so far.
    pub fn pictures(&self) -> u64 {
        self.pictures
    }

    /// Frames that failed to decode so far.
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// The size of the latest picture: the customer's screen as streamed.
    pub fn size(&self) -> Option<(u32, u32)> {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::SyntheticScreen;
    use crate::media::codec::{EncoderSettings, H264Encoder};
    use crate::media::source::{CaptureConfig, ScreenSource, SyntheticSource};

    #[test]
    fn decodes_in_order_and_counts_errors() {
        let screen = SyntheticScreen {
            width: 160,
            height: 120,
            ..Default::default()
        };
        let mut src = SyntheticSource::new(screen, CaptureConfig::default(), true);
        let mut enc = H264Encoder::new(EncoderSettings::default()).unwrap();
        let mut dec = ScreenDecoder::new().unwrap();
        for _ in 0..3 {
            let out = enc.encode(&src.capture().unwrap()).unwrap().unwrap();
            assert!(dec.push(&out.to_screen_frame()).unwrap().is_some());
        }
        assert_eq!((dec.pictures(), dec.size()), (3, Some((160, 120))));
        let garbage = pb::ScreenFrame {
            width: 160,
            height: 120,
            key_frame: true,
            data: vec![0, 0, 0, 1, 0x65, 1, 2, 3],
            group_key: None,
        };
        if dec.push(&garbage).is_err() {
            assert_eq!(dec.errors(), 1);
        }
    }
}
