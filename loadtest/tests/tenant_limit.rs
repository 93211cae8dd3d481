//! A tenant's time limit, set by the cluster's operator, ends its sessions through a real
//! relay (real gRPC, real QUIC, real agents) whatever the call-center software asked for:
//! a warning first, then END_REASON_TIME_LIMIT at the customer, the operator and on the
//! watch stream. Another tenant's session on the same cluster keeps its own duration.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use kakehashi_agent::{
    Consent, Host, HostConfig, HostEvent, HostOptions, Viewer, ViewerConfig, ViewerEvent,
};
use kakehashi_coordinator::TenantPolicies;
use kakehashi_coordinator::tenants::parse_spec;
use kakehashi_loadtest::LocalCluster;
use kakehashi_loadtest::testkit::within;
use kakehashi_proto::Permissions;
use kakehashi_proto::pb::{self, session_service_client::SessionServiceClient};

/// The tenant's maximum; its call-center software asks for ten minutes regardless.
const TENANT_MAX_SECS: u64 = 4;
const ASKED_SECS: u32 = 600;

fn policies() -> Result<TenantPolicies> {
    let mut t = TenantPolicies::new();
    let (tenant, policy) = parse_spec(&format!("call-center:max={TENANT_MAX_SECS}"))?;
    t.insert(tenant, policy)?;
    Ok(t)
}

async fn create(cluster: &LocalCluster, tenant: &str) -> Result<pb::CreateSessionResponse> {
    let mut api = SessionServiceClient::connect(cluster.coordinator_url()).await?;
    Ok(api
        .create_session(pb::CreateSessionRequest {
            tenant: tenant.into(),
            operator: "op-1".into(),
            mode: pb::SessionMode::View as i32,
            max_duration_secs: ASKED_SECS,
            // Permissions: the mode's default.
            ..Default::default()
        })
        .await?
        .into_inner())
}

fn granted(created: &pb::CreateSessionResponse) -> Result<Duration> {
    let s = created.session.as_ref().context("no session")?;
    let ms = u64::try_from(s.deadline_unix_ms - s.created_at_unix_ms)?;
    Ok(Duration::from_millis(ms))
}

#[tokio::test]
async fn a_tenants_time_limit_ends_its_session_at_the_relay_after_a_warning() -> Result<()> {
    let tenants = policies()?;
    let cluster = LocalCluster::builder()
        .coordinator_config(move |c| c.tenants = tenants.clone())
        .start()
        .await?;

    // The request for ten minutes is cut to the tenant's maximum, and says so.
    let created = create(&cluster, "call-center").await?;
    assert_eq!(granted(&created)?, Duration::from_secs(TENANT_MAX_SECS));
    // Another tenant on the same cluster gets what it asked for.
    let other = create(&cluster, "someone-else").await?;
    assert_eq!(granted(&other)?, Duration::from_secs(u64::from(ASKED_SECS)));

    let sid = created
        .session
        .as_ref()
        .map(|s| s.session_id.clone())
        .context("no session")?;
    let mut api = SessionServiceClient::connect(cluster.coordinator_url()).await?;
    let mut watch = api
        .watch_session(pb::WatchSessionRequest {
            session_id: sid.clone(),
        })
        .await?
        .into_inner();

    let mut viewer = Viewer::join(
        &cluster.coordinator_url(),
        &sid,
        &created.operator_ticket,
        ViewerConfig::default(),
    )
    .await?;
    let mut host = Host::join_with_options(
        &cluster.coordinator_url(),
        &created.code,
        HostConfig {
            consent: Consent::Approve(Permissions::VIEW),
        },
        HostOptions {
            time_warnings: vec![Duration::from_secs(2)],
            ..HostOptions::default()
        },
    )
    .await?;

    let events = within("the session's events", async {
        let mut events = Vec::new();
        while let Some(ev) = watch.message().await? {
            let ended = ev.kind() == pb::EventKind::Ended;
            events.push(ev);
            if ended {
                return Ok(events);
            }
        }
        bail!("watch stream closed before ENDED: {events:?}")
    });
    let host_side = within("the host's warning and end", async {
        let mut warned = None;
        while let Some(ev) = host.next_event().await {
            match ev {
                HostEvent::TimeWarning { remaining_secs } => warned = Some(remaining_secs),
                HostEvent::Ended { reason, .. } => return Ok((warned, reason)),
                _ => {}
            }
        }
        bail!("host event stream closed before the end")
    });
    let viewer_side = within("the viewer's warning and end", async {
        let mut warned = None;
        while let Some(ev) = viewer.next_event().await {
            match ev {
                ViewerEvent::TimeWarning { remaining_secs } => warned = Some(remaining_secs),
                ViewerEvent::Ended { reason, .. } => return Ok((warned, reason)),
                _ => {}
            }
        }
        bail!("viewer event stream closed before the end")
    });
    let (events, host_side, viewer_side) = tokio::join!(events, host_side, viewer_side);

    let (host_warned, host_end) = host_side??;
    let host_warned = host_warned.context("the host was not warned before the end")?;
    assert!(host_warned <= 2, "host warned with {host_warned} s left");
    assert_eq!(host_end, pb::EndReason::TimeLimit);
    let (viewer_warned, viewer_end) = viewer_side??;
    assert!(
        viewer_warned.is_some(),
        "the operator was not warned before the end"
    );
    assert_eq!(viewer_end, pb::EndReason::TimeLimit);

    let events = events??;
    let warning = events
        .iter()
        .position(|e| e.kind() == pb::EventKind::TimeWarning)
        .context("no TIME_WARNING event")?;
    let last = events.last().context("no events")?;
    assert_eq!(last.kind(), pb::EventKind::Ended);
    assert_eq!(last.end_reason(), pb::EndReason::TimeLimit);
    assert!(warning < events.len() - 1, "the warning came after the end");

    // The other tenant's session is still live.
    let other_id = other
        .session
        .as_ref()
        .map(|s| s.session_id.clone())
        .context("no session")?;
    let still = api
        .get_session(pb::GetSessionRequest {
            session_id: other_id,
        })
        .await?
        .into_inner();
    assert_ne!(still.state, pb::SessionState::Ended as i32);
    cluster.shutdown().await;
    Ok(())
}
