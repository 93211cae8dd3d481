//! The operator's viewer window in a real session: the customer's private Xvfb shows
//! known content, the host captures and streams it through a real relay, and the
//! viewer shows it in a `ViewerWindow` on a second private Xvfb (the operator's
//! desktop). The tests read the window back from the operator's X server (pixels,
//! title, status property) and drive it with XTest as an operator would.
//! Without Xvfb the tests skip, except under CI=true, where they fail.

use anyhow::{Context, Result, bail};
use kakehashi_agent::host::{ScreenOptions, ScreenShare};
use kakehashi_agent::media::frame::psnr;
use kakehashi_agent::media::image::RgbImage;
use kakehashi_agent::media::input::jis;
use kakehashi_agent::media::xvfb::{FilledRect, Seen, TestWindow, Xvfb, test_picture};
use kakehashi_agent::media::{CaptureConfig, InputSink, XTestSink};
use kakehashi_agent::viewer::window::{PAUSED_RGB, STATUS_PROPERTY, STRIP_HEIGHT};
use kakehashi_agent::viewer::{ViewerWindow, WindowEvent};
use kakehashi_agent::{Consent, Host, HostConfig, HostEvent, Viewer, ViewerConfig, ViewerEvent};
use kakehashi_loadtest::LocalCluster;
use kakehashi_loadtest::testkit::{SessionSpec, create_session, until, within};
use kakehashi_proto::Permissions;
use kakehashi_proto::pb;
use x11rb::connection::Connection;
use x11rb::protocol::xproto::{AtomEnum, ConnectionExt as _, ImageFormat};
use x11rb::rust_connection::RustConnection;

const W: u16 = 640;
const H: u16 = 480;
/// The operator's desktop: room for the window and then some.
const OPERATOR: (u32, u32) = (1024, 768);
/// Where the test window's "button" is.
const BUTTON: (i16, i16, u16, u16) = (400, 300, 120, 40);
/// Coloured rectangles on even coordinates (4:2:0 keeps their colour), over the page.
const RECTS: [FilledRect; 4] = [
    (20, 60, 160, 80, [0xd0, 0x20, 0x20]),
    (220, 60, 160, 80, [0x20, 0xa0, 0x30]),
    (420, 60, 160, 80, [0x20, 0x40, 0xc0]),
    (BUTTON.0, BUTTON.1, BUTTON.2, BUTTON.3, [0x60, 0x60, 0x60]),
];
/// The bar the issue sets for the picture against the known one.
const MIN_PSNR_DB: f64 = 30.0;

/// The known picture as RGB, exactly what the test window shows.
fn reference_rgb() -> Vec<u8> {
    test_picture(W, H, &RECTS)
        .chunks_exact(4)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect()
}

/// Two displays: the customer's and the operator's.
fn displays() -> Result<Option<(Xvfb, Xvfb)>> {
    let Some(customer) = Xvfb::start_or_skip(u32::from(W), u32::from(H))? else {
        return Ok(None);
    };
    let Some(operator) = Xvfb::start_or_skip(OPERATOR.0, OPERATOR.1)? else {
        return Ok(None);
    };
    Ok(Some((customer, operator)))
}

/// A session with viewer and host attached and `approve` granted (scripted); every
/// viewer event on the way goes through the window, as the CLI does.
async fn attached_pair(
    cluster: &LocalCluster,
    mode: pb::SessionMode,
    approve: Permissions,
    window: &mut ViewerWindow,
) -> Result<(Host, Viewer)> {
    let (created, sid) =
        create_session(&cluster.coordinator_url(), &SessionSpec::mode(mode)).await?;
    let url = cluster.coordinator_url();
    let mut viewer = Viewer::join(
        &url,
        &sid,
        &created.operator_ticket,
        ViewerConfig::default(),
    )
    .await?;
    let host = Host::join(
        &url,
        &created.code,
        HostConfig {
            consent: Consent::Approve(approve),
        },
    )
    .await?;
    granted(&mut viewer, window, Permissions::VIEW).await?;
    let more = approve.without(Permissions::VIEW);
    if !more.is_empty() {
        viewer.request_permissions(more, "let me fix it").await?;
        granted(&mut viewer, window, approve).await?;
    }
    Ok((host, viewer))
}

async fn granted(viewer: &mut Viewer, window: &mut ViewerWindow, want: Permissions) -> Result<()> {
    within("the grant at the viewer", async {
        while let Some(ev) = viewer.next_event().await {
            window.follow(viewer, &ev)?;
            match ev {
                ViewerEvent::GrantsChanged(g) if g.contains(want) => return Ok(()),
                ViewerEvent::Ended { reason, detail } => bail!("ended: {reason:?} {detail}"),
                _ => {}
            }
        }
        bail!("viewer event stream closed")
    })
    .await?
}

/// Follows the viewer until `pred` holds for an event (after the window saw it).
async fn follow_until(
    viewer: &mut Viewer,
    window: &mut ViewerWindow,
    what: &str,
    pred: impl Fn(&ViewerEvent) -> bool,
) -> Result<()> {
    within(what, async {
        while let Some(ev) = viewer.next_event().await {
            window.follow(viewer, &ev)?;
            if pred(&ev) {
                return Ok(());
            }
            if let ViewerEvent::Ended { reason, detail } = ev {
                bail!("ended: {reason:?} {detail}");
            }
        }
        bail!("viewer event stream closed")
    })
    .await?
}

/// Follows the viewer until the window has painted a picture, and waits until it is on
/// the operator's screen.
async fn shown(viewer: &mut Viewer, window: &mut ViewerWindow) -> Result<()> {
    let before = window.painted();
    within("a picture in the viewer window", async {
        loop {
            let Some(ev) = viewer.next_event().await else {
                bail!("viewer event stream closed")
            };
            window.follow(viewer, &ev)?;
            if let ViewerEvent::Ended { reason, detail } = ev {
                bail!("ended: {reason:?} {detail}");
            }
            window.sync().await?;
            if window.painted() > before {
                return Ok(());
            }
        }
    })
    .await?
}

fn share(host: &Host, display: &str, inject_input: bool) -> Result<ScreenShare> {
    Ok(host.share_x11_screen(&ScreenOptions {
        display: Some(display.to_owned()),
        capture: CaptureConfig {
            fps: 15,
            scale: 1.0,
        },
        bitrate_bps: 4_000_000,
        adapt_bitrate: false,
        inject_input,
        ..ScreenOptions::default()
    })?)
}

/// The operator's X server, as a screenshot tool or a test would see it.
struct OperatorScreen {
    conn: RustConnection,
    root: u32,
}

impl OperatorScreen {
    fn open(display: &str) -> Result<Self> {
        let (conn, n) = x11rb::connect(Some(display))?;
        let root = conn.setup().roots.get(n).context("no screen")?.root;
        Ok(Self { conn, root })
    }

    /// The window's pixels (whole window, strip included) as RGB.
    fn pixels(&self, window: u32) -> Result<RgbImage> {
        let geo = self.conn.get_geometry(window)?.reply()?;
        let img = self
            .conn
            .get_image(
                ImageFormat::Z_PIXMAP,
                window,
                0,
                0,
                geo.width,
                geo.height,
                !0,
            )?
            .reply()?;
        let (w, h) = (usize::from(geo.width), usize::from(geo.height));
        if img.data.len() < w * h * 4 {
            bail!("short image: {} bytes for {w}x{h}", img.data.len());
        }
        Ok(RgbImage {
            width: u32::from(geo.width),
            height: u32::from(geo.height),
            data: img.data[..w * h * 4]
                .chunks_exact(4)
                .flat_map(|p| [p[2], p[1], p[0]])
                .collect(),
        })
    }

    /// Where the window's top-left pixel is on the root window.
    fn origin(&self, window: u32) -> Result<(i32, i32)> {
        let t = self
            .conn
            .translate_coordinates(window, self.root, 0, 0)?
            .reply()?;
        Ok((i32::from(t.dst_x), i32::from(t.dst_y)))
    }

    fn text_property(&self, window: u32, name: &str) -> Result<String> {
        let atom = match name {
            "WM_NAME" => AtomEnum::WM_NAME.into(),
            _ => self.conn.intern_atom(false, name.as_bytes())?.reply()?.atom,
        };
        let reply = self
            .conn
            .get_property(false, window, atom, AtomEnum::ANY, 0, 4096)?
            .reply()?;
        Ok(String::from_utf8_lossy(&reply.value).into_owned())
    }

    /// The three places the status shows as text.
    fn status_texts(&self, window: u32) -> Result<[String; 3]> {
        Ok([
            self.text_property(window, "WM_NAME")?,
            self.text_property(window, "_NET_WM_NAME")?,
            self.text_property(window, STATUS_PROPERTY)?,
        ])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_window_shows_the_customer_screen_and_the_session_state() -> Result<()> {
    let Some((customer, operator)) = displays()? else {
        return Ok(());
    };
    let _app = TestWindow::open(customer.display(), W, H, &RECTS)?;
    let cluster = LocalCluster::builder().start().await?;
    let mut window = ViewerWindow::open(Some(operator.display()), "Kakehashi viewer")?;
    let (host, mut viewer) = attached_pair(
        &cluster,
        pb::SessionMode::View,
        Permissions::VIEW,
        &mut window,
    )
    .await?;
    let share = share(&host, customer.display(), false)?;
    let screen = OperatorScreen::open(operator.display())?;

    // (a) The picture, read back from the operator's X server.
    shown(&mut viewer, &mut window).await?;
    let img = screen.pixels(window.id())?;
    assert_eq!(
        (img.width, img.height),
        (u32::from(W), u32::from(H + STRIP_HEIGHT))
    );
    let picture = &img.data[usize::from(W) * usize::from(STRIP_HEIGHT) * 3..];
    let db = psnr(picture, &reference_rgb());
    eprintln!("viewer window vs the known picture: {db:.1} dB PSNR");
    assert!(db >= MIN_PSNR_DB, "PSNR {db:.1} dB below {MIN_PSNR_DB} dB");
    if let Some(dir) = std::env::var_os("KAKEHASHI_SCREENSHOT_DIR") {
        let path = std::path::Path::new(&dir).join("viewer-window.png");
        img.write_png(&path)?;
        eprintln!("wrote {}", path.display());
    }

    // (d) The security code in the title and the status property; "paused" while the
    // customer pauses, and the strip turns red.
    let sas = viewer.sas().context("no SAS after the host joined")?;
    let texts = screen.status_texts(window.id())?;
    for t in &texts {
        assert!(t.contains(&sas), "{t:?} lacks the SAS {sas}");
        assert!(
            !t.contains("paused=true") && !t.ends_with("| paused"),
            "{t:?}"
        );
    }
    host.pause_sharing().await?;
    follow_until(&mut viewer, &mut window, "the pause at the viewer", |ev| {
        matches!(ev, ViewerEvent::SharingPaused)
    })
    .await?;
    window.sync().await?;
    let [wm_name, net_wm_name, status] = screen.status_texts(window.id())?;
    assert!(
        wm_name.contains(&sas) && wm_name.contains("paused"),
        "{wm_name:?}"
    );
    assert!(
        net_wm_name.contains(&sas) && net_wm_name.contains("paused"),
        "{net_wm_name:?}"
    );
    assert!(status.contains("paused=true"), "{status:?}");
    let strip = screen.pixels(window.id())?;
    assert_eq!(
        strip.data[..3],
        PAUSED_RGB,
        "the strip is not red while paused"
    );

    host.resume_sharing().await?;
    follow_until(&mut viewer, &mut window, "the resume at the viewer", |ev| {
        matches!(ev, ViewerEvent::SharingResumed)
    })
    .await?;
    window.sync().await?;
    let [_, _, status] = screen.status_texts(window.id())?;
    assert!(status.contains("paused=false"), "{status:?}");

    // Closing the window (as a window manager asks) is an event for the owner.
    close_like_a_window_manager(&screen, window.id())?;
    let ev = within("the close event", window.next_event()).await?;
    assert_eq!(ev, Some(WindowEvent::Closed));
    drop(share);
    drop(window);
    cluster.shutdown().await;
    Ok(())
}

/// Sends WM_DELETE_WINDOW the way a window manager does.
fn close_like_a_window_manager(screen: &OperatorScreen, window: u32) -> Result<()> {
    use x11rb::protocol::xproto::{ClientMessageEvent, EventMask};
    let protocols = screen
        .conn
        .intern_atom(false, b"WM_PROTOCOLS")?
        .reply()?
        .atom;
    let delete = screen
        .conn
        .intern_atom(false, b"WM_DELETE_WINDOW")?
        .reply()?
        .atom;
    let ev = ClientMessageEvent::new(32, window, protocols, [delete, 0, 0, 0, 0]);
    screen
        .conn
        .send_event(false, window, EventMask::NO_EVENT, ev)?;
    screen.conn.flush()?;
    Ok(())
}

/// The operator clicks the customer's button inside the viewer window and types, with
/// XTest on the operator's display; returns once the window has turned all of it into
/// events.
async fn operator_clicks_and_types(
    operator: &str,
    screen: &OperatorScreen,
    window: &mut ViewerWindow,
    at: (i16, i16),
    text: &str,
) -> Result<()> {
    let (ox, oy) = screen.origin(window.id())?;
    let mut xtest = XTestSink::open(Some(operator))?;
    xtest.pointer_move(
        ox + i32::from(at.0),
        oy + i32::from(STRIP_HEIGHT) + i32::from(at.1),
    )?;
    xtest.button(1, true)?;
    xtest.button(1, false)?;
    xtest.flush()?;
    for c in text.chars() {
        xtest.type_char(c)?;
    }
    xtest.flush()?;
    window.sync().await?;
    Ok(())
}

/// What [`forward`] sent.
#[derive(Debug, Default)]
struct Forwarded {
    inputs: u64,
    points: Vec<pb::PointerHint>,
}

/// Every event the window has queued, sent as the CLI does: input through
/// `send_input` (nothing without control), pointing through `send_pointer`.
async fn forward(viewer: &Viewer, window: &mut ViewerWindow) -> Result<Forwarded> {
    let mut sent = Forwarded::default();
    while let Ok(ev) = window.events().try_recv() {
        match ev {
            WindowEvent::Input(i) => {
                if viewer.send_input(i).await? {
                    sent.inputs += 1;
                }
            }
            WindowEvent::Point(p) => {
                if viewer.send_pointer(p).await? {
                    sent.points.push(p);
                }
            }
            other => bail!("unexpected window event {other:?}"),
        }
    }
    Ok(sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_window_input_reaches_the_customer_only_with_control() -> Result<()> {
    let Some((customer, operator)) = displays()? else {
        return Ok(());
    };
    let app = TestWindow::open(customer.display(), W, H, &RECTS)?;
    let rx = app.record();
    let cluster = LocalCluster::builder().start().await?;
    let screen = OperatorScreen::open(operator.display())?;
    let (bx, by) = (
        BUTTON.0 + BUTTON.2 as i16 / 2,
        BUTTON.1 + BUTTON.3 as i16 / 2,
    );
    // `@`, `"` and `(` sit on different keys in the operator's US layout and the
    // customer's JIS one.
    let text = "Hello, World! 123 ~ @\"(";

    // (c) View-only session: the same attempt changes nothing on the customer's side;
    // the click points there instead (指差し).
    {
        let mut window = ViewerWindow::open(Some(operator.display()), "view-only")?;
        let (mut host, mut viewer) = attached_pair(
            &cluster,
            pb::SessionMode::View,
            Permissions::VIEW,
            &mut window,
        )
        .await?;
        let share = share(&host, customer.display(), true)?;
        shown(&mut viewer, &mut window).await?;
        operator_clicks_and_types(operator.display(), &screen, &mut window, (bx, by), text).await?;
        let sent = forward(&viewer, &mut window).await?;
        assert_eq!(sent.inputs, 0);
        let at = pb::PointerHint {
            x: bx.into(),
            y: by.into(),
            visible: true,
        };
        assert_eq!(sent.points, [at]);
        // Chat after the attempt: once it arrives, any input sent had its chance (chat
        // and input share their ordering; the pointer has a stream of its own).
        viewer.send_chat("done").await?;
        within("the chat and the pointer at the host", async {
            let (mut chat, mut pointed) = (false, false);
            while let Some(ev) = host.next_event().await {
                match ev {
                    HostEvent::Chat(t) if t == "done" => chat = true,
                    HostEvent::Input(i) => bail!("host obeyed input in view-only: {i:?}"),
                    HostEvent::Pointer(p) => {
                        assert_eq!(p, at, "pointed elsewhere");
                        pointed = true;
                    }
                    _ => {}
                }
                if chat && pointed {
                    return Ok(());
                }
            }
            bail!("host event stream closed")
        })
        .await??;
        assert_eq!(share.injected(), 0);
        assert_eq!(app.until_marker(&rx, 1)?, []);
    }

    // (b) Control session with CONTROL granted: exactly that click and that text.
    // The customer's keyboard is Japanese (JIS), the operator's US: what arrives is the
    // characters the operator typed, not the keys pressed.
    XTestSink::open(Some(customer.display()))?.load_layout(jis::JIS106)?;
    let mut window = ViewerWindow::open(Some(operator.display()), "control")?;
    let (host, mut viewer) = attached_pair(
        &cluster,
        pb::SessionMode::Control,
        Permissions::VIEW | Permissions::CONTROL,
        &mut window,
    )
    .await?;
    let share = share(&host, customer.display(), true)?;
    assert!(share.control_open());
    shown(&mut viewer, &mut window).await?;
    operator_clicks_and_types(operator.display(), &screen, &mut window, (bx, by), text).await?;
    let sent = forward(&viewer, &mut window).await?;
    assert!(sent.points.is_empty(), "pointed while controlling");
    let sent = sent.inputs;
    assert!(
        sent >= 3 + text.len() as u64,
        "only {sent} input events sent"
    );
    until("all input injected", || share.injected() >= sent).await?;
    let seen = app.until_marker(&rx, 2)?;
    assert_eq!(Seen::buttons(&seen), Seen::click(1, bx, by));
    assert_eq!(app.typed(&seen)?, text);
    // `@` came from the JIS `@` key (keycode 34), not from the US Shift+2.
    let (at_key, _) = jis::position('@').context("no @ on JIS")?;
    assert!(
        seen.iter()
            .any(|s| matches!(s, Seen::Key { keycode, press: true, .. } if *keycode == at_key)),
        "the JIS @ key was not pressed"
    );
    drop(share);
    drop(window);
    cluster.shutdown().await;
    Ok(())
}
