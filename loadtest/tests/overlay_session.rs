//! The operator's pointer on the customer's screen, end to end: a private Xvfb is the
//! customer's display, the host shares it through a real relay with an overlay fed by
//! its own `HostEvent`s, and the operator's viewer points in a VIEW-ONLY session. The
//! marker appears at that position on the customer's display and, captured with the
//! rest of the screen, in the picture the operator's viewer decodes.
//! Without Xvfb the test skips, except under CI=true, where it fails.

use anyhow::{Result, bail};
use kakehashi_agent::host::{ScreenOptions, ScreenShare};
use kakehashi_agent::media::overlay::{
    INDICATOR_NAME_PREFIX, KEYS_NAME_PREFIX, MARKER_RGB, MARKER_RING_RADIUS, POINTER_NAME,
};
use kakehashi_agent::media::xvfb::{FilledRect, TestWindow, Xvfb, test_picture};
use kakehashi_agent::media::{
    CaptureConfig, IndicatorState, Overlay, ScreenSource, X11Source, image::RgbImage,
};
use kakehashi_agent::viewer::PngOutput;
use kakehashi_agent::{Host, HostEvent, Viewer, ViewerEvent};
use kakehashi_loadtest::LocalCluster;
use kakehashi_loadtest::testkit::{self, Attached, SessionSpec, within};
use kakehashi_proto::Permissions;
use kakehashi_proto::pb;
use x11rb::connection::Connection;
use x11rb::protocol::xproto::{self, ConnectionExt as _};

const W: u16 = 640;
const H: u16 = 480;
const RECTS: [FilledRect; 2] = [
    (20, 60, 160, 80, [0xd0, 0x20, 0x20]),
    (400, 300, 120, 40, [0x60, 0x60, 0x60]),
];
/// Where the operator points: on the page's white margin, away from the rectangles.
const POINT: (i32, i32) = (300, 220);

/// A session with viewer and host attached and VIEW granted, in `mode`.
async fn attached_pair(cluster: &LocalCluster, mode: pb::SessionMode) -> Result<(Host, Viewer)> {
    let Attached { host, viewer, .. } = testkit::attached_pair(
        &cluster.coordinator_url(),
        &SessionSpec::mode(mode),
        Permissions::VIEW,
    )
    .await?;
    Ok((host, viewer))
}

/// What the CLI does with each host event: the overlay shows it, and the indicator
/// follows the session. Returns the first event `pick` accepts.
async fn feed_until<T>(
    host: &mut Host,
    overlay: &Overlay,
    what: &str,
    pick: impl Fn(&HostEvent) -> Option<T>,
) -> Result<T> {
    within(what, async {
        while let Some(ev) = host.next_event().await {
            overlay.apply(&ev);
            show_state(host, overlay);
            if let Some(t) = pick(&ev) {
                return Ok(t);
            }
            if let HostEvent::Ended { reason, detail } = ev {
                bail!("ended: {reason:?} {detail}");
            }
        }
        bail!("host event stream closed")
    })
    .await?
}

fn show_state(host: &Host, overlay: &Overlay) {
    let control = host.session().mode == pb::SessionMode::Control as i32;
    overlay.set_state(IndicatorState::from_session(
        host.granted(),
        host.is_paused(),
        control,
        u32::from(host.sas().is_some()),
    ));
}

fn share(host: &Host, display: &str) -> Result<ScreenShare> {
    Ok(host.share_x11_screen(&ScreenOptions {
        display: Some(display.to_owned()),
        capture: CaptureConfig {
            fps: 15,
            scale: 1.0,
        },
        bitrate_bps: 4_000_000,
        adapt_bitrate: false,
        inject_input: true,
        ..ScreenOptions::default()
    })?)
}

/// The customer's screen now, as BGRA.
fn capture(display: &str) -> Result<Vec<u8>> {
    let config = CaptureConfig {
        fps: 15,
        scale: 1.0,
    };
    Ok(X11Source::open(Some(display), config)?
        .without_damage()
        .capture()?
        .data
        .to_vec())
}

fn bgra_at(bgra: &[u8], x: i32, y: i32) -> [u8; 3] {
    let o = (y as usize * usize::from(W) + x as usize) * 4;
    [bgra[o + 2], bgra[o + 1], bgra[o]]
}

/// The overlay's viewable windows on `display`, by name.
fn overlay_windows(display: &str) -> Result<Vec<String>> {
    let (conn, screen) = x11rb::connect(Some(display))?;
    let root = conn.setup().roots[screen].root;
    let mut names = Vec::new();
    for w in conn.query_tree(root)?.reply()?.children {
        if conn.get_window_attributes(w)?.reply()?.map_state != xproto::MapState::VIEWABLE {
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
        let name = String::from_utf8_lossy(&name).into_owned();
        if name.starts_with("Kakehashi") {
            names.push(name);
        }
    }
    Ok(names)
}

/// The ring points around the hinted position.
fn ring(p: (i32, i32)) -> [(i32, i32); 4] {
    let r = MARKER_RING_RADIUS;
    [
        (p.0 + r, p.1),
        (p.0 - r, p.1),
        (p.0, p.1 + r),
        (p.0, p.1 - r),
    ]
}

/// Whether a decoded picture shows the marker's colour on the ring (after H.264 and
/// 4:2:0, within a margin; the page there is white or light grey).
fn shows_marker(img: &RgbImage, p: (i32, i32)) -> bool {
    ring(p).iter().all(|&(x, y)| {
        let o = (y as usize * img.width as usize + x as usize) * 3;
        let px = &img.data[o..o + 3];
        px.iter()
            .zip(MARKER_RGB)
            .all(|(&got, want)| (i32::from(got) - i32::from(want)).abs() <= 60)
    })
}

async fn next_picture(viewer: &mut Viewer, png: &mut PngOutput) -> Result<RgbImage> {
    within("a decoded picture at the viewer", async {
        while let Some(ev) = viewer.next_event().await {
            match ev {
                ViewerEvent::Screen { frame, .. } => {
                    if let Some(img) = png.push(&frame)? {
                        return Ok(img);
                    }
                }
                ViewerEvent::Ended { reason, detail } => bail!("ended: {reason:?} {detail}"),
                _ => {}
            }
        }
        bail!("viewer event stream closed")
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_points_in_a_view_only_session_and_the_customer_sees_it() -> Result<()> {
    let Some(x) = Xvfb::start_or_skip(u32::from(W), u32::from(H))? else {
        return Ok(());
    };
    let _app = TestWindow::open(x.display(), W, H, &RECTS)?;
    let picture = test_picture(W, H, &RECTS);
    let cluster = LocalCluster::builder().start().await?;
    let (mut host, mut viewer) = attached_pair(&cluster, pb::SessionMode::View).await?;
    let overlay = Overlay::open(Some(x.display()))?;
    show_state(&host, &overlay);
    overlay.sync()?;
    // VIEW is granted and the operator is there: the customer is told so.
    assert_eq!(
        overlay_windows(x.display())?,
        [format!("{INDICATOR_NAME_PREFIX}WATCHING (1 viewer)")]
    );
    let share = share(&host, x.display())?;
    let dir = std::env::temp_dir().join(format!("kakehashi-overlay-{}", std::process::id()));
    let mut png = PngOutput::new(&dir)?;
    let first = next_picture(&mut viewer, &mut png).await?;
    assert!(!shows_marker(&first, POINT), "a marker before pointing");

    // View-only: the viewer may point (and never send input).
    let hint = pb::PointerHint {
        x: POINT.0,
        y: POINT.1,
        visible: true,
    };
    assert!(viewer.send_pointer(hint).await?, "pointer hint withheld");
    let got = feed_until(&mut host, &overlay, "the hint at the host", |ev| match ev {
        HostEvent::Pointer(p) => Some(*p),
        _ => None,
    })
    .await?;
    assert_eq!((got.x, got.y, got.visible), (POINT.0, POINT.1, true));
    overlay.sync()?;

    // On the customer's display, at the hinted position.
    let screen = capture(x.display())?;
    for (rx, ry) in ring(POINT) {
        assert_eq!(bgra_at(&screen, rx, ry), MARKER_RGB, "ring at ({rx}, {ry})");
    }
    let mut shown = overlay_windows(x.display())?;
    shown.sort();
    let mut want = [
        format!("{INDICATOR_NAME_PREFIX}WATCHING (1 viewer)"),
        POINTER_NAME.to_owned(),
    ];
    want.sort();
    assert_eq!(shown, want);

    // In the operator's decoded stream too (frames from before the hint come first).
    within("the marker in the viewer's picture", async {
        loop {
            let img = next_picture(&mut viewer, &mut png).await?;
            if shows_marker(&img, POINT) {
                return Ok::<_, anyhow::Error>(());
            }
        }
    })
    .await??;

    // The keyboard display is allowed in view-only sessions too.
    assert!(
        viewer
            .send_key_display(&["Ctrl", "Alt", "Delete"], "then Task Manager")
            .await?
    );
    feed_until(&mut host, &overlay, "the keys at the host", |ev| {
        matches!(ev, HostEvent::KeyDisplay { .. }).then_some(())
    })
    .await?;
    overlay.sync()?;
    assert!(
        overlay_windows(x.display())?.contains(&format!("{KEYS_NAME_PREFIX}Ctrl + Alt + Delete"))
    );

    // The operator stops pointing: the customer's screen is theirs again.
    let hide = pb::PointerHint {
        x: POINT.0,
        y: POINT.1,
        visible: false,
    };
    assert!(viewer.send_pointer(hide).await?);
    feed_until(&mut host, &overlay, "the hide at the host", |ev| match ev {
        HostEvent::Pointer(p) if !p.visible => Some(()),
        _ => None,
    })
    .await?;
    overlay.sync()?;
    let screen = capture(x.display())?;
    for (rx, ry) in ring(POINT) {
        assert_eq!(bgra_at(&screen, rx, ry), bgra_at(&picture, rx, ry));
    }
    // Pointing and the keyboard display never became input.
    assert_eq!(share.injected(), 0);

    // Paused: nobody watches, and the bar says so.
    host.pause_sharing().await?;
    show_state(&host, &overlay);
    overlay.sync()?;
    assert!(overlay_windows(x.display())?.contains(&format!(
        "{INDICATOR_NAME_PREFIX}PAUSED (nobody sees your screen)"
    )));

    let _ = std::fs::remove_dir_all(&dir);
    drop(share);
    drop(overlay);
    assert_eq!(overlay_windows(x.display())?, Vec::<String>::new());
    cluster.shutdown().await;
    Ok(())
}
