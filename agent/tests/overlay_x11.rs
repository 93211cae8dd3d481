//! The on-screen overlay against a real X server: each test starts its own Xvfb, shows
//! a known picture in a test window, and checks what the overlay puts on the screen
//! (captured pixels and window names) and that clicks go through it.
//! Without Xvfb the tests skip, except under CI=true, where they fail.
#![cfg(feature = "media")]

use std::time::Duration;

use anyhow::{Context, Result};
use kakehashi_agent::HostEvent;
use kakehashi_agent::media::overlay::{
    INDICATOR_NAME_PREFIX, KEYS_NAME_PREFIX, MARKER_RGB, MARKER_RING_RADIUS, POINTER_NAME,
};
use kakehashi_agent::media::xvfb::{FilledRect, Seen, TestWindow, Xvfb, test_picture};
use kakehashi_agent::media::{
    CaptureConfig, IndicatorState, InputSink, Overlay, OverlayOptions, ScreenSource, X11Source,
    XTestSink,
};
use kakehashi_proto::pb;
use x11rb::connection::Connection;
use x11rb::protocol::xproto::{self, ConnectionExt as _};

const W: u16 = 640;
const H: u16 = 480;
const RECTS: [FilledRect; 2] = [
    (20, 60, 160, 80, [0xd0, 0x20, 0x20]),
    (400, 300, 120, 40, [0x60, 0x60, 0x60]),
];

fn xvfb() -> Result<Option<Xvfb>> {
    Ok(Xvfb::start_or_skip(u32::from(W), u32::from(H))?)
}

fn open_app(display: &str) -> Result<TestWindow> {
    Ok(TestWindow::open(display, W, H, &RECTS)?)
}

/// The screen now, as BGRA.
fn capture(display: &str) -> Result<Vec<u8>> {
    let config = CaptureConfig {
        fps: 15,
        scale: 1.0,
    };
    let mut src = X11Source::open(Some(display), config)?.without_damage();
    Ok(src.capture()?.data.to_vec())
}

fn rgb_at(bgra: &[u8], x: i32, y: i32) -> [u8; 3] {
    let o = (y as usize * usize::from(W) + x as usize) * 4;
    [bgra[o + 2], bgra[o + 1], bgra[o]]
}

/// The names of the viewable top-level windows, in stacking order (bottom first).
fn viewable_names(display: &str) -> Result<Vec<String>> {
    let (conn, screen) = x11rb::connect(Some(display))?;
    let root = conn.setup().roots[screen].root;
    let mut names = Vec::new();
    for w in conn.query_tree(root)?.reply()?.children {
        let attrs = conn.get_window_attributes(w)?.reply()?;
        if attrs.map_state != xproto::MapState::VIEWABLE {
            continue;
        }
        let name = conn
            .get_property(
                false,
                w,
                xproto::AtomEnum::WM_NAME,
                xproto::AtomEnum::STRING,
                0,
                1024,
            )?
            .reply()?
            .value;
        names.push(String::from_utf8_lossy(&name).into_owned());
    }
    Ok(names)
}

/// The overlay's viewable windows, bottom first.
fn overlay_windows(display: &str) -> Result<Vec<String>> {
    Ok(viewable_names(display)?
        .into_iter()
        .filter(|n| n.starts_with("Kakehashi"))
        .collect())
}

fn hint(x: i32, y: i32, visible: bool) -> HostEvent {
    HostEvent::Pointer(pb::PointerHint { x, y, visible })
}

#[test]
fn marker_shows_at_the_hint_and_goes_when_hidden() -> Result<()> {
    let Some(x) = xvfb()? else { return Ok(()) };
    let _app = open_app(x.display())?;
    let overlay = Overlay::open(Some(x.display()))?;
    let picture = test_picture(W, H, &RECTS);
    let r = MARKER_RING_RADIUS;

    for (px, py) in [(200, 200), (100, 90), (500, 320)] {
        overlay.apply(&hint(px, py, true));
        overlay.sync()?;
        let screen = capture(x.display())?;
        for (dx, dy) in [(r, 0), (-r, 0), (0, r), (0, -r)] {
            assert_eq!(
                rgb_at(&screen, px + dx, py + dy),
                MARKER_RGB,
                "ring at ({}, {}) for a hint at ({px}, {py})",
                px + dx,
                py + dy
            );
        }
        // Inside the ring the application shows through.
        assert_eq!(
            rgb_at(&screen, px + 4, py),
            rgb_at(&picture, px + 4, py),
            "inside the ring"
        );
        // Nothing is left where the marker was before.
        assert_eq!(overlay_windows(x.display())?, [POINTER_NAME]);
    }

    overlay.apply(&hint(500, 320, false));
    overlay.sync()?;
    let screen = capture(x.display())?;
    assert_eq!(
        rgb_at(&screen, 500 + r, 320),
        rgb_at(&picture, 500 + r, 320)
    );
    assert_eq!(overlay_windows(x.display())?, Vec::<String>::new());
    Ok(())
}

#[test]
fn hints_in_scaled_pixels_land_on_the_real_screen() -> Result<()> {
    let Some(x) = xvfb()? else { return Ok(()) };
    let _app = open_app(x.display())?;
    let overlay = Overlay::open_with(
        Some(x.display()),
        OverlayOptions {
            capture_scale: 0.5,
            ..Default::default()
        },
    )?;
    overlay.apply(&hint(100, 80, true));
    overlay.sync()?;
    let screen = capture(x.display())?;
    assert_eq!(rgb_at(&screen, 200 + MARKER_RING_RADIUS, 160), MARKER_RGB);
    Ok(())
}

#[test]
fn clicks_at_the_overlay_reach_the_window_beneath() -> Result<()> {
    let Some(x) = xvfb()? else { return Ok(()) };
    let app = open_app(x.display())?;
    let rx = app.record();
    let overlay = Overlay::open(Some(x.display()))?;
    let (bx, by) = (460i16, 320i16);
    overlay.apply(&hint(bx.into(), by.into(), true));
    overlay.set_state(IndicatorState {
        watching: 1,
        controlling: true,
        ..Default::default()
    });
    overlay.apply(&HostEvent::KeyDisplay {
        keys: vec!["Ctrl".into(), "Alt".into(), "Delete".into()],
        note: "then choose Task Manager".into(),
    });
    overlay.sync()?;
    let shown = overlay_windows(x.display())?;
    assert_eq!(shown.len(), 3, "pointer, keys and indicator: {shown:?}");
    // The pointer marker is on top of everything, so a click would hit it first.
    assert_eq!(shown.last().map(String::as_str), Some(POINTER_NAME));
    let screen = capture(x.display())?;
    assert_eq!(
        rgb_at(&screen, i32::from(bx) + MARKER_RING_RADIUS, by.into()),
        MARKER_RGB
    );

    let mut sink = XTestSink::open(Some(x.display()))?;
    // The marker's centre, the middle of the indicator bar, the middle of the keys box.
    // The keys box ends 48 px above the bottom edge.
    let spots = [
        (bx, by),
        (W as i16 / 2, 5),
        (W as i16 / 2, H as i16 - 48 - 8),
    ];
    for &(cx, cy) in &spots {
        sink.pointer_move(cx.into(), cy.into())?;
        sink.button(1, true)?;
        sink.button(1, false)?;
    }
    sink.flush()?;
    let seen = app.until_marker(&rx, 1)?;
    let want: Vec<Seen> = spots
        .iter()
        .flat_map(|&(x, y)| {
            [true, false].map(|press| Seen::Button {
                button: 1,
                press,
                x,
                y,
            })
        })
        .collect();
    assert_eq!(seen, want, "every click reached the application");
    Ok(())
}

#[test]
fn indicator_names_each_state_and_is_gone_when_nobody_watches() -> Result<()> {
    let Some(x) = xvfb()? else { return Ok(()) };
    let _app = open_app(x.display())?;
    let overlay = Overlay::open(Some(x.display()))?;
    overlay.sync()?;
    assert_eq!(overlay_windows(x.display())?, Vec::<String>::new());
    let before = capture(x.display())?;

    let none = IndicatorState::default();
    let cases = [
        (
            IndicatorState {
                watching: 1,
                ..none
            },
            "WATCHING (1 viewer)",
        ),
        (
            IndicatorState {
                watching: 2,
                controlling: true,
                ..none
            },
            "WATCHING (2 viewers) | CONTROLLING",
        ),
        (
            IndicatorState {
                watching: 1,
                recording: true,
                ..none
            },
            "WATCHING (1 viewer) | RECORDING",
        ),
        (
            IndicatorState {
                paused: true,
                ..none
            },
            "PAUSED (nobody sees your screen)",
        ),
    ];
    for (state, text) in cases {
        overlay.set_state(state);
        overlay.sync()?;
        assert_eq!(
            overlay_windows(x.display())?,
            [format!("{INDICATOR_NAME_PREFIX}{text}")]
        );
        // The bar is drawn at the top edge, in the middle.
        let screen = capture(x.display())?;
        assert_ne!(
            rgb_at(&screen, i32::from(W) / 2, 2),
            rgb_at(&before, i32::from(W) / 2, 2),
            "no bar for {text}"
        );
    }

    overlay.set_state(none);
    overlay.sync()?;
    assert_eq!(overlay_windows(x.display())?, Vec::<String>::new());
    assert!(
        capture(x.display())? == before,
        "the bar left pixels behind"
    );
    Ok(())
}

#[test]
fn keyboard_display_shows_the_keys_and_an_empty_one_hides_them() -> Result<()> {
    let Some(x) = xvfb()? else { return Ok(()) };
    let _app = open_app(x.display())?;
    let overlay = Overlay::open(Some(x.display()))?;
    let before = capture(x.display())?;
    overlay.apply(&HostEvent::KeyDisplay {
        keys: vec!["Ctrl".into(), "C".into()],
        note: "copy".into(),
    });
    overlay.sync()?;
    assert_eq!(
        overlay_windows(x.display())?,
        [format!("{KEYS_NAME_PREFIX}Ctrl + C")]
    );
    let screen = capture(x.display())?;
    let changed = (0..usize::from(H))
        .filter(|&y| {
            let row = y * usize::from(W) * 4..(y + 1) * usize::from(W) * 4;
            screen[row.clone()] != before[row]
        })
        .collect::<Vec<_>>();
    let (top, bottom) = (
        *changed.first().context("the box changed no pixel")?,
        *changed.last().context("the box changed no pixel")?,
    );
    assert!(
        top > usize::from(H) / 2 && bottom < usize::from(H),
        "the box is in the lower half: rows {top}..={bottom}"
    );

    overlay.apply(&HostEvent::KeyDisplay {
        keys: vec![],
        note: String::new(),
    });
    overlay.sync()?;
    assert_eq!(overlay_windows(x.display())?, Vec::<String>::new());
    Ok(())
}

#[test]
fn the_overlay_stays_above_windows_opened_later_and_leaves_with_its_owner() -> Result<()> {
    let Some(x) = xvfb()? else { return Ok(()) };
    let overlay = Overlay::open(Some(x.display()))?;
    overlay.apply(&hint(300, 200, true));
    overlay.set_state(IndicatorState {
        watching: 1,
        ..Default::default()
    });
    overlay.sync()?;
    // An application mapped after the overlay is raised above it by the server...
    let _app = open_app(x.display())?;
    // ...and the overlay puts itself back on top once it hears of it.
    overlay.sync()?;
    let names = viewable_names(x.display())?;
    let top: Vec<&str> = names.iter().rev().take(2).map(String::as_str).collect();
    assert!(
        top.contains(&POINTER_NAME) && top.iter().any(|n| n.starts_with(INDICATOR_NAME_PREFIX)),
        "the overlay is not on top: {names:?}"
    );
    let screen = capture(x.display())?;
    assert_eq!(rgb_at(&screen, 300 + MARKER_RING_RADIUS, 200), MARKER_RGB);

    drop(overlay);
    assert_eq!(overlay_windows(x.display())?, Vec::<String>::new());
    Ok(())
}

#[test]
fn marker_and_keys_leave_by_themselves_when_the_operator_goes_quiet() -> Result<()> {
    let Some(x) = xvfb()? else { return Ok(()) };
    let _app = open_app(x.display())?;
    let overlay = Overlay::open_with(
        Some(x.display()),
        OverlayOptions {
            pointer_timeout: Duration::from_millis(200),
            keys_shown_for: Duration::from_millis(200),
            ..Default::default()
        },
    )?;
    overlay.apply(&hint(200, 200, true));
    overlay.apply(&HostEvent::KeyDisplay {
        keys: vec!["Enter".into()],
        note: String::new(),
    });
    overlay.sync()?;
    // Both may already be gone on a slow machine; what matters is that they go.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !overlay_windows(x.display())?.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "still shown: {:?}",
            overlay_windows(x.display())?
        );
        std::thread::sleep(Duration::from_millis(20));
        overlay.sync()?;
    }
    // A new hint brings the marker back.
    overlay.apply(&hint(200, 200, true));
    overlay.sync()?;
    let screen = capture(x.display())?;
    assert_eq!(rgb_at(&screen, 200 + MARKER_RING_RADIUS, 200), MARKER_RGB);
    Ok(())
}

#[test]
fn the_operators_marks_go_when_nobody_sees_the_screen() -> Result<()> {
    let Some(x) = xvfb()? else { return Ok(()) };
    let _app = open_app(x.display())?;
    let overlay = Overlay::open(Some(x.display()))?;
    let watching = IndicatorState {
        watching: 1,
        ..Default::default()
    };
    overlay.set_state(watching);
    overlay.apply(&hint(200, 200, true));
    overlay.apply(&HostEvent::KeyDisplay {
        keys: vec!["F5".into()],
        note: String::new(),
    });
    overlay.sync()?;
    assert_eq!(overlay_windows(x.display())?.len(), 3);
    // The customer pauses: the pointer and the keys refer to a picture the operator no
    // longer has.
    overlay.set_state(IndicatorState {
        paused: true,
        ..Default::default()
    });
    overlay.sync()?;
    assert_eq!(
        overlay_windows(x.display())?,
        [format!(
            "{INDICATOR_NAME_PREFIX}PAUSED (nobody sees your screen)"
        )]
    );
    Ok(())
}
