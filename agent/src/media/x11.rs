//! Linux/X11 screen capture over x11rb's pure-Rust connection. MIT-SHM (1.2, the server
//! hands us the segment as a file descriptor) avoids copying 8 MB per 1080p frame
//! through the socket; plain `GetImage` is the fallback. XDamage tells us whether
//! anything was drawn since the last capture, so a still screen costs no capture at all;
//! a byte comparison with the previous frame catches redraws of identical pixels.

use std::os::fd::AsRawFd;
use std::time::Instant;

use bytes::Bytes;
use x11rb::connection::{Connection, RequestConnection};
use x11rb::protocol::Event;
use x11rb::protocol::damage::{self, ConnectionExt as _};
use x11rb::protocol::shm::{self, ConnectionExt as _};
use x11rb::protocol::xproto::{ConnectionExt as _, ImageFormat, ImageOrder, Window};
use x11rb::rust_connection::RustConnection;

use super::frame::{Frame, pack_bgra, scale_bgra, scaled_size};
use super::source::{CaptureConfig, CaptureError, ScreenSource};

/// Captures the root window of an X screen.
/// A screen's pixel layout, as the server's setup describes it. Capture, the overlay and
/// the viewer window all need TrueColor at 24 or 32 bits in 32-bit little-endian pixels
/// (BGRX in memory); anything else (palettes, 16-bit, big-endian servers) would need
/// converters none of them has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScreenFormat {
    pub depth: u8,
    pub bits_per_pixel: u8,
    pub lsb_first: bool,
}

impl ScreenFormat {
    /// Screen `n` of the server and its pixel layout; `None` when there is no such
    /// screen.
    pub fn screen(
        setup: &x11rb::protocol::xproto::Setup,
        n: usize,
    ) -> Option<(x11rb::protocol::xproto::Screen, Self)> {
        let screen = setup.roots.get(n)?.clone();
        let format = Self::of(setup, screen.root_depth);
        Some((screen, format))
    }

    pub fn of(setup: &x11rb::protocol::xproto::Setup, depth: u8) -> Self {
        let bits_per_pixel = setup
            .pixmap_formats
            .iter()
            .find(|f| f.depth == depth)
            .map_or(0, |f| f.bits_per_pixel);
        Self {
            depth,
            bits_per_pixel,
            lsb_first: setup.image_byte_order == ImageOrder::LSB_FIRST,
        }
    }

    /// 32-bit little-endian TrueColor: BGRX in memory.
    pub fn is_bgrx(&self) -> bool {
        (self.depth == 24 || self.depth == 32) && self.bits_per_pixel == 32 && self.lsb_first
    }

    pub fn byte_order(&self) -> &'static str {
        if self.lsb_first {
            "LSB first"
        } else {
            "MSB first"
        }
    }
}

pub struct X11Source {
    display: String,
    conn: RustConnection,
    root: Window,
    screen_w: u16,
    screen_h: u16,
    out_w: u32,
    out_h: u32,
    config: CaptureConfig,
    shm: Option<ShmSegment>,
    damage: Option<damage::Damage>,
    /// Damage seen since the last capture (or no damage tracking: always capture).
    dirty: bool,
    previous: Option<Bytes>,
    started: Instant,
    captures: u64,
}

impl std::fmt::Debug for X11Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X11Source")
            .field("display", &self.display)
            .field("screen", &(self.screen_w, self.screen_h))
            .field("out", &(self.out_w, self.out_h))
            .field("shm", &self.shm.is_some())
            .field("damage", &self.damage.is_some())
            .finish()
    }
}

impl X11Source {
    /// Opens `display` (`None`: `$DISPLAY`) and prepares to capture its default screen.
    pub fn open(display: Option<&str>, config: CaptureConfig) -> Result<Self, CaptureError> {
        let name = display
            .map(str::to_owned)
            .or_else(|| std::env::var("DISPLAY").ok())
            .unwrap_or_default();
        let (conn, screen_num) =
            x11rb::connect(display).map_err(|source| CaptureError::Connect {
                display: name.clone(),
                source,
            })?;
        let setup = conn.setup();
        let (screen, format) =
            ScreenFormat::screen(setup, screen_num).ok_or_else(|| CaptureError::NoScreen {
                display: name.clone(),
                screen: screen_num,
            })?;
        let depth = screen.root_depth;
        // 24/32-bit TrueColor in little-endian order is BGRA in memory; anything else
        // (8-bit palettes, 16-bit, big-endian servers) would need a converter we lack.
        if !format.is_bgrx() {
            return Err(CaptureError::UnsupportedFormat {
                display: name,
                depth,
                bits_per_pixel: format.bits_per_pixel,
                byte_order: format.byte_order(),
            });
        }
        let (root, screen_w, screen_h) =
            (screen.root, screen.width_in_pixels, screen.height_in_pixels);
        let (out_w, out_h) = scaled_size(u32::from(screen_w), u32::from(screen_h), config.scale);
        let mut source = Self {
            display: name,
            conn,
            root,
            screen_w,
            screen_h,
            out_w,
            out_h,
            config,
            shm: None,
            damage: None,
            dirty: true,
            previous: None,
            started: Instant::now(),
            captures: 0,
        };
        let size = usize::from(screen_w) * usize::from(screen_h) * 4;
        source.shm = match ShmSegment::create(&source.conn, size) {
            Ok(seg) => seg,
            Err(e) => {
                tracing::debug!(display = %source.display, error = %e, "MIT-SHM unavailable; plain GetImage");
                None
            }
        };
        source.damage = match source.start_damage() {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(display = %source.display, error = %e, "XDamage unavailable; diffing frames");
                None
            }
        };
        Ok(source)
    }

    /// Captures with plain `GetImage` from now on (for servers whose shared memory
    /// misbehaves, and to test the fallback).
    pub fn without_shm(mut self) -> Self {
        if let Some(seg) = self.shm.take() {
            let _ = self.conn.shm_detach(seg.id);
        }
        self
    }

    /// Detects a still screen by comparing pixels only, capturing every time.
    pub fn without_damage(mut self) -> Self {
        if let Some(d) = self.damage.take() {
            let _ = self.conn.damage_destroy(d);
        }
        self.dirty = true;
        self
    }

    /// Whether captures go through shared memory.
    pub fn uses_shm(&self) -> bool {
        self.shm.is_some()
    }

    /// Whether a still screen is detected by XDamage (else by comparing pixels).
    pub fn uses_damage(&self) -> bool {
        self.damage.is_some()
    }

    /// Captures actually taken from the server (a still screen under XDamage takes none).
    pub fn captures(&self) -> u64 {
        self.captures
    }

    fn start_damage(&self) -> Result<Option<damage::Damage>, Box<dyn std::error::Error>> {
        if self
            .conn
            .extension_information(damage::X11_EXTENSION_NAME)?
            .is_none()
        {
            return Ok(None);
        }
        self.conn.damage_query_version(1, 1)?.reply()?;
        let id = self.conn.generate_id()?;
        self.conn
            .damage_create(id, self.root, damage::ReportLevel::NON_EMPTY)?
            .check()?;
        Ok(Some(id))
    }

    fn conn_err(&self, source: x11rb::errors::ConnectionError) -> CaptureError {
        CaptureError::Connection {
            display: self.display.clone(),
            source,
        }
    }

    fn req_err(&self, source: x11rb::errors::ReplyError) -> CaptureError {
        CaptureError::Request {
            display: self.display.clone(),
            source,
        }
    }

    /// Reads pending events; any damage notification marks the screen dirty.
    fn drain_events(&mut self) -> Result<(), CaptureError> {
        while let Some(ev) = self.conn.poll_for_event().map_err(|e| self.conn_err(e))? {
            if let Event::DamageNotify(_) = ev {
                self.dirty = true;
            }
        }
        Ok(())
    }

    fn grab(&mut self) -> Result<Vec<u8>, CaptureError> {
        let (w, h) = (self.screen_w, self.screen_h);
        let expected = usize::from(w) * usize::from(h) * 4;
        if let Some(seg) = &self.shm {
            let reply = self
                .conn
                .shm_get_image(
                    self.root,
                    0,
                    0,
                    w,
                    h,
                    !0,
                    ImageFormat::Z_PIXMAP.into(),
                    seg.id,
                    0,
                )
                .map_err(|e| self.conn_err(e))?
                .reply();
            match reply {
                Ok(reply) => {
                    let actual = reply.size as usize;
                    if actual < expected {
                        return Err(self.short(expected, actual));
                    }
                    return Ok(seg.bytes()[..expected].to_vec());
                }
                // The server refused the segment (e.g. a changed security policy):
                // fall back to GetImage for good rather than fail every frame.
                Err(x11rb::errors::ReplyError::X11Error(e)) => {
                    tracing::warn!(display = %self.display, error = ?e, "MIT-SHM capture refused; using GetImage");
                    if let Some(seg) = self.shm.take() {
                        let _ = self.conn.shm_detach(seg.id);
                    }
                }
                Err(e) => return Err(self.req_err(e)),
            }
        }
        let reply = self
            .conn
            .get_image(ImageFormat::Z_PIXMAP, self.root, 0, 0, w, h, !0)
            .map_err(|e| self.conn_err(e))?
            .reply()
            .map_err(|e| self.req_err(e))?;
        if reply.data.len() < expected {
            return Err(self.short(expected, reply.data.len()));
        }
        let mut data = reply.data;
        data.truncate(expected);
        Ok(data)
    }

    fn short(&self, expected: usize, actual: usize) -> CaptureError {
        CaptureError::ShortImage {
            display: self.display.clone(),
            width: self.screen_w,
            height: self.screen_h,
            expected,
            actual,
        }
    }
}

impl ScreenSource for X11Source {
    fn size(&self) -> (u32, u32) {
        (self.out_w, self.out_h)
    }

    fn config(&self) -> CaptureConfig {
        self.config
    }

    fn capture(&mut self) -> Result<Frame, CaptureError> {
        let timestamp = self.started.elapsed();
        if let Some(damage) = self.damage {
            // A round trip first: every damage event for drawing the server finished
            // before now is then in our queue, so "unchanged" is never stale.
            self.conn
                .get_input_focus()
                .map_err(|e| self.conn_err(e))?
                .reply()
                .map_err(|e| self.req_err(e))?;
            self.drain_events()?;
            if !self.dirty
                && let Some(previous) = &self.previous
            {
                return Ok(self.frame(previous.clone(), timestamp, false));
            }
            // Empty the damage region before grabbing, so drawing that races with the
            // grab raises a new notification instead of being lost.
            self.conn
                .damage_subtract(damage, x11rb::NONE, x11rb::NONE)
                .map_err(|e| self.conn_err(e))?;
            self.dirty = false;
        }
        let raw = self.grab()?;
        self.captures += 1;
        let (sw, sh) = (u32::from(self.screen_w), u32::from(self.screen_h));
        let data = if (self.out_w, self.out_h) == (sw, sh) {
            raw
        } else if self.config.scale >= 1.0 || !self.config.scale.is_finite() {
            // Native size with an odd dimension: crop the last column or row.
            pack_bgra(
                &raw,
                sw as usize * 4,
                self.out_w as usize,
                self.out_h as usize,
            )
        } else {
            scale_bgra(&raw, sw, sh, sw * 4, self.out_w, self.out_h)
        };
        let data = Bytes::from(data);
        let changed = !self
            .previous
            .as_ref()
            .is_some_and(|p| same_colours(p, &data));
        self.previous = Some(data.clone());
        Ok(self.frame(data, timestamp, changed))
    }
}

impl X11Source {
    fn frame(&self, data: Bytes, timestamp: std::time::Duration, changed: bool) -> Frame {
        Frame {
            width: self.out_w,
            height: self.out_h,
            stride: self.out_w * 4,
            format: super::PixelFormat::Bgra,
            data,
            timestamp,
            changed,
        }
    }
}

impl Drop for X11Source {
    fn drop(&mut self) {
        // Best effort: the server frees both when the connection closes anyway.
        if let Some(seg) = &self.shm {
            let _ = self.conn.shm_detach(seg.id);
        }
        if let Some(d) = self.damage {
            let _ = self.conn.damage_destroy(d);
        }
        let _ = self.conn.flush();
    }
}

/// Whether two BGRA buffers show the same picture. The fourth byte is X's padding,
/// which drawing may set to anything, so it is masked out: comparing it would report
/// invisible changes and send frames for them.
fn same_colours(a: &[u8], b: &[u8]) -> bool {
    const MASK: u64 = 0x00ff_ffff_00ff_ffff;
    if a.len() != b.len() {
        return false;
    }
    let (ha, ta) = a.split_at(a.len() / 8 * 8);
    let (hb, tb) = b.split_at(b.len() / 8 * 8);
    let word = |c: &[u8]| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
    ha.chunks_exact(8)
        .zip(hb.chunks_exact(8))
        .all(|(x, y)| (word(x) ^ word(y)) & MASK == 0)
        && ta
            .chunks(4)
            .zip(tb.chunks(4))
            .all(|(x, y)| x[..x.len().min(3)] == y[..y.len().min(3)])
}

/// A server-allocated shared-memory segment mapped read-only into this process.
struct ShmSegment {
    id: shm::Seg,
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone and only read through `bytes`.
unsafe impl Send for ShmSegment {}

impl ShmSegment {
    /// Ok(None) when the server lacks MIT-SHM 1.2 (fd passing), e.g. over TCP.
    fn create(
        conn: &RustConnection,
        len: usize,
    ) -> Result<Option<Self>, Box<dyn std::error::Error>> {
        if conn
            .extension_information(shm::X11_EXTENSION_NAME)?
            .is_none()
        {
            return Ok(None);
        }
        let version = conn.shm_query_version()?.reply()?;
        if (version.major_version, version.minor_version) < (1, 2) {
            return Ok(None);
        }
        let size = u32::try_from(len)?;
        let id = conn.generate_id()?;
        // Not read-only: the flag is about the server's access, and it writes the image.
        let reply = conn.shm_create_segment(id, size, false)?.reply()?;
        // SAFETY: mapping a fresh fd the server gave us for exactly `len` bytes;
        // MAP_FAILED is checked below and the mapping is unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                reply.shm_fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            let _ = conn.shm_detach(id);
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(Some(Self { id, ptr, len }))
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes for the life of `self`. The server
        // writes them only while a ShmGetImage is in progress, and we read only after
        // its reply, on the same thread that sent it.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for ShmSegment {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `create`.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::same_colours;

    #[test]
    fn padding_byte_is_not_a_change() {
        let a = [1, 2, 3, 0xff].repeat(5);
        let mut b = [1, 2, 3, 0].repeat(5);
        assert!(same_colours(&a, &b));
        b[18] = 9; // a colour byte of the last (odd) pixel
        assert!(!same_colours(&a, &b));
        b[18] = 3;
        b[1] = 0;
        assert!(!same_colours(&a, &b));
        assert!(!same_colours(&a, &a[..16]));
    }
}
