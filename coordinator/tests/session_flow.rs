//! One session end to end through real gRPC servers on 127.0.0.1:0.

mod support {
    pub mod cluster;
}

use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use kakehashi_coordinator::{Backends, Coordinator, CoordinatorConfig};
use kakehashi_proto::pb::agent_service_client::AgentServiceClient;
use kakehashi_proto::pb::session_service_client::SessionServiceClient;
use kakehashi_proto::token::{self, Role};
use kakehashi_proto::{Permissions, pb};
use support::cluster::{Cluster, dead_relay, start_with};
use tonic::Code;

/// Generous bound for events that arrive within a second or so; a hang fails the test
/// instead of blocking it forever. Not a timing assertion.
const EVENT_WAIT: Duration = Duration::from_secs(30);

async fn start() -> Result<Cluster> {
    start_with(|_| {}).await
}

fn create_req(mode: pb::SessionMode) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        device_id: String::new(),
        tenant: "acme".into(),
        operator: "op-1".into(),
        mode: mode as i32,
        permissions: 0,
        max_duration_secs: 0,
    }
}

async fn next_event(
    stream: &mut tonic::Streaming<pb::SessionEvent>,
) -> Result<Option<pb::SessionEvent>> {
    let item = tokio::time::timeout(EVENT_WAIT, stream.next())
        .await
        .context("no event within the wait bound")?;
    Ok(item.transpose()?)
}

#[tokio::test]
async fn one_session_end_to_end() -> Result<()> {
    let mut c = start().await?;
    let created = c
        .sessions
        .create_session(create_req(pb::SessionMode::Control))
        .await?
        .into_inner();
    let session = created.session.context("session in response")?;
    assert_eq!(session.state, pb::SessionState::Waiting as i32);
    assert_eq!(
        session.permissions,
        (Permissions::VIEW | Permissions::CONTROL).bits()
    );
    assert_eq!(created.code.len(), 6);
    assert_eq!(created.operator_ticket.len(), 64);
    let relay = session.relay.clone().context("relay in session")?;
    assert_eq!(relay.relay_id, support::cluster::RELAY_ID);
    assert_eq!(relay.cert_sha256, vec![0x5a; 32]);

    let mut watch = c
        .sessions
        .watch_session(pb::WatchSessionRequest {
            session_id: session.session_id.clone(),
        })
        .await?
        .into_inner();

    // The customer joins by code; the code is then spent.
    let host_key = [1u8; 32];
    let host = c
        .agents
        .join_by_code(pb::JoinByCodeRequest {
            code: created.code.clone(),
            public_key: host_key.to_vec(),
        })
        .await?
        .into_inner();
    assert_eq!(
        host.coordinator_public_key,
        c.handle.public_key().to_bytes().to_vec()
    );
    assert_eq!(
        host.relay.as_ref().map(|r| r.cert_sha256.clone()),
        Some(vec![0x5a; 32])
    );
    assert_eq!(
        host.session.as_ref().map(|s| s.state),
        Some(pb::SessionState::Joined as i32)
    );
    let claims = token::verify(
        &host.token,
        &c.handle.public_key(),
        kakehashi_proto::unix_now(),
    )?;
    assert_eq!(claims.role, Role::Host);
    assert_eq!(claims.session_id.to_string(), session.session_id);
    assert_eq!(claims.public_key, host_key);
    assert_eq!(claims.relay_id, support::cluster::RELAY_ID);
    assert_eq!(claims.session_deadline, claims.expires_at);
    assert_eq!(claims.permissions, Permissions::VIEW | Permissions::CONTROL);

    let again = c
        .agents
        .join_by_code(pb::JoinByCodeRequest {
            code: created.code.clone(),
            public_key: host_key.to_vec(),
        })
        .await
        .expect_err("a code is single use");
    assert_eq!(again.code(), Code::NotFound);
    assert_eq!(again.message(), "code not found or expired");

    // The operator's viewer: a wrong ticket is refused, the right one admitted.
    let wrong = c
        .agents
        .join_as_operator(pb::JoinAsOperatorRequest {
            session_id: session.session_id.clone(),
            operator_ticket: "00".repeat(32),
            public_key: vec![2; 32],
            supervisor: false,
            recorder: false,
        })
        .await
        .expect_err("wrong ticket");
    assert_eq!(wrong.code(), Code::PermissionDenied);
    let viewer = c
        .agents
        .join_as_operator(pb::JoinAsOperatorRequest {
            session_id: session.session_id.clone(),
            operator_ticket: created.operator_ticket.clone(),
            public_key: vec![2; 32],
            supervisor: false,
            recorder: false,
        })
        .await?
        .into_inner();
    let vclaims = token::verify(
        &viewer.token,
        &c.handle.public_key(),
        kakehashi_proto::unix_now(),
    )?;
    assert_eq!(vclaims.role, Role::Viewer);
    assert_eq!(vclaims.public_key, [2; 32]);
    assert_ne!(vclaims.participant_id, claims.participant_id);

    // Only the host may report consent.
    let not_host = c
        .agents
        .report_consent(pb::ReportConsentRequest {
            token: viewer.token.clone(),
            granted: Permissions::VIEW.bits(),
            denied: 0,
        })
        .await
        .expect_err("viewer token");
    assert_eq!(not_host.code(), Code::PermissionDenied);
    c.agents
        .report_consent(pb::ReportConsentRequest {
            token: host.token.clone(),
            granted: (Permissions::VIEW | Permissions::CONTROL).bits(),
            denied: 0,
        })
        .await?;
    let now = c
        .sessions
        .get_session(pb::GetSessionRequest {
            session_id: session.session_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(now.state, pb::SessionState::Active as i32);
    assert_eq!(
        now.granted,
        (Permissions::VIEW | Permissions::CONTROL).bits()
    );

    let mut kinds = Vec::new();
    for want_seq in 1..=4u64 {
        let ev = next_event(&mut watch).await?.context("stream open")?;
        assert_eq!(ev.seq, want_seq);
        assert_eq!(ev.session_id, session.session_id);
        kinds.push(ev.kind);
        if ev.kind == pb::EventKind::ConsentGiven as i32 {
            assert_eq!(
                ev.granted,
                (Permissions::VIEW | Permissions::CONTROL).bits()
            );
        }
    }
    assert_eq!(
        kinds,
        vec![
            pb::EventKind::Created as i32,
            pb::EventKind::CodeEntered as i32,
            pb::EventKind::OperatorJoined as i32,
            pb::EventKind::ConsentGiven as i32,
        ]
    );

    // The operator ends it; the relay is unreachable, the session ends anyway.
    let ended = c
        .sessions
        .end_session(pb::EndSessionRequest {
            session_id: session.session_id.clone(),
            detail: "customer's question answered".into(),
        })
        .await?
        .into_inner();
    assert_eq!(ended.state, pb::SessionState::Ended as i32);
    assert_eq!(ended.end_reason, pb::EndReason::EndedByOperator as i32);
    let ev = next_event(&mut watch).await?.context("ENDED event")?;
    assert_eq!(ev.kind, pb::EventKind::Ended as i32);
    assert_eq!(ev.end_reason, pb::EndReason::EndedByOperator as i32);
    assert_eq!(ev.detail, "customer's question answered");
    assert!(
        next_event(&mut watch).await?.is_none(),
        "stream closes after ENDED"
    );

    // An ended session refuses everything that would change it.
    let twice = c
        .sessions
        .end_session(pb::EndSessionRequest {
            session_id: session.session_id.clone(),
            detail: String::new(),
        })
        .await
        .expect_err("already ended");
    assert_eq!(twice.code(), Code::FailedPrecondition);
    let late = c
        .agents
        .join_as_operator(pb::JoinAsOperatorRequest {
            session_id: session.session_id.clone(),
            operator_ticket: created.operator_ticket.clone(),
            public_key: vec![2; 32],
            supervisor: false,
            recorder: false,
        })
        .await
        .expect_err("ended");
    assert_eq!(late.code(), Code::FailedPrecondition);
    let consent = c
        .agents
        .report_consent(pb::ReportConsentRequest {
            token: host.token.clone(),
            granted: 0,
            denied: 0,
        })
        .await
        .expect_err("ended");
    assert_eq!(consent.code(), Code::FailedPrecondition);
    // A late ReportEnd leaves the recorded end as it was; only the host may report, and
    // only the reasons a relay-side end can have.
    c.agents
        .report_end(pb::ReportEndRequest {
            token: host.token.clone(),
            reason: pb::EndReason::EndedByCustomer as i32,
            detail: "late".into(),
        })
        .await?;
    let still = c
        .sessions
        .get_session(pb::GetSessionRequest {
            session_id: session.session_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(still.end_reason(), pb::EndReason::EndedByOperator);
    let by_viewer = c
        .agents
        .report_end(pb::ReportEndRequest {
            token: viewer.token.clone(),
            reason: pb::EndReason::EndedByOperator as i32,
            detail: String::new(),
        })
        .await
        .expect_err("viewer token");
    assert_eq!(by_viewer.code(), Code::PermissionDenied);
    let bad_reason = c
        .agents
        .report_end(pb::ReportEndRequest {
            token: host.token.clone(),
            reason: pb::EndReason::TimeLimit as i32,
            detail: String::new(),
        })
        .await
        .expect_err("not a relay-side reason");
    assert_eq!(bad_reason.code(), Code::InvalidArgument);

    // A watcher arriving after the end gets the whole history and a closed stream.
    let mut replay = c
        .sessions
        .watch_session(pb::WatchSessionRequest {
            session_id: session.session_id.clone(),
        })
        .await?
        .into_inner();
    let mut count = 0;
    while let Some(ev) = next_event(&mut replay).await? {
        count += 1;
        assert_eq!(ev.seq, count);
    }
    assert_eq!(count, 5);

    c.handle.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn reaper_ends_sessions_at_their_time_limit() -> Result<()> {
    let mut c = start().await?;
    let mut req = create_req(pb::SessionMode::View);
    req.max_duration_secs = 1;
    let created = c.sessions.create_session(req).await?.into_inner();
    let session = created.session.context("session")?;
    assert_eq!(session.deadline_unix_ms - session.created_at_unix_ms, 1000);
    let mut watch = c
        .sessions
        .watch_session(pb::WatchSessionRequest {
            session_id: session.session_id.clone(),
        })
        .await?
        .into_inner();
    let ended = loop {
        let ev = next_event(&mut watch).await?.context("stream open")?;
        if ev.kind == pb::EventKind::Ended as i32 {
            break ev;
        }
    };
    assert_eq!(ended.end_reason, pb::EndReason::TimeLimit as i32);
    assert!(next_event(&mut watch).await?.is_none());
    let gone = c
        .agents
        .join_by_code(pb::JoinByCodeRequest {
            code: created.code,
            public_key: vec![1; 32],
        })
        .await
        .expect_err("the code of an ended session is revoked");
    assert_eq!(gone.code(), Code::NotFound);
    c.handle.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn reaper_ends_waiting_sessions_whose_code_expired() -> Result<()> {
    let mut c = start_with(|cfg| cfg.code_ttl = Duration::from_secs(1)).await?;
    let created = c
        .sessions
        .create_session(create_req(pb::SessionMode::Control))
        .await?
        .into_inner();
    let id = created.session.context("session")?.session_id;
    let mut watch = c
        .sessions
        .watch_session(pb::WatchSessionRequest { session_id: id })
        .await?
        .into_inner();
    let ended = loop {
        let ev = next_event(&mut watch).await?.context("stream open")?;
        if ev.kind == pb::EventKind::Ended as i32 {
            break ev;
        }
    };
    assert_eq!(ended.end_reason, pb::EndReason::CodeExpired as i32);
    c.handle.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn view_mode_never_gets_control() -> Result<()> {
    let mut c = start().await?;
    for asked in [0, Permissions::ALL.bits(), Permissions::CONTROL.bits()] {
        let mut req = create_req(pb::SessionMode::View);
        req.permissions = asked;
        let created = c.sessions.create_session(req).await?.into_inner();
        let session = created.session.context("session")?;
        assert_eq!(
            session.permissions & Permissions::CONTROL.bits(),
            0,
            "asked {asked:#x}"
        );
        assert_ne!(session.permissions & Permissions::VIEW.bits(), 0);

        let host = c
            .agents
            .join_by_code(pb::JoinByCodeRequest {
                code: created.code,
                public_key: vec![3; 32],
            })
            .await?
            .into_inner();
        let claims = token::verify(
            &host.token,
            &c.handle.public_key(),
            kakehashi_proto::unix_now(),
        )?;
        assert!(!claims.permissions.contains(Permissions::CONTROL));
        // The customer cannot grant what the mode forbids.
        c.agents
            .report_consent(pb::ReportConsentRequest {
                token: host.token,
                granted: Permissions::ALL.bits(),
                denied: 0,
            })
            .await?;
        let now = c
            .sessions
            .get_session(pb::GetSessionRequest {
                session_id: session.session_id,
            })
            .await?
            .into_inner();
        assert_eq!(now.granted & Permissions::CONTROL.bits(), 0);
        assert_eq!(now.state, pb::SessionState::Active as i32);
    }
    c.handle.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn wrong_code_guesses_trip_the_limiter() -> Result<()> {
    let mut c = start().await?;
    let guess = |code: String| pb::JoinByCodeRequest {
        code,
        public_key: vec![1; 32],
    };
    // Well-formed codes (valid check digit) that no session has.
    let well_formed = |n: u32| {
        let payload = format!("{n:05}");
        let check = kakehashi_coordinator::backend::codes::check_digit(&payload).expect("digits");
        format!("{payload}{check}")
    };
    // A typo (bad check digit) is refused locally and never counts as a guess.
    let mut typo = well_formed(12_345);
    let last = typo.pop().expect("non-empty");
    typo.push(if last == '0' { '1' } else { '0' });
    for _ in 0..20 {
        let err = c
            .agents
            .join_by_code(guess(typo.clone()))
            .await
            .expect_err("typo");
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    // The free wrong codes, and one more, which starts the backoff.
    let free = kakehashi_coordinator::limiter::GuessPolicy::default().free_failures;
    for i in 0..=free {
        let err = c
            .agents
            .join_by_code(guess(well_formed(10_000 + i)))
            .await
            .expect_err("no session has this code");
        assert_eq!(err.code(), Code::NotFound, "guess {i}");
    }
    let err = c
        .agents
        .join_by_code(guess(well_formed(20_000)))
        .await
        .expect_err("limited");
    assert_eq!(err.code(), Code::ResourceExhausted);

    // Even the right code is refused from this address until its backoff has passed.
    let created = c
        .sessions
        .create_session(create_req(pb::SessionMode::View))
        .await?
        .into_inner();
    let err = c
        .agents
        .join_by_code(guess(created.code))
        .await
        .expect_err("limited");
    assert_eq!(err.code(), Code::ResourceExhausted);
    c.handle.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn invalid_inputs_are_refused_precisely() -> Result<()> {
    let mut c = start().await?;
    let bad_creates = [
        pb::CreateSessionRequest {
            tenant: String::new(),
            ..create_req(pb::SessionMode::View)
        },
        pb::CreateSessionRequest {
            operator: "x".repeat(129),
            ..create_req(pb::SessionMode::View)
        },
        create_req(pb::SessionMode::Unspecified),
        pb::CreateSessionRequest {
            mode: 99,
            ..create_req(pb::SessionMode::View)
        },
        pb::CreateSessionRequest {
            permissions: 1 << 20,
            ..create_req(pb::SessionMode::Control)
        },
    ];
    for req in bad_creates {
        let err = c
            .sessions
            .create_session(req.clone())
            .await
            .expect_err("invalid create");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{req:?}: {}",
            err.message()
        );
    }

    let err = c
        .sessions
        .get_session(pb::GetSessionRequest {
            session_id: "not-hex".into(),
        })
        .await
        .expect_err("bad id");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .sessions
        .get_session(pb::GetSessionRequest {
            session_id: "0".repeat(32),
        })
        .await
        .expect_err("unknown id");
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .sessions
        .watch_session(pb::WatchSessionRequest {
            session_id: "0".repeat(32),
        })
        .await
        .expect_err("unknown id");
    assert_eq!(err.code(), Code::NotFound);

    let created = c
        .sessions
        .create_session(create_req(pb::SessionMode::View))
        .await?
        .into_inner();
    let id = created.session.context("session")?.session_id;
    let err = c
        .sessions
        .end_session(pb::EndSessionRequest {
            session_id: id.clone(),
            detail: "d".repeat(513),
        })
        .await
        .expect_err("detail too long");
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = c
        .agents
        .join_by_code(pb::JoinByCodeRequest {
            code: created.code.clone(),
            public_key: vec![1; 31],
        })
        .await
        .expect_err("short key");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .agents
        .join_by_code(pb::JoinByCodeRequest {
            code: "abc".into(),
            public_key: vec![1; 32],
        })
        .await
        .expect_err("not digits");
    assert_eq!(err.code(), Code::InvalidArgument);
    // Neither refusal spent the code.
    c.agents
        .join_by_code(pb::JoinByCodeRequest {
            code: created.code,
            public_key: vec![1; 32],
        })
        .await?;

    let err = c
        .agents
        .join_as_operator(pb::JoinAsOperatorRequest {
            session_id: id,
            operator_ticket: "t".repeat(129),
            public_key: vec![1; 32],
            supervisor: false,
            recorder: false,
        })
        .await
        .expect_err("ticket too long");
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = c
        .agents
        .report_consent(pb::ReportConsentRequest {
            token: vec![1, 2, 3],
            granted: 1,
            denied: 0,
        })
        .await
        .expect_err("garbage token");
    assert_eq!(err.code(), Code::Unauthenticated);

    // A token signed by another cluster's key is not ours.
    let other = Coordinator::start(
        CoordinatorConfig::dev(vec![dead_relay().await?]),
        Backends::in_memory(vec![dead_relay().await?]),
    )
    .await?;
    let mut other_sessions = SessionServiceClient::connect(other.url()).await?;
    let mut other_agents = AgentServiceClient::connect(other.url()).await?;
    let foreign = other_sessions
        .create_session(create_req(pb::SessionMode::View))
        .await?
        .into_inner();
    let foreign_host = other_agents
        .join_by_code(pb::JoinByCodeRequest {
            code: foreign.code,
            public_key: vec![1; 32],
        })
        .await?
        .into_inner();
    let err = c
        .agents
        .report_consent(pb::ReportConsentRequest {
            token: foreign_host.token,
            granted: 1,
            denied: 0,
        })
        .await
        .expect_err("foreign token");
    assert_eq!(err.code(), Code::Unauthenticated);
    other.shutdown().await;
    c.handle.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn list_filters_orders_and_limits() -> Result<()> {
    let mut c = start().await?;
    let mut ids = Vec::new();
    for tenant in ["a", "b", "a", "a"] {
        let created = c
            .sessions
            .create_session(pb::CreateSessionRequest {
                tenant: tenant.into(),
                ..create_req(pb::SessionMode::View)
            })
            .await?
            .into_inner();
        ids.push(created.session.context("session")?);
    }
    c.sessions
        .end_session(pb::EndSessionRequest {
            session_id: ids[3].session_id.clone(),
            detail: String::new(),
        })
        .await?;
    let list = |tenant: &str, limit, include_ended| pb::ListSessionsRequest {
        tenant: tenant.into(),
        limit,
        include_ended,
    };
    let live_a = c
        .sessions
        .list_sessions(list("a", 0, false))
        .await?
        .into_inner();
    assert_eq!(live_a.sessions.len(), 2);
    assert!(live_a.sessions.iter().all(|s| s.tenant == "a"));
    assert!(live_a.sessions[0].created_at_unix_ms >= live_a.sessions[1].created_at_unix_ms);
    let all_a = c
        .sessions
        .list_sessions(list("a", 0, true))
        .await?
        .into_inner();
    assert_eq!(all_a.sessions.len(), 3);
    let everyone = c
        .sessions
        .list_sessions(list("", 1, true))
        .await?
        .into_inner();
    assert_eq!(everyone.sessions.len(), 1);
    c.handle.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn shutdown_closes_open_watch_streams() -> Result<()> {
    let mut c = start().await?;
    let created = c
        .sessions
        .create_session(create_req(pb::SessionMode::View))
        .await?
        .into_inner();
    let mut watch = c
        .sessions
        .watch_session(pb::WatchSessionRequest {
            session_id: created.session.context("session")?.session_id,
        })
        .await?
        .into_inner();
    let first = next_event(&mut watch).await?.context("CREATED")?;
    assert_eq!(first.kind, pb::EventKind::Created as i32);
    // Shutdown must not hang on the open stream.
    tokio::time::timeout(EVENT_WAIT, c.handle.shutdown())
        .await
        .context("shutdown finished")?;
    Ok(())
}
