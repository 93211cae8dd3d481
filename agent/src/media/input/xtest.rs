//! X11 input through the XTEST extension, on x11rb's pure-Rust connection.

use x11rb::connection::{Connection, RequestConnection};
use x11rb::protocol::xproto::{self, ConnectionExt as _, Window};
use x11rb::protocol::xtest::{self, ConnectionExt as _};
use x11rb::rust_connection::RustConnection;

use super::jis::KeyDef;
use super::keysym::{SHIFT_L, from_char};
use super::{InputError, InputSink};

/// Fakes pointer and keyboard input on an X display. Keysyms are resolved against the
/// display's live keymap (so a JIS customer's `@` is the JIS `@` key); a keysym the
/// keymap lacks (kana, symbols) is bound to a spare keycode for the moment it is typed.
pub struct XTestSink {
    display: String,
    conn: RustConnection,
    root: Window,
    width: u16,
    height: u16,
    min_keycode: u8,
    max_keycode: u8,
    per_keycode: usize,
    /// Core keymap: `per_keycode` keysyms for each keycode from `min_keycode`.
    syms: Vec<u32>,
    shift: Option<u8>,
}

impl std::fmt::Debug for XTestSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XTestSink")
            .field("display", &self.display)
            .finish_non_exhaustive()
    }
}

impl XTestSink {
    /// Connects to `display` (`None`: `$DISPLAY`) and checks for XTEST.
    pub fn open(display: Option<&str>) -> Result<Self, InputError> {
        let name = display
            .map(str::to_owned)
            .or_else(|| std::env::var("DISPLAY").ok())
            .unwrap_or_default();
        let (conn, screen_num) = x11rb::connect(display).map_err(|source| InputError::Connect {
            display: name.clone(),
            source,
        })?;
        let conn_err = |source| InputError::Connection {
            display: name.clone(),
            source,
        };
        if conn
            .extension_information(xtest::X11_EXTENSION_NAME)
            .map_err(conn_err)?
            .is_none()
        {
            return Err(InputError::NoXTest { display: name });
        }
        let setup = conn.setup();
        let Some(screen) = setup.roots.get(screen_num) else {
            return Err(InputError::NoXTest { display: name });
        };
        let (root, width, height) = (screen.root, screen.width_in_pixels, screen.height_in_pixels);
        let (min_keycode, max_keycode) = (setup.min_keycode, setup.max_keycode);
        let mut sink = Self {
            display: name,
            conn,
            root,
            width,
            height,
            min_keycode,
            max_keycode,
            per_keycode: 0,
            syms: Vec::new(),
            shift: None,
        };
        sink.conn
            .xtest_get_version(2, 2)
            .map_err(|e| sink.conn_err(e))?
            .reply()
            .map_err(|e| sink.req_err(e))?;
        sink.refresh_keymap()?;
        Ok(sink)
    }

    fn conn_err(&self, source: x11rb::errors::ConnectionError) -> InputError {
        InputError::Connection {
            display: self.display.clone(),
            source,
        }
    }

    fn req_err(&self, source: x11rb::errors::ReplyError) -> InputError {
        InputError::Request {
            display: self.display.clone(),
            source,
        }
    }

    /// Re-reads the display's keymap (after the customer switched layouts).
    pub fn refresh_keymap(&mut self) -> Result<(), InputError> {
        let count = self.max_keycode - self.min_keycode + 1;
        let reply = self
            .conn
            .get_keyboard_mapping(self.min_keycode, count)
            .map_err(|e| self.conn_err(e))?
            .reply()
            .map_err(|e| self.req_err(e))?;
        self.per_keycode = usize::from(reply.keysyms_per_keycode);
        self.syms = reply.keysyms;
        self.shift = self.find(SHIFT_L).map(|(kc, _)| kc);
        Ok(())
    }

    /// Loads `keys` into the display's keymap (core protocol), e.g. [`super::jis::JIS106`]
    /// on a test display. Keys not listed keep their meaning.
    pub fn load_layout(&mut self, keys: &[KeyDef]) -> Result<(), InputError> {
        let per = self.per_keycode.max(2);
        for &(kc, plain, shifted) in keys {
            if !(self.min_keycode..=self.max_keycode).contains(&kc) {
                continue;
            }
            let mut row = vec![0u32; per];
            row[0] = plain;
            row[1] = shifted;
            self.conn
                .change_keyboard_mapping(1, kc, per as u8, &row)
                .map_err(|e| self.conn_err(e))?;
        }
        self.sync()?;
        self.refresh_keymap()
    }

    /// The keycode and column (0 plain, 1 shifted) that produce `keysym` in group 1.
    fn find(&self, keysym: u32) -> Option<(u8, usize)> {
        if self.per_keycode == 0 || keysym == 0 {
            return None;
        }
        for col in 0..self.per_keycode.min(2) {
            for (i, row) in self.syms.chunks(self.per_keycode).enumerate() {
                if row[col] == keysym {
                    return Some((self.min_keycode + i as u8, col));
                }
            }
        }
        None
    }

    /// A keycode for `keysym`: where the keymap has it, else a keycode with no symbols
    /// rebound to it (xdotool's approach to characters the layout cannot type).
    fn keycode(&mut self, keysym: u32) -> Result<(u8, usize), InputError> {
        if let Some(found) = self.find(keysym) {
            return Ok(found);
        }
        let per = self.per_keycode;
        let spare = self
            .syms
            .chunks(per.max(1))
            .rposition(|row| row.iter().all(|&s| s == 0))
            .map(|i| self.min_keycode + i as u8)
            .ok_or(InputError::NoKeycode { keysym })?;
        let row = vec![keysym; per];
        self.conn
            .change_keyboard_mapping(1, spare, per as u8, &row)
            .map_err(|e| self.conn_err(e))?;
        self.sync()?;
        let at = usize::from(spare - self.min_keycode) * per;
        self.syms[at..at + per].copy_from_slice(&row);
        Ok((spare, 0))
    }

    fn fake(&self, kind: u8, detail: u8, x: i16, y: i16) -> Result<(), InputError> {
        self.conn
            .xtest_fake_input(kind, detail, x11rb::CURRENT_TIME, self.root, x, y, 0)
            .map_err(|e| self.conn_err(e))?;
        Ok(())
    }

    fn sync(&self) -> Result<(), InputError> {
        self.conn
            .get_input_focus()
            .map_err(|e| self.conn_err(e))?
            .reply()
            .map_err(|e| self.req_err(e))?;
        Ok(())
    }
}

impl InputSink for XTestSink {
    fn pointer_move(&mut self, x: i32, y: i32) -> Result<(), InputError> {
        let cx = x.clamp(0, i32::from(self.width.max(1)) - 1) as i16;
        let cy = y.clamp(0, i32::from(self.height.max(1)) - 1) as i16;
        self.fake(xproto::MOTION_NOTIFY_EVENT, 0, cx, cy)
    }

    fn button(&mut self, button: u8, down: bool) -> Result<(), InputError> {
        let kind = if down {
            xproto::BUTTON_PRESS_EVENT
        } else {
            xproto::BUTTON_RELEASE_EVENT
        };
        self.fake(kind, button, 0, 0)
    }

    fn key(&mut self, keysym: u32, down: bool) -> Result<(), InputError> {
        let (kc, _) = self.keycode(keysym)?;
        let kind = if down {
            xproto::KEY_PRESS_EVENT
        } else {
            xproto::KEY_RELEASE_EVENT
        };
        self.fake(kind, kc, 0, 0)
    }

    fn type_char(&mut self, c: char) -> Result<(), InputError> {
        let (kc, col) = self.keycode(from_char(c))?;
        let shift = if col == 1 { self.shift } else { None };
        if let Some(s) = shift {
            self.fake(xproto::KEY_PRESS_EVENT, s, 0, 0)?;
        }
        self.fake(xproto::KEY_PRESS_EVENT, kc, 0, 0)?;
        self.fake(xproto::KEY_RELEASE_EVENT, kc, 0, 0)?;
        if let Some(s) = shift {
            self.fake(xproto::KEY_RELEASE_EVENT, s, 0, 0)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), InputError> {
        self.sync()
    }
}
