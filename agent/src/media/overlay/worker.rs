//! The overlay thread: its X connection, the three windows and how they are drawn.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use x11rb::connection::{Connection, RequestConnection};
use x11rb::errors::{ConnectionError, ReplyError, ReplyOrIdError};
use x11rb::protocol::Event;
use x11rb::protocol::shape::{self, ConnectionExt as _};
use x11rb::protocol::xproto::{
    AtomEnum, ChangeGCAux, ChangeWindowAttributesAux, ClipOrdering, ConfigureWindowAux,
    ConnectionExt as _, CreateGCAux, CreateWindowAux, EventMask, Font, Gcontext, ImageFormat,
    Pixmap, PropMode, Rectangle, StackMode, Window, WindowClass,
};
use x11rb::rust_connection::RustConnection;
use x11rb::wrapper::ConnectionExt as _;

use super::{
    INDICATOR_NAME_PREFIX, IndicatorState, KEYS_BG_RGB, KEYS_FG_RGB, KEYS_NAME_PREFIX, MARKER_RGB,
    MARKER_SIZE, OUTLINE_RGB, OverlayError, OverlayOptions, POINTER_NAME, Pending, Shared,
    TEXT_RGB, TICK,
};

/// One overlay window and the pixmap that is its picture.
struct Layer {
    window: Window,
    pixmap: Option<Pixmap>,
    shown: bool,
}

/// The `fixed` font and its cell size.
struct FontCell {
    font: Font,
    width: u16,
    ascent: u16,
    descent: u16,
}

/// The overlay thread's side: the X connection and what is on the screen.
pub(super) struct Worker {
    pub(super) display: String,
    conn: RustConnection,
    root: Window,
    depth: u8,
    screen_w: u16,
    screen_h: u16,
    gc: Gcontext,
    font: Option<FontCell>,
    marker: Layer,
    keys: Layer,
    indicator: Layer,
    scale: f32,
    pointer_timeout: Duration,
    keys_shown_for: Duration,
    pointer_until: Option<Instant>,
    keys_until: Option<Instant>,
    state: IndicatorState,
}

impl Worker {
    pub(super) fn open(
        display: Option<&str>,
        options: OverlayOptions,
    ) -> Result<Self, OverlayError> {
        let name = display
            .map(str::to_owned)
            .or_else(|| std::env::var("DISPLAY").ok())
            .unwrap_or_default();
        let (conn, screen_num) =
            x11rb::connect(display).map_err(|source| OverlayError::Connect {
                display: name.clone(),
                source,
            })?;
        let req = |source: ReplyOrIdError| OverlayError::Request {
            display: name.clone(),
            source,
        };
        let setup = conn.setup();
        let (screen, format) =
            crate::media::ScreenFormat::screen(setup, screen_num).ok_or_else(|| {
                OverlayError::NoScreen {
                    display: name.clone(),
                    screen: screen_num,
                }
            })?;
        let depth = screen.root_depth;
        // The marker is a BGRX image and colours are 0xRRGGBB pixels: TrueColor at 24
        // or 32 bits, little-endian, as X11Source needs too.
        if !format.is_bgrx() {
            return Err(OverlayError::UnsupportedFormat {
                display: name,
                depth,
                bits_per_pixel: format.bits_per_pixel,
                byte_order: format.byte_order(),
            });
        }
        let shape_ok = conn
            .extension_information(shape::X11_EXTENSION_NAME)
            .map_err(|e| req(e.into()))?
            .is_some();
        if !shape_ok {
            return Err(OverlayError::NoShape { display: name });
        }
        let v = conn
            .shape_query_version()
            .map_err(|e| req(e.into()))?
            .reply()
            .map_err(|e| req(e.into()))?;
        // Input shapes came with SHAPE 1.1.
        if (v.major_version, v.minor_version) < (1, 1) {
            return Err(OverlayError::NoShape { display: name });
        }
        let font = open_font(&conn);
        let gc = conn.generate_id().map_err(req)?;
        let mut gc_aux = CreateGCAux::new().graphics_exposures(0);
        if let Some(f) = &font {
            gc_aux = gc_aux.font(f.font);
        }
        conn.create_gc(gc, screen.root, &gc_aux)
            .map_err(|e| req(e.into()))?;
        let make = |title: &str| -> Result<Layer, ReplyOrIdError> {
            let window = conn.generate_id()?;
            conn.create_window(
                depth,
                window,
                screen.root,
                0,
                0,
                1,
                1,
                0,
                WindowClass::INPUT_OUTPUT,
                screen.root_visual,
                &CreateWindowAux::new()
                    .override_redirect(1)
                    .background_pixel(0),
            )?;
            // An empty input region: pointer events go to whatever is beneath.
            conn.shape_rectangles(
                shape::SO::SET,
                shape::SK::INPUT,
                ClipOrdering::UNSORTED,
                window,
                0,
                0,
                &[],
            )?;
            set_name(&conn, window, title)?;
            conn.change_property8(
                PropMode::REPLACE,
                window,
                AtomEnum::WM_CLASS,
                AtomEnum::STRING,
                b"kakehashi-overlay\0Kakehashi\0",
            )?;
            Ok(Layer {
                window,
                pixmap: None,
                shown: false,
            })
        };
        let marker = make(POINTER_NAME).map_err(req)?;
        let keys = make(KEYS_NAME_PREFIX.trim_end()).map_err(req)?;
        let indicator = make(INDICATOR_NAME_PREFIX.trim_end()).map_err(req)?;
        let mut worker = Self {
            display: name.clone(),
            conn,
            root: screen.root,
            depth,
            screen_w: screen.width_in_pixels,
            screen_h: screen.height_in_pixels,
            gc,
            font,
            marker,
            keys,
            indicator,
            scale: if options.capture_scale.is_finite() && options.capture_scale > 0.0 {
                options.capture_scale
            } else {
                1.0
            },
            pointer_timeout: options.pointer_timeout,
            keys_shown_for: options.keys_shown_for,
            pointer_until: None,
            keys_until: None,
            state: IndicatorState::default(),
        };
        worker.draw_marker().map_err(req)?;
        // New and restacked windows are announced, so the overlay can stay on top.
        worker
            .conn
            .change_window_attributes(
                worker.root,
                &ChangeWindowAttributesAux::new().event_mask(EventMask::SUBSTRUCTURE_NOTIFY),
            )
            .map_err(|e| req(e.into()))?;
        worker
            .conn
            .get_input_focus()
            .map_err(|e| req(e.into()))?
            .reply()
            .map_err(|e| req(e.into()))?;
        Ok(worker)
    }

    pub(super) fn run(mut self, shared: &Shared, woken: &mpsc::Receiver<()>) {
        loop {
            let disconnected = matches!(
                woken.recv_timeout(TICK),
                Err(RecvTimeoutError::Disconnected)
            );
            let pending = std::mem::take(&mut *shared.pending());
            if pending.stop || disconnected {
                break;
            }
            let syncs = pending.syncs.clone();
            if let Err(e) = self.step(pending) {
                tracing::warn!(display = %self.display, error = %e, "overlay stopped: X connection failed");
                // Dropping `syncs` (and the queued ones with `shared`) answers waiters
                // with "stopped".
                return;
            }
            for s in syncs {
                let _ = s.try_send(());
            }
        }
        self.destroy();
    }

    /// Applies what was asked, expires what is old, and follows the server's events.
    fn step(&mut self, pending: Pending) -> Result<(), ReplyOrIdError> {
        let now = Instant::now();
        if let Some((x, y, visible)) = pending.pointer {
            if visible {
                self.move_marker(x, y)?;
                self.pointer_until = Some(now + self.pointer_timeout);
            } else {
                self.hide(Which::Marker)?;
            }
        }
        if let Some((keys, note)) = pending.keys {
            if keys.is_empty() && note.is_empty() {
                self.hide(Which::Keys)?;
            } else {
                self.show_keys(&keys, &note)?;
                self.keys_until = Some(now + self.keys_shown_for);
            }
        }
        if let Some(state) = pending.state {
            if state.watching == 0 {
                // Nobody sees the screen (paused, VIEW revoked, the operator gone): the
                // operator's marks point at a picture they no longer have.
                self.hide(Which::Marker)?;
                self.hide(Which::Keys)?;
            }
            if state != self.state {
                self.state = state;
                self.draw_indicator()?;
            }
        }
        if self.pointer_until.is_some_and(|t| now >= t) {
            self.hide(Which::Marker)?;
        }
        if self.keys_until.is_some_and(|t| now >= t) {
            self.hide(Which::Keys)?;
        }
        self.follow_events()?;
        if !pending.syncs.is_empty() {
            // A round trip: the server has handled every request sent before it, and
            // every event it sent before it is read, so a window mapped before the
            // caller's sync is seen and the overlay raised above it.
            self.conn.get_input_focus()?.reply().map_err(reply_err)?;
            if self.follow_events()? {
                self.conn.get_input_focus()?.reply().map_err(reply_err)?;
            }
        } else {
            self.conn.flush()?;
        }
        Ok(())
    }

    /// Reads the server's events; when another window was mapped or restacked, puts
    /// the overlay back on top. Returns whether it did.
    fn follow_events(&mut self) -> Result<bool, ReplyOrIdError> {
        let mut raise = false;
        while let Some(ev) = self.conn.poll_for_event()? {
            match ev {
                Event::MapNotify(e) if !self.is_ours(e.window) => raise = true,
                Event::ConfigureNotify(e) if !self.is_ours(e.window) => raise = true,
                Event::Error(e) => {
                    tracing::debug!(display = %self.display, error = ?e, "overlay request failed");
                }
                _ => {}
            }
        }
        if raise {
            self.raise_all()?;
        }
        Ok(raise)
    }

    fn is_ours(&self, w: Window) -> bool {
        [self.marker.window, self.keys.window, self.indicator.window].contains(&w)
    }

    fn layer(&mut self, which: Which) -> &mut Layer {
        match which {
            Which::Marker => &mut self.marker,
            Which::Keys => &mut self.keys,
            Which::Indicator => &mut self.indicator,
        }
    }

    fn hide(&mut self, which: Which) -> Result<(), ReplyOrIdError> {
        match which {
            Which::Marker => self.pointer_until = None,
            Which::Keys => self.keys_until = None,
            Which::Indicator => {}
        }
        let layer = self.layer(which);
        if layer.shown {
            layer.shown = false;
            let w = layer.window;
            self.conn.unmap_window(w)?;
        }
        Ok(())
    }

    /// Maps the layer if needed and puts the overlay windows on top, marker topmost.
    fn show(&mut self, which: Which) -> Result<(), ReplyOrIdError> {
        let layer = self.layer(which);
        if !layer.shown {
            layer.shown = true;
            let w = layer.window;
            self.conn.map_window(w)?;
        }
        self.raise_all()
    }

    fn raise_all(&self) -> Result<(), ReplyOrIdError> {
        for l in [&self.indicator, &self.keys, &self.marker] {
            if l.shown {
                self.conn.configure_window(
                    l.window,
                    &ConfigureWindowAux::new().stack_mode(StackMode::ABOVE),
                )?;
            }
        }
        Ok(())
    }

    fn move_marker(&mut self, x: i32, y: i32) -> Result<(), ReplyOrIdError> {
        let half = i32::from(MARKER_SIZE / 2);
        let (sx, sy) = (
            (x as f32 / self.scale).round() as i32,
            (y as f32 / self.scale).round() as i32,
        );
        // Clamped to the screen, so a hint outside it still shows at the edge.
        let cx = sx.clamp(0, i32::from(self.screen_w.max(1)) - 1);
        let cy = sy.clamp(0, i32::from(self.screen_h.max(1)) - 1);
        self.conn.configure_window(
            self.marker.window,
            &ConfigureWindowAux::new()
                .x(cx - half)
                .y(cy - half)
                .stack_mode(StackMode::ABOVE),
        )?;
        self.show(Which::Marker)
    }

    /// Gives the marker window its picture and its ring-shaped outline.
    fn draw_marker(&mut self) -> Result<(), ReplyOrIdError> {
        let s = MARKER_SIZE;
        let w = self.marker.window;
        self.conn.configure_window(
            w,
            &ConfigureWindowAux::new()
                .width(u32::from(s))
                .height(u32::from(s)),
        )?;
        let pixmap = self.conn.generate_id()?;
        self.conn.create_pixmap(self.depth, pixmap, w, s, s)?;
        self.conn.put_image(
            ImageFormat::Z_PIXMAP,
            pixmap,
            self.gc,
            s,
            s,
            0,
            0,
            0,
            self.depth,
            &marker_bgrx(),
        )?;
        self.conn.change_window_attributes(
            w,
            &ChangeWindowAttributesAux::new().background_pixmap(pixmap),
        )?;
        self.conn.shape_rectangles(
            shape::SO::SET,
            shape::SK::BOUNDING,
            ClipOrdering::UNSORTED,
            w,
            0,
            0,
            &marker_rects(),
        )?;
        self.marker.pixmap = Some(pixmap);
        Ok(())
    }

    fn show_keys(&mut self, keys: &[String], note: &str) -> Result<(), ReplyOrIdError> {
        let joined = keys.join(" + ");
        let mut lines = Vec::new();
        if !joined.is_empty() {
            lines.push((format!("Press: {joined}"), KEYS_FG_RGB));
        }
        if !note.is_empty() {
            lines.push((note.to_owned(), TEXT_RGB));
        }
        let title = format!(
            "{KEYS_NAME_PREFIX}{}",
            if joined.is_empty() { note } else { &joined }
        );
        let (w, h) = self.box_size(&lines, 14, 8);
        let x = (i32::from(self.screen_w) - i32::from(w)) / 2;
        let y = (i32::from(self.screen_h) - i32::from(h) - 48).max(0);
        self.draw_box(
            Which::Keys,
            (x, y, w, h),
            KEYS_BG_RGB,
            &lines,
            (14, 8),
            &title,
        )?;
        self.show(Which::Keys)
    }

    fn draw_indicator(&mut self) -> Result<(), ReplyOrIdError> {
        let Some(label) = self.state.label() else {
            return self.hide(Which::Indicator);
        };
        let lines = [(label.clone(), TEXT_RGB)];
        let (w, h) = self.box_size(&lines, 12, 4);
        let x = (i32::from(self.screen_w) - i32::from(w)) / 2;
        let colour = self.state.colour();
        self.draw_box(
            Which::Indicator,
            (x, 0, w, h),
            colour,
            &lines,
            (12, 4),
            &label,
        )?;
        self.show(Which::Indicator)
    }

    /// The size of a box holding `lines`, clamped to the screen.
    fn box_size(&self, lines: &[(String, u32)], pad_x: u16, pad_y: u16) -> (u16, u16) {
        let (cw, ch) = self.cell();
        let longest = lines
            .iter()
            .map(|(t, _)| t.chars().count())
            .max()
            .unwrap_or(0);
        let w = (longest as u32 * u32::from(cw) + 1 + 2 * u32::from(pad_x))
            .min(u32::from(self.screen_w.max(1)));
        let h = (lines.len() as u32 * (u32::from(ch) + 4) + 2 * u32::from(pad_y))
            .min(u32::from(self.screen_h.max(1)));
        (w.max(1) as u16, h.max(1) as u16)
    }

    fn cell(&self) -> (u16, u16) {
        self.font
            .as_ref()
            .map_or((6, 13), |f| (f.width.max(1), f.ascent + f.descent))
    }

    /// Paints a box of text into a fresh pixmap and makes it the layer's picture at
    /// `at` (x, y, width, height), named `title`.
    fn draw_box(
        &mut self,
        which: Which,
        at: (i32, i32, u16, u16),
        bg: u32,
        lines: &[(String, u32)],
        pad: (u16, u16),
        title: &str,
    ) -> Result<(), ReplyOrIdError> {
        let (x, y, w, h) = at;
        let window = self.layer(which).window;
        let pixmap = self.conn.generate_id()?;
        self.conn.create_pixmap(self.depth, pixmap, window, w, h)?;
        self.conn
            .change_gc(self.gc, &ChangeGCAux::new().foreground(bg))?;
        self.conn.poly_fill_rectangle(
            pixmap,
            self.gc,
            &[Rectangle {
                x: 0,
                y: 0,
                width: w,
                height: h,
            }],
        )?;
        if let Some(font) = &self.font {
            let cw = u32::from(font.width.max(1));
            let max_chars = (u32::from(w).saturating_sub(2 * u32::from(pad.0) + 1) / cw) as usize;
            let line_h = i16::try_from(font.ascent + font.descent + 4).unwrap_or(i16::MAX);
            for (i, (text, fg)) in lines.iter().enumerate() {
                self.conn
                    .change_gc(self.gc, &ChangeGCAux::new().foreground(*fg))?;
                let bytes = latin1(text, max_chars);
                let ty = pad.1 as i16 + 2 + font.ascent as i16 + line_h * i as i16;
                // Drawn twice, a pixel apart: a bold face without a bold font.
                for dx in [0, 1] {
                    self.conn.poly_text8(
                        pixmap,
                        self.gc,
                        pad.0 as i16 + dx,
                        ty,
                        &text_items(&bytes),
                    )?;
                }
            }
        }
        self.conn.change_window_attributes(
            window,
            &ChangeWindowAttributesAux::new().background_pixmap(pixmap),
        )?;
        self.conn.configure_window(
            window,
            &ConfigureWindowAux::new()
                .x(x)
                .y(y)
                .width(u32::from(w))
                .height(u32::from(h)),
        )?;
        // A mapped window repaints its new background only when cleared.
        self.conn.clear_area(false, window, 0, 0, 0, 0)?;
        set_name(&self.conn, window, title)?;
        let layer = self.layer(which);
        if let Some(old) = layer.pixmap.replace(pixmap) {
            self.conn.free_pixmap(old)?;
        }
        Ok(())
    }

    /// Removes the windows; best effort, the server also does it when we disconnect.
    fn destroy(&mut self) {
        for l in [&self.marker, &self.keys, &self.indicator] {
            let _ = self.conn.destroy_window(l.window);
            if let Some(p) = l.pixmap {
                let _ = self.conn.free_pixmap(p);
            }
        }
        if let Some(f) = &self.font {
            let _ = self.conn.close_font(f.font);
        }
        let _ = self.conn.free_gc(self.gc);
        // A round trip, so the windows are gone when Overlay's drop returns.
        if let Ok(c) = self.conn.get_input_focus() {
            let _ = c.reply();
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Which {
    Marker,
    Keys,
    Indicator,
}

fn reply_err(e: ReplyError) -> ReplyOrIdError {
    match e {
        ReplyError::ConnectionError(c) => ReplyOrIdError::ConnectionError(c),
        ReplyError::X11Error(x) => ReplyOrIdError::X11Error(x),
    }
}

fn set_name(conn: &RustConnection, window: Window, name: &str) -> Result<(), ConnectionError> {
    conn.change_property8(
        PropMode::REPLACE,
        window,
        AtomEnum::WM_NAME,
        AtomEnum::STRING,
        &latin1(name, usize::MAX),
    )?;
    Ok(())
}

/// Opens the server's `fixed` font; `None` (logged) when even that is missing.
fn open_font(conn: &RustConnection) -> Option<FontCell> {
    let attempt = || -> Result<FontCell, ReplyOrIdError> {
        let font = conn.generate_id()?;
        conn.open_font(font, b"fixed")?.check()?;
        let q = conn.query_font(font)?.reply()?;
        Ok(FontCell {
            font,
            width: u16::try_from(q.max_bounds.character_width).unwrap_or(6),
            ascent: u16::try_from(q.font_ascent).unwrap_or(10),
            descent: u16::try_from(q.font_descent).unwrap_or(3),
        })
    };
    match attempt() {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(error = %e, "the X server has no `fixed` font; overlay boxes show no text");
            None
        }
    }
}

/// `text` as the Latin-1 bytes core fonts and STRING properties use, at most `max`
/// characters; anything else (control characters, non-Latin-1) becomes `?`.
fn latin1(text: &str, max: usize) -> Vec<u8> {
    text.chars()
        .take(max)
        .map(|c| match u32::from(c) {
            0x20..=0x7e | 0xa0..=0xff => u32::from(c) as u8,
            _ => b'?',
        })
        .collect()
}

/// PolyText8 items: runs of at most 254 characters, each with no extra spacing.
fn text_items(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 254 * 2 + 2);
    for chunk in bytes.chunks(254) {
        out.push(chunk.len() as u8);
        out.push(0);
        out.extend_from_slice(chunk);
    }
    out
}

/// The marker's colour at pixel (x, y) of its square, `None` where it is transparent:
/// an orange ring with a dark outline, and a dark dot on the hinted point.
fn marker_pixel(x: u16, y: u16) -> Option<[u8; 3]> {
    let c = f32::from(MARKER_SIZE) / 2.0;
    let (dx, dy) = (f32::from(x) + 0.5 - c, f32::from(y) + 0.5 - c);
    let d = (dx * dx + dy * dy).sqrt();
    match d {
        d if d <= 2.0 => Some(OUTLINE_RGB),
        d if (6.5..7.5).contains(&d) || (12.5..=13.5).contains(&d) => Some(OUTLINE_RGB),
        d if (7.5..12.5).contains(&d) => Some(MARKER_RGB),
        _ => None,
    }
}

/// The marker as BGRX rows for PutImage.
fn marker_bgrx() -> Vec<u8> {
    let s = MARKER_SIZE;
    let mut out = Vec::with_capacity(usize::from(s) * usize::from(s) * 4);
    for y in 0..s {
        for x in 0..s {
            let [r, g, b] = marker_pixel(x, y).unwrap_or([0, 0, 0]);
            out.extend_from_slice(&[b, g, r, 0]);
        }
    }
    out
}

/// The marker's visible pixels as one rectangle per horizontal run (its window shape).
fn marker_rects() -> Vec<Rectangle> {
    let s = MARKER_SIZE;
    let mut out = Vec::new();
    for y in 0..s {
        let mut x = 0;
        while x < s {
            if marker_pixel(x, y).is_none() {
                x += 1;
                continue;
            }
            let start = x;
            while x < s && marker_pixel(x, y).is_some() {
                x += 1;
            }
            out.push(Rectangle {
                x: start as i16,
                y: y as i16,
                width: x - start,
                height: 1,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::MARKER_RING_RADIUS;
    use super::*;

    #[test]
    fn marker_is_a_ring_around_the_point() {
        let c = MARKER_SIZE / 2;
        let r = MARKER_RING_RADIUS as u16;
        for (x, y) in [(c + r, c), (c - r - 1, c), (c, c + r), (c, c - r - 1)] {
            assert_eq!(marker_pixel(x, y), Some(MARKER_RGB), "({x}, {y})");
        }
        // The hinted point itself is marked; between dot and ring is see-through.
        assert_eq!(marker_pixel(c, c), Some(OUTLINE_RGB));
        assert_eq!(marker_pixel(c + 4, c), None);
        assert_eq!(marker_pixel(0, 0), None);
        // The shape covers exactly the drawn pixels.
        let covered: usize = marker_rects().iter().map(|r| usize::from(r.width)).sum();
        let drawn = (0..MARKER_SIZE)
            .flat_map(|y| (0..MARKER_SIZE).map(move |x| (x, y)))
            .filter(|&(x, y)| marker_pixel(x, y).is_some())
            .count();
        assert_eq!(covered, drawn);
        assert_eq!(marker_bgrx().len(), usize::from(MARKER_SIZE).pow(2) * 4);
    }

    #[test]
    fn text_is_latin1_and_chunked() {
        assert_eq!(latin1("Ctrl+é 日", 10), b"Ctrl+\xe9 ?");
        assert_eq!(latin1("abc", 2), b"ab");
        let long = vec![b'a'; 300];
        let items = text_items(&long);
        assert_eq!(items.len(), 304);
        assert_eq!((items[0], items[1]), (254, 0));
        assert_eq!((items[256], items[257]), (46, 0));
    }
}
