//! The operator's viewer window on X11, over the same pure-Rust x11rb connection the
//! capture uses (no GUI toolkit). It shows the customer's screen, tells the operator
//! what the session allows (security code, grants, pause, recording) in its title and
//! in a coloured strip above the picture, and turns the operator's mouse and keyboard
//! into INPUT events while control is granted.
//!
//! One thread owns the window: it paints, reads X events and translates input. The
//! caller decodes in [`ViewerWindow::push`] (every frame must reach the decoder, in
//! order) and hands the latest picture over; pictures the thread has not painted yet
//! are replaced, never queued. The caller wakes the thread with client messages sent
//! to the window itself, so the thread has a single place to wait: the X connection.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kakehashi_proto::{Mode, Permissions, pb};
use tokio::sync::{mpsc, watch};
use x11rb::connection::{Connection, RequestConnection};
use x11rb::errors::{ConnectError, ConnectionError, ReplyOrIdError};
use x11rb::protocol::Event;
use x11rb::protocol::xproto::{
    Atom, AtomEnum, ChangeGCAux, ClientMessageEvent, ConfigureWindowAux, ConnectionExt as _,
    CreateGCAux, CreateWindowAux, EventMask, Gcontext, ImageFormat, InputFocus, KeyButMask,
    PropMode, Rectangle, Window, WindowClass,
};
use x11rb::rust_connection::RustConnection;
use x11rb::wrapper::ConnectionExt as _;

use super::{Viewer, ViewerEvent};
use crate::media::codec::CodecError;
use crate::media::decoder::ScreenDecoder;
use crate::media::frame::scale_bgra;
use crate::media::image::RgbImage;
use crate::media::input::{jis, keysym};

/// Height of the status strip above the picture, in pixels.
pub const STRIP_HEIGHT: u16 = 8;
/// Input events the caller has not read yet; beyond it pointer motion is dropped and
/// the window stops reading X events until the caller catches up.
const EVENT_QUEUE: usize = 256;
/// The window's size before the first picture arrives.
const INITIAL_SIZE: (u16, u16) = (640, 480);
/// The X property holding the status in a fixed, machine-readable form.
pub const STATUS_PROPERTY: &str = "_KAKEHASHI_VIEWER_STATUS";
const WAKE_ATOM: &str = "_KAKEHASHI_VIEWER_WAKE";

const WAKE_PICTURE: u32 = 1;
const WAKE_STATUS: u32 = 2;
const WAKE_SYNC: u32 = 3;
const WAKE_STOP: u32 = 4;

/// What the window says about the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The security code both sides compare; `None` until the customer joined.
    pub sas: Option<String>,
    /// What the customer has granted.
    pub granted: Permissions,
    /// The customer paused sharing.
    pub paused: bool,
    /// The session is being recorded.
    pub recording: bool,
    pub mode: Mode,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            sas: None,
            granted: Permissions::NONE,
            paused: false,
            recording: false,
            mode: Mode::View,
        }
    }
}

impl Status {
    /// The viewer's state now.
    pub fn of(viewer: &Viewer) -> Self {
        let session = viewer.session();
        let granted = viewer.granted();
        Self {
            sas: viewer.sas(),
            granted,
            paused: viewer.is_paused(),
            recording: granted.contains(Permissions::RECORDING),
            mode: u8::try_from(session.mode)
                .ok()
                .and_then(Mode::from_u8)
                .unwrap_or(Mode::View),
        }
    }

    /// Whether the operator's input may be sent: control granted in a control session,
    /// and sharing not paused (the operator would be typing blind).
    pub fn controls(&self) -> bool {
        self.mode == Mode::Control && self.granted.contains(Permissions::CONTROL) && !self.paused
    }

    /// The window title: `base`, then the security code, the session's mode, the
    /// grants, and "paused" / "recording" when they apply.
    pub fn title(&self, base: &str) -> String {
        let mut parts = vec![base.to_owned()];
        parts.push(match &self.sas {
            Some(sas) => format!("SAS {sas}"),
            None => "waiting for the customer".to_owned(),
        });
        parts.push(
            match self.mode {
                Mode::View => "view-only session",
                Mode::Control => "control session",
            }
            .to_owned(),
        );
        parts.push(format!("granted: {}", self.granted));
        if self.paused {
            parts.push("paused".to_owned());
        }
        if self.recording {
            parts.push("recording".to_owned());
        }
        parts.join(" | ")
    }

    /// Whether a click points at the customer's screen (指差し) instead: VIEW granted,
    /// no control, sharing not paused.
    pub fn points(&self) -> bool {
        self.granted.contains(Permissions::VIEW) && !self.paused && !self.controls()
    }

    /// The [`STATUS_PROPERTY`] value: `key=value` pairs, space separated.
    pub fn property(&self) -> String {
        format!(
            "sas={} granted={} mode={} paused={} recording={}",
            self.sas.as_deref().unwrap_or("-"),
            self.granted,
            match self.mode {
                Mode::View => "view",
                Mode::Control => "control",
            },
            self.paused,
            self.recording
        )
    }

    /// The strip's colour: red while paused, orange while the operator controls,
    /// green while viewing, grey before anything is granted.
    pub fn strip_rgb(&self) -> [u8; 3] {
        if self.paused {
            PAUSED_RGB
        } else if self.controls() {
            [0xff, 0x8c, 0x00]
        } else if self.granted.contains(Permissions::VIEW) {
            [0x20, 0xa0, 0x40]
        } else {
            [0x80, 0x80, 0x80]
        }
    }
}

/// The strip's colour while the customer has paused sharing.
pub const PAUSED_RGB: [u8; 3] = [0xd0, 0x20, 0x20];
/// The block at the strip's right end while the session is recorded.
pub const RECORDING_RGB: [u8; 3] = [0xc0, 0x00, 0xc0];

/// What the window reports to its owner.
#[derive(Debug, Clone, PartialEq)]
pub enum WindowEvent {
    /// The operator's input, in the customer's screen coordinates. Only produced while
    /// the last [`Status`] allowed control.
    Input(pb::InputEvent),
    /// The operator points at the customer's screen (指差し), in the customer's screen
    /// coordinates: the left button shows the marker where it is pressed and follows a
    /// drag, the right button hides it. Only produced while the last [`Status`] allowed
    /// pointing and not control.
    Point(pb::PointerHint),
    /// The operator closed the window (WM_DELETE_WINDOW).
    Closed,
    /// The X connection failed; the window is gone.
    Failed(String),
}

/// Why the window could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    #[error("cannot connect to X display {display:?}: {source}")]
    Connect {
        display: String,
        #[source]
        source: ConnectError,
    },
    #[error("X display {display:?} has no screen {screen}")]
    NoScreen { display: String, screen: usize },
    #[error(
        "X display {display:?} has depth {depth} at {bits_per_pixel} bits per pixel ({byte_order}); the viewer window needs 24/32-bit little-endian TrueColor"
    )]
    UnsupportedFormat {
        display: String,
        depth: u8,
        bits_per_pixel: u8,
        byte_order: &'static str,
    },
    #[error("X request on {display:?} failed: {source}")]
    X {
        display: String,
        #[source]
        source: ReplyOrIdError,
    },
    #[error("cannot start the viewer window thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("screen frame does not decode: {0}")]
    Decode(#[from] CodecError),
    #[error("the viewer window on {display:?} is gone")]
    Gone { display: String },
}

/// State the caller and the window thread share.
struct Inner {
    conn: RustConnection,
    display: String,
    window: Window,
    wake: Atom,
    /// The latest decoded picture the thread has not painted yet.
    picture: Mutex<Option<RgbImage>>,
    status: Mutex<Status>,
    picture_pending: AtomicBool,
    status_pending: AtomicBool,
    painted: AtomicU64,
    replaced: AtomicU64,
    dropped_motion: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn x_err(&self, e: impl Into<ReplyOrIdError>) -> WindowError {
        WindowError::X {
            display: self.display.clone(),
            source: e.into(),
        }
    }

    fn wake(&self, kind: u32, arg: u32) -> Result<(), WindowError> {
        let ev = ClientMessageEvent::new(32, self.window, self.wake, [kind, arg, 0, 0, 0]);
        self.conn
            .send_event(false, self.window, EventMask::NO_EVENT, ev)
            .map_err(|e| self.x_err(e))?;
        self.conn.flush().map_err(|e| self.x_err(e))
    }
}

/// A top-level X11 window showing the customer's screen. Dropping it closes the window
/// and stops its thread.
pub struct ViewerWindow {
    inner: Arc<Inner>,
    decoder: ScreenDecoder,
    events: mpsc::Receiver<WindowEvent>,
    synced: watch::Receiver<u32>,
    next_sync: u32,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ViewerWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewerWindow")
            .field("display", &self.inner.display)
            .field("window", &self.inner.window)
            .finish_non_exhaustive()
    }
}

impl ViewerWindow {
    /// Opens a window titled `title` on `display` (`None`: `$DISPLAY`) and starts its
    /// thread. Input events start flowing once a [`Status`] allows control.
    pub fn open(display: Option<&str>, title: &str) -> Result<Self, WindowError> {
        let name = display
            .map(str::to_owned)
            .or_else(|| std::env::var("DISPLAY").ok())
            .unwrap_or_default();
        let (conn, screen_num) =
            x11rb::connect(display).map_err(|source| WindowError::Connect {
                display: name.clone(),
                source,
            })?;
        let x_err = |e: ReplyOrIdError| WindowError::X {
            display: name.clone(),
            source: e,
        };
        let setup = conn.setup();
        let (screen, format) =
            crate::media::ScreenFormat::screen(setup, screen_num).ok_or_else(|| {
                WindowError::NoScreen {
                    display: name.clone(),
                    screen: screen_num,
                }
            })?;
        let depth = screen.root_depth;
        // The picture goes to the server as BGRX; other formats would need converters.
        if !format.is_bgrx() {
            return Err(WindowError::UnsupportedFormat {
                display: name,
                depth,
                bits_per_pixel: format.bits_per_pixel,
                byte_order: format.byte_order(),
            });
        }
        let (min_keycode, max_keycode) = (setup.min_keycode, setup.max_keycode);
        let names = [
            "WM_PROTOCOLS",
            "WM_DELETE_WINDOW",
            "_NET_WM_NAME",
            "UTF8_STRING",
            STATUS_PROPERTY,
            WAKE_ATOM,
        ];
        let mut cookies = Vec::new();
        for n in names {
            cookies.push(
                conn.intern_atom(false, n.as_bytes())
                    .map_err(|e| x_err(e.into()))?,
            );
        }
        let mut atoms_vec = Vec::new();
        for c in cookies {
            atoms_vec.push(c.reply().map_err(|e| x_err(e.into()))?.atom);
        }
        let atoms = Atoms {
            wm_protocols: atoms_vec[0],
            wm_delete: atoms_vec[1],
            net_wm_name: atoms_vec[2],
            utf8: atoms_vec[3],
            status: atoms_vec[4],
        };
        let wake = atoms_vec[5];
        let window = conn.generate_id().map_err(x_err)?;
        let (w, h) = INITIAL_SIZE;
        conn.create_window(
            depth,
            window,
            screen.root,
            0,
            0,
            w,
            h + STRIP_HEIGHT,
            0,
            WindowClass::INPUT_OUTPUT,
            screen.root_visual,
            &CreateWindowAux::new()
                .background_pixel(screen.black_pixel)
                .event_mask(
                    EventMask::EXPOSURE
                        | EventMask::STRUCTURE_NOTIFY
                        | EventMask::KEY_PRESS
                        | EventMask::KEY_RELEASE
                        | EventMask::BUTTON_PRESS
                        | EventMask::BUTTON_RELEASE
                        | EventMask::POINTER_MOTION
                        | EventMask::FOCUS_CHANGE,
                ),
        )
        .map_err(|e| x_err(e.into()))?;
        let gc = conn.generate_id().map_err(x_err)?;
        conn.create_gc(gc, window, &CreateGCAux::new())
            .map_err(|e| x_err(e.into()))?;
        let prop = |r: Result<_, ConnectionError>| r.map(|_| ()).map_err(|e| x_err(e.into()));
        prop(conn.change_property32(
            PropMode::REPLACE,
            window,
            atoms.wm_protocols,
            AtomEnum::ATOM,
            &[atoms.wm_delete],
        ))?;
        // Input hint: a window manager gives the window the keyboard.
        prop(conn.change_property32(
            PropMode::REPLACE,
            window,
            AtomEnum::WM_HINTS,
            AtomEnum::WM_HINTS,
            &[1, 1, 0, 0, 0, 0, 0, 0, 0],
        ))?;
        prop(conn.change_property8(
            PropMode::REPLACE,
            window,
            AtomEnum::WM_CLASS,
            AtomEnum::STRING,
            b"kakehashi-viewer\0Kakehashi\0",
        ))?;
        let keymap = conn
            .get_keyboard_mapping(min_keycode, max_keycode.saturating_sub(min_keycode) + 1)
            .map_err(|e| x_err(e.into()))?
            .reply()
            .map_err(|e| x_err(e.into()))?;
        let keymap = Keymap {
            min: min_keycode,
            per: usize::from(keymap.keysyms_per_keycode),
            syms: keymap.keysyms,
        };
        let status = Status::default();
        let inner = Arc::new(Inner {
            conn,
            display: name.clone(),
            window,
            wake,
            picture: Mutex::new(None),
            status: Mutex::new(status.clone()),
            picture_pending: AtomicBool::new(false),
            status_pending: AtomicBool::new(false),
            painted: AtomicU64::new(0),
            replaced: AtomicU64::new(0),
            dropped_motion: AtomicU64::new(0),
        });
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let (synced_tx, synced) = watch::channel(0);
        let mut painter = Painter {
            inner: inner.clone(),
            gc,
            depth,
            atoms,
            title: title.to_owned(),
            size: (w, h + STRIP_HEIGHT),
            picture: None,
            status,
            keymap,
            held_keys: BTreeMap::new(),
            held_buttons: Vec::new(),
            pointing: false,
            events: events_tx,
            synced: synced_tx,
        };
        painter.apply_status().map_err(x_err)?;
        inner.conn.map_window(window).map_err(|e| x_err(e.into()))?;
        inner.conn.flush().map_err(|e| x_err(e.into()))?;
        let decoder = ScreenDecoder::new()?;
        let thread = std::thread::Builder::new()
            .name("kakehashi-window".into())
            .spawn(move || painter.run())
            .map_err(WindowError::Thread)?;
        Ok(Self {
            inner,
            decoder,
            events,
            synced,
            next_sync: 0,
            thread: Some(thread),
        })
    }

    /// The X window id (for tests and window managers' tools).
    pub fn id(&self) -> u32 {
        self.inner.window
    }

    /// Decodes `frame` and, when it completes a picture, has the window show it (resized
    /// to the stream's size). Returns whether a picture came out. Decoding happens on
    /// the caller's thread because every frame must reach the decoder in order; painting
    /// happens on the window's thread, which skips pictures it is too slow for.
    pub fn push(&mut self, frame: &pb::ScreenFrame) -> Result<bool, WindowError> {
        let Some(img) = self.decoder.push(frame)? else {
            return Ok(false);
        };
        if lock(&self.inner.picture).replace(img).is_some() {
            self.inner.replaced.fetch_add(1, Ordering::Relaxed);
        }
        if !self.inner.picture_pending.swap(true, Ordering::SeqCst) {
            self.inner.wake(WAKE_PICTURE, 0)?;
        }
        Ok(true)
    }

    /// Shows `status` in the title, the status property and the strip, and gates input.
    pub fn set_status(&self, status: Status) -> Result<(), WindowError> {
        *lock(&self.inner.status) = status;
        if !self.inner.status_pending.swap(true, Ordering::SeqCst) {
            self.inner.wake(WAKE_STATUS, 0)?;
        }
        Ok(())
    }

    /// Follows the viewer: shows screen frames and keeps the status current. Call it
    /// with every event the viewer delivers.
    pub fn follow(&mut self, viewer: &Viewer, event: &ViewerEvent) -> Result<(), WindowError> {
        match event {
            ViewerEvent::Screen { frame, .. } => {
                self.push(frame)?;
            }
            ViewerEvent::PeerJoined { .. }
            | ViewerEvent::GrantsChanged(_)
            | ViewerEvent::SharingPaused
            | ViewerEvent::SharingResumed
            | ViewerEvent::ConsentAnswer { .. }
            | ViewerEvent::Resumed { .. }
            | ViewerEvent::Ended { .. } => self.set_status(Status::of(viewer))?,
            _ => {}
        }
        Ok(())
    }

    /// Returns once everything pushed and set before is on the screen, and every input
    /// the X server had delivered to the window by then is in the event queue.
    pub async fn sync(&mut self) -> Result<(), WindowError> {
        self.next_sync = self.next_sync.wrapping_add(1);
        let n = self.next_sync;
        self.inner.wake(WAKE_SYNC, n)?;
        self.synced
            .wait_for(|&v| v == n)
            .await
            .map(|_| ())
            .map_err(|_| WindowError::Gone {
                display: self.inner.display.clone(),
            })
    }

    /// The next event; `None` once the window's thread stopped and every event was read.
    pub async fn next_event(&mut self) -> Option<WindowEvent> {
        self.events.recv().await
    }

    pub fn events(&mut self) -> &mut mpsc::Receiver<WindowEvent> {
        &mut self.events
    }

    /// Pictures painted so far.
    pub fn painted(&self) -> u64 {
        self.inner.painted.load(Ordering::Relaxed)
    }

    /// Decoded pictures replaced by a newer one before the thread could paint them.
    pub fn skipped(&self) -> u64 {
        self.inner.replaced.load(Ordering::Relaxed)
    }

    /// Pointer motion dropped because the caller had not read its events.
    pub fn dropped_motion(&self) -> u64 {
        self.inner.dropped_motion.load(Ordering::Relaxed)
    }

    /// Frames that did not decode.
    pub fn decode_errors(&self) -> u64 {
        self.decoder.errors()
    }
}

impl Drop for ViewerWindow {
    fn drop(&mut self) {
        // Unblocks a thread waiting for room in the event queue, then wakes it from
        // its wait for X events.
        self.events.close();
        let _ = self.inner.wake(WAKE_STOP, 0);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = self.inner.conn.destroy_window(self.inner.window);
        let _ = self.inner.conn.flush();
    }
}

#[derive(Debug, Clone, Copy)]
struct Atoms {
    wm_protocols: Atom,
    wm_delete: Atom,
    net_wm_name: Atom,
    utf8: Atom,
    status: Atom,
}

/// The operator's core keymap: `per` keysyms for each keycode from `min`.
struct Keymap {
    min: u8,
    per: usize,
    syms: Vec<u32>,
}

impl Keymap {
    /// The unshifted and shifted keysym of `keycode`; the JIS table fills keys the
    /// keymap leaves empty (a JIS keyboard on a server configured for another layout).
    fn lookup(&self, keycode: u8) -> (u32, u32) {
        let row = keycode
            .checked_sub(self.min)
            .and_then(|k| self.syms.get(usize::from(k) * self.per..)?.get(..self.per))
            .unwrap_or(&[]);
        let plain = row.first().copied().unwrap_or(0);
        let shifted = row.get(1).copied().filter(|&s| s != 0).unwrap_or(plain);
        if plain == 0 {
            return (
                jis::keysym(keycode, false).unwrap_or(0),
                jis::keysym(keycode, true).unwrap_or(0),
            );
        }
        (plain, shifted)
    }
}

/// What one key press on the operator's keyboard becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyOut {
    /// A character: typed on the customer's side with whatever modifiers their layout
    /// needs, so a US operator's `@` is a JIS customer's `@`.
    Text(char),
    /// A key by keysym, pressed and released as the operator does; `shift` wraps it in
    /// Shift (Shift itself is never sent alone: characters carry it).
    Key {
        keysym: u32,
        shift: bool,
    },
    Ignore,
}

fn classify(plain: u32, shifted: u32, state: u16) -> KeyOut {
    let shift = state & u16::from(KeyButMask::SHIFT) != 0;
    let caps = state & u16::from(KeyButMask::LOCK) != 0;
    let mut sym = if shift { shifted } else { plain };
    if caps && (u32::from(b'a')..=u32::from(b'z')).contains(&sym) {
        sym -= 0x20;
    }
    if sym == 0 || matches!(sym, keysym::SHIFT_L | 0xffe2 | keysym::CAPS_LOCK) {
        return KeyOut::Ignore;
    }
    let commanding =
        state & u16::from(KeyButMask::CONTROL | KeyButMask::MOD1 | KeyButMask::MOD4) != 0;
    if !commanding && let Some(c) = keysym::to_char(sym) {
        return KeyOut::Text(c);
    }
    KeyOut::Key {
        // With Ctrl or Alt held the key is a shortcut: send the key, not what it types.
        keysym: if commanding { plain } else { sym },
        shift,
    }
}

/// Window coordinates to the customer's screen: the picture fills the window below
/// the strip, scaled. `None` outside the picture unless `clamp`.
fn to_stream(
    x: i16,
    y: i16,
    window: (u16, u16),
    stream: (u32, u32),
    clamp: bool,
) -> Option<(i32, i32)> {
    let (aw, ah) = (
        i64::from(window.0),
        i64::from(window.1.saturating_sub(STRIP_HEIGHT)),
    );
    if aw == 0 || ah == 0 || stream.0 == 0 || stream.1 == 0 {
        return None;
    }
    let (mut px, mut py) = (i64::from(x), i64::from(y) - i64::from(STRIP_HEIGHT));
    if !(0..aw).contains(&px) || !(0..ah).contains(&py) {
        if !clamp {
            return None;
        }
        px = px.clamp(0, aw - 1);
        py = py.clamp(0, ah - 1);
    }
    let sx = px * i64::from(stream.0) / aw;
    let sy = py * i64::from(stream.1) / ah;
    Some((i32::try_from(sx).ok()?, i32::try_from(sy).ok()?))
}

fn input(kind: pb::input_event::Kind) -> WindowEvent {
    WindowEvent::Input(pb::InputEvent { kind: Some(kind) })
}

fn key(keysym: u32, down: bool) -> WindowEvent {
    input(pb::input_event::Kind::Key(pb::KeyPress { keysym, down }))
}

/// RGB to the BGRX the server takes for a 24/32-bit little-endian TrueColor visual.
fn bgrx(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::with_capacity(img.data.len() / 3 * 4);
    for p in img.data.chunks_exact(3) {
        out.extend_from_slice(&[p[2], p[1], p[0], 0xff]);
    }
    out
}

/// The window's thread.
struct Painter {
    inner: Arc<Inner>,
    gc: Gcontext,
    depth: u8,
    atoms: Atoms,
    title: String,
    /// The window's size as the server last told it.
    size: (u16, u16),
    /// The latest painted picture as BGRX at stream size, for exposures and resizes.
    picture: Option<(u32, u32, Vec<u8>)>,
    status: Status,
    keymap: Keymap,
    /// Keys sent as keys (not text), by keycode, so the release matches the press.
    held_keys: BTreeMap<u8, (u32, bool)>,
    held_buttons: Vec<u8>,
    /// The left button is down in pointing mode: motion moves the marker.
    pointing: bool,
    events: mpsc::Sender<WindowEvent>,
    synced: watch::Sender<u32>,
}

enum Flow {
    Continue,
    Stop,
}

impl Painter {
    fn run(mut self) {
        loop {
            let ev = match self.inner.conn.wait_for_event() {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::warn!(display = %self.inner.display, error = %e, "viewer window lost its X connection");
                    let _ = self
                        .events
                        .blocking_send(WindowEvent::Failed(e.to_string()));
                    return;
                }
            };
            match self.handle(ev) {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => return,
                Err(e) => {
                    tracing::warn!(display = %self.inner.display, error = %e, "viewer window failed");
                    let _ = self
                        .events
                        .blocking_send(WindowEvent::Failed(e.to_string()));
                    return;
                }
            }
        }
    }

    fn handle(&mut self, ev: Event) -> Result<Flow, ReplyOrIdError> {
        match ev {
            Event::ClientMessage(e) if e.type_ == self.inner.wake => {
                let [kind, arg, ..] = e.data.as_data32();
                match kind {
                    WAKE_PICTURE => {
                        self.inner.picture_pending.store(false, Ordering::SeqCst);
                        let img = lock(&self.inner.picture).take();
                        if let Some(img) = img {
                            self.show(&img)?;
                        }
                    }
                    WAKE_STATUS => {
                        self.inner.status_pending.store(false, Ordering::SeqCst);
                        self.status = lock(&self.inner.status).clone();
                        self.apply_status()?;
                        if !self.status.controls() {
                            self.release_all();
                        }
                    }
                    WAKE_SYNC => {
                        // A round trip: the server has done everything sent before.
                        self.inner.conn.get_input_focus()?.reply()?;
                        let _ = self.synced.send(arg);
                    }
                    WAKE_STOP => return Ok(Flow::Stop),
                    _ => {}
                }
            }
            Event::ClientMessage(e)
                if e.type_ == self.atoms.wm_protocols
                    && e.data.as_data32()[0] == self.atoms.wm_delete =>
            {
                self.send(WindowEvent::Closed);
            }
            Event::Expose(e) if e.count == 0 => self.repaint()?,
            Event::ConfigureNotify(e)
                if e.window == self.inner.window && (e.width, e.height) != self.size =>
            {
                self.size = (e.width, e.height);
                self.repaint()?;
            }
            Event::MappingNotify(_) => self.refresh_keymap()?,
            Event::MotionNotify(e) => {
                if let Some((x, y)) = self.point(e.event_x, e.event_y, false) {
                    let ev = if self.status.controls() {
                        Some(input(pb::input_event::Kind::PointerMove(pb::PointerMove {
                            x,
                            y,
                        })))
                    } else if self.pointing && self.status.points() {
                        Some(WindowEvent::Point(pb::PointerHint {
                            x,
                            y,
                            visible: true,
                        }))
                    } else {
                        None
                    };
                    if let Some(ev) = ev
                        && self.events.try_send(ev).is_err()
                    {
                        self.inner.dropped_motion.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Event::ButtonPress(e) => {
                // Without a window manager nobody else gives the window the keyboard.
                self.inner
                    .conn
                    .set_input_focus(InputFocus::PARENT, self.inner.window, e.time)?;
                self.inner.conn.flush()?;
                if let Some((x, y)) = self.point(e.event_x, e.event_y, false)
                    && self.status.controls()
                {
                    self.send(input(pb::input_event::Kind::PointerMove(pb::PointerMove {
                        x,
                        y,
                    })));
                    self.send(input(pb::input_event::Kind::PointerButton(
                        pb::PointerButton {
                            button: u32::from(e.detail),
                            down: true,
                        },
                    )));
                    self.held_buttons.push(e.detail);
                } else if let Some((x, y)) = self.point(e.event_x, e.event_y, false)
                    && self.status.points()
                    && matches!(e.detail, 1 | 3)
                {
                    self.pointing = e.detail == 1;
                    self.send(WindowEvent::Point(pb::PointerHint {
                        x,
                        y,
                        visible: e.detail == 1,
                    }));
                }
            }
            Event::ButtonRelease(e) => {
                if e.detail == 1 {
                    self.pointing = false;
                }
                if let Some(i) = self.held_buttons.iter().position(|&b| b == e.detail) {
                    self.held_buttons.swap_remove(i);
                    if let Some((x, y)) = self.point(e.event_x, e.event_y, true) {
                        self.send(input(pb::input_event::Kind::PointerMove(pb::PointerMove {
                            x,
                            y,
                        })));
                    }
                    self.send(input(pb::input_event::Kind::PointerButton(
                        pb::PointerButton {
                            button: u32::from(e.detail),
                            down: false,
                        },
                    )));
                }
            }
            Event::KeyPress(e) if self.status.controls() => {
                let (plain, shifted) = self.keymap.lookup(e.detail);
                match classify(plain, shifted, u16::from(e.state)) {
                    KeyOut::Text(c) => {
                        self.send(input(pb::input_event::Kind::Text(pb::TypeText {
                            text: c.into(),
                        })))
                    }
                    KeyOut::Key { keysym, shift } => {
                        if shift {
                            self.send(key(keysym::SHIFT_L, true));
                        }
                        self.send(key(keysym, true));
                        self.held_keys.insert(e.detail, (keysym, shift));
                    }
                    KeyOut::Ignore => {}
                }
            }
            Event::KeyRelease(e) => {
                if let Some((keysym, shift)) = self.held_keys.remove(&e.detail) {
                    self.send(key(keysym, false));
                    if shift {
                        self.send(key(keysym::SHIFT_L, false));
                    }
                }
            }
            // Keys released elsewhere would stay down on the customer's side.
            Event::FocusOut(_) => self.release_all(),
            // A refused request (e.g. a picture the server has no memory for) costs
            // that picture, not the window.
            Event::Error(e) => {
                tracing::debug!(display = %self.inner.display, error = ?e, "X request refused")
            }
            _ => {}
        }
        Ok(Flow::Continue)
    }

    /// Queues an event the caller must not miss (buttons, keys, close); waits for room.
    fn send(&self, ev: WindowEvent) {
        let _ = self.events.blocking_send(ev);
    }

    fn release_all(&mut self) {
        for (_, (keysym, shift)) in std::mem::take(&mut self.held_keys) {
            self.send(key(keysym, false));
            if shift {
                self.send(key(keysym::SHIFT_L, false));
            }
        }
        for b in std::mem::take(&mut self.held_buttons) {
            self.send(input(pb::input_event::Kind::PointerButton(
                pb::PointerButton {
                    button: u32::from(b),
                    down: false,
                },
            )));
        }
    }

    fn point(&self, x: i16, y: i16, clamp: bool) -> Option<(i32, i32)> {
        let (w, h, _) = self.picture.as_ref()?;
        to_stream(x, y, self.size, (*w, *h), clamp)
    }

    fn refresh_keymap(&mut self) -> Result<(), ReplyOrIdError> {
        let setup = self.inner.conn.setup();
        let (min, max) = (setup.min_keycode, setup.max_keycode);
        let reply = self
            .inner
            .conn
            .get_keyboard_mapping(min, max.saturating_sub(min) + 1)?
            .reply()?;
        self.keymap = Keymap {
            min,
            per: usize::from(reply.keysyms_per_keycode),
            syms: reply.keysyms,
        };
        Ok(())
    }

    fn show(&mut self, img: &RgbImage) -> Result<(), ReplyOrIdError> {
        let needed = img.width as usize * img.height as usize * 3;
        if img.data.len() != needed || img.width == 0 || img.height == 0 {
            return Ok(());
        }
        let (Ok(w), Ok(h)) = (u16::try_from(img.width), u16::try_from(img.height)) else {
            return Ok(());
        };
        let resized =
            self.picture.as_ref().map(|(pw, ph, _)| (*pw, *ph)) != Some((img.width, img.height));
        self.picture = Some((img.width, img.height, bgrx(img)));
        let want = (w, h.saturating_add(STRIP_HEIGHT));
        if resized && want != self.size {
            self.inner.conn.configure_window(
                self.inner.window,
                &ConfigureWindowAux::new()
                    .width(u32::from(want.0))
                    .height(u32::from(want.1)),
            )?;
            // Without a window manager the server applies it at once; with one, the
            // ConfigureNotify that follows corrects the size and repaints.
            self.size = want;
            self.paint_strip()?;
        }
        self.paint_picture()?;
        self.inner.conn.flush()?;
        self.inner.painted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn repaint(&mut self) -> Result<(), ReplyOrIdError> {
        self.paint_strip()?;
        self.paint_picture()?;
        self.inner.conn.flush()?;
        Ok(())
    }

    /// Puts the picture below the strip, scaled to the window when the two differ.
    fn paint_picture(&self) -> Result<(), ReplyOrIdError> {
        let Some((sw, sh, px)) = &self.picture else {
            return Ok(());
        };
        let (aw, ah) = (self.size.0, self.size.1.saturating_sub(STRIP_HEIGHT));
        if aw == 0 || ah == 0 {
            return Ok(());
        }
        let scaled;
        let data = if (u32::from(aw), u32::from(ah)) == (*sw, *sh) {
            px.as_slice()
        } else {
            scaled = scale_bgra(px, *sw, *sh, sw * 4, u32::from(aw), u32::from(ah));
            scaled.as_slice()
        };
        let row = usize::from(aw) * 4;
        // Each request below the server's maximum request length.
        let max = self.inner.conn.maximum_request_bytes().saturating_sub(64);
        let rows = (max / row).clamp(1, usize::from(ah));
        for (i, strip) in data.chunks(row * rows).enumerate() {
            let n = (strip.len() / row) as u16;
            let y = i64::from(STRIP_HEIGHT) + (i * rows) as i64;
            let Ok(y) = i16::try_from(y) else { break };
            self.inner.conn.put_image(
                ImageFormat::Z_PIXMAP,
                self.inner.window,
                self.gc,
                aw,
                n,
                0,
                y,
                0,
                self.depth,
                strip,
            )?;
        }
        Ok(())
    }

    fn fill(&self, rgb: [u8; 3], rect: Rectangle) -> Result<(), ReplyOrIdError> {
        let pixel = u32::from(rgb[0]) << 16 | u32::from(rgb[1]) << 8 | u32::from(rgb[2]);
        self.inner
            .conn
            .change_gc(self.gc, &ChangeGCAux::new().foreground(pixel))?;
        self.inner
            .conn
            .poly_fill_rectangle(self.inner.window, self.gc, &[rect])?;
        Ok(())
    }

    fn paint_strip(&self) -> Result<(), ReplyOrIdError> {
        let w = self.size.0;
        self.fill(
            self.status.strip_rgb(),
            Rectangle {
                x: 0,
                y: 0,
                width: w,
                height: STRIP_HEIGHT,
            },
        )?;
        if self.status.recording {
            let block = (w / 8).max(1);
            self.fill(
                RECORDING_RGB,
                Rectangle {
                    x: i16::try_from(w - block).unwrap_or(0),
                    y: 0,
                    width: block,
                    height: STRIP_HEIGHT,
                },
            )?;
        }
        Ok(())
    }

    /// Title (WM_NAME in Latin-1, _NET_WM_NAME in UTF-8), status property, strip.
    fn apply_status(&mut self) -> Result<(), ReplyOrIdError> {
        let title = self.status.title(&self.title);
        let latin1: Vec<u8> = title
            .chars()
            .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
            .collect();
        let conn = &self.inner.conn;
        let window = self.inner.window;
        conn.change_property8(
            PropMode::REPLACE,
            window,
            AtomEnum::WM_NAME,
            AtomEnum::STRING,
            &latin1,
        )?;
        conn.change_property8(
            PropMode::REPLACE,
            window,
            self.atoms.net_wm_name,
            self.atoms.utf8,
            title.as_bytes(),
        )?;
        conn.change_property8(
            PropMode::REPLACE,
            window,
            self.atoms.status,
            self.atoms.utf8,
            self.status.property().as_bytes(),
        )?;
        self.paint_strip()?;
        conn.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIFT: u16 = 1;
    const CONTROL: u16 = 4;

    #[test]
    fn characters_become_text_and_shortcuts_keys() {
        let a = (u32::from(b'a'), u32::from(b'A'));
        assert_eq!(classify(a.0, a.1, 0), KeyOut::Text('a'));
        assert_eq!(classify(a.0, a.1, SHIFT), KeyOut::Text('A'));
        assert_eq!(classify(a.0, a.1, 2), KeyOut::Text('A'), "caps lock");
        assert_eq!(
            classify(a.0, a.1, CONTROL),
            KeyOut::Key {
                keysym: a.0,
                shift: false
            }
        );
        assert_eq!(
            classify(u32::from(b'2'), u32::from(b'@'), SHIFT),
            KeyOut::Text('@')
        );
        assert_eq!(
            classify(keysym::RETURN, keysym::RETURN, 0),
            KeyOut::Text('\n')
        );
        assert_eq!(
            classify(keysym::BACKSPACE, keysym::BACKSPACE, SHIFT),
            KeyOut::Key {
                keysym: keysym::BACKSPACE,
                shift: true
            }
        );
        assert_eq!(
            classify(keysym::SHIFT_L, keysym::SHIFT_L, 0),
            KeyOut::Ignore
        );
        assert_eq!(
            classify(keysym::HENKAN, keysym::HENKAN, 0),
            KeyOut::Key {
                keysym: keysym::HENKAN,
                shift: false
            }
        );
        assert_eq!(classify(0, 0, 0), KeyOut::Ignore);
    }

    #[test]
    fn empty_keymap_rows_fall_back_to_jis() {
        let km = Keymap {
            min: 8,
            per: 2,
            syms: vec![0; 2 * 248],
        };
        assert_eq!(km.lookup(34), (u32::from(b'@'), u32::from(b'`')));
        assert_eq!(km.lookup(7), (0, 0));
    }

    #[test]
    fn window_points_scale_to_the_stream() {
        let s = STRIP_HEIGHT as i16;
        let win = (640, 480 + STRIP_HEIGHT);
        assert_eq!(
            to_stream(10, s + 20, win, (640, 480), false),
            Some((10, 20))
        );
        assert_eq!(
            to_stream(10, 2, win, (640, 480), false),
            None,
            "on the strip"
        );
        assert_eq!(to_stream(10, 2, win, (640, 480), true), Some((10, 0)));
        assert_eq!(
            to_stream(320, s + 240, win, (1920, 1440), false),
            Some((960, 720))
        );
        assert_eq!(to_stream(700, s, win, (640, 480), false), None);
        assert_eq!(to_stream(0, 0, (0, 0), (640, 480), true), None);
    }

    #[test]
    fn status_reads_in_title_and_property() {
        let mut st = Status {
            sas: Some("12-34-56".into()),
            granted: Permissions::VIEW | Permissions::CONTROL,
            paused: false,
            recording: true,
            mode: Mode::Control,
        };
        assert!(st.controls());
        let t = st.title("Kakehashi");
        assert!(t.contains("SAS 12-34-56") && t.contains("recording"), "{t}");
        assert!(!t.contains("paused"), "{t}");
        st.paused = true;
        assert!(!st.controls());
        assert!(st.title("K").contains("paused"));
        assert_eq!(st.strip_rgb(), PAUSED_RGB);
        assert!(st.property().contains("paused=true"), "{}", st.property());
        st.mode = Mode::View;
        st.paused = false;
        assert!(!st.controls(), "view-only sessions never control");
        assert!(st.points(), "view-only sessions point");
        st.paused = true;
        assert!(!st.points(), "nothing to point at while paused");
    }
}
