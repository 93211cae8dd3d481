//! The media layer against a real X server: each test starts its own Xvfb on a display
//! number Xvfb picks (`-displayfd`), draws known content with x11rb, and checks capture,
//! H.264 round trip, skip-when-unchanged and XTest injection (ASCII and JIS).
//! Without Xvfb the tests skip, except under CI=true, where they fail.
#![cfg(feature = "media")]

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kakehashi_agent::media::codec::EncoderSettings;
use kakehashi_agent::media::frame::psnr;
use kakehashi_agent::media::input::{jis, keysym};
use kakehashi_agent::media::source::office_page;
use kakehashi_agent::media::xvfb::{Xvfb, XvfbError};
use kakehashi_agent::media::{
    CaptureConfig, ControlGate, EncodePipeline, H264Decoder, H264Encoder, Injector, InputAction,
    InputError, ScreenSource, X11Source, XTestSink,
};
use x11rb::connection::Connection;
use x11rb::protocol::Event;
use x11rb::protocol::xproto::{
    self, ClientMessageEvent, ConnectionExt as _, CreateGCAux, CreateWindowAux, EventMask,
    ImageFormat, InputFocus, Rectangle, WindowClass,
};
use x11rb::rust_connection::RustConnection;

const W: u16 = 640;
const H: u16 = 480;
/// Upper bound on waiting for an X event that must come; a failure guard, not a timing.
const EVENT_WAIT: Duration = Duration::from_secs(30);
/// Where the test window's "button" is.
const BUTTON: (i16, i16, u16, u16) = (400, 300, 120, 40);

fn xvfb() -> Option<Xvfb> {
    match Xvfb::start(u32::from(W), u32::from(H)) {
        Ok(x) => Some(x),
        Err(XvfbError::NotFound(e)) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipping: Xvfb not installed ({e}); apt-get install xvfb");
            None
        }
        Err(e) => panic!("cannot start Xvfb: {e}"),
    }
}

/// Coloured rectangles on even coordinates (4:2:0 keeps their colour exactly), drawn
/// with PolyFillRectangle over the PutImage'd page.
const RECTS: [(i16, i16, u16, u16, [u8; 3]); 4] = [
    (20, 60, 160, 80, [0xd0, 0x20, 0x20]),
    (220, 60, 160, 80, [0x20, 0xa0, 0x30]),
    (420, 60, 160, 80, [0x20, 0x40, 0xc0]),
    (BUTTON.0, BUTTON.1, BUTTON.2, BUTTON.3, [0x60, 0x60, 0x60]),
];

/// The known picture as BGRA, exactly what the test window shows.
fn reference() -> Vec<u8> {
    let mut px = office_page(u32::from(W), u32::from(H));
    for (x, y, w, h, [r, g, b]) in RECTS {
        for yy in y as usize..(y as usize + h as usize) {
            for xx in x as usize..(x as usize + w as usize) {
                let o = (yy * W as usize + xx) * 4;
                px[o..o + 4].copy_from_slice(&[b, g, r, 0xff]);
            }
        }
    }
    px
}

fn bgra_to_rgb(bgra: &[u8]) -> Vec<u8> {
    bgra.chunks_exact(4)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect()
}

/// A full-screen, undecorated window whose background pixmap holds the known picture,
/// so the server repaints it by itself; it records the input it receives.
struct TestApp {
    conn: Arc<RustConnection>,
    window: xproto::Window,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Motion,
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

impl TestApp {
    fn open(display: &str) -> Result<Self> {
        let (conn, screen_num) = x11rb::connect(Some(display)).context("connect")?;
        let screen = conn.setup().roots[screen_num].clone();
        let (root, depth) = (screen.root, screen.root_depth);
        let pixmap = conn.generate_id()?;
        conn.create_pixmap(depth, pixmap, root, W, H)?;
        let gc = conn.generate_id()?;
        conn.create_gc(gc, pixmap, &CreateGCAux::new())?;
        // The page in strips, to stay far below the maximum request length.
        let page = office_page(u32::from(W), u32::from(H));
        let rows = 32usize;
        for (i, strip) in page.chunks(W as usize * 4 * rows).enumerate() {
            let h = (strip.len() / (W as usize * 4)) as u16;
            conn.put_image(
                ImageFormat::Z_PIXMAP,
                pixmap,
                gc,
                W,
                h,
                0,
                (i * rows) as i16,
                0,
                depth,
                strip,
            )?;
        }
        for (x, y, w, h, [r, g, b]) in RECTS {
            let pixel = u32::from(r) << 16 | u32::from(g) << 8 | u32::from(b);
            conn.change_gc(gc, &xproto::ChangeGCAux::new().foreground(pixel))?;
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
            W,
            H,
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
                        | EventMask::BUTTON_RELEASE
                        | EventMask::POINTER_MOTION,
                ),
        )?;
        conn.map_window(window)?;
        conn.flush()?;
        // The background is painted before the Expose event is sent.
        loop {
            if let Event::Expose(_) = conn.wait_for_event()? {
                break;
            }
        }
        conn.set_input_focus(InputFocus::POINTER_ROOT, window, x11rb::CURRENT_TIME)?;
        conn.get_input_focus()?.reply()?;
        Ok(Self {
            conn: Arc::new(conn),
            window,
        })
    }

    /// Records this window's input events until dropped (the thread ends when the
    /// connection does).
    fn record(&self) -> mpsc::Receiver<Seen> {
        let (tx, rx) = mpsc::channel();
        let conn = self.conn.clone();
        std::thread::spawn(move || {
            while let Ok(ev) = conn.wait_for_event() {
                let seen = match ev {
                    Event::MotionNotify(_) => Seen::Motion,
                    Event::ButtonPress(e) | Event::ButtonRelease(e) => Seen::Button {
                        button: e.detail,
                        press: e.response_type == xproto::BUTTON_PRESS_EVENT,
                        x: e.event_x,
                        y: e.event_y,
                    },
                    Event::KeyPress(e) | Event::KeyRelease(e) => Seen::Key {
                        keycode: e.detail,
                        state: u16::from(e.state),
                        press: e.response_type == xproto::KEY_PRESS_EVENT,
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

    /// Sends a marker through the server to the recorder; everything the server did
    /// before it arrives first.
    fn marker(&self, n: u32) -> Result<()> {
        let ev =
            ClientMessageEvent::new(32, self.window, xproto::AtomEnum::STRING, [n, 0, 0, 0, 0]);
        self.conn
            .send_event(false, self.window, EventMask::NO_EVENT, ev)?;
        self.conn.flush()?;
        Ok(())
    }

    fn until_marker(&self, rx: &mpsc::Receiver<Seen>, n: u32) -> Result<Vec<Seen>> {
        self.marker(n)?;
        let mut seen = Vec::new();
        loop {
            match rx
                .recv_timeout(EVENT_WAIT)
                .context("waiting for the marker")?
            {
                Seen::Marker(m) if m == n => return Ok(seen),
                Seen::Motion => {}
                other => seen.push(other),
            }
        }
    }

    /// Draws a rectangle straight onto the window (not its background) and waits until
    /// the server has done it.
    fn scribble(&self, n: i16) -> Result<()> {
        let gc = self.conn.generate_id()?;
        self.conn
            .create_gc(gc, self.window, &CreateGCAux::new().foreground(0x00ff_00ff))?;
        self.conn.poly_fill_rectangle(
            self.window,
            gc,
            &[Rectangle {
                x: 10 + 60 * n,
                y: 400,
                width: 50,
                height: 20,
            }],
        )?;
        self.conn.get_input_focus()?.reply()?;
        Ok(())
    }

    /// The characters the key presses in `seen` type under the display's keymap now.
    fn typed(&self, seen: &[Seen]) -> Result<String> {
        let setup = self.conn.setup();
        let (min, max) = (setup.min_keycode, setup.max_keycode);
        let map = self
            .conn
            .get_keyboard_mapping(min, max - min + 1)?
            .reply()?;
        let per = usize::from(map.keysyms_per_keycode);
        let mut out = String::new();
        for s in seen {
            let Seen::Key {
                keycode,
                state,
                press: true,
            } = s
            else {
                continue;
            };
            let row = &map.keysyms[usize::from(keycode - min) * per..][..per];
            let shift = state & u16::from(xproto::KeyButMask::SHIFT) != 0;
            let sym = if shift && row[1] != 0 { row[1] } else { row[0] };
            if let Some(c) = keysym::to_char(sym) {
                out.push(c);
            }
        }
        Ok(out)
    }
}

#[test]
fn capture_encode_decode_matches_the_known_picture() -> Result<()> {
    let Some(x) = xvfb() else { return Ok(()) };
    let _app = TestApp::open(x.display())?;
    let want = reference();
    let config = CaptureConfig {
        fps: 15,
        scale: 1.0,
    };

    let mut shm = X11Source::open(Some(x.display()), config)?;
    assert!(shm.uses_shm(), "Xvfb offers MIT-SHM 1.2");
    assert_eq!(shm.size(), (u32::from(W), u32::from(H)));
    let frame = shm.capture()?;
    let want_rgb = bgra_to_rgb(&want);
    // The fourth byte is padding (X leaves it 0); compare the colours.
    assert!(
        bgra_to_rgb(&frame.data) == want_rgb,
        "shared-memory capture differs from the drawn picture"
    );

    let mut plain = X11Source::open(Some(x.display()), config)?.without_shm();
    assert!(!plain.uses_shm());
    assert!(
        bgra_to_rgb(&plain.capture()?.data) == want_rgb,
        "GetImage capture differs from the drawn picture"
    );

    let mut enc = H264Encoder::new(EncoderSettings {
        bitrate_bps: 4_000_000,
        fps: 15,
        key_interval: None,
    })?;
    let mut dec = H264Decoder::new()?;
    let mut first_db = None;
    let mut last = None;
    // The same picture several times: the key frame, then P-frames refining it.
    for i in 0..6 {
        let out = enc
            .encode(&frame)?
            .context("rate control skipped a frame")?;
        assert_eq!(out.key_frame, i == 0);
        let img = dec.decode(&out.data)?.context("no picture decoded")?;
        assert_eq!((img.width, img.height), (u32::from(W), u32::from(H)));
        let db = psnr(&want_rgb, &img.data);
        first_db.get_or_insert(db);
        last = Some((img, db));
    }
    let (img, db) = last.context("no frames")?;
    eprintln!(
        "PSNR: key frame {:.1} dB, after 5 P-frames {db:.1} dB",
        first_db.unwrap_or(0.0)
    );
    assert!(db > 30.0, "decoded picture PSNR {db:.1} dB is below 30 dB");

    // The headless viewer's output: a PNG that decodes to the same picture.
    let path = std::env::temp_dir().join(format!("kakehashi-media-{}.png", std::process::id()));
    img.write_png(&path)?;
    let file = std::fs::File::open(&path)?;
    let mut reader = png::Decoder::new(std::io::BufReader::new(file)).read_info()?;
    let mut buf = vec![0; reader.output_buffer_size().context("png size")?];
    let info = reader.next_frame(&mut buf)?;
    std::fs::remove_file(&path)?;
    assert_eq!((info.width, info.height), (u32::from(W), u32::from(H)));
    assert_eq!(&buf[..info.buffer_size()], &img.data[..]);
    Ok(())
}

#[test]
fn still_screen_yields_unchanged_frames_that_the_encoder_skips() -> Result<()> {
    let Some(x) = xvfb() else { return Ok(()) };
    let app = TestApp::open(x.display())?;
    let config = CaptureConfig {
        fps: 15,
        scale: 1.0,
    };
    for (n, damage) in [true, false].into_iter().enumerate() {
        let mut src = X11Source::open(Some(x.display()), config)?;
        if !damage {
            src = src.without_damage();
        }
        assert_eq!(src.uses_damage(), damage);
        let mut pipe = EncodePipeline::new(EncoderSettings::default())?;
        let first = src.capture()?;
        assert!(first.changed);
        assert!(pipe.push(&first)?.context("first frame encoded")?.key_frame);
        for _ in 0..3 {
            let f = src.capture()?;
            assert!(
                !f.changed,
                "still screen reported as changed (damage: {damage})"
            );
            assert!(pipe.push(&f)?.is_none());
        }
        if damage {
            assert_eq!(
                src.captures(),
                1,
                "XDamage should spare the captures of a still screen"
            );
        }
        app.scribble(n as i16)?;
        let f = src.capture()?;
        assert!(f.changed, "drawing not noticed (damage: {damage})");
        assert!(pipe.push(&f)?.is_some());
        let stats = pipe.stats();
        assert_eq!((stats.encoded, stats.unchanged), (2, 3));
        // Scaled capture: half size, still even, still noticed as unchanged.
        let mut half = X11Source::open(
            Some(x.display()),
            CaptureConfig {
                fps: 15,
                scale: 0.5,
            },
        )?;
        assert_eq!(half.size(), (u32::from(W) / 2, u32::from(H) / 2));
        let a = half.capture()?;
        assert_eq!(a.data.len(), (W as usize / 2) * (H as usize / 2) * 4);
        assert!(!half.capture()?.changed);
    }
    Ok(())
}

#[test]
fn xtest_clicks_and_types_only_through_an_open_gate() -> Result<()> {
    let Some(x) = xvfb() else { return Ok(()) };
    let app = TestApp::open(x.display())?;
    let rx = app.record();
    let gate = ControlGate::new();
    let mut inj = Injector::new(XTestSink::open(Some(x.display()))?, gate.clone());
    let (bx, by) = (
        BUTTON.0 + BUTTON.2 as i16 / 2,
        BUTTON.1 + BUTTON.3 as i16 / 2,
    );
    let click = [
        InputAction::PointerMove {
            x: bx.into(),
            y: by.into(),
        },
        InputAction::Button {
            button: 1,
            down: true,
        },
        InputAction::Button {
            button: 1,
            down: false,
        },
    ];
    let text = "Hello, World! 123 ~";

    // View-only: every attempt is refused and nothing reaches the window.
    for a in click.iter().chain([&InputAction::Text(text.into())]) {
        assert!(matches!(inj.apply(a), Err(InputError::NotGranted)));
    }
    assert_eq!(app.until_marker(&rx, 1)?, []);

    // Control granted: exactly one click on the button and exactly the text.
    gate.open();
    for a in &click {
        inj.apply(a)?;
    }
    inj.apply(&InputAction::Text(text.into()))?;
    let seen = app.until_marker(&rx, 2)?;
    let buttons: Vec<_> = seen
        .iter()
        .filter(|s| matches!(s, Seen::Button { .. }))
        .cloned()
        .collect();
    assert_eq!(
        buttons,
        [
            Seen::Button {
                button: 1,
                press: true,
                x: bx,
                y: by
            },
            Seen::Button {
                button: 1,
                press: false,
                x: bx,
                y: by
            },
        ]
    );
    let (x0, y0, w, h) = BUTTON;
    assert!((x0..x0 + w as i16).contains(&bx) && (y0..y0 + h as i16).contains(&by));
    assert_eq!(app.typed(&seen)?, text);
    let presses = seen
        .iter()
        .filter(|s| matches!(s, Seen::Key { press: true, .. }))
        .count();
    let releases = seen
        .iter()
        .filter(|s| matches!(s, Seen::Key { press: false, .. }))
        .count();
    assert_eq!(presses, releases, "every key pressed was released");

    // A character the US layout lacks goes through a spare keycode bound for it.
    inj.apply(&InputAction::Text("あ".into()))?;
    let seen = app.until_marker(&rx, 4)?;
    assert_eq!(app.typed(&seen)?, "あ");

    // Revoked: closed again, nothing more arrives.
    gate.close();
    assert!(inj.apply(&InputAction::Text("x".into())).is_err());
    assert_eq!(app.until_marker(&rx, 3)?, []);
    Ok(())
}

#[test]
fn xtest_types_on_a_jis_keyboard_at_jis_positions() -> Result<()> {
    let Some(x) = xvfb() else { return Ok(()) };
    let app = TestApp::open(x.display())?;
    let rx = app.record();
    let gate = ControlGate::new();
    gate.open();
    let mut sink = XTestSink::open(Some(x.display()))?;
    sink.load_layout(jis::JIS106)?;
    let mut inj = Injector::new(sink, gate);
    // Characters whose keys differ between the US and JIS layouts.
    let text = "@:*_\"&'()=^[]{}`+|\\";
    inj.apply(&InputAction::Text(text.into()))?;
    let seen = app.until_marker(&rx, 1)?;
    assert_eq!(app.typed(&seen)?, text);
    // '@' is its own unshifted key on JIS (US: Shift+2), '"' is Shift+2 (US: Shift+').
    let first_press = |want: u8| {
        seen.iter().find_map(|s| match s {
            Seen::Key {
                keycode,
                state,
                press: true,
            } if *keycode == want => Some(*state),
            _ => None,
        })
    };
    let shift = u16::from(xproto::KeyButMask::SHIFT);
    let Some(at_state) = first_press(34) else {
        bail!("'@' was not typed with the JIS @ key (34)")
    };
    assert_eq!(at_state & shift, 0, "'@' needs no Shift on JIS");
    let Some(quote_state) = first_press(11) else {
        bail!("'\"' was not typed with the 2 key")
    };
    assert_ne!(quote_state & shift, 0, "'\"' is Shift+2 on JIS");
    Ok(())
}
