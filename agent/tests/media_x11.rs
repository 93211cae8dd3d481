//! The media layer against a real X server: each test starts its own Xvfb on a display
//! number Xvfb picks (`-displayfd`), draws known content with x11rb, and checks capture,
//! H.264 round trip, skip-when-unchanged and XTest injection (ASCII and JIS).
//! Without Xvfb the tests skip, except under CI=true, where they fail.
#![cfg(feature = "media")]

use anyhow::{Context, Result, bail};
use kakehashi_agent::media::codec::EncoderSettings;
use kakehashi_agent::media::frame::psnr;
use kakehashi_agent::media::input::jis;
use kakehashi_agent::media::xvfb::{FilledRect, Seen, TestWindow, Xvfb, test_picture};
use kakehashi_agent::media::{
    CaptureConfig, ControlGate, EncodePipeline, H264Decoder, H264Encoder, Injector, InputAction,
    InputError, ScreenSource, X11Source, XTestSink,
};
use x11rb::protocol::xproto;

const W: u16 = 640;
const H: u16 = 480;
/// Where the test window's "button" is.
const BUTTON: (i16, i16, u16, u16) = (400, 300, 120, 40);

fn xvfb() -> Result<Option<Xvfb>> {
    Ok(Xvfb::start_or_skip(u32::from(W), u32::from(H))?)
}

/// Coloured rectangles on even coordinates (4:2:0 keeps their colour exactly), drawn
/// with PolyFillRectangle over the PutImage'd page.
const RECTS: [FilledRect; 4] = [
    (20, 60, 160, 80, [0xd0, 0x20, 0x20]),
    (220, 60, 160, 80, [0x20, 0xa0, 0x30]),
    (420, 60, 160, 80, [0x20, 0x40, 0xc0]),
    (BUTTON.0, BUTTON.1, BUTTON.2, BUTTON.3, [0x60, 0x60, 0x60]),
];

/// The known picture as BGRA, exactly what the test window shows.
fn reference() -> Vec<u8> {
    test_picture(W, H, &RECTS)
}

fn bgra_to_rgb(bgra: &[u8]) -> Vec<u8> {
    bgra.chunks_exact(4)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect()
}

fn open_app(display: &str) -> Result<TestWindow> {
    Ok(TestWindow::open(display, W, H, &RECTS)?)
}

#[test]
fn capture_encode_decode_matches_the_known_picture() -> Result<()> {
    let Some(x) = xvfb()? else { return Ok(()) };
    let _app = open_app(x.display())?;
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
    let Some(x) = xvfb()? else { return Ok(()) };
    let app = open_app(x.display())?;
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
    let Some(x) = xvfb()? else { return Ok(()) };
    let app = open_app(x.display())?;
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
    assert_eq!(Seen::buttons(&seen), Seen::click(1, bx, by));
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
    let Some(x) = xvfb()? else { return Ok(()) };
    let app = open_app(x.display())?;
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
