//! The headless viewer: decodes the customer's screen and keeps the latest picture as a
//! PNG file, for scripts and tests that have no window.

use std::path::{Path, PathBuf};

use kakehashi_proto::pb;

use crate::media::codec::CodecError;
use crate::media::decoder::ScreenDecoder;
use crate::media::image::{PngError, RgbImage};

/// Why a screen frame did not become a picture on disk.
#[derive(Debug, thiserror::Error)]
pub enum PngOutputError {
    #[error("cannot create the PNG directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("screen frame does not decode: {0}")]
    Decode(#[from] CodecError),
    #[error(transparent)]
    Png(#[from] PngError),
}

/// Decodes SCREEN frames in order and writes each completed picture to `DIR/screen.png`
/// (replaced atomically, so a reader never sees half a picture).
#[derive(Debug)]
pub struct PngOutput {
    decoder: ScreenDecoder,
    path: PathBuf,
    written: u64,
}

impl PngOutput {
    /// Creates `dir` if needed.
    pub fn new(dir: &Path) -> Result<Self, PngOutputError> {
        std::fs::create_dir_all(dir).map_err(|source| PngOutputError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        Ok(Self {
            decoder: ScreenDecoder::new()?,
            path: dir.join("screen.png"),
            written: 0,
        })
    }

    /// Where the latest picture is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pictures written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Decodes one frame; when it completes a picture, writes it and returns it. A
    /// frame that completes nothing (a delta before the first key frame) returns `None`.
    pub fn push(&mut self, frame: &pb::ScreenFrame) -> Result<Option<RgbImage>, PngOutputError> {
        let Some(img) = self.decoder.push(frame)? else {
            return Ok(None);
        };
        img.write_png(&self.path)?;
        self.written += 1;
        Ok(Some(img))
    }
}
