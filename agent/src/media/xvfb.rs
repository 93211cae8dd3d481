//! A private Xvfb server for tests, benchmarks and demos: started on a display number
//! it picks itself (`-displayfd`), never a fixed one, and killed when dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long Xvfb may take to report its display number.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Why Xvfb did not start.
#[derive(Debug, thiserror::Error)]
pub enum XvfbError {
    #[error("Xvfb is not installed (Debian package xvfb): {0}")]
    NotFound(#[source] std::io::Error),
    #[error("cannot start Xvfb: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("Xvfb exited before reporting a display number")]
    Exited,
    #[error("Xvfb reported no display number within {0:?}")]
    Timeout(Duration),
    #[error("Xvfb reported {0:?} instead of a display number")]
    BadDisplay(String),
}

/// A running Xvfb; dropping it kills the server.
#[derive(Debug)]
pub struct Xvfb {
    child: Child,
    display: String,
}

impl Xvfb {
    /// Starts `Xvfb -screen 0 {width}x{height}x24 -nolisten tcp` on a free display.
    pub fn start(width: u32, height: u32) -> Result<Self, XvfbError> {
        let mut child = Command::new("Xvfb")
            .args([
                "-displayfd",
                "1",
                "-nolisten",
                "tcp",
                "-noreset",
                "-screen",
                "0",
            ])
            .arg(format!("{width}x{height}x24"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    XvfbError::NotFound(e)
                } else {
                    XvfbError::Spawn(e)
                }
            })?;
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(XvfbError::Exited);
        };
        let (tx, rx) = mpsc::channel();
        // The reader thread ends when Xvfb writes its number or its stdout closes.
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(read.map(|_| line));
        });
        let mut server = Self {
            child,
            display: String::new(),
        };
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(line)) if !line.is_empty() => line,
            Ok(_) => return Err(XvfbError::Exited),
            Err(mpsc::RecvTimeoutError::Timeout) => return Err(XvfbError::Timeout(START_TIMEOUT)),
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(XvfbError::Exited),
        };
        let n: u32 = line
            .trim()
            .parse()
            .map_err(|_| XvfbError::BadDisplay(line.trim().to_owned()))?;
        server.display = format!(":{n}");
        Ok(server)
    }

    /// The display name to connect to, e.g. `:5`.
    pub fn display(&self) -> &str {
        &self.display
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Why a [`Scene`] could not draw.
#[derive(Debug, thiserror::Error)]
pub enum SceneError {
    #[error("cannot connect to X display: {0}")]
    Connect(#[from] x11rb::errors::ConnectError),
    #[error("X drawing failed: {0}")]
    X(#[from] x11rb::errors::ReplyOrIdError),
    #[error("X display has no screen {0}")]
    NoScreen(usize),
}

impl From<x11rb::errors::ConnectionError> for SceneError {
    fn from(e: x11rb::errors::ConnectionError) -> Self {
        Self::X(e.into())
    }
}

impl From<x11rb::errors::ReplyError> for SceneError {
    fn from(e: x11rb::errors::ReplyError) -> Self {
        Self::X(e.into())
    }
}

/// Desktop-like content on a display, for benchmarks and demos: a full-screen window
/// showing [`office_page`](super::source::office_page), which can be "typed into"
/// (a few glyph-sized marks per step at a moving caret) or scrolled (the page moves up,
/// new lines appear at the bottom).
pub struct Scene {
    conn: x11rb::rust_connection::RustConnection,
    window: u32,
    text_gc: u32,
    paper_gc: u32,
    width: u16,
    height: u16,
    caret: (i16, i16),
    seed: u32,
}

impl std::fmt::Debug for Scene {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scene")
            .field("size", &(self.width, self.height))
            .finish_non_exhaustive()
    }
}

impl Scene {
    /// Opens `display` and shows the page full-screen; returns once it is on screen.
    pub fn open(display: &str) -> Result<Self, SceneError> {
        use x11rb::connection::Connection;
        use x11rb::protocol::Event;
        use x11rb::protocol::xproto::{
            ConnectionExt as _, CreateGCAux, CreateWindowAux, EventMask, ImageFormat, WindowClass,
        };
        let (conn, screen_num) = x11rb::connect(Some(display))?;
        let screen = conn
            .setup()
            .roots
            .get(screen_num)
            .ok_or(SceneError::NoScreen(screen_num))?
            .clone();
        let (width, height, depth) = (
            screen.width_in_pixels,
            screen.height_in_pixels,
            screen.root_depth,
        );
        let window = conn.generate_id()?;
        conn.create_window(
            depth,
            window,
            screen.root,
            0,
            0,
            width,
            height,
            0,
            WindowClass::INPUT_OUTPUT,
            screen.root_visual,
            &CreateWindowAux::new()
                .background_pixel(screen.white_pixel)
                .override_redirect(1)
                .event_mask(EventMask::EXPOSURE),
        )?;
        let text_gc = conn.generate_id()?;
        // Dark blue, unlike the page's grey runs, so typing over them is a visible change.
        conn.create_gc(text_gc, window, &CreateGCAux::new().foreground(0x0018_2878))?;
        let paper_gc = conn.generate_id()?;
        conn.create_gc(
            paper_gc,
            window,
            &CreateGCAux::new().foreground(0x00ff_ffff),
        )?;
        conn.map_window(window)?;
        conn.flush()?;
        while !matches!(conn.wait_for_event()?, Event::Expose(_)) {}
        let page = super::source::office_page(u32::from(width), u32::from(height));
        let row_bytes = usize::from(width) * 4;
        // Strips of 32 rows keep each request far below the maximum request length.
        for (i, strip) in page.chunks(row_bytes * 32).enumerate() {
            let rows = (strip.len() / row_bytes) as u16;
            conn.put_image(
                ImageFormat::Z_PIXMAP,
                window,
                text_gc,
                width,
                rows,
                0,
                (i * 32) as i16,
                0,
                depth,
                strip,
            )?;
        }
        conn.get_input_focus()?.reply()?;
        Ok(Self {
            conn,
            window,
            text_gc,
            paper_gc,
            width,
            height,
            caret: (i16::try_from(width / 6 + 16).unwrap_or(0), 48),
            seed: 0x9e37_79b9,
        })
    }

    fn rand(&mut self) -> u32 {
        self.seed = self
            .seed
            .wrapping_mul(1_664_525)
            .wrapping_add(1_013_904_223);
        self.seed >> 16
    }

    /// Types three "characters" at the caret and waits until they are drawn.
    pub fn type_step(&mut self) -> Result<(), SceneError> {
        use x11rb::protocol::xproto::{ConnectionExt as _, Rectangle};
        let mut rects = Vec::new();
        for _ in 0..3 {
            let w = 5 + (self.rand() % 4) as u16;
            rects.push(Rectangle {
                x: self.caret.0,
                y: self.caret.1,
                width: w,
                height: 9,
            });
            self.caret.0 += w as i16 + 2 + if self.rand().is_multiple_of(6) { 5 } else { 0 };
            if self.caret.0 as i32 + 20 > i32::from(self.width) {
                self.caret = (
                    i16::try_from(self.width / 6 + 16).unwrap_or(0),
                    self.caret.1 + 18,
                );
                if self.caret.1 as i32 + 20 > i32::from(self.height) {
                    self.caret.1 = 48;
                }
            }
        }
        self.conn
            .poly_fill_rectangle(self.window, self.text_gc, &rects)?;
        self.conn.get_input_focus()?.reply()?;
        Ok(())
    }

    /// Scrolls the page up by `dy` pixels, fills the new strip with lines of "text",
    /// and waits until it is drawn.
    pub fn scroll_step(&mut self, dy: u16) -> Result<(), SceneError> {
        use x11rb::protocol::xproto::{ConnectionExt as _, Rectangle};
        let (w, h) = (self.width, self.height);
        let dy = dy.min(h);
        self.conn.copy_area(
            self.window,
            self.window,
            self.text_gc,
            0,
            dy as i16,
            0,
            0,
            w,
            h - dy,
        )?;
        let top = (h - dy) as i16;
        self.conn.poly_fill_rectangle(
            self.window,
            self.paper_gc,
            &[Rectangle {
                x: 0,
                y: top,
                width: w,
                height: dy,
            }],
        )?;
        let mut rects = Vec::new();
        let mut x = (w / 6 + 16) as i16;
        while (x as i32) + 60 < i32::from(w) - 16 {
            let word = 8 + (self.rand() % 10) as u16 * 3;
            rects.push(Rectangle {
                x,
                y: top,
                width: word,
                height: dy.min(9),
            });
            x += word as i16 + 6;
        }
        self.conn
            .poly_fill_rectangle(self.window, self.text_gc, &rects)?;
        self.conn.get_input_focus()?.reply()?;
        Ok(())
    }
}

impl Xvfb {
    /// [`Xvfb::start`] for tests: `Ok(None)` (after saying so on stderr) when Xvfb is
    /// not installed, unless `CI=true`, where a missing Xvfb is an error like any other.
    pub fn start_or_skip(width: u32, height: u32) -> Result<Option<Self>, XvfbError> {
        match Self::start(width, height) {
            Ok(x) => Ok(Some(x)),
            Err(XvfbError::NotFound(e)) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("skipping: Xvfb not installed ({e}); apt-get install xvfb");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// How long [`TestWindow::until_marker`] waits for its marker; a failure guard, not a
/// timing.
const MARKER_WAIT: Duration = Duration::from_secs(30);

/// Why a [`TestWindow`] failed.
#[derive(Debug, thiserror::Error)]
pub enum TestWindowError {
    #[error("cannot connect to X display: {0}")]
    Connect(#[from] x11rb::errors::ConnectError),
    #[error("X request failed: {0}")]
    X(#[from] x11rb::errors::ReplyOrIdError),
    #[error("X display has no screen {0}")]
    NoScreen(usize),
    #[error("marker {0} did not come back within {1:?}")]
    MarkerTimeout(u32, Duration),
    #[error("the event recorder stopped before marker {0} came back")]
    RecorderEnded(u32),
    #[error("key code {0} is outside the display's keymap")]
    BadKeycode(u8),
}

impl From<x11rb::errors::ConnectionError> for TestWindowError {
    fn from(e: x11rb::errors::ConnectionError) -> Self {
        Self::X(e.into())
    }
}

impl From<x11rb::errors::ReplyError> for TestWindowError {
    fn from(e: x11rb::errors::ReplyError) -> Self {
        Self::X(e.into())
    }
}

/// A solid rectangle [`TestWindow`] draws over the page: `x, y, width, height, [r, g, b]`.
pub type FilledRect = (i16, i16, u16, u16, [u8; 3]);

/// The picture a [`TestWindow`] of this size and these rectangles shows, as BGRA.
pub fn test_picture(width: u16, height: u16, rects: &[FilledRect]) -> Vec<u8> {
    let mut px = super::source::office_page(u32::from(width), u32::from(height));
    for &(x, y, w, h, [r, g, b]) in rects {
        for yy in y as usize..(y as usize + h as usize) {
            for xx in x as usize..(x as usize + w as usize) {
                let o = (yy * usize::from(width) + xx) * 4;
                px[o..o + 4].copy_from_slice(&[b, g, r, 0xff]);
            }
        }
    }
    px
}

/// Input a [`TestWindow`] received (see [`TestWindow::record`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Button {
        button: u8,
        press: bool,
        x: i16,
        y: i16,
    },
    Key {
        keycode: u8,
        state: u16,
        press: bool,
    },
    Marker(u32),
}

impl Seen {
    /// A whole click: `button` pressed and released at (`x`, `y`).
    pub fn click(button: u8, x: i16, y: i16) -> [Seen; 2] {
        [true, false].map(|press| Seen::Button {
            button,
            press,
            x,
            y,
        })
    }

    /// The button events of `seen`, in order (keys and markers left out).
    pub fn buttons(seen: &[Seen]) -> Vec<Seen> {
        seen.iter()
            .filter(|s| matches!(s, Seen::Button { .. }))
            .cloned()
            .collect()
    }
}

/// A full-screen, undecorated, focused window whose background pixmap holds
/// [`test_picture`], so the server repaints it by itself; it can record the button and
/// key events it receives.
pub struct TestWindow {
    conn: std::sync::Arc<x11rb::rust_connection::RustConnection>,
    window: u32,
}

impl std::fmt::Debug for TestWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestWindow")
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl TestWindow {
    /// Opens `display`, shows the picture at `width`x`height`, focuses the window, and
    /// returns once it is on screen.
    pub fn open(
        display: &str,
        width: u16,
        height: u16,
        rects: &[FilledRect],
    ) -> Result<Self, TestWindowError> {
        use x11rb::connection::Connection;
        use x11rb::protocol::Event;
        use x11rb::protocol::xproto::{
            ChangeGCAux, ConnectionExt as _, CreateGCAux, CreateWindowAux, EventMask, ImageFormat,
            InputFocus, Rectangle, WindowClass,
        };
        let (conn, screen_num) = x11rb::connect(Some(display))?;
        let screen = conn
            .setup()
            .roots
            .get(screen_num)
            .ok_or(TestWindowError::NoScreen(screen_num))?
            .clone();
        let (root, depth) = (screen.root, screen.root_depth);
        let pixmap = conn.generate_id()?;
        conn.create_pixmap(depth, pixmap, root, width, height)?;
        let gc = conn.generate_id()?;
        conn.create_gc(gc, pixmap, &CreateGCAux::new())?;
        let page = super::source::office_page(u32::from(width), u32::from(height));
        let row_bytes = usize::from(width) * 4;
        // Strips of 32 rows keep each request far below the maximum request length.
        for (i, strip) in page.chunks(row_bytes * 32).enumerate() {
            conn.put_image(
                ImageFormat::Z_PIXMAP,
                pixmap,
                gc,
                width,
                (strip.len() / row_bytes) as u16,
                0,
                (i * 32) as i16,
                0,
                depth,
                strip,
            )?;
        }
        for &(x, y, w, h, [r, g, b]) in rects {
            let pixel = u32::from(r) << 16 | u32::from(g) << 8 | u32::from(b);
            conn.change_gc(gc, &ChangeGCAux::new().foreground(pixel))?;
            conn.poly_fill_rectangle(
                pixmap,
                gc,
                &[Rectangle {
                    x,
                    y,
                    width: w,
                    height: h,
                }],
            )?;
        }
        let window = conn.generate_id()?;
        conn.create_window(
            depth,
            window,
            root,
            0,
            0,
            width,
            height,
            0,
            WindowClass::INPUT_OUTPUT,
            screen.root_visual,
            &CreateWindowAux::new()
                .background_pixmap(pixmap)
                .override_redirect(1)
                .event_mask(
                    EventMask::EXPOSURE
                        | EventMask::KEY_PRESS
                        | EventMask::KEY_RELEASE
                        | EventMask::BUTTON_PRESS
                        | EventMask::BUTTON_RELEASE,
                ),
        )?;
        conn.map_window(window)?;
        conn.flush()?;
        // The background is painted before the Expose event is sent.
        while !matches!(conn.wait_for_event()?, Event::Expose(_)) {}
        conn.set_input_focus(InputFocus::POINTER_ROOT, window, x11rb::CURRENT_TIME)?;
        conn.get_input_focus()?.reply()?;
        Ok(Self {
            conn: std::sync::Arc::new(conn),
            window,
        })
    }

    /// Records this window's input until the connection closes (the thread ends with
    /// it, or when the receiver is dropped).
    pub fn record(&self) -> mpsc::Receiver<Seen> {
        use x11rb::connection::Connection;
        use x11rb::protocol::Event;
        use x11rb::protocol::xproto::{BUTTON_PRESS_EVENT, KEY_PRESS_EVENT};
        let (tx, rx) = mpsc::channel();
        let conn = self.conn.clone();
        std::thread::spawn(move || {
            while let Ok(ev) = conn.wait_for_event() {
                let seen = match ev {
                    Event::ButtonPress(e) | Event::ButtonRelease(e) => Seen::Button {
                        button: e.detail,
                        press: e.response_type == BUTTON_PRESS_EVENT,
                        x: e.event_x,
                        y: e.event_y,
                    },
                    Event::KeyPress(e) | Event::KeyRelease(e) => Seen::Key {
                        keycode: e.detail,
                        state: u16::from(e.state),
                        press: e.response_type == KEY_PRESS_EVENT,
                    },
                    Event::ClientMessage(e) => Seen::Marker(e.data.as_data32()[0]),
                    _ => continue,
                };
                if tx.send(seen).is_err() {
                    break;
                }
            }
        });
        rx
    }

    /// Everything `rx` (from [`record`](Self::record)) received before marker `n`,
    /// sent now, came back through the server; the server delivers in order, so that is
    /// all the input it had processed by then.
    pub fn until_marker(
        &self,
        rx: &mpsc::Receiver<Seen>,
        n: u32,
    ) -> Result<Vec<Seen>, TestWindowError> {
        use x11rb::connection::Connection;
        use x11rb::protocol::xproto::{
            AtomEnum, ClientMessageEvent, ConnectionExt as _, EventMask,
        };
        let ev = ClientMessageEvent::new(32, self.window, AtomEnum::STRING, [n, 0, 0, 0, 0]);
        self.conn
            .send_event(false, self.window, EventMask::NO_EVENT, ev)?;
        self.conn.flush()?;
        let mut seen = Vec::new();
        loop {
            match rx.recv_timeout(MARKER_WAIT) {
                Ok(Seen::Marker(m)) if m == n => return Ok(seen),
                Ok(other) => seen.push(other),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(TestWindowError::MarkerTimeout(n, MARKER_WAIT));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(TestWindowError::RecorderEnded(n));
                }
            }
        }
    }

    /// Draws a magenta 50x20 rectangle straight onto the window (not its background)
    /// at `(10 + 60 * (n % 10), 400)`, and waits until the server has done it.
    pub fn scribble(&self, n: i16) -> Result<(), TestWindowError> {
        use x11rb::connection::Connection;
        use x11rb::protocol::xproto::{ConnectionExt as _, CreateGCAux, Rectangle};
        let gc = self.conn.generate_id()?;
        self.conn
            .create_gc(gc, self.window, &CreateGCAux::new().foreground(0x00ff_00ff))?;
        self.conn.poly_fill_rectangle(
            self.window,
            gc,
            &[Rectangle {
                x: 10 + 60 * (n % 10),
                y: 400,
                width: 50,
                height: 20,
            }],
        )?;
        self.conn.free_gc(gc)?;
        self.conn.get_input_focus()?.reply()?;
        Ok(())
    }

    /// The characters the key presses in `seen` type under the display's keymap now.
    pub fn typed(&self, seen: &[Seen]) -> Result<String, TestWindowError> {
        use x11rb::connection::Connection;
        use x11rb::protocol::xproto::{ConnectionExt as _, KeyButMask};
        let setup = self.conn.setup();
        let (min, max) = (setup.min_keycode, setup.max_keycode);
        let map = self
            .conn
            .get_keyboard_mapping(min, max.saturating_sub(min) + 1)?
            .reply()?;
        let per = usize::from(map.keysyms_per_keycode);
        let mut out = String::new();
        for s in seen {
            let &Seen::Key {
                keycode,
                state,
                press: true,
            } = s
            else {
                continue;
            };
            let row = keycode
                .checked_sub(min)
                .and_then(|k| map.keysyms.get(usize::from(k) * per..)?.get(..per))
                .filter(|row| !row.is_empty())
                .ok_or(TestWindowError::BadKeycode(keycode))?;
            let shift = state & u16::from(KeyButMask::SHIFT) != 0;
            let sym = match row.get(1) {
                Some(&s) if shift && s != 0 => s,
                _ => row[0],
            };
            if let Some(c) = super::input::keysym::to_char(sym) {
                out.push(c);
            }
        }
        Ok(out)
    }
}
