//! Raw frames between a capture source and the encoder, and the pixel arithmetic around
//! them (scaling, change detection, PSNR) as plain functions without I/O.

use std::time::Duration;

use bytes::Bytes;

/// How a [`Frame`]'s bytes are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// 4 bytes per pixel, blue first, the fourth byte ignored (X11's 24-bit ZPixmap on a
    /// little-endian server).
    Bgra,
    /// Planar 4:2:0: a full-size Y plane then quarter-size U and V planes; `stride` is the
    /// Y plane's, the chroma planes use `stride / 2`.
    I420,
}

/// One captured picture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    /// Bytes per row of `data` (for I420, of the Y plane).
    pub stride: u32,
    pub format: PixelFormat,
    pub data: Bytes,
    /// When it was captured, from the source's start.
    pub timestamp: Duration,
    /// False when the source knows the picture equals the previous one; the encoder then
    /// sends nothing for it.
    pub changed: bool,
}

/// A frame whose buffer does not match its stated size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{format:?} frame of {width}x{height} (stride {stride}) needs {needed} bytes, has {actual}"
)]
pub struct FrameSizeError {
    pub format: PixelFormat,
    pub width: u32,
    pub height: u32,
    pub stride: u32,
    pub needed: usize,
    pub actual: usize,
}

impl Frame {
    /// A tightly packed BGRA frame, checked for size.
    pub fn bgra(
        width: u32,
        height: u32,
        data: Vec<u8>,
        timestamp: Duration,
    ) -> Result<Self, FrameSizeError> {
        let frame = Self {
            width,
            height,
            stride: width.saturating_mul(4),
            format: PixelFormat::Bgra,
            data: Bytes::from(data),
            timestamp,
            changed: true,
        };
        frame.check()?;
        Ok(frame)
    }

    /// Bytes the buffer must hold for the stated format, size and stride.
    pub fn needed_len(&self) -> usize {
        let (w, h, s) = (
            self.width as usize,
            self.height as usize,
            self.stride as usize,
        );
        match self.format {
            PixelFormat::Bgra => s * h.saturating_sub(1) + w * 4 * usize::from(h > 0),
            PixelFormat::I420 => s * h + 2 * (s / 2) * h.div_ceil(2),
        }
    }

    /// Checks that the buffer matches the stated size, so indexing cannot go out of range.
    pub fn check(&self) -> Result<(), FrameSizeError> {
        let min_stride = match self.format {
            PixelFormat::Bgra => self.width as usize * 4,
            PixelFormat::I420 => self.width as usize,
        };
        let needed = self.needed_len();
        if (self.stride as usize) < min_stride || self.data.len() < needed {
            return Err(FrameSizeError {
                format: self.format,
                width: self.width,
                height: self.height,
                stride: self.stride,
                needed,
                actual: self.data.len(),
            });
        }
        Ok(())
    }

    /// The picture as tightly packed RGB (3 bytes per pixel), for PNG and comparisons.
    pub fn to_rgb(&self) -> Result<Vec<u8>, FrameSizeError> {
        self.check()?;
        let (w, h, s) = (
            self.width as usize,
            self.height as usize,
            self.stride as usize,
        );
        let mut out = Vec::with_capacity(w * h * 3);
        match self.format {
            PixelFormat::Bgra => {
                for row in self.data.chunks(s).take(h) {
                    for px in row[..w * 4].chunks_exact(4) {
                        out.extend_from_slice(&[px[2], px[1], px[0]]);
                    }
                }
            }
            PixelFormat::I420 => {
                let cs = s / 2;
                let (y, rest) = self.data.split_at(s * h);
                let (u, v) = rest.split_at(cs * h.div_ceil(2));
                for row in 0..h {
                    for col in 0..w {
                        let c = (row / 2) * cs + col / 2;
                        out.extend_from_slice(&yuv_to_rgb(y[row * s + col], u[c], v[c]));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// BT.601 limited range, the matrix OpenH264's own converters use.
fn yuv_to_rgb(y: u8, u: u8, v: u8) -> [u8; 3] {
    let c = (f32::from(y) - 16.0) * (255.0 / 219.0);
    let d = f32::from(u) - 128.0;
    let e = f32::from(v) - 128.0;
    let k = 255.0 / 224.0;
    let r = c + k * 1.402 * e;
    let g = c - k * (1.772 * 0.114 / 0.587) * d - k * (1.402 * 0.299 / 0.587) * e;
    let b = c + k * 1.772 * d;
    [clamp(r), clamp(g), clamp(b)]
}

fn clamp(x: f32) -> u8 {
    x.round().clamp(0.0, 255.0) as u8
}

/// The output size for `scale` (0 < scale ≤ 1), rounded down to even numbers because 4:2:0
/// video needs them; never below 2×2.
pub fn scaled_size(width: u32, height: u32, scale: f32) -> (u32, u32) {
    let scale = if scale.is_finite() && scale > 0.0 {
        scale.min(1.0)
    } else {
        1.0
    };
    let even = |v: u32| ((f64::from(v) * f64::from(scale)) as u32 & !1).max(2);
    (even(width), even(height))
}

/// Resamples tightly packed or strided BGRA to `dst_w`×`dst_h` (tightly packed). Each
/// output pixel averages the source pixels it covers, so text stays legible at 1/2 and
/// 1/3 scale rather than losing whole strokes as nearest-neighbour would.
pub fn scale_bgra(
    src: &[u8],
    src_w: u32,
    src_h: u32,
    src_stride: u32,
    dst_w: u32,
    dst_h: u32,
) -> Vec<u8> {
    let (sw, sh, ss) = (src_w as usize, src_h as usize, src_stride as usize);
    let (dw, dh) = (dst_w as usize, dst_h as usize);
    let mut out = vec![0u8; dw * dh * 4];
    if sw == 0 || sh == 0 || dw == 0 || dh == 0 || src.len() < ss * (sh - 1) + sw * 4 {
        return out;
    }
    if sw >= dw * 2 && sw < dw * 2 + 2 && sh >= dh * 2 && sh < dh * 2 + 2 {
        half_bgra(src, ss, dw, dh, &mut out);
        return out;
    }
    for oy in 0..dh {
        let y0 = oy * sh / dh;
        let y1 = ((oy + 1) * sh / dh).max(y0 + 1).min(sh);
        for ox in 0..dw {
            let x0 = ox * sw / dw;
            let x1 = ((ox + 1) * sw / dw).max(x0 + 1).min(sw);
            let mut acc = [0u32; 3];
            for y in y0..y1 {
                let row = &src[y * ss..];
                for x in x0..x1 {
                    let p = &row[x * 4..x * 4 + 3];
                    acc[0] += u32::from(p[0]);
                    acc[1] += u32::from(p[1]);
                    acc[2] += u32::from(p[2]);
                }
            }
            let n = ((y1 - y0) * (x1 - x0)) as u32;
            let o = (oy * dw + ox) * 4;
            out[o] = (acc[0] / n) as u8;
            out[o + 1] = (acc[1] / n) as u8;
            out[o + 2] = (acc[2] / n) as u8;
            out[o + 3] = 0xff;
        }
    }
    out
}

/// The common case of [`scale_bgra`], 2×2 blocks to one pixel, without the general
/// loop's divisions (a 1080p frame in a few milliseconds rather than ~15).
fn half_bgra(src: &[u8], stride: usize, dw: usize, dh: usize, out: &mut [u8]) {
    for (oy, orow) in out.chunks_exact_mut(dw * 4).take(dh).enumerate() {
        let r0 = &src[2 * oy * stride..][..dw * 8];
        let r1 = &src[(2 * oy + 1) * stride..][..dw * 8];
        for ((o, a), b) in orow
            .chunks_exact_mut(4)
            .zip(r0.chunks_exact(8))
            .zip(r1.chunks_exact(8))
        {
            for c in 0..3 {
                let sum =
                    u16::from(a[c]) + u16::from(a[c + 4]) + u16::from(b[c]) + u16::from(b[c + 4]);
                o[c] = (sum / 4) as u8;
            }
            o[3] = 0xff;
        }
    }
}

/// Copies the top-left `width`×`height` pixels of strided BGRA into a tight buffer.
pub fn pack_bgra(src: &[u8], stride: usize, width: usize, height: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(width * height * 4);
    for row in src.chunks(stride).take(height) {
        out.extend_from_slice(&row[..(width * 4).min(row.len())]);
    }
    out
}

/// Peak signal-to-noise ratio in dB between two equally sized 8-bit pictures (any channel
/// layout, compared byte by byte); infinite when they are identical.
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let n = a.len().min(b.len());
    if n == 0 {
        return 0.0;
    }
    let sse: f64 = a[..n]
        .iter()
        .zip(&b[..n])
        .map(|(&x, &y)| {
            let d = f64::from(x) - f64::from(y);
            d * d
        })
        .sum();
    if sse == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (255.0f64 * 255.0 * n as f64 / sse).log10()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_is_checked() {
        assert!(Frame::bgra(4, 2, vec![0; 32], Duration::ZERO).is_ok());
        let e = Frame::bgra(4, 2, vec![0; 31], Duration::ZERO).unwrap_err();
        assert_eq!((e.needed, e.actual), (32, 31));
    }

    #[test]
    fn bgra_to_rgb_swaps_channels() {
        let f = Frame::bgra(2, 2, [1, 2, 3, 0].repeat(4), Duration::ZERO).unwrap();
        assert_eq!(f.to_rgb().unwrap(), [3, 2, 1].repeat(4));
    }

    #[test]
    fn i420_grey_is_grey() {
        let mut data = vec![126u8; 4 * 4];
        data.extend(vec![128u8; 2 * 2 * 2]);
        let f = Frame {
            width: 4,
            height: 4,
            stride: 4,
            format: PixelFormat::I420,
            data: data.into(),
            timestamp: Duration::ZERO,
            changed: true,
        };
        let rgb = f.to_rgb().unwrap();
        assert!(rgb.iter().all(|&c| c == 128), "{rgb:?}");
    }

    #[test]
    fn scaled_sizes_are_even() {
        assert_eq!(scaled_size(1920, 1080, 1.0), (1920, 1080));
        assert_eq!(scaled_size(1920, 1080, 0.5), (960, 540));
        assert_eq!(scaled_size(1001, 667, 1.0), (1000, 666));
        assert_eq!(scaled_size(1001, 667, f32::NAN), (1000, 666));
        assert_eq!(scaled_size(3, 3, 0.01), (2, 2));
    }

    #[test]
    fn half_scale_averages_blocks() {
        // 4x2: left 2x2 block black, right 2x2 block white.
        let mut src = Vec::new();
        for _ in 0..2 {
            src.extend([0, 0, 0, 255].repeat(2));
            src.extend([255, 255, 255, 255].repeat(2));
        }
        let out = scale_bgra(&src, 4, 2, 16, 2, 1);
        assert_eq!(out, [0, 0, 0, 255, 255, 255, 255, 255]);
        // The general path (a third) averages the same way.
        let mut src = Vec::new();
        for _ in 0..3 {
            src.extend([0, 0, 0, 255].repeat(3));
            src.extend([30, 60, 90, 255].repeat(3));
        }
        let out = scale_bgra(&src, 6, 3, 24, 2, 1);
        assert_eq!(out, [0, 0, 0, 255, 30, 60, 90, 255]);
    }

    #[test]
    fn psnr_of_identical_is_infinite_and_drops_with_noise() {
        let a = vec![100u8; 300];
        assert!(psnr(&a, &a).is_infinite());
        let mut b = a.clone();
        b[0] = 110;
        let one = psnr(&a, &b);
        b[1] = 110;
        assert!(psnr(&a, &b) < one);
    }
}
