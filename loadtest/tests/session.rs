//! End-to-end behaviour of one session through a real cluster: real gRPC to the
//! coordinator, real QUIC to the relay, real agents. Each test starts its own cluster on
//! loopback ports the OS picks.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use ed25519_dalek::SigningKey;
use kakehashi_agent::{
    Consent, Host, HostConfig, HostEvent, LinkError, RelayLink, Viewer, ViewerConfig, ViewerEvent,
};
use kakehashi_loadtest::LocalCluster;
use kakehashi_loadtest::testkit::{
    self, SessionSpec, counter_reaches, host_until, viewer_until, within,
};
use kakehashi_proto::frame::{FLAG_KEY_FRAME, HEADER_LEN};
use kakehashi_proto::pb::{
    self, agent_service_client::AgentServiceClient, relay_admin_client::RelayAdminClient,
    session_service_client::SessionServiceClient,
};
use kakehashi_proto::{Channel, Claims, Frame, FrameHeader, Permissions, Role, SessionId};

async fn create(
    cluster: &LocalCluster,
    mode: pb::SessionMode,
    max_duration_secs: u32,
) -> Result<pb::CreateSessionResponse> {
    let mut api = SessionServiceClient::connect(cluster.coordinator_url()).await?;
    Ok(api
        .create_session(pb::CreateSessionRequest {
            device_id: String::new(),
            tenant: "acme".into(),
            operator: "op-7".into(),
            mode: mode as i32,
            permissions: 0,
            max_duration_secs,
        })
        .await?
        .into_inner())
}

fn session_id(created: &pb::CreateSessionResponse) -> String {
    created
        .session
        .as_ref()
        .map(|s| s.session_id.clone())
        .unwrap_or_default()
}

/// A session with its viewer and host attached, both keys verified, and `approve`
/// granted (scripted), waiting until the viewer sees the grant.
async fn attached_pair(
    cluster: &LocalCluster,
    mode: pb::SessionMode,
    approve: Permissions,
) -> Result<(pb::CreateSessionResponse, Host, Viewer)> {
    let a = testkit::attached_pair(
        &cluster.coordinator_url(),
        &SessionSpec::mode(mode),
        approve,
    )
    .await?;
    Ok((a.created, a.host, a.viewer))
}

fn screen(data: Vec<u8>, key_frame: bool) -> pb::ScreenFrame {
    pb::ScreenFrame {
        width: 640,
        height: 480,
        key_frame,
        data,
        group_key: None,
    }
}

/// Sends one screen frame and waits until the viewer shows exactly it.
async fn screen_roundtrip(host: &Host, viewer: &mut Viewer, data: Vec<u8>) -> Result<()> {
    if !host.send_screen(screen(data.clone(), true)).await? {
        bail!("host withheld a screen frame it should have sent");
    }
    let got = viewer_until(viewer, |ev| match ev {
        ViewerEvent::Screen { frame, .. } => Some(frame.data),
        _ => None,
    })
    .await?;
    if got != data {
        bail!("viewer got different screen bytes");
    }
    Ok(())
}

fn key_press(keysym: u32) -> pb::InputEvent {
    pb::InputEvent {
        kind: Some(pb::input_event::Kind::Key(pb::KeyPress {
            keysym,
            down: true,
        })),
    }
}

/// Joins as the host with a keypair of our own and attaches a bare link: a client that
/// can send anything, as a modified agent would.
async fn raw_host(
    cluster: &LocalCluster,
    code: &str,
) -> Result<(RelayLink, pb::JoinResponse, SessionId)> {
    let mut agent = AgentServiceClient::connect(cluster.coordinator_url()).await?;
    let resp = agent
        .join_by_code(pb::JoinByCodeRequest {
            code: code.into(),
            public_key: vec![7; 32],
        })
        .await?
        .into_inner();
    let sid: SessionId = resp
        .session
        .as_ref()
        .context("no session")?
        .session_id
        .parse()?;
    let relay = resp.relay.clone().context("no relay")?;
    let (link, _welcome) = RelayLink::connect(&relay, &resp.token, &sid).await?;
    Ok((link, resp, sid))
}

#[tokio::test]
async fn full_session_delivers_every_channel_in_order_and_input_only_after_control() -> Result<()> {
    let cluster = LocalCluster::builder().start().await?;
    let url = cluster.coordinator_url();
    let created = create(&cluster, pb::SessionMode::Control, 600).await?;
    let mut viewer = Viewer::join(
        &url,
        &session_id(&created),
        &created.operator_ticket,
        ViewerConfig::default(),
    )
    .await?;
    let mut host = Host::join(
        &url,
        &created.code,
        HostConfig {
            consent: Consent::Manual,
        },
    )
    .await?;

    // The host asks the customer about viewing as soon as the operator is verified.
    let asked = host_until(&mut host, |ev| match ev {
        HostEvent::ConsentRequested { permissions, .. } => Some(permissions),
        _ => None,
    })
    .await?;
    assert!(asked.contains(Permissions::VIEW), "asked {asked}");
    host.answer(Permissions::VIEW)?;
    viewer_until(&mut viewer, |ev| match ev {
        ViewerEvent::GrantsChanged(g) if g == Permissions::VIEW => Some(()),
        _ => None,
    })
    .await?;
    assert_eq!(host.sas(), viewer.sas(), "both ends show the same SAS");
    assert!(host.sas().is_some());

    // Screen frames arrive byte-exact.
    for i in 0..20u32 {
        let data = format!("frame {i} ").repeat(200).into_bytes();
        screen_roundtrip(&host, &mut viewer, data).await?;
    }

    // Input before control: a polite viewer does not send it; a modified one does and
    // the relay drops it.
    let stats = cluster.relays[0].stats();
    assert!(!viewer.send_input(key_press(999)).await?);
    let denied_before = stats.frames_denied.load(Ordering::Relaxed);
    viewer.send_input_unchecked(key_press(999)).await?;
    counter_reaches(
        "the relay to drop early input",
        &stats.frames_denied,
        denied_before + 1,
    )
    .await?;

    // Control consent, asked end to end over the control channel.
    viewer
        .request_permissions(Permissions::CONTROL, "to open the network settings")
        .await?;
    let note = host_until(&mut host, |ev| match ev {
        HostEvent::ConsentRequested {
            permissions, note, ..
        } if permissions.contains(Permissions::CONTROL) => Some(note),
        _ => None,
    })
    .await?;
    assert_eq!(note, "to open the network settings");
    host.answer(Permissions::VIEW | Permissions::CONTROL)?;
    viewer_until(&mut viewer, |ev| match ev {
        ViewerEvent::GrantsChanged(g) if g.contains(Permissions::CONTROL) => Some(()),
        _ => None,
    })
    .await?;

    // Reliable channels: in order, byte-exact, nothing from before the grant.
    for i in 0..200 {
        assert!(viewer.send_input(key_press(i)).await?);
    }
    let chats: Vec<String> = (0..100)
        .map(|i| format!("メッセージ {i}: {}", "x".repeat(i)))
        .collect();
    for c in &chats {
        viewer.send_chat(c).await?;
        host.send_chat(c).await?;
    }
    let mut keys = Vec::new();
    let mut host_chats = Vec::new();
    within("input and chat at the host", async {
        while keys.len() < 200 || host_chats.len() < 100 {
            match host.next_event().await {
                Some(HostEvent::Input(pb::InputEvent {
                    kind: Some(pb::input_event::Kind::Key(k)),
                })) => keys.push(k.keysym),
                Some(HostEvent::Chat(c)) => host_chats.push(c),
                Some(HostEvent::Ended { .. }) | None => break,
                Some(_) => {}
            }
        }
    })
    .await?;
    assert_eq!(
        keys,
        (0..200).collect::<Vec<_>>(),
        "input in order, none from before the grant"
    );
    assert_eq!(host_chats, chats);
    let mut viewer_chats = Vec::new();
    while viewer_chats.len() < 100 {
        viewer_chats.push(
            viewer_until(&mut viewer, |ev| match ev {
                ViewerEvent::Chat(c) => Some(c),
                _ => None,
            })
            .await?,
        );
    }
    assert_eq!(viewer_chats, chats);
    assert_eq!(viewer.undecryptable_frames(), 0);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn denied_consent_means_no_screen_even_from_a_modified_host() -> Result<()> {
    let cluster = LocalCluster::builder().start().await?;

    // An honest host whose customer said no withholds the screen itself.
    let (_c, host, mut viewer) =
        attached_pair(&cluster, pb::SessionMode::Control, Permissions::NONE).await?;
    viewer_until(&mut viewer, |ev| match ev {
        ViewerEvent::PeerJoined { .. } => Some(()),
        _ => None,
    })
    .await?;
    assert!(!host.send_screen(screen(vec![1; 1000], true)).await?);

    // A modified host sends screen frames anyway: the relay drops and counts every one.
    let created = create(&cluster, pb::SessionMode::Control, 600).await?;
    let mut viewer2 = Viewer::join(
        &cluster.coordinator_url(),
        &session_id(&created),
        &created.operator_ticket,
        ViewerConfig::default(),
    )
    .await?;
    let (link, _resp, _sid) = raw_host(&cluster, &created.code).await?;
    let stats = cluster.relays[0].stats();
    let before = stats.frames_denied.load(Ordering::Relaxed);
    for seq in 1..=10u64 {
        let h = FrameHeader::new(Channel::Screen, FLAG_KEY_FRAME, seq, 0, 500);
        link.send_frame_unchecked(&Frame::new(h, &[0x55; 500]))
            .await?;
    }
    counter_reaches(
        "the relay to drop 10 screen frames",
        &stats.frames_denied,
        before + 10,
    )
    .await?;
    // Frames on one stream are handled in order, so all ten were judged: none reached
    // the viewer, not even as undecryptable bytes.
    while let Ok(ev) = viewer2.events().try_recv() {
        assert!(
            !matches!(ev, ViewerEvent::Screen { .. }),
            "screen leaked: {ev:?}"
        );
    }
    assert_eq!(viewer2.undecryptable_frames(), 0);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn view_only_session_never_delivers_input() -> Result<()> {
    let cluster = LocalCluster::builder().start().await?;
    let (_c, mut host, viewer) =
        attached_pair(&cluster, pb::SessionMode::View, Permissions::ALL).await?;
    // Whatever the customer approves, a view-only session grants no control.
    assert!(!viewer.granted().contains(Permissions::CONTROL));
    assert!(!viewer.send_input(key_press(1)).await?);

    let stats = cluster.relays[0].stats();
    let before = stats.frames_denied.load(Ordering::Relaxed);
    for i in 0..5 {
        viewer.send_input_unchecked(key_press(i)).await?;
    }
    counter_reaches(
        "the relay to drop 5 input frames",
        &stats.frames_denied,
        before + 5,
    )
    .await?;
    // Pointer hints are allowed in view-only mode; chat still flows.
    assert!(
        viewer
            .send_pointer(pb::PointerHint {
                x: 10,
                y: 20,
                visible: true
            })
            .await?
    );
    viewer.send_chat("done").await?;
    let mut saw_pointer = false;
    host_until(&mut host, |ev| match ev {
        HostEvent::Input(i) => panic!("input reached the host in a view-only session: {i:?}"),
        HostEvent::Pointer(_) => {
            saw_pointer = true;
            None
        }
        HostEvent::Chat(c) if c == "done" => Some(()),
        _ => None,
    })
    .await?;
    assert!(saw_pointer, "pointer hint delivered in view-only mode");
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn bad_tokens_are_refused_with_a_clear_reason() -> Result<()> {
    let cluster = LocalCluster::builder().start().await?;
    let created = create(&cluster, pb::SessionMode::Control, 600).await?;
    let mut agent = AgentServiceClient::connect(cluster.coordinator_url()).await?;
    let resp = agent
        .join_by_code(pb::JoinByCodeRequest {
            code: created.code.clone(),
            public_key: vec![9; 32],
        })
        .await?
        .into_inner();
    let relay = resp.relay.clone().context("no relay")?;
    let sid: SessionId = session_id(&created).parse()?;
    let (claims, _, _) = Claims::decode_unverified(&resp.token)?;
    let now = kakehashi_proto::unix_now();

    let refused = |r: Result<(RelayLink, pb::Welcome), LinkError>| match r {
        Err(LinkError::Refused(reason)) => reason,
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, got a welcome"),
    };

    let forged = claims.sign(&SigningKey::from_bytes(&[3; 32]));
    let reason = refused(RelayLink::connect(&relay, &forged, &sid).await);
    assert!(reason.contains("signature"), "{reason}");

    let expired = Claims {
        expires_at: now - 1,
        ..claims.clone()
    }
    .sign(&cluster.signing_key);
    let reason = refused(RelayLink::connect(&relay, &expired, &sid).await);
    assert!(reason.contains("expired"), "{reason}");

    let elsewhere = Claims {
        relay_id: "relay-elsewhere".into(),
        ..claims.clone()
    }
    .sign(&cluster.signing_key);
    let reason = refused(RelayLink::connect(&relay, &elsewhere, &sid).await);
    assert!(reason.contains("relay-elsewhere"), "{reason}");

    let other_session = SessionId::from_bytes([0xAB; 16]);
    let reason = refused(RelayLink::connect(&relay, &resp.token, &other_session).await);
    assert!(reason.contains("is for session"), "{reason}");

    // A coordinator-role token is for RelayAdmin only.
    let admin_token = Claims {
        role: Role::Coordinator,
        ..claims.clone()
    }
    .sign(&cluster.signing_key);
    let reason = refused(RelayLink::connect(&relay, &admin_token, &sid).await);
    assert!(reason.contains("role"), "{reason}");

    // RelayAdmin refuses participant tokens and tokens for another session.
    let mut admin = RelayAdminClient::connect(cluster.relays[0].admin_url()).await?;
    let status = admin
        .end_session(pb::RelayEndSessionRequest {
            session_id: sid.to_string(),
            token: resp.token.clone(),
            reason: pb::EndReason::EndedByOperator as i32,
            detail: String::new(),
        })
        .await
        .expect_err("a host token must not end sessions");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let status = admin
        .end_session(pb::RelayEndSessionRequest {
            session_id: other_session.to_string(),
            token: admin_token.clone(),
            reason: pb::EndReason::EndedByOperator as i32,
            detail: String::new(),
        })
        .await
        .expect_err("a token for another session must not end this one");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // The genuine token still works.
    let (_link, welcome) = RelayLink::connect(&relay, &resp.token, &sid).await?;
    assert_eq!(welcome.participant_id, claims.participant_id);
    assert!(
        cluster.relays[0]
            .stats()
            .attaches_refused
            .load(Ordering::Relaxed)
            >= 5
    );
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_relay_never_sees_plaintext() -> Result<()> {
    const MARKER: &str = "KAKEHASHI-PLAINTEXT-MARKER-7f3a";
    let tapped = Arc::new(Mutex::new(Vec::<u8>::new()));
    let sink = tapped.clone();
    let cluster = LocalCluster::builder()
        .relay_config(move |_, config| {
            let sink = sink.clone();
            config.hooks.forward_tap = Some(Arc::new(move |raw: &[u8]| {
                if let Ok(mut t) = sink.lock() {
                    t.extend_from_slice(raw);
                }
            }));
        })
        .start()
        .await?;
    let (_c, mut host, mut viewer) = attached_pair(
        &cluster,
        pb::SessionMode::Control,
        Permissions::VIEW | Permissions::CONTROL,
    )
    .await?;
    // The permission request's note crosses the control channel: plaintext too.
    viewer
        .request_permissions(Permissions::CONTROL, MARKER)
        .await?;
    viewer_until(&mut viewer, |ev| match ev {
        ViewerEvent::GrantsChanged(g) if g.contains(Permissions::CONTROL) => Some(()),
        _ => None,
    })
    .await?;
    let mut sent_bytes = 0;
    for _ in 0..5 {
        let data = MARKER.repeat(100).into_bytes();
        sent_bytes += data.len();
        screen_roundtrip(&host, &mut viewer, data).await?;
    }
    let text = format!("{MARKER} my password is hunter2");
    host.send_chat(&text).await?;
    viewer.send_chat(&text).await?;
    let typed = pb::InputEvent {
        kind: Some(pb::input_event::Kind::Text(pb::TypeText {
            text: text.clone(),
        })),
    };
    assert!(viewer.send_input(typed).await?);
    viewer_until(&mut viewer, |ev| match ev {
        ViewerEvent::Chat(c) if c == text => Some(()),
        _ => None,
    })
    .await?;
    let mut got_chat = false;
    let mut got_input = false;
    host_until(&mut host, |ev| {
        match ev {
            HostEvent::Chat(c) if c == text => got_chat = true,
            HostEvent::Input(_) => got_input = true,
            _ => {}
        }
        (got_chat && got_input).then_some(())
    })
    .await?;

    let tapped = tapped.lock().map(|t| t.clone()).unwrap_or_default();
    assert!(
        tapped.len() > sent_bytes,
        "the tap saw {} bytes, less than the {sent_bytes} screen bytes sent: the test would be vacuous",
        tapped.len()
    );
    let marker = MARKER.as_bytes();
    assert!(
        !tapped.windows(marker.len()).any(|w| w == marker),
        "plaintext found in bytes the relay forwarded"
    );
    assert!(!tapped.windows(7).any(|w| w == b"hunter2"));
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_malformed_frame_closes_only_its_sender() -> Result<()> {
    let cluster = LocalCluster::builder().start().await?;
    let (_c, host, mut viewer) =
        attached_pair(&cluster, pb::SessionMode::Control, Permissions::VIEW).await?;
    screen_roundtrip(&host, &mut viewer, b"before".to_vec()).await?;

    // A header with an unknown version.
    let created = create(&cluster, pb::SessionMode::Control, 600).await?;
    let (bad, _, _) = raw_host(&cluster, &created.code).await?;
    let mut header = FrameHeader::new(Channel::Chat, 0, 1, 0, 4).encode();
    header[0] = 9;
    bad.send_raw_on_new_uni(&header).await?;
    match within("the relay to close the bad client", bad.closed()).await? {
        LinkError::Protocol(reason) => assert!(reason.contains("version"), "{reason}"),
        other => panic!("expected a protocol close, got {other}"),
    }

    // A header announcing a payload far past the channel's bound.
    let created = create(&cluster, pb::SessionMode::Control, 600).await?;
    let (big, _, _) = raw_host(&cluster, &created.code).await?;
    let mut header = FrameHeader::new(Channel::Chat, 0, 1, 0, 0).encode();
    header[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    let mut bytes = header.to_vec();
    bytes.extend_from_slice(&[0u8; 64]);
    assert_eq!(header.len(), HEADER_LEN);
    big.send_raw_on_new_uni(&bytes).await?;
    match within("the relay to close the oversize client", big.closed()).await? {
        LinkError::Protocol(reason) => assert!(reason.contains("exceeds"), "{reason}"),
        other => panic!("expected a protocol close, got {other}"),
    }

    // The other session never noticed.
    for i in 0..10u8 {
        screen_roundtrip(&host, &mut viewer, vec![i; 4000]).await?;
    }
    assert_eq!(
        cluster.relays[0]
            .stats()
            .protocol_errors
            .load(Ordering::Relaxed),
        2
    );
    cluster.shutdown().await;
    Ok(())
}

async fn watch_until_end(cluster: &LocalCluster, sid: &str) -> Result<Vec<pb::SessionEvent>> {
    let mut api = SessionServiceClient::connect(cluster.coordinator_url()).await?;
    let mut stream = api
        .watch_session(pb::WatchSessionRequest {
            session_id: sid.into(),
        })
        .await?
        .into_inner();
    within("the watch stream to end", async {
        let mut events = Vec::new();
        while let Some(ev) = stream.message().await? {
            events.push(ev);
        }
        Ok::<_, anyhow::Error>(events)
    })
    .await?
}

#[tokio::test]
async fn max_duration_ends_the_session_with_time_limit_everywhere() -> Result<()> {
    let cluster = LocalCluster::builder().start().await?;
    let created = create(&cluster, pb::SessionMode::View, 2).await?;
    let url = cluster.coordinator_url();
    let sid = session_id(&created);
    let mut viewer = Viewer::join(
        &url,
        &sid,
        &created.operator_ticket,
        ViewerConfig::default(),
    )
    .await?;
    let mut host = Host::join(
        &url,
        &created.code,
        HostConfig {
            consent: Consent::Approve(Permissions::VIEW),
        },
    )
    .await?;
    let watch = watch_until_end(&cluster, &sid);
    let host_end = host_until(&mut host, |ev| match ev {
        HostEvent::Ended { reason, .. } => Some(reason),
        _ => None,
    });
    let viewer_end = viewer_until(&mut viewer, |ev| match ev {
        ViewerEvent::Ended { reason, .. } => Some(reason),
        _ => None,
    });
    let (events, host_end, viewer_end) = tokio::join!(watch, host_end, viewer_end);
    assert_eq!(host_end?, pb::EndReason::TimeLimit);
    assert_eq!(viewer_end?, pb::EndReason::TimeLimit);
    let last = events?.pop().context("no events")?;
    assert_eq!(last.kind(), pb::EventKind::Ended);
    assert_eq!(last.end_reason(), pb::EndReason::TimeLimit);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn end_session_through_the_api_ends_it_for_everyone() -> Result<()> {
    let cluster = LocalCluster::builder().start().await?;
    let (created, mut host, mut viewer) =
        attached_pair(&cluster, pb::SessionMode::Control, Permissions::VIEW).await?;
    let sid = session_id(&created);
    let watch = tokio::spawn({
        let url = cluster.coordinator_url();
        let sid = sid.clone();
        async move {
            let mut api = SessionServiceClient::connect(url).await?;
            let mut stream = api
                .watch_session(pb::WatchSessionRequest { session_id: sid })
                .await?
                .into_inner();
            let mut events = Vec::new();
            while let Some(ev) = stream.message().await? {
                events.push(ev);
            }
            Ok::<_, anyhow::Error>(events)
        }
    });
    let mut api = SessionServiceClient::connect(cluster.coordinator_url()).await?;
    let ended = api
        .end_session(pb::EndSessionRequest {
            session_id: sid.clone(),
            detail: "customer's problem solved".into(),
        })
        .await?
        .into_inner();
    assert_eq!(ended.end_reason(), pb::EndReason::EndedByOperator);
    let host_end = host_until(&mut host, |ev| match ev {
        HostEvent::Ended { reason, .. } => Some(reason),
        _ => None,
    })
    .await?;
    let viewer_end = viewer_until(&mut viewer, |ev| match ev {
        ViewerEvent::Ended { reason, .. } => Some(reason),
        _ => None,
    })
    .await?;
    assert_eq!(host_end, pb::EndReason::EndedByOperator);
    assert_eq!(viewer_end, pb::EndReason::EndedByOperator);
    let events = within("the watch stream to close", watch).await???;
    let kinds: Vec<_> = events.iter().map(|e| e.kind()).collect();
    assert_eq!(kinds.first(), Some(&pb::EventKind::Created));
    assert!(kinds.contains(&pb::EventKind::CodeEntered));
    assert!(kinds.contains(&pb::EventKind::ConsentGiven));
    let last = events.last().context("no events")?;
    assert_eq!(last.kind(), pb::EventKind::Ended);
    assert_eq!(last.end_reason(), pb::EndReason::EndedByOperator);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_panicking_session_actor_ends_only_its_own_session() -> Result<()> {
    let cluster = LocalCluster::builder().start().await?;
    let (doomed, mut host_a, mut viewer_a) =
        attached_pair(&cluster, pb::SessionMode::Control, Permissions::VIEW).await?;
    let (_ok, host_b, mut viewer_b) =
        attached_pair(&cluster, pb::SessionMode::Control, Permissions::VIEW).await?;
    let relay = &cluster.relays[0];
    assert_eq!(relay.live_sessions().await, 2);

    assert!(relay.inject_panic(session_id(&doomed).parse()?).await);
    let host_end = host_until(&mut host_a, |ev| match ev {
        HostEvent::Ended { reason, .. } => Some(reason),
        _ => None,
    })
    .await?;
    let viewer_end = viewer_until(&mut viewer_a, |ev| match ev {
        ViewerEvent::Ended { reason, .. } => Some(reason),
        _ => None,
    })
    .await?;
    assert_eq!(host_end, pb::EndReason::SessionFailed);
    assert_eq!(viewer_end, pb::EndReason::SessionFailed);

    // The node and the other session carry on.
    for i in 0..10u8 {
        screen_roundtrip(&host_b, &mut viewer_b, vec![i; 2000]).await?;
    }
    assert!(relay.is_running());
    assert_eq!(relay.live_sessions().await, 1);
    assert_eq!(relay.stats().sessions_failed.load(Ordering::Relaxed), 1);
    // The host told the coordinator, so the call-center software sees why it ended.
    let last = watch_until_end(&cluster, &session_id(&doomed))
        .await?
        .pop()
        .context("no events")?;
    assert_eq!(last.end_reason(), pb::EndReason::SessionFailed);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_customer_hangup_ends_the_session_in_the_coordinator_too() -> Result<()> {
    let cluster = LocalCluster::builder().start().await?;
    let (created, host, mut viewer) =
        attached_pair(&cluster, pb::SessionMode::Control, Permissions::VIEW).await?;
    let sid = session_id(&created);
    host.hangup(pb::EndReason::EndedByCustomer, "I have to go")
        .await?;
    let viewer_end = viewer_until(&mut viewer, |ev| match ev {
        ViewerEvent::Ended { reason, .. } => Some(reason),
        _ => None,
    })
    .await?;
    assert_eq!(viewer_end, pb::EndReason::EndedByCustomer);
    let last = watch_until_end(&cluster, &sid)
        .await?
        .pop()
        .context("no events")?;
    assert_eq!(last.kind(), pb::EventKind::Ended);
    assert_eq!(last.end_reason(), pb::EndReason::EndedByCustomer);
    assert_eq!(last.detail, "I have to go");
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn reliable_channels_survive_a_lossy_jittery_path() -> Result<()> {
    let cluster = LocalCluster::builder().proxied().start().await?;
    let mobile =
        kakehashi_loadtest::proxy::Impairment::profile("mobile").context("profile exists")?;
    cluster.proxies[0].set_impairment(kakehashi_loadtest::proxy::Impairment {
        // Heavier loss than the profile, so retransmission certainly happens.
        loss: 0.05,
        ..mobile
    });
    let (_c, mut host, viewer) =
        attached_pair(&cluster, pb::SessionMode::Control, Permissions::VIEW).await?;
    let sent: Vec<String> = (0..200).map(|i| format!("line {i}")).collect();
    for line in &sent {
        viewer.send_chat(line).await?;
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        got.push(
            host_until(&mut host, |ev| match ev {
                HostEvent::Chat(c) => Some(c),
                _ => None,
            })
            .await?,
        );
    }
    assert_eq!(
        got, sent,
        "every line once, in order, despite loss and jitter"
    );
    assert!(
        cluster.proxies[0].counts().1 > 0,
        "the proxy really dropped datagrams"
    );
    cluster.shutdown().await;
    Ok(())
}
