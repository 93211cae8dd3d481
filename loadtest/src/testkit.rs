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
    within_for(WAIT, what, fut).await
}

/// [`within`] with another guard, for what takes longer by nature (a QUIC idle timeout,
/// a bitrate settling).
pub async fn within_for<T>(wait: Duration, what: &str, fut: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(wait, fut)
        .await
        .with_context(|| format!("timed out waiting for {what}"))
}

/// Polls `cond` (a counter another thread or process updates: there is no event to
/// await) until it holds.
pub async fn until(what: &str, cond: impl Fn() -> bool) -> Result<()> {
    until_for(WAIT, what, cond).await
}

/// [`until`] with another guard.
pub async fn until_for(wait: Duration, what: &str, cond: impl Fn() -> bool) -> Result<()> {
    within_for(wait, what, async {
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

/// The next screen frame a viewer shows: (sequence number, picture bytes).
pub async fn next_picture(viewer: &mut Viewer) -> Result<(u64, Vec<u8>)> {
    viewer_until(viewer, |ev| match ev {
        ViewerEvent::Screen { frame, seq, .. } => Some((seq, frame.data)),
        _ => None,
    })
    .await
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

/// Joins the operator's viewer to a created session, then the customer's host with
/// `consent`.
pub async fn join_created(
    url: &str,
    created: &pb::CreateSessionResponse,
    consent: kakehashi_agent::Consent,
) -> Result<(Host, Viewer)> {
    let sid = &created
        .session
        .as_ref()
        .context("no session in the answer")?
        .session_id;
    let viewer = Viewer::join(
        url,
        sid,
        &created.operator_ticket,
        kakehashi_agent::ViewerConfig::default(),
    )
    .await
    .context("operator joins")?;
    let host = Host::join(url, &created.code, kakehashi_agent::HostConfig { consent })
        .await
        .context("customer joins")?;
    Ok((host, viewer))
}

/// Creates a session and joins the operator's viewer, then the customer's host.
async fn join_pair(
    url: &str,
    spec: &SessionSpec,
    consent: kakehashi_agent::Consent,
) -> Result<Attached> {
    let (created, sid) = create_session(url, spec).await?;
    let (host, viewer) = join_created(url, &created, consent).await?;
    Ok(Attached {
        created,
        sid,
        host,
        viewer,
    })
}

/// Creates a session, joins the operator's viewer and then the customer's host with
/// `approve` scripted, and waits until the viewer sees VIEW granted (if `approve`
/// has it).
pub async fn attached_pair(
    url: &str,
    spec: &SessionSpec,
    approve: Permissions,
) -> Result<Attached> {
    let mut pair = join_pair(url, spec, kakehashi_agent::Consent::Approve(approve)).await?;
    if approve.contains(Permissions::VIEW) {
        viewer_until(&mut pair.viewer, |ev| match ev {
            ViewerEvent::GrantsChanged(g) if g.contains(Permissions::VIEW) => Some(()),
            _ => None,
        })
        .await?;
    }
    Ok(pair)
}

/// Answers the next consent question on a [`kakehashi_agent::Consent::Manual`] host,
/// which must ask for exactly `expected`: all of it, or nothing.
pub async fn answer(host: &mut Host, expected: Permissions, yes: bool) -> Result<()> {
    let asked = host_until(host, |ev| match ev {
        HostEvent::ConsentRequested { permissions, .. } => Some(permissions),
        _ => None,
    })
    .await?;
    anyhow::ensure!(
        asked == expected,
        "asked {asked}, expected one question for {expected}"
    );
    host.answer(if yes { asked } else { Permissions::NONE })?;
    Ok(())
}

/// Creates a session, joins the operator's viewer and a host whose customer answers by
/// hand ([`kakehashi_agent::Consent::Manual`]), answers the first question (VIEW) yes
/// and waits until the host has granted it.
pub async fn manual_pair(url: &str, spec: &SessionSpec) -> Result<Attached> {
    let mut pair = join_pair(url, spec, kakehashi_agent::Consent::Manual).await?;
    answer(&mut pair.host, Permissions::VIEW, true).await?;
    host_until(&mut pair.host, |ev| match ev {
        HostEvent::GrantsChanged(g) if g.contains(Permissions::VIEW) => Some(()),
        _ => None,
    })
    .await?;
    Ok(pair)
}

/// `N` random bytes as hex (names, namespaces and keys that must not collide).
pub fn hex_random<const N: usize>() -> Result<String> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("system randomness: {e}"))?;
    Ok(hex::encode(b))
}

/// Screen frame `n` of `bytes` bytes (640x480 as far as anyone is told): distinct,
/// incompressible-looking content per `n`, so a frame that arrives can be matched to
/// the one sent.
pub fn picture(n: usize, bytes: usize, key_frame: bool) -> pb::ScreenFrame {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (n as u64);
    let data = (0..bytes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    pb::ScreenFrame {
        width: 640,
        height: 480,
        key_frame,
        data,
        group_key: None,
    }
}

/// `target` as a coordinator backend with a private namespace, so tests sharing one
/// Redis never see each other's keys.
pub fn redis_config(
    target: kakehashi_coordinator::backend::redis::RedisTarget,
) -> Result<kakehashi_coordinator::backend::redis::RedisConfig> {
    let mut config = kakehashi_coordinator::backend::redis::RedisConfig::new(target);
    config.namespace = format!("test-{}", hex_random::<6>()?);
    Ok(config)
}

/// A fresh API key in the coordinator's format, `kh_<16 hex>_<64 hex>`.
pub fn api_key() -> Result<String> {
    Ok(format!("kh_{}_{}", hex_random::<8>()?, hex_random::<32>()?))
}

/// `msg` with `authorization: Bearer KEY` (no header for an empty key).
pub fn authed<T>(msg: T, key: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if !key.is_empty()
        && let Ok(value) = format!("Bearer {key}").parse()
    {
        req.metadata_mut().insert("authorization", value);
    }
    req
}
