//! What the end-to-end tests share: a failure guard for anything that must happen
//! (never a timing: [`WAIT`] only stops a hung test), picking agents' events, and
//! making sessions through the real API.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kakehashi_agent::{Host, HostEvent, Viewer, ViewerEvent};
use kakehashi_proto::Permissions;
use kakehashi_proto::pb::{self, session_service_client::SessionServiceClient};

/// How long a test waits for something that must happen before it fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// `fut`, or an error naming `what` after [`WAIT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(WAIT, fut)
        .await
        .with_context(|| format!("timed out waiting for {what}"))
}

/// Polls `cond` (a counter another thread or process updates: there is no event to
/// await) until it holds.
pub async fn until(what: &str, cond: impl Fn() -> bool) -> Result<()> {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Polls a counter until it reaches `at_least`.
pub async fn counter_reaches(what: &str, counter: &AtomicU64, at_least: u64) -> Result<()> {
    until(what, || counter.load(Ordering::Relaxed) >= at_least).await
}

/// The first host event `pick` takes; an error if the session ends first.
pub async fn host_until<T>(
    host: &mut Host,
    mut pick: impl FnMut(HostEvent) -> Option<T>,
) -> Result<T> {
    within("a host event", async {
        while let Some(ev) = host.next_event().await {
            let shown = format!("{ev:?}");
            let ended = matches!(ev, HostEvent::Ended { .. });
            if let Some(v) = pick(ev) {
                return Ok(v);
            }
            if ended {
                bail!("host: session ended: {shown}");
            }
        }
        bail!("host event stream closed")
    })
    .await?
}

/// [`host_until`] for tests in which no operator input may reach the customer: any
/// input event on the way is an error.
pub async fn host_until_no_input<T>(
    host: &mut Host,
    mut pick: impl FnMut(HostEvent) -> Option<T>,
) -> Result<T> {
    let mut input = None;
    let picked = host_until(host, |ev| {
        if let HostEvent::Input(i) = &ev {
            input = Some(format!("{i:?}"));
            return Some(None);
        }
        pick(ev).map(Some)
    })
    .await?;
    match (picked, input) {
        (Some(v), _) => Ok(v),
        (None, Some(i)) => bail!("input reached the host: {i}"),
        (None, None) => bail!("host event stream closed"),
    }
}

/// The first viewer event `pick` takes; an error if the session ends first.
pub async fn viewer_until<T>(
    viewer: &mut Viewer,
    mut pick: impl FnMut(ViewerEvent) -> Option<T>,
) -> Result<T> {
    within("a viewer event", async {
        while let Some(ev) = viewer.next_event().await {
            let shown = format!("{ev:?}");
            let ended = matches!(ev, ViewerEvent::Ended { .. });
            if let Some(v) = pick(ev) {
                return Ok(v);
            }
            if ended {
                bail!("viewer: session ended: {shown}");
            }
        }
        bail!("viewer event stream closed")
    })
    .await?
}

/// What a test asks `CreateSession` for; [`Default`] is tenant "acme", operator
/// "op-7", a control session with the mode's default permissions, 10 minutes.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    pub tenant: String,
    pub operator: String,
    pub mode: pb::SessionMode,
    pub permissions: Permissions,
    pub max_duration_secs: u32,
}

impl Default for SessionSpec {
    fn default() -> Self {
        Self {
            tenant: "acme".into(),
            operator: "op-7".into(),
            mode: pb::SessionMode::Control,
            permissions: Permissions::NONE,
            max_duration_secs: 600,
        }
    }
}

impl SessionSpec {
    pub fn mode(mode: pb::SessionMode) -> Self {
        Self {
            mode,
            ..Self::default()
        }
    }

    pub fn permissions(mut self, permissions: Permissions) -> Self {
        self.permissions = permissions;
        self
    }

    pub fn max_duration_secs(mut self, secs: u32) -> Self {
        self.max_duration_secs = secs;
        self
    }
}

/// Creates a session through the coordinator at `url`: the response and the session id.
pub async fn create_session(
    url: &str,
    spec: &SessionSpec,
) -> Result<(pb::CreateSessionResponse, String)> {
    let mut api = SessionServiceClient::connect(url.to_owned()).await?;
    let created = api
        .create_session(pb::CreateSessionRequest {
            device_id: String::new(),
            tenant: spec.tenant.clone(),
            operator: spec.operator.clone(),
            mode: spec.mode as i32,
            permissions: spec.permissions.bits(),
            max_duration_secs: spec.max_duration_secs,
        })
        .await?
        .into_inner();
    let sid = created
        .session
        .as_ref()
        .map(|s| s.session_id.clone())
        .context("CreateSession answered without a session")?;
    Ok((created, sid))
}

/// The session's audit log (`GetAuditLog`).
pub async fn audit_log(url: &str, sid: &str) -> Result<Vec<pb::SessionEvent>> {
    let mut api = SessionServiceClient::connect(url.to_owned()).await?;
    Ok(api
        .get_audit_log(pb::GetAuditLogRequest {
            session_id: sid.into(),
        })
        .await?
        .into_inner()
        .events)
}

/// A session with its viewer and host attached through the cluster at `url`.
pub struct Attached {
    pub created: pb::CreateSessionResponse,
    pub sid: String,
    pub host: Host,
    pub viewer: Viewer,
}

/// Creates a session, joins the operator's viewer and then the customer's host with
/// `approve` scripted, and waits until the viewer sees VIEW granted (if `approve`
/// has it).
pub async fn attached_pair(
    url: &str,
    spec: &SessionSpec,
    approve: Permissions,
) -> Result<Attached> {
    let (created, sid) = create_session(url, spec).await?;
    let mut viewer = Viewer::join(
        url,
        &sid,
        &created.operator_ticket,
        kakehashi_agent::ViewerConfig::default(),
    )
    .await?;
    let host = Host::join(
        url,
        &created.code,
        kakehashi_agent::HostConfig {
            consent: kakehashi_agent::Consent::Approve(approve),
        },
    )
    .await?;
    if approve.contains(Permissions::VIEW) {
        viewer_until(&mut viewer, |ev| match ev {
            ViewerEvent::GrantsChanged(g) if g.contains(Permissions::VIEW) => Some(()),
            _ => None,
        })
        .await?;
    }
    Ok(Attached {
        created,
        sid,
        host,
        viewer,
    })
}
