//! The agent against a minimal in-test relay and coordinator on 127.0.0.1:0: attach,
//! refusal, pinning, and a host and viewer talking end to end. The test relay forwards
//! every data frame without applying any policy, so these tests also show that the host
//! enforces grants by itself.

mod support {
    pub mod coordinator;
    pub mod relay;
    pub mod tokens;
}

use std::time::Duration;

use anyhow::{Context, Result, bail};
use kakehashi_agent::consent::Consent;
use kakehashi_agent::crypto::Keypair;
use kakehashi_agent::{
    Host, HostConfig, HostEvent, LinkError, RelayLink, Viewer, ViewerConfig, ViewerEvent,
};
use kakehashi_proto::token::Role;
use kakehashi_proto::{Channel, Frame, Mode, Permissions, pb};
use tokio::task::JoinSet;

use support::coordinator::start_coordinator;
use support::relay::TestRelay;
use support::tokens::{joined, session_id};

const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------
// Participants and waiting for their events.
// ---------------------------------------------------------------------------------

async fn start_host(relay: &TestRelay, mode: Mode) -> Result<Host> {
    let me = Keypair::generate()?;
    let j = joined(&me, Role::Host, mode, &relay.endpoint)?;
    let (link, welcome) = RelayLink::connect(&j.relay, &j.token, &j.session_id).await?;
    let config = HostConfig {
        consent: Consent::Manual,
    };
    Ok(Host::start(j, me, link, welcome, config, None))
}

async fn start_viewer(relay: &TestRelay, mode: Mode, config: ViewerConfig) -> Result<Viewer> {
    let me = Keypair::generate()?;
    let j = joined(&me, Role::Viewer, mode, &relay.endpoint)?;
    let (link, welcome) = RelayLink::connect(&j.relay, &j.token, &j.session_id).await?;
    Ok(Viewer::start(j, me, link, welcome, config, None))
}

/// The next host event `f` accepts; others are collected in `seen`.
async fn host_until<T>(
    host: &mut Host,
    seen: &mut Vec<HostEvent>,
    mut f: impl FnMut(&HostEvent) -> Option<T>,
) -> Result<T> {
    tokio::time::timeout(WAIT, async {
        loop {
            let ev = host.next_event().await.context("host events ended")?;
            if let Some(t) = f(&ev) {
                return Ok(t);
            }
            seen.push(ev);
        }
    })
    .await
    .context("timed out waiting for a host event")?
}

async fn viewer_until<T>(
    viewer: &mut Viewer,
    mut f: impl FnMut(&ViewerEvent) -> Option<T>,
) -> Result<T> {
    tokio::time::timeout(WAIT, async {
        loop {
            let ev = viewer.next_event().await.context("viewer events ended")?;
            if let Some(t) = f(&ev) {
                return Ok(t);
            }
        }
    })
    .await
    .context("timed out waiting for a viewer event")?
}

fn text(s: &str) -> pb::InputEvent {
    pb::InputEvent {
        kind: Some(pb::input_event::Kind::Text(pb::TypeText { text: s.into() })),
    }
}

// ---------------------------------------------------------------------------------

#[tokio::test]
async fn refusal_carries_the_relays_reason() -> Result<()> {
    let relay = TestRelay::start(Some("token expired at 5 (now 9)"))?;
    let err = RelayLink::connect(&relay.endpoint, b"tok", &session_id())
        .await
        .expect_err("refused");
    match err {
        LinkError::Refused(reason) => assert_eq!(reason, "token expired at 5 (now 9)"),
        other => bail!("expected Refused, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_relay_with_another_certificate_is_not_trusted() -> Result<()> {
    let relay = TestRelay::start(None)?;
    let mut endpoint = relay.endpoint.clone();
    endpoint.cert_sha256[0] ^= 1;
    let err = RelayLink::connect(&endpoint, b"tok", &session_id())
        .await
        .expect_err("pin mismatch");
    match err {
        LinkError::Handshake(reason) => assert!(reason.contains("certificate"), "{reason}"),
        other => bail!("expected a handshake failure, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn host_and_viewer_end_to_end() -> Result<()> {
    let relay = TestRelay::start(None)?;
    let mut host = start_host(&relay, Mode::Control).await?;
    let mut viewer = start_viewer(
        &relay,
        Mode::Control,
        ViewerConfig {
            request_on_join: Some((Permissions::CONTROL, "to fix the printer".into())),
            supervisor: false,
            recorder: false,
        },
    )
    .await?;
    let mut seen = Vec::new();

    // Both ends verify each other's token and show the same SAS.
    let host_sas = host_until(&mut host, &mut seen, |e| match e {
        HostEvent::PeerJoined { sas, .. } => Some(sas.clone()),
        _ => None,
    })
    .await?;
    let viewer_sas = viewer_until(&mut viewer, |e| match e {
        ViewerEvent::PeerJoined { sas } => Some(sas.clone()),
        _ => None,
    })
    .await?;
    assert_eq!(host_sas, viewer_sas);
    assert_eq!(host.sas(), Some(host_sas.clone()));
    assert_eq!(viewer.sas(), Some(host_sas));

    // The host asks for VIEW first; nothing is shown before the answer.
    let asked = host_until(&mut host, &mut seen, |e| match e {
        HostEvent::ConsentRequested { permissions, .. } => Some(*permissions),
        _ => None,
    })
    .await?;
    assert_eq!(asked, Permissions::VIEW);
    let frame = pb::ScreenFrame {
        width: 4,
        height: 2,
        key_frame: true,
        data: vec![1, 2, 3],
        group_key: None,
    };
    assert!(!host.send_screen(frame.clone()).await?);

    // A modified viewer sends input without a grant: the relay here forwards it, and
    // the host must drop it.
    viewer.send_input_unchecked(text("forbidden")).await?;
    assert!(!viewer.send_input(text("polite")).await?);
    // A dropped frame produces no event, only a counter: poll it, bounded.
    tokio::time::timeout(WAIT, async {
        while host.dropped_frames() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .context("host never counted the forbidden input")?;

    host.answer(Permissions::VIEW)?;
    let g = host_until(&mut host, &mut seen, |e| match e {
        HostEvent::GrantsChanged(g) => Some(*g),
        _ => None,
    })
    .await?;
    assert_eq!(g, Permissions::VIEW);
    let g = viewer_until(&mut viewer, |e| match e {
        ViewerEvent::GrantsChanged(g) => Some(*g),
        _ => None,
    })
    .await?;
    assert_eq!(g, Permissions::VIEW);

    // The screen flows now, sealed end to end.
    assert!(host.send_screen(frame.clone()).await?);
    let (got, seq) = viewer_until(&mut viewer, |e| match e {
        ViewerEvent::Screen { frame, seq, .. } => Some((frame.clone(), *seq)),
        _ => None,
    })
    .await?;
    assert_eq!(got, frame);
    // Sequence number 1 carried the group key, sealed for this viewer alone.
    assert_eq!(seq, 2);

    // The viewer's own request for CONTROL comes second.
    let (asked, note) = host_until(&mut host, &mut seen, |e| match e {
        HostEvent::ConsentRequested {
            permissions, note, ..
        } => Some((*permissions, note.clone())),
        _ => None,
    })
    .await?;
    assert_eq!(asked, Permissions::CONTROL);
    assert_eq!(note, "to fix the printer");
    host.answer(Permissions::CONTROL)?;
    viewer_until(&mut viewer, |e| match e {
        ViewerEvent::GrantsChanged(g) if g.contains(Permissions::CONTROL) => Some(()),
        _ => None,
    })
    .await?;
    assert!(viewer.send_input(text("allowed")).await?);
    let input = host_until(&mut host, &mut seen, |e| match e {
        HostEvent::Input(i) => Some(i.clone()),
        _ => None,
    })
    .await?;
    assert_eq!(
        input,
        text("allowed"),
        "the forbidden input must never arrive"
    );

    // Chat both ways.
    viewer.send_chat("hello from the operator").await?;
    let chat = host_until(&mut host, &mut seen, |e| match e {
        HostEvent::Chat(t) => Some(t.clone()),
        _ => None,
    })
    .await?;
    assert_eq!(chat, "hello from the operator");
    host.send_chat("hello from the customer").await?;
    let chat = viewer_until(&mut viewer, |e| match e {
        ViewerEvent::Chat(t) => Some(t.clone()),
        _ => None,
    })
    .await?;
    assert_eq!(chat, "hello from the customer");

    // The operator hangs up: both learn why.
    viewer
        .hangup(pb::EndReason::EndedByOperator, "done")
        .await?;
    let (reason, detail) = host_until(&mut host, &mut seen, |e| match e {
        HostEvent::Ended { reason, detail } => Some((*reason, detail.clone())),
        _ => None,
    })
    .await?;
    assert_eq!(reason, pb::EndReason::EndedByOperator);
    assert_eq!(detail, "done");
    assert!(
        !seen.iter().any(|e| matches!(e, HostEvent::Input(_))),
        "no other input was obeyed: {seen:?}"
    );
    assert!(matches!(
        host.send_screen(frame).await,
        Err(kakehashi_agent::AgentError::Ended)
    ));
    Ok(())
}

#[tokio::test]
async fn view_only_session_never_grants_or_obeys_control() -> Result<()> {
    let relay = TestRelay::start(None)?;
    let mut host = start_host(&relay, Mode::View).await?;
    let mut viewer = start_viewer(
        &relay,
        Mode::View,
        ViewerConfig {
            request_on_join: Some((Permissions::CONTROL, String::new())),
            supervisor: false,
            recorder: false,
        },
    )
    .await?;
    let mut seen = Vec::new();
    let asked = host_until(&mut host, &mut seen, |e| match e {
        HostEvent::ConsentRequested { permissions, .. } => Some(*permissions),
        _ => None,
    })
    .await?;
    assert_eq!(asked, Permissions::VIEW);
    // Granting everything still yields only VIEW: the mode caps it.
    host.answer(Permissions::ALL)?;
    let g = viewer_until(&mut viewer, |e| match e {
        ViewerEvent::GrantsChanged(g) => Some(*g),
        _ => None,
    })
    .await?;
    assert_eq!(g, Permissions::VIEW);
    assert!(!viewer.send_input(text("x")).await?);
    viewer.send_input_unchecked(text("x")).await?;
    // A dropped frame produces no event, only a counter: poll it, bounded.
    tokio::time::timeout(WAIT, async {
        while host.dropped_frames() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .context("host never counted the input")?;
    assert_eq!(host.granted(), Permissions::VIEW);
    // Pointer hints are fine in a view session with VIEW granted.
    assert!(
        viewer
            .send_pointer(pb::PointerHint {
                x: 3,
                y: 4,
                visible: true
            })
            .await?
    );
    let p = host_until(&mut host, &mut seen, |e| match e {
        HostEvent::Pointer(p) => Some(*p),
        _ => None,
    })
    .await?;
    assert_eq!((p.x, p.y), (3, 4));
    assert!(!seen.iter().any(|e| matches!(e, HostEvent::Input(_))));
    Ok(())
}

#[tokio::test]
async fn frames_on_the_wire_are_sealed_and_numbered_from_one() -> Result<()> {
    let relay = TestRelay::start(None)?;
    let me = Keypair::generate()?;
    let j = joined(&me, Role::Host, Mode::Control, &relay.endpoint)?;
    let (link, welcome) = RelayLink::connect(&j.relay, &j.token, &j.session_id).await?;
    assert_eq!(welcome.participant_id, 1);
    // Lower level: the sequence check on send_frame.
    let bad = Frame::new(
        kakehashi_proto::FrameHeader::new(Channel::Chat, 0, 5, 0, 0),
        &[],
    );
    assert!(matches!(
        link.send_frame(&bad).await,
        Err(LinkError::WrongSeq {
            expected: 1,
            got: 5,
            ..
        })
    ));
    let good = Frame::new(
        kakehashi_proto::FrameHeader::new(Channel::Chat, 0, 1, 0, 0),
        &[],
    );
    link.send_frame(&good).await?;
    let signal = Frame::new(
        kakehashi_proto::FrameHeader::new(Channel::Signal, 0, 1, 0, 0),
        &[],
    );
    assert!(matches!(
        link.send_frame(&signal).await,
        Err(LinkError::WrongChannel { .. })
    ));
    // The escape hatches accept anything.
    link.send_raw_on_new_uni(b"\x09garbage").await?;
    link.send_frame_unchecked(&bad).await?;
    Ok(())
}

#[tokio::test]
async fn scripted_host_streams_a_synthetic_screen_until_hung_up() -> Result<()> {
    let relay = TestRelay::start(None)?;
    let me = Keypair::generate()?;
    let j = joined(&me, Role::Host, Mode::Control, &relay.endpoint)?;
    let (link, welcome) = RelayLink::connect(&j.relay, &j.token, &j.session_id).await?;
    let mut host = Host::start(
        j,
        me,
        link,
        welcome,
        HostConfig {
            consent: Consent::Approve(Permissions::VIEW),
        },
        None,
    );
    let screen = kakehashi_agent::SyntheticScreen {
        width: 64,
        height: 32,
        fps: 100,
        frame_bytes: 1000,
        key_interval: 5,
    };
    let mut running = JoinSet::new();
    running.spawn(async move {
        let mut events = Vec::new();
        let end = host.run_synthetic(screen, |e| events.push(e.clone())).await;
        (end, events)
    });
    let mut viewer = start_viewer(
        &relay,
        Mode::Control,
        ViewerConfig {
            request_on_join: Some((Permissions::CONTROL, String::new())),
            supervisor: false,
            recorder: false,
        },
    )
    .await?;
    let mut frames = Vec::new();
    while frames.len() < 12 {
        let f = viewer_until(&mut viewer, |e| match e {
            ViewerEvent::Screen { frame, seq, .. } => {
                Some((frame.key_frame, *seq, frame.data.len()))
            }
            _ => None,
        })
        .await?;
        frames.push(f);
    }
    // The first frame a viewer sees is a key frame; then one every five.
    assert!(frames[0].0, "{frames:?}");
    assert!(frames.iter().all(|f| f.2 == 1000));
    // Consecutive, but for the group key that goes before each key frame (one viewer).
    assert!(
        frames
            .windows(2)
            .all(|w| w[1].1 == w[0].1 + 1 + u64::from(w[1].0)),
        "{frames:?}"
    );
    assert!(frames.iter().filter(|f| f.0).count() >= 2, "{frames:?}");
    // CONTROL was outside the scripted set: denied.
    assert_eq!(viewer.granted(), Permissions::VIEW);
    viewer
        .hangup(pb::EndReason::EndedByOperator, "seen enough")
        .await?;
    let (end, events) = tokio::time::timeout(WAIT, running.join_next())
        .await
        .context("host did not stop")?
        .context("no task")??;
    let (reason, detail) = end?;
    assert_eq!(reason, pb::EndReason::EndedByOperator);
    assert_eq!(detail, "seen enough");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, HostEvent::PeerJoined { .. }))
    );
    assert!(events.contains(&HostEvent::GrantsChanged(Permissions::VIEW)));
    Ok(())
}

#[tokio::test]
async fn viewer_counts_frames_that_do_not_decrypt_and_carries_on() -> Result<()> {
    let relay = TestRelay::start(None)?;
    // A host that is only a link: it sends a screen frame nobody sealed.
    let me = Keypair::generate()?;
    let j = joined(&me, Role::Host, Mode::Control, &relay.endpoint)?;
    let (fake_host, _) = RelayLink::connect(&j.relay, &j.token, &j.session_id).await?;
    let mut viewer = start_viewer(&relay, Mode::Control, ViewerConfig::default()).await?;
    viewer_until(&mut viewer, |e| match e {
        ViewerEvent::PeerJoined { .. } => Some(()),
        _ => None,
    })
    .await?;
    let payload = [0x5a; 40];
    let header = kakehashi_proto::FrameHeader::new(
        Channel::Chat,
        0,
        1,
        kakehashi_proto::unix_now_us(),
        payload.len() as u32,
    );
    fake_host.send_frame(&Frame::new(header, &payload)).await?;
    // A dropped frame produces no event, only a counter: poll it, bounded.
    tokio::time::timeout(WAIT, async {
        while viewer.undecryptable_frames() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .context("viewer never counted the bad frame")?;
    // Still alive and usable.
    viewer.send_chat("still here").await?;
    assert_eq!(viewer.undecryptable_frames(), 1);
    // A screen frame it cannot open may be sealed for another viewer: skipped, counted
    // apart.
    let header = kakehashi_proto::FrameHeader::new(
        Channel::Screen,
        0,
        1,
        kakehashi_proto::unix_now_us(),
        payload.len() as u32,
    );
    fake_host.send_frame(&Frame::new(header, &payload)).await?;
    tokio::time::timeout(WAIT, async {
        while viewer.frames_for_others() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .context("viewer never counted the screen frame it could not open")?;
    assert_eq!(viewer.undecryptable_frames(), 1);
    Ok(())
}

#[tokio::test]
async fn join_through_the_coordinator_and_report_consent() -> Result<()> {
    let relay = TestRelay::start(None)?;
    let mut tasks = JoinSet::new();
    let (url, reports) = start_coordinator(&relay, &mut tasks).await?;

    let wrong = Host::join(&url, "9999", HostConfig::default()).await;
    match wrong {
        Err(kakehashi_agent::AgentError::Rpc { call, status }) => {
            assert_eq!(call, "JoinByCode");
            assert_eq!(status.code(), tonic::Code::NotFound);
        }
        other => bail!("expected a NotFound refusal, got {other:?}"),
    }

    let config = HostConfig {
        consent: Consent::Approve(Permissions::VIEW),
    };
    let mut host = Host::join(&url, "1234", config).await?;
    assert_eq!(host.participant_id(), 10);
    assert_eq!(host.session().session_id, session_id().to_string());
    let mut viewer = Viewer::join(
        &url,
        &session_id().to_string(),
        "ticket",
        ViewerConfig::default(),
    )
    .await?;
    let mut seen = Vec::new();
    let g = host_until(&mut host, &mut seen, |e| match e {
        HostEvent::GrantsChanged(g) => Some(*g),
        _ => None,
    })
    .await?;
    assert_eq!(g, Permissions::VIEW);
    viewer_until(&mut viewer, |e| match e {
        ViewerEvent::GrantsChanged(g) if *g == Permissions::VIEW => Some(()),
        _ => None,
    })
    .await?;
    assert_eq!(host.sas(), viewer.sas());
    // The report is best effort and asynchronous: poll for it, bounded.
    tokio::time::timeout(WAIT, async {
        loop {
            let got = reports.lock().map(|r| r.clone()).unwrap_or_default();
            if let Some(r) = got.first() {
                return r.clone();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .context("no ReportConsent")
    .map(|r| {
        assert_eq!(r.granted, Permissions::VIEW.bits());
        assert_eq!(r.denied, 0);
    })?;
    Ok(())
}
