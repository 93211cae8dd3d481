//! Per-tenant session limits through a real coordinator gRPC server on 127.0.0.1:0:
//! each tenant's sessions get its own default and are capped at its own maximum, in the
//! CreateSession answer, in the stored session, in the tokens relays enforce, and in the
//! coordinator's own deadline check.

mod support {
    pub mod cluster;
}

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use kakehashi_coordinator::tenants::parse_spec;
use kakehashi_coordinator::{Backends, Coordinator, CoordinatorConfig, TenantPolicies};
use kakehashi_proto::pb;
use kakehashi_proto::token;
use support::cluster::{Cluster, dead_relay, start_with};

/// Bound for events that come within seconds; a hang fails the test. Not a timing
/// assertion.
const EVENT_WAIT: Duration = Duration::from_secs(30);

const CLUSTER_DEFAULT: Duration = Duration::from_secs(40 * 60);
const CLUSTER_MAX: Duration = Duration::from_secs(4 * 3600);

fn policies(specs: &[&str]) -> Result<TenantPolicies> {
    let mut t = TenantPolicies::new();
    for spec in specs {
        let (tenant, policy) = parse_spec(spec)?;
        t.insert(tenant, policy)?;
    }
    Ok(t)
}

async fn start(tenants: TenantPolicies) -> Result<Cluster> {
    start_with(|config| {
        config.default_max_duration = CLUSTER_DEFAULT;
        config.max_max_duration = CLUSTER_MAX;
        config.tenants = tenants;
    })
    .await
}

/// Creates a session for `tenant` asking for `secs` (0: none) and returns it with the
/// duration granted, read from the response's deadline.
async fn create(
    c: &mut Cluster,
    tenant: &str,
    secs: u32,
) -> Result<(pb::CreateSessionResponse, Duration)> {
    let created = c
        .sessions
        .create_session(pb::CreateSessionRequest {
            tenant: tenant.into(),
            operator: "op-1".into(),
            mode: pb::SessionMode::View as i32,
            max_duration_secs: secs,
            ..Default::default()
        })
        .await?
        .into_inner();
    let s = created.session.as_ref().context("session in response")?;
    let ms = s.deadline_unix_ms - s.created_at_unix_ms;
    ensure!(ms >= 0, "deadline before creation: {s:?}");
    Ok((created, Duration::from_millis(ms.unsigned_abs())))
}

#[tokio::test]
async fn each_tenant_gets_its_own_default_and_cap() -> Result<()> {
    let mut c = start(policies(&[
        "acme-callcenter:max=40m,default=30m",
        "globex:default=10m",
        "initech:max=5m",
    ])?)
    .await?;
    let min = |m: u64| Duration::from_secs(m * 60);

    // acme: its default; what it asks below its cap; an over-long request cut to the
    // cap, not refused.
    assert_eq!(create(&mut c, "acme-callcenter", 0).await?.1, min(30));
    assert_eq!(create(&mut c, "acme-callcenter", 120).await?.1, min(2));
    assert_eq!(
        create(&mut c, "acme-callcenter", 3 * 3600).await?.1,
        min(40)
    );
    assert_eq!(
        create(&mut c, "acme-callcenter", u32::MAX).await?.1,
        min(40)
    );

    // globex: its own default, the cluster's maximum.
    assert_eq!(create(&mut c, "globex", 0).await?.1, min(10));
    assert_eq!(create(&mut c, "globex", 3 * 3600).await?.1, min(180));
    assert_eq!(create(&mut c, "globex", u32::MAX).await?.1, CLUSTER_MAX);

    // initech sets only a cap below the cluster default: the default is cut to it.
    assert_eq!(create(&mut c, "initech", 0).await?.1, min(5));

    // A tenant without a policy (names match exactly) keeps the cluster's limits.
    assert_eq!(create(&mut c, "other", 0).await?.1, CLUSTER_DEFAULT);
    assert_eq!(
        create(&mut c, "ACME-CALLCENTER", 0).await?.1,
        CLUSTER_DEFAULT
    );
    assert_eq!(create(&mut c, "other", u32::MAX).await?.1, CLUSTER_MAX);

    // The capped deadline is what is stored, and what the relay is told in the tokens.
    let (created, granted) = create(&mut c, "acme-callcenter", 3 * 3600).await?;
    assert_eq!(granted, min(40));
    let session = created.session.context("session")?;
    let stored = c
        .sessions
        .get_session(pb::GetSessionRequest {
            session_id: session.session_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(stored.deadline_unix_ms, session.deadline_unix_ms);
    let host = c
        .agents
        .join_by_code(pb::JoinByCodeRequest {
            code: created.code.clone(),
            public_key: vec![1; 32],
        })
        .await?
        .into_inner();
    let claims = token::verify(
        &host.token,
        &c.handle.public_key(),
        kakehashi_proto::unix_now(),
    )?;
    let deadline_secs = u64::try_from(session.deadline_unix_ms / 1000)?;
    assert_eq!(claims.session_deadline, deadline_secs);
    assert!(claims.expires_at <= deadline_secs);

    c.handle.shutdown().await;
    Ok(())
}

/// With a tenant maximum of two seconds, a session that asks for an hour is ended by the
/// coordinator's deadline check with TIME_LIMIT, while another tenant's is not.
#[tokio::test]
async fn a_short_tenant_maximum_ends_the_session_with_time_limit() -> Result<()> {
    let mut c = start(policies(&["brief:max=2"])?).await?;
    let (short, granted) = create(&mut c, "brief", 3600).await?;
    assert_eq!(granted, Duration::from_secs(2));
    let (long, _) = create(&mut c, "patient", 3600).await?;
    let short_id = short.session.context("session")?.session_id;
    let long_id = long.session.context("session")?.session_id;

    let mut watch = c
        .sessions
        .watch_session(pb::WatchSessionRequest {
            session_id: short_id.clone(),
        })
        .await?
        .into_inner();
    let ended = tokio::time::timeout(EVENT_WAIT, async {
        while let Some(ev) = watch.next().await {
            let ev = ev?;
            if ev.kind() == pb::EventKind::Ended {
                return Ok::<_, anyhow::Error>(Some(ev));
            }
        }
        Ok(None)
    })
    .await
    .context("the short session did not end within the wait bound")??
    .context("watch stream closed before ENDED")?;
    assert_eq!(ended.end_reason(), pb::EndReason::TimeLimit);

    let long = c
        .sessions
        .get_session(pb::GetSessionRequest {
            session_id: long_id,
        })
        .await?
        .into_inner();
    assert_ne!(long.state, pb::SessionState::Ended as i32);
    c.handle.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_tenant_maximum_above_the_clusters_is_refused_at_start() -> Result<()> {
    let relays = vec![dead_relay().await?];
    let mut config = CoordinatorConfig::dev(relays.clone());
    config.max_max_duration = Duration::from_secs(3600);
    config.tenants = policies(&["acme:max=2h"])?;
    let err = Coordinator::start(config, Backends::in_memory(relays))
        .await
        .err()
        .context("started with a tenant above the cluster maximum")?;
    let msg = err.to_string();
    assert!(
        msg.contains("\"acme\"") && msg.contains("max") && msg.contains("cluster maximum"),
        "{msg}"
    );
    Ok(())
}
