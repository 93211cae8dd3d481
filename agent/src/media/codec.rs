//! H.264 through OpenH264 (Cisco's encoder/decoder, compiled from the bundled source with
//! nasm for its SIMD kernels). Chosen over VP8/libvpx because it needs no system library
//! at run time and its screen-content mode suits desktops; measured in the README.

use std::time::Duration;

use openh264::decoder::Decoder;
use openh264::encoder::{
    BitRate, Complexity, Encoder, EncoderConfig, FrameRate, FrameType, IntraFramePeriod,
    RateControlMode, UsageType,
};
use openh264::formats::{BgraSliceU8, YUVBuffer, YUVSource};
use openh264::{OpenH264API, Timestamp};

use super::frame::{Frame, PixelFormat};
use super::image::RgbImage;
use kakehashi_proto::pb;

/// Why encoding or decoding failed.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("H.264 encoder: {0}")]
    Encode(#[source] openh264::Error),
    #[error("H.264 decoder: {0}")]
    Decode(#[source] openh264::Error),
    #[error("H.264 encoder refused bitrate {bps} bit/s (code {code})")]
    Bitrate { bps: u32, code: i32 },
    #[error("cannot encode a {format:?} frame of {width}x{height}: needs BGRA with even sides")]
    Unsupported {
        format: PixelFormat,
        width: u32,
        height: u32,
    },
    #[error("frame buffer: {0}")]
    Size(#[from] super::frame::FrameSizeError),
}

/// Encoder settings; bitrate can change later with [`H264Encoder::set_bitrate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderSettings {
    /// Target bits per second.
    pub bitrate_bps: u32,
    /// Frames per second the source is paced at.
    pub fps: u32,
    /// A key frame every this many encoded frames; `None` for key frames only on request
    /// (the viewer asks after a loss or a relay move).
    pub key_interval: Option<u32>,
}

impl Default for EncoderSettings {
    fn default() -> Self {
        Self {
            bitrate_bps: 1_500_000,
            fps: 15,
            key_interval: None,
        }
    }
}

/// One encoded picture: an H.264 Annex B access unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedFrame {
    pub width: u32,
    pub height: u32,
    pub key_frame: bool,
    pub data: Vec<u8>,
    pub timestamp: Duration,
}

impl EncodedFrame {
    /// The SCREEN channel payload the host sends.
    pub fn to_screen_frame(&self) -> pb::ScreenFrame {
        pb::ScreenFrame {
            width: self.width,
            height: self.height,
            key_frame: self.key_frame,
            data: self.data.clone(),
            group_key: None,
        }
    }
}

/// An H.264 encoder tuned for screen content with run-time bitrate and key frames.
pub struct H264Encoder {
    settings: EncoderSettings,
    encoder: Encoder,
    /// Size the encoder was initialised for (it initialises on the first frame).
    size: Option<(u32, u32)>,
    yuv: Option<YUVBuffer>,
    key_pending: bool,
}

impl std::fmt::Debug for H264Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H264Encoder")
            .field("settings", &self.settings)
            .field("size", &self.size)
            .finish()
    }
}

fn encoder_config(s: &EncoderSettings) -> EncoderConfig {
    EncoderConfig::new()
        .usage_type(UsageType::ScreenContentRealTime)
        .rate_control_mode(RateControlMode::Bitrate)
        .bitrate(BitRate::from_bps(s.bitrate_bps))
        .max_frame_rate(FrameRate::from_hz(s.fps.max(1) as f32))
        .complexity(Complexity::Low)
        // Both are unsupported in screen-content mode (OpenH264 turns them off and warns).
        .adaptive_quantization(false)
        .background_detection(false)
        // Let rate control drop a frame rather than overshoot: a late frame on a
        // remote desktop is worse than a skipped one.
        .skip_frames(true)
        .intra_frame_period(IntraFramePeriod::from_num_frames(
            s.key_interval.unwrap_or(0),
        ))
}

impl H264Encoder {
    pub fn new(settings: EncoderSettings) -> Result<Self, CodecError> {
        let encoder =
            Encoder::with_api_config(OpenH264API::from_source(), encoder_config(&settings))
                .map_err(CodecError::Encode)?;
        Ok(Self {
            settings,
            encoder,
            size: None,
            yuv: None,
            key_pending: true,
        })
    }

    pub fn settings(&self) -> EncoderSettings {
        self.settings
    }

    /// Makes the next encoded frame a key frame (IDR).
    pub fn force_key_frame(&mut self) {
        self.key_pending = true;
    }

    /// Changes the target bitrate from the next frame on, without a key frame; the
    /// adaptation loop calls this as the relay path reports drops and delay.
    pub fn set_bitrate(&mut self, bps: u32) -> Result<(), CodecError> {
        let bps = bps.max(10_000);
        if self.size.is_some() {
            use openh264_sys2::{
                ENCODER_OPTION_BITRATE, ENCODER_OPTION_MAX_BITRATE, SPATIAL_LAYER_0,
                SPATIAL_LAYER_ALL,
            };
            let raising = bps > self.settings.bitrate_bps;
            // The layer's maximum caps its target (the check fails otherwise), so raise
            // the maximum first and lower it last.
            let set_max = |this: &mut Self| {
                this.set_option(ENCODER_OPTION_MAX_BITRATE, SPATIAL_LAYER_ALL, bps)?;
                this.set_option(ENCODER_OPTION_MAX_BITRATE, SPATIAL_LAYER_0, bps)
            };
            if raising {
                set_max(self)?;
            }
            self.set_option(ENCODER_OPTION_BITRATE, SPATIAL_LAYER_ALL, bps)?;
            if !raising {
                set_max(self)?;
            }
        }
        self.settings.bitrate_bps = bps;
        Ok(())
    }

    fn set_option(
        &mut self,
        option: openh264_sys2::ENCODER_OPTION,
        layer: openh264_sys2::LAYER_NUM,
        bps: u32,
    ) -> Result<(), CodecError> {
        let mut info = openh264_sys2::SBitrateInfo {
            iLayer: layer,
            iBitrate: i32::try_from(bps).unwrap_or(i32::MAX),
        };
        // SAFETY: the encoder is initialised (a frame was encoded), and SetOption with
        // the BITRATE/MAX_BITRATE options reads exactly one SBitrateInfo from the
        // pointer, which lives across the call.
        let code = unsafe {
            self.encoder
                .raw_api()
                .set_option(option, std::ptr::addr_of_mut!(info).cast())
        };
        if code != 0 {
            return Err(CodecError::Bitrate { bps, code });
        }
        Ok(())
    }

    /// Encodes one BGRA frame. Returns `None` when rate control skipped it.
    pub fn encode(&mut self, frame: &Frame) -> Result<Option<EncodedFrame>, CodecError> {
        frame.check()?;
        let (w, h) = (frame.width, frame.height);
        if frame.format != PixelFormat::Bgra || w % 2 == 1 || h % 2 == 1 || w == 0 || h == 0 {
            return Err(CodecError::Unsupported {
                format: frame.format,
                width: w,
                height: h,
            });
        }
        if self.size.is_some_and(|s| s != (w, h)) {
            // OpenH264 would re-initialise with the bitrate it was created with; a new
            // encoder keeps the current one. A key frame follows either way.
            self.encoder = Encoder::with_api_config(
                OpenH264API::from_source(),
                encoder_config(&self.settings),
            )
            .map_err(CodecError::Encode)?;
            self.size = None;
            self.key_pending = true;
        }
        let (wu, hu) = (w as usize, h as usize);
        let yuv = match &mut self.yuv {
            Some(y) if y.dimensions() == (wu, hu) => y,
            slot => slot.insert(YUVBuffer::new(wu, hu)),
        };
        let tight = if frame.stride == w * 4 {
            &frame.data[..wu * hu * 4]
        } else {
            return Err(CodecError::Unsupported {
                format: frame.format,
                width: w,
                height: h,
            });
        };
        yuv.read_bgra8(BgraSliceU8::new(tight, (wu, hu)));
        if self.key_pending && self.size.is_some() {
            self.encoder.force_intra_frame();
        }
        let ts = Timestamp::from_millis(frame.timestamp.as_millis() as u64);
        let out = self
            .encoder
            .encode_at(&*yuv, ts)
            .map_err(CodecError::Encode)?;
        self.size = Some((w, h));
        let frame_type = out.frame_type();
        if matches!(frame_type, FrameType::Skip | FrameType::Invalid) {
            return Ok(None);
        }
        let data = out.to_vec();
        if data.is_empty() {
            return Ok(None);
        }
        let key_frame = matches!(frame_type, FrameType::IDR | FrameType::I);
        if key_frame {
            self.key_pending = false;
        }
        Ok(Some(EncodedFrame {
            width: w,
            height: h,
            key_frame,
            data,
            timestamp: frame.timestamp,
        }))
    }
}

/// Counts of what an [`EncodePipeline`] did with the frames it was given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipelineStats {
    /// Frames encoded and returned.
    pub encoded: u64,
    /// Frames not encoded because the source said nothing changed.
    pub unchanged: u64,
    /// Frames rate control dropped.
    pub rate_skipped: u64,
    pub bytes: u64,
}

/// Capture-to-bitstream glue: skips frames the source marked unchanged unless a key
/// frame is wanted, and counts what it did.
#[derive(Debug)]
pub struct EncodePipeline {
    encoder: H264Encoder,
    stats: PipelineStats,
    key_wanted: bool,
}

impl EncodePipeline {
    pub fn new(settings: EncoderSettings) -> Result<Self, CodecError> {
        Ok(Self {
            encoder: H264Encoder::new(settings)?,
            stats: PipelineStats::default(),
            key_wanted: true,
        })
    }

    pub fn encoder_mut(&mut self) -> &mut H264Encoder {
        &mut self.encoder
    }

    pub fn stats(&self) -> PipelineStats {
        self.stats
    }

    /// The next frame is encoded (even if unchanged) as a key frame.
    pub fn force_key_frame(&mut self) {
        self.key_wanted = true;
        self.encoder.force_key_frame();
    }

    pub fn set_bitrate(&mut self, bps: u32) -> Result<(), CodecError> {
        self.encoder.set_bitrate(bps)
    }

    /// Encodes `frame` if it changed or a key frame is due; `None` when there is nothing
    /// to send.
    pub fn push(&mut self, frame: &Frame) -> Result<Option<EncodedFrame>, CodecError> {
        if !frame.changed && !self.key_wanted {
            self.stats.unchanged += 1;
            return Ok(None);
        }
        match self.encoder.encode(frame)? {
            Some(out) => {
                if out.key_frame {
                    self.key_wanted = false;
                }
                self.stats.encoded += 1;
                self.stats.bytes += out.data.len() as u64;
                Ok(Some(out))
            }
            None => {
                self.stats.rate_skipped += 1;
                Ok(None)
            }
        }
    }
}

/// Decodes the host's H.264 stream into RGB pictures for the viewer.
pub struct H264Decoder {
    decoder: Decoder,
}

impl std::fmt::Debug for H264Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H264Decoder").finish_non_exhaustive()
    }
}

impl H264Decoder {
    pub fn new() -> Result<Self, CodecError> {
        let decoder = Decoder::with_api_config(
            OpenH264API::from_source(),
            openh264::decoder::DecoderConfig::new(),
        )
        .map_err(CodecError::Decode)?;
        Ok(Self { decoder })
    }

    /// Decodes one access unit; `None` when it completes no picture (e.g. the stream
    /// started without a key frame).
    pub fn decode(&mut self, data: &[u8]) -> Result<Option<RgbImage>, CodecError> {
        let Some(yuv) = self.decoder.decode(data).map_err(CodecError::Decode)? else {
            return Ok(None);
        };
        let (w, h) = yuv.dimensions();
        let mut rgb = vec![0u8; w * h * 3];
        yuv.write_rgb8(&mut rgb);
        Ok(Some(RgbImage {
            width: w as u32,
            height: h as u32,
            data: rgb,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::SyntheticScreen;
    use crate::media::frame::psnr;
    use crate::media::source::{CaptureConfig, ScreenSource, SyntheticSource};

    fn source(moving: bool) -> SyntheticSource {
        let screen = SyntheticScreen {
            width: 320,
            height: 240,
            ..Default::default()
        };
        SyntheticSource::new(screen, CaptureConfig::default(), moving)
    }

    #[test]
    fn round_trip_keeps_the_picture() {
        let mut src = source(true);
        let mut enc = H264Encoder::new(EncoderSettings {
            bitrate_bps: 4_000_000,
            ..Default::default()
        })
        .unwrap();
        let mut dec = H264Decoder::new().unwrap();
        let mut last = None;
        for i in 0..5 {
            let frame = src.capture().unwrap();
            let out = enc.encode(&frame).unwrap().expect("frame encoded");
            assert_eq!(out.key_frame, i == 0, "frame {i}");
            let img = dec.decode(&out.data).unwrap().expect("picture decoded");
            last = Some((frame, img));
        }
        let (frame, img) = last.unwrap();
        assert_eq!((img.width, img.height), (320, 240));
        let db = psnr(&frame.to_rgb().unwrap(), &img.data);
        assert!(db > 30.0, "PSNR {db:.1} dB");
    }

    #[test]
    fn key_frame_on_request_and_bitrate_at_run_time() {
        let mut src = source(true);
        let mut enc = H264Encoder::new(EncoderSettings::default()).unwrap();
        assert!(
            enc.encode(&src.capture().unwrap())
                .unwrap()
                .unwrap()
                .key_frame
        );
        assert!(
            !enc.encode(&src.capture().unwrap())
                .unwrap()
                .unwrap()
                .key_frame
        );
        enc.set_bitrate(300_000).unwrap();
        assert_eq!(enc.settings().bitrate_bps, 300_000);
        enc.set_bitrate(3_000_000).unwrap();
        enc.force_key_frame();
        assert!(
            enc.encode(&src.capture().unwrap())
                .unwrap()
                .unwrap()
                .key_frame
        );
        assert!(
            !enc.encode(&src.capture().unwrap())
                .unwrap()
                .unwrap()
                .key_frame
        );
    }

    #[test]
    fn pipeline_skips_unchanged_frames_but_not_a_wanted_key_frame() {
        let mut src = source(false);
        let mut p = EncodePipeline::new(EncoderSettings::default()).unwrap();
        let first = src.capture().unwrap();
        assert!(p.push(&first).unwrap().unwrap().key_frame);
        for _ in 0..3 {
            assert!(p.push(&src.capture().unwrap()).unwrap().is_none());
        }
        p.force_key_frame();
        assert!(p.push(&src.capture().unwrap()).unwrap().unwrap().key_frame);
        let s = p.stats();
        assert_eq!((s.encoded, s.unchanged), (2, 3));
    }

    #[test]
    fn odd_or_wrong_format_frames_are_refused() {
        let mut enc = H264Encoder::new(EncoderSettings::default()).unwrap();
        let f = Frame::bgra(3, 2, vec![0; 24], Duration::ZERO).unwrap();
        assert!(matches!(
            enc.encode(&f),
            Err(CodecError::Unsupported { .. })
        ));
    }

    #[test]
    fn garbage_does_not_decode_to_a_picture() {
        let mut dec = H264Decoder::new().unwrap();
        let r = dec.decode(&[0, 0, 0, 1, 0x65, 1, 2, 3, 4]);
        assert!(!matches!(r, Ok(Some(_))));
    }
}
