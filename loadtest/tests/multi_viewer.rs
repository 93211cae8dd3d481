//! Several viewers, one ciphertext: a supervisor joins next to the operator with the
//! same ticket, the customer admits (or refuses) it, and the host seals each screen
//! frame once, under a group key it hands to each admitted viewer sealed pairwise. The
//! relay fans that one ciphertext out. Real cluster: gRPC coordinator, QUIC relay,
//! real agents.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kakehashi_agent::{AgentError, Consent, Host, HostEvent, Viewer, ViewerConfig, ViewerEvent};
use kakehashi_loadtest::LocalCluster;
use kakehashi_loadtest::testkit::{
    Attached, SessionSpec, audit_log, create_session, host_until_no_input as host_until,
    join_created, manual_pair, next_picture, picture, viewer_until, within,
};
use kakehashi_proto::Permissions;
use kakehashi_proto::pb;
use tokio::time::timeout;

/// Pictures sent while both watch, and the size of each: big enough that sealing per
/// viewer would show plainly in the bytes the host sends.
const PICTURES: usize = 20;
const PICTURE_BYTES: usize = 40_000;

/// A control session with the operator watching (VIEW answered by hand) and a
/// supervisor attached with the same ticket, its question open on the host.
struct Room {
    cluster: LocalCluster,
    sid: String,
    host: Host,
    operator: Viewer,
    supervisor: Viewer,
    supervisor_sas: String,
}

async fn room() -> Result<Room> {
    let cluster = LocalCluster::builder().start().await?;
    let url = cluster.coordinator_url();
    let spec = SessionSpec::default().permissions(Permissions::VIEW | Permissions::CONTROL);
    let Attached {
        created,
        sid,
        mut host,
        viewer: operator,
    } = manual_pair(&url, &spec).await?;

    let supervisor = Viewer::join(
        &url,
        &sid,
        &created.operator_ticket,
        ViewerConfig {
            supervisor: true,
            ..ViewerConfig::default()
        },
    )
    .await
    .context("supervisor joins")?;
    ensure!(supervisor.is_supervisor());
    let (id, supervisor_sas) = host_until(&mut host, |ev| match ev {
        HostEvent::SupervisorJoined {
            participant_id,
            sas,
        } => Some((participant_id, sas)),
        _ => None,
    })
    .await?;
    ensure!(id == supervisor.participant_id());
    // The customer is asked about the supervisor, by name, like any other question.
    let note = host_until(&mut host, |ev| match ev {
        HostEvent::ConsentRequested {
            permissions,
            note,
            sas,
            supervisor: true,
        } if permissions == Permissions::VIEW && sas == supervisor_sas => Some(note),
        _ => None,
    })
    .await?;
    ensure!(note.contains("supervisor"), "question: {note}");
    Ok(Room {
        cluster,
        sid,
        host,
        operator,
        supervisor,
        supervisor_sas,
    })
}

#[tokio::test]
async fn an_admitted_supervisor_watches_the_one_ciphertext_the_host_seals() -> Result<()> {
    let Room {
        cluster,
        sid,
        mut host,
        mut operator,
        mut supervisor,
        supervisor_sas,
    } = room().await?;
    // Both sides of the supervisor's pairwise keys show the same code.
    within("the supervisor to verify the host", async {
        while supervisor.sas().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await?;
    assert_eq!(supervisor.sas(), Some(supervisor_sas));
    host.answer(Permissions::VIEW)?;
    let admitted = host_until(&mut host, |ev| match ev {
        HostEvent::SupervisorAnswered { admitted, .. } => Some(admitted),
        _ => None,
    })
    .await?;
    assert!(admitted);
    assert_eq!(
        host.supervisors(),
        vec![(supervisor.participant_id(), true)]
    );

    // A key frame carries the group key to both (each sealed pairwise) first.
    ensure!(
        host.wants_key_frame(),
        "an admitted supervisor needs a key frame"
    );
    ensure!(
        host.send_screen(picture(0, PICTURE_BYTES, true)).await?,
        "key frame withheld"
    );
    viewer_until(&mut supervisor, |ev| {
        matches!(ev, ViewerEvent::Admitted).then_some(())
    })
    .await?;
    let (op_seq, op_pic) = next_picture(&mut operator).await?;
    let (sup_seq, sup_pic) = next_picture(&mut supervisor).await?;
    assert_eq!((op_seq, &op_pic), (sup_seq, &sup_pic));

    // Now many pictures: each is sealed once and crosses the host's link once; the
    // relay delivers the same frame (same sequence number, same bytes) to both.
    let sealed_before = host.screen_frames_sealed();
    let bytes_before = host.bytes_sent_to_relay();
    let stats = cluster.relays[0].stats();
    let forwarded_before = stats.frames_forwarded.load(Ordering::Relaxed);
    // In step with the viewers: the relay is latency-first and drops deltas a viewer
    // has no room for, which is not what this test is about.
    for n in 1..=PICTURES {
        ensure!(!host.wants_key_frame(), "no frame was lost");
        ensure!(
            host.send_screen(picture(n, PICTURE_BYTES, false)).await?,
            "picture {n} withheld"
        );
        let (a_seq, a) = next_picture(&mut operator).await?;
        let (b_seq, b) = next_picture(&mut supervisor).await?;
        assert_eq!(a_seq, b_seq, "picture {n}: the same frame for both");
        assert!(
            a == b && a == picture(n, PICTURE_BYTES, false).data,
            "picture {n} differs"
        );
    }
    let sealed = host.screen_frames_sealed() - sealed_before;
    let sent = host.bytes_sent_to_relay() - bytes_before;
    let forwarded = stats.frames_forwarded.load(Ordering::Relaxed) - forwarded_before;
    assert_eq!(sealed, PICTURES as u64, "one seal per picture");
    let one_copy = (PICTURES * PICTURE_BYTES) as u64;
    assert!(
        sent < one_copy * 3 / 2,
        "the host sent {sent} bytes for {one_copy} bytes of pictures: more than one copy"
    );
    assert!(
        forwarded >= 2 * PICTURES as u64,
        "the relay forwarded {forwarded} frames for {PICTURES} pictures and two viewers"
    );
    println!(
        "{PICTURES} pictures of {PICTURE_BYTES} B, two viewers: host sealed {sealed}, \
         sent {sent} B ({:.2} copies), relay forwarded {forwarded} frames",
        sent as f64 / one_copy as f64
    );

    // A supervisor only watches: it sends nothing, and what a modified one sends the
    // relay refuses (the host never sees input: host_until fails on it).
    assert!(matches!(
        supervisor.send_chat("hello").await,
        Err(AgentError::WatchOnly)
    ));
    assert!(!supervisor.send_input(key_press()).await?);
    let denied_before = stats.frames_denied.load(Ordering::Relaxed);
    supervisor.send_input_unchecked(key_press()).await?;
    within("the relay to refuse the supervisor's input", async {
        while stats.frames_denied.load(Ordering::Relaxed) == denied_before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await?;

    // The supervisor leaves; the session goes on under a new group key, which the
    // operator gets with the next key frame.
    let epoch = host.group_epoch().context("group key")?;
    let supervisor_id = supervisor.participant_id();
    supervisor
        .hangup(pb::EndReason::EndedByOperator, "supervisor done")
        .await?;
    drop(supervisor);
    host_until(&mut host, |ev| match ev {
        HostEvent::SupervisorLeft { participant_id } if participant_id == supervisor_id => Some(()),
        _ => None,
    })
    .await?;
    assert_eq!(host.group_epoch(), Some(epoch + 1));
    ensure!(host.wants_key_frame(), "a new key needs a key frame");
    let last = picture(PICTURES + 1, PICTURE_BYTES, true);
    ensure!(
        host.send_screen(last.clone()).await?,
        "withheld after rotation"
    );
    let (_, got) = next_picture(&mut operator).await?;
    assert_eq!(got, last.data);

    // The audit log says who joined as what, and what the customer decided.
    let log = audit_log(&cluster.coordinator_url(), &sid).await?;
    let joined_as_supervisor = log.iter().any(|e| {
        e.kind() == pb::EventKind::OperatorJoined
            && e.detail == format!("supervisor {supervisor_id}")
    });
    assert!(joined_as_supervisor, "{log:?}");
    let admitted = log
        .iter()
        .find(|e| e.kind() == pb::EventKind::SupervisorAdmitted)
        .context("no SUPERVISOR_ADMITTED event")?;
    assert_eq!(admitted.actor(), pb::EventActor::Customer);
    assert_eq!(admitted.detail, format!("supervisor {supervisor_id}"));
    ensure!(host.session().session_id == sid);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_refused_supervisor_sees_nothing_while_the_operator_watches() -> Result<()> {
    let Room {
        cluster,
        sid,
        mut host,
        mut operator,
        supervisor,
        ..
    } = room().await?;
    host.answer(Permissions::NONE)?;
    let admitted = host_until(&mut host, |ev| match ev {
        HostEvent::SupervisorAnswered { admitted, .. } => Some(admitted),
        _ => None,
    })
    .await?;
    assert!(!admitted);
    let key = host.wants_key_frame();
    ensure!(
        host.send_screen(picture(0, PICTURE_BYTES, key)).await?,
        "withheld"
    );
    for n in 1..5 {
        ensure!(
            host.send_screen(picture(n, PICTURE_BYTES, false)).await?,
            "withheld"
        );
    }
    for n in 0..5 {
        let (_, got) = next_picture(&mut operator).await?;
        assert_eq!(got, picture(n, PICTURE_BYTES, false).data);
    }
    // The frames did reach the supervisor (the relay fans out to every viewer); it
    // opens none of them: the operator's key envelope and pictures under a key it
    // was never given.
    within("the supervisor to skip the frames", async {
        while supervisor.frames_for_others() < 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await?;
    // Whatever it was sent is in its event queue by now: no picture, no admission.
    let mut supervisor = supervisor;
    while let Ok(ev) = supervisor.events().try_recv() {
        assert!(
            !matches!(ev, ViewerEvent::Screen { .. } | ViewerEvent::Admitted),
            "a refused supervisor saw the screen: {ev:?}"
        );
    }
    assert_eq!(supervisor.undecryptable_frames(), 0);
    let log = audit_log(&cluster.coordinator_url(), &sid).await?;
    assert!(
        log.iter()
            .any(|e| e.kind() == pb::EventKind::SupervisorRefused),
        "{log:?}"
    );
    cluster.shutdown().await;
    Ok(())
}

fn key_press() -> pb::InputEvent {
    pb::InputEvent {
        kind: Some(pb::input_event::Kind::Key(pb::KeyPress {
            keysym: 0x61,
            down: true,
        })),
    }
}

#[tokio::test]
async fn a_recorder_gets_the_screen_only_while_recording_is_allowed() -> Result<()> {
    let cluster = LocalCluster::builder().start().await?;
    let url = cluster.coordinator_url();
    let view_only = SessionSpec::mode(pb::SessionMode::View);
    // Without the recording permission a recorder is refused at once.
    let (plain, plain_sid) =
        create_session(&url, &view_only.clone().permissions(Permissions::VIEW)).await?;
    let recorder = ViewerConfig {
        recorder: true,
        ..ViewerConfig::default()
    };
    let refused = Viewer::join(&url, &plain_sid, &plain.operator_ticket, recorder.clone()).await;
    let err = refused
        .err()
        .context("a recorder joined a session without recording")?;
    assert!(
        format!("{err:#}").contains("recording permission"),
        "{err:#}"
    );

    let Attached {
        created,
        sid,
        mut host,
        viewer: mut operator,
    } = manual_pair(
        &url,
        &view_only.permissions(Permissions::VIEW | Permissions::RECORDING),
    )
    .await?;
    let mut rec = Viewer::join(&url, &sid, &created.operator_ticket, recorder).await?;
    ensure!(rec.is_recorder());
    host_until(&mut host, |ev| {
        matches!(ev, HostEvent::RecorderJoined { .. }).then_some(())
    })
    .await?;
    let asked = host_until(&mut host, |ev| match ev {
        HostEvent::ConsentRequested { permissions, .. } => Some(permissions),
        _ => None,
    })
    .await?;
    ensure!(asked == Permissions::RECORDING, "asked {asked}");
    assert!(!host.is_recording());

    // Not yet allowed: the operator watches, the recorder gets nothing.
    let key = host.wants_key_frame();
    ensure!(
        host.send_screen(picture(0, PICTURE_BYTES, key)).await?,
        "withheld"
    );
    next_picture(&mut operator).await?;

    host.answer(Permissions::RECORDING)?;
    host_until(&mut host, |ev| match ev {
        HostEvent::GrantsChanged(g) if g.contains(Permissions::RECORDING) => Some(()),
        _ => None,
    })
    .await?;
    assert!(host.is_recording());
    ensure!(host.wants_key_frame(), "the recorder needs a key frame");
    ensure!(
        host.send_screen(picture(1, PICTURE_BYTES, true)).await?,
        "withheld"
    );
    viewer_until(&mut rec, |ev| {
        matches!(ev, ViewerEvent::Admitted).then_some(())
    })
    .await?;
    let (_, got) = next_picture(&mut rec).await?;
    assert_eq!(
        got,
        picture(1, PICTURE_BYTES, true).data,
        "the recorder's first picture"
    );
    next_picture(&mut operator).await?;

    // The customer stops the recording: a new group key the recorder never gets, and
    // the relay forwards it nothing more.
    let epoch = host.group_epoch();
    host.revoke(Permissions::RECORDING).await?;
    assert!(!host.is_recording());
    assert_eq!(host.group_epoch(), epoch.map(|e| e + 1));
    ensure!(host.wants_key_frame());
    ensure!(
        host.send_screen(picture(2, PICTURE_BYTES, true)).await?,
        "withheld"
    );
    let (_, got) = next_picture(&mut operator).await?;
    assert_eq!(got, picture(2, PICTURE_BYTES, true).data);
    while let Ok(ev) = rec.events().try_recv() {
        assert!(
            !matches!(ev, ViewerEvent::Screen { .. }),
            "the recorder got a picture after the revoke: {ev:?}"
        );
    }
    assert!(matches!(
        rec.send_chat("x").await,
        Err(AgentError::WatchOnly)
    ));
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn operator_and_supervisor_follow_the_session_to_another_relay() -> Result<()> {
    let mut cluster = LocalCluster::builder().relays(2).start().await?;
    let url = cluster.coordinator_url();
    let spec = SessionSpec::mode(pb::SessionMode::View).permissions(Permissions::VIEW);
    let (created, sid) = create_session(&url, &spec).await?;
    let first_relay = created
        .session
        .clone()
        .and_then(|s| s.relay)
        .context("relay")?
        .relay_id;
    let (mut host, mut operator) =
        join_created(&url, &created, Consent::Approve(Permissions::VIEW)).await?;
    host_until(&mut host, |ev| match ev {
        HostEvent::GrantsChanged(g) if g.contains(Permissions::VIEW) => Some(()),
        _ => None,
    })
    .await?;
    let supervisor_config = ViewerConfig {
        supervisor: true,
        ..ViewerConfig::default()
    };
    let mut supervisor =
        Viewer::join(&url, &sid, &created.operator_ticket, supervisor_config).await?;
    // Scripted consent that allows VIEW admits the supervisor too.
    let admitted = host_until(&mut host, |ev| match ev {
        HostEvent::SupervisorAnswered { admitted, .. } => Some(admitted),
        _ => None,
    })
    .await?;
    ensure!(admitted);
    ensure!(
        host.send_screen(picture(0, PICTURE_BYTES, host.wants_key_frame()))
            .await?
    );
    next_picture(&mut operator).await?;
    next_picture(&mut supervisor).await?;

    // The relay goes away; all three resume on the other one.
    let idx = cluster
        .relays
        .iter()
        .position(|r| r.relay_id() == first_relay)
        .context("the session's relay")?;
    cluster.relays.remove(idx).shutdown().await;
    let moved_to = host_until(&mut host, |ev| match ev {
        HostEvent::Resumed { relay_id, .. } => Some(relay_id),
        _ => None,
    })
    .await?;
    ensure!(moved_to != first_relay);
    for v in [&mut operator, &mut supervisor] {
        viewer_until(v, |ev| {
            matches!(ev, ViewerEvent::Resumed { .. }).then_some(())
        })
        .await?;
    }
    // Whoever is back gets the group key again with the next key frame (each return
    // asks for one); the customer is not asked again about the same supervisor.
    let mut n = 1;
    let (b_seq, b) = within("the supervisor's pictures on the new relay", async {
        loop {
            let key = host.wants_key_frame();
            host.send_screen(picture(n, PICTURE_BYTES, key)).await?;
            n += 1;
            if let Ok(Some(ViewerEvent::Screen { frame, seq, .. })) =
                timeout(Duration::from_millis(50), supervisor.next_event()).await
            {
                return anyhow::Ok((seq, frame.data));
            }
        }
    })
    .await??;
    let a = within("the same picture at the operator", async {
        loop {
            let (seq, data) = next_picture(&mut operator).await?;
            if seq == b_seq {
                return anyhow::Ok(data);
            }
        }
    })
    .await??;
    assert_eq!(a, b);
    assert_eq!(
        host.supervisors(),
        vec![(supervisor.participant_id(), true)]
    );
    cluster.shutdown().await;
    Ok(())
}
