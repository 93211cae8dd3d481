//! Decoded pictures for the operator's side, and the headless viewer's PNG output.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A decoded picture: tightly packed RGB, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// Why a PNG could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PngError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("PNG encoding failed: {0}")]
    Encode(#[from] png::EncodingError),
    #[error("image of {width}x{height} needs {needed} RGB bytes, has {actual}")]
    Size {
        width: u32,
        height: u32,
        needed: usize,
        actual: usize,
    },
}

impl RgbImage {
    /// The picture as PNG bytes.
    pub fn to_png(&self) -> Result<Vec<u8>, PngError> {
        let mut out = Vec::new();
        self.write_png_to(&mut out)?;
        Ok(out)
    }

    /// Writes the picture as a PNG file, replacing it atomically (written beside it, then
    /// renamed) so a script polling the file never reads half a picture.
    pub fn write_png(&self, path: &Path) -> Result<(), PngError> {
        let bytes = self.to_png()?;
        let tmp = path.with_extension("png.tmp");
        let io = |source| PngError::Io {
            path: path.to_owned(),
            source,
        };
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    fn write_png_to<W: Write>(&self, w: W) -> Result<(), PngError> {
        let needed = self.width as usize * self.height as usize * 3;
        if self.data.len() != needed || self.width == 0 || self.height == 0 {
            return Err(PngError::Size {
                width: self.width,
                height: self.height,
                needed,
                actual: self.data.len(),
            });
        }
        let mut enc = png::Encoder::new(w, self.width, self.height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        // Fast compression: the headless viewer may write every frame.
        enc.set_compression(png::Compression::Fast);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&self.data)?;
        writer.finish()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trips() {
        let img = RgbImage {
            width: 3,
            height: 2,
            data: (0..18).collect(),
        };
        let bytes = img.to_png().unwrap();
        let dec = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (3, 2));
        assert_eq!(&buf[..info.buffer_size()], &img.data[..]);
    }

    #[test]
    fn wrong_size_is_an_error() {
        let img = RgbImage {
            width: 3,
            height: 2,
            data: vec![0; 17],
        };
        assert!(matches!(img.to_png(), Err(PngError::Size { .. })));
    }
}
