//! Unattended access through a real coordinator and relay: an admin enrols a device key,
//! the device polls with signed requests, an allowed operator's key creates a session
//! for it, and the viewer sees the device's screen without anyone answering a prompt.
//! Refusals (tenant policy, blocked device, deny and allow lists, another tenant's
//! device) are PERMISSION_DENIED; forged, expired and replayed polls UNAUTHENTICATED;
//! the audit log names the device and the operator.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kakehashi_agent::device::{self, DeviceKey, Poller};
use kakehashi_agent::{HostOptions, SyntheticScreen, Viewer, ViewerConfig, ViewerEvent};
use kakehashi_coordinator::backend::redis::{RedisConfig, RedisTarget};
use kakehashi_loadtest::testkit::{api_key, authed, redis_config, viewer_until, within};
use kakehashi_loadtest::{LocalCluster, services};
use kakehashi_proto::pb::{
    self, admin_service_client::AdminServiceClient, agent_service_client::AgentServiceClient,
    session_service_client::SessionServiceClient,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

struct Fixture {
    cluster: LocalCluster,
    /// The cluster-admin key; empty with auth disabled.
    root: String,
    sessions: SessionServiceClient<Channel>,
    admin: AdminServiceClient<Channel>,
    agent: AgentServiceClient<Channel>,
}

impl Fixture {
    async fn start(auth: bool, redis: Option<RedisConfig>) -> Result<Self> {
        let root = if auth { api_key()? } else { String::new() };
        let mut builder = LocalCluster::builder();
        if auth {
            builder = builder.api_keys(root.clone());
        }
        if let Some(redis) = redis {
            builder = builder.redis(redis);
        }
        let cluster = builder.start().await?;
        let url = cluster.coordinator_url();
        Ok(Self {
            sessions: SessionServiceClient::connect(url.clone()).await?,
            admin: AdminServiceClient::connect(url.clone()).await?,
            agent: AgentServiceClient::connect(url).await?,
            cluster,
            root,
        })
    }

    async fn key(&self, tenant: &str, role: pb::ApiRole, name: &str) -> Result<String> {
        Ok(self
            .admin
            .clone()
            .create_api_key(authed(
                pb::CreateApiKeyRequest {
                    tenant: tenant.into(),
                    role: role as i32,
                    name: name.into(),
                    groups: vec![],
                },
                &self.root,
            ))
            .await?
            .into_inner()
            .api_key)
    }

    async fn policy(&self, by: &str, tenant: &str, unattended: bool) -> Result<()> {
        self.admin
            .clone()
            .set_tenant_policy(authed(
                pb::SetTenantPolicyRequest {
                    policy: Some(pb::TenantPolicy {
                        tenant: tenant.into(),
                        unattended_enabled: unattended,
                        ..Default::default()
                    }),
                },
                by,
            ))
            .await?;
        Ok(())
    }

    async fn enroll(
        &self,
        by: &str,
        tenant: &str,
        key: &DeviceKey,
        allowed: &[&str],
    ) -> Result<pb::DeviceInfo, tonic::Status> {
        self.admin
            .clone()
            .enroll_device(authed(
                pb::EnrollDeviceRequest {
                    tenant: tenant.into(),
                    device_id: key.device_id(),
                    name: "front-desk-pc".into(),
                    public_key: key.public_key().to_vec(),
                    allowed_operators: allowed.iter().map(|s| s.to_string()).collect(),
                    monitoring: false,
                },
                by,
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn access(
        &self,
        by: &str,
        device_id: &str,
        blocked: bool,
        allowed: &[&str],
        denied: &[&str],
    ) -> Result<pb::DeviceInfo> {
        Ok(self
            .admin
            .clone()
            .set_device_access(authed(
                pb::SetDeviceAccessRequest {
                    device_id: device_id.into(),
                    blocked,
                    allowed_operators: allowed.iter().map(|s| s.to_string()).collect(),
                    denied_operators: denied.iter().map(|s| s.to_string()).collect(),
                    monitoring: false,
                },
                by,
            ))
            .await?
            .into_inner())
    }

    async fn connect(
        &self,
        by: &str,
        tenant: &str,
        device_id: &str,
        operator: &str,
    ) -> Result<pb::CreateSessionResponse, tonic::Status> {
        self.sessions
            .clone()
            .create_session(authed(
                pb::CreateSessionRequest {
                    tenant: tenant.into(),
                    operator: operator.into(),
                    mode: pb::SessionMode::Control as i32,
                    permissions: 0,
                    max_duration_secs: 600,
                    device_id: device_id.into(),
                },
                by,
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn poll(&self, req: pb::PollDeviceRequest) -> Result<Vec<String>, tonic::Status> {
        self.agent.clone().poll_device(req).await.map(|r| {
            r.into_inner()
                .sessions
                .into_iter()
                .map(|s| s.session_id)
                .collect()
        })
    }
}

fn code_of<T>(r: Result<T, tonic::Status>) -> Code {
    r.err().map_or(Code::Ok, |s| s.code())
}

/// The device: polls, and hosts every session it is given with a synthetic screen,
/// consenting without a prompt. Stops with `cancel` (or when the set is dropped).
fn run_device(
    tasks: &mut JoinSet<Result<()>>,
    url: String,
    key: DeviceKey,
    cancel: CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel(8);
    let poll_cancel = cancel.clone();
    let poll_url = url.clone();
    tasks.spawn(async move {
        let poller = Poller::connect(&poll_url, key).await?;
        poller
            .run(Duration::from_millis(50), tx, poll_cancel)
            .await?;
        Ok(())
    });
    tasks.spawn(async move {
        let mut hosts = JoinSet::new();
        loop {
            let pending = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                p = rx.recv() => match p { Some(p) => p, None => return Ok(()) },
            };
            let mut host = device::join(&url, &pending, HostOptions::default()).await?;
            hosts.spawn(async move {
                let screen = SyntheticScreen {
                    width: 640,
                    height: 360,
                    fps: 30,
                    frame_bytes: 2_000,
                    key_interval: 10,
                };
                host.run_synthetic(screen, |_| {}).await
            });
        }
    });
}

async fn connects_without_a_prompt(redis: Option<RedisConfig>) -> Result<()> {
    let f = Fixture::start(true, redis).await?;
    let admin = f.key("acme", pb::ApiRole::Admin, "acme-admin").await?;
    let alice = f.key("acme", pb::ApiRole::Operator, "alice").await?;
    f.policy(&admin, "", true).await?;
    let key = DeviceKey::generate()?;
    let device_id = key.device_id();
    let info = f.enroll(&admin, "", &key, &["alice"]).await?;
    ensure!(info.tenant == "acme" && info.device_id == device_id && !info.blocked);
    let listed = f
        .admin
        .clone()
        .list_devices(authed(pb::ListDevicesRequest::default(), &admin))
        .await?
        .into_inner()
        .devices;
    ensure!(listed == vec![info.clone()], "listed: {listed:?}");

    let url = f.cluster.coordinator_url();
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    run_device(&mut tasks, url.clone(), key, cancel.clone());

    let created = f.connect(&alice, "", &device_id, "").await?;
    let session = created.session.context("no session")?;
    ensure!(session.operator == "alice" && session.tenant == "acme");
    let mut viewer = Viewer::join(
        &url,
        &session.session_id,
        &created.operator_ticket,
        ViewerConfig::default(),
    )
    .await?;
    // Nobody answers anything: the device consented by itself.
    let frames = viewer_until(&mut viewer, |ev| match ev {
        ViewerEvent::Screen { frame, .. } => Some(frame),
        _ => None,
    })
    .await?;
    ensure!(frames.width == 640, "a frame from the device's screen");

    // The device reports its consent to the coordinator on its own time: follow the
    // session's events until it is there, then read the whole log.
    let mut events = f
        .sessions
        .clone()
        .watch_session(authed(
            pb::WatchSessionRequest {
                session_id: session.session_id.clone(),
            },
            &alice,
        ))
        .await?
        .into_inner();
    within("CONSENT_GIVEN", async {
        while let Some(ev) = events.message().await? {
            if ev.kind() == pb::EventKind::ConsentGiven {
                return Ok(());
            }
        }
        anyhow::bail!("the event stream closed before CONSENT_GIVEN")
    })
    .await??;
    let log = f
        .sessions
        .clone()
        .get_audit_log(authed(
            pb::GetAuditLogRequest {
                session_id: session.session_id.clone(),
            },
            &alice,
        ))
        .await?
        .into_inner()
        .events;
    let kinds: Vec<pb::EventKind> = log.iter().map(|e| e.kind()).collect();
    let at = |k: pb::EventKind| kinds.iter().position(|&x| x == k);
    let connect = at(pb::EventKind::UnattendedConnect).context("no UNATTENDED_CONNECT")?;
    let ev = &log[connect];
    ensure!(ev.actor() == pb::EventActor::Api);
    ensure!(
        ev.detail.contains(&device_id) && ev.detail.contains("alice"),
        "detail: {}",
        ev.detail
    );
    let entered = at(pb::EventKind::CodeEntered).context("no CODE_ENTERED")?;
    let consent = at(pb::EventKind::ConsentGiven).context("no CONSENT_GIVEN")?;
    ensure!(connect < entered && entered < consent, "order: {kinds:?}");
    ensure!(log[consent].actor() == pb::EventActor::Customer);

    f.sessions
        .clone()
        .end_session(authed(
            pb::EndSessionRequest {
                session_id: session.session_id,
                detail: "done".into(),
            },
            &alice,
        ))
        .await?;
    cancel.cancel();
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    f.cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn an_allowed_operator_connects_to_an_enrolled_device_without_a_prompt() -> Result<()> {
    connects_without_a_prompt(None).await
}

#[tokio::test]
async fn unattended_access_works_with_devices_in_redis() -> Result<()> {
    let Some(redis) = services::redis()? else {
        return Ok(());
    };
    let config = redis_config(RedisTarget::Single(redis.url.clone()))?;
    connects_without_a_prompt(Some(config)).await
}

#[tokio::test]
async fn policy_block_and_operator_lists_refuse_with_permission_denied() -> Result<()> {
    let f = Fixture::start(true, None).await?;
    let admin = f.key("acme", pb::ApiRole::Admin, "acme-admin").await?;
    let alice = f.key("acme", pb::ApiRole::Operator, "alice").await?;
    let bob = f.key("acme", pb::ApiRole::Operator, "bob").await?;
    let globex_admin = f.key("globex", pb::ApiRole::Admin, "globex-admin").await?;
    let key = DeviceKey::generate()?;
    let id = key.device_id();
    f.enroll(&admin, "", &key, &[]).await?;

    // The tenant policy does not enable unattended access (no policy, then false).
    let refused = f.connect(&alice, "", &id, "").await;
    ensure!(code_of(refused) == Code::PermissionDenied);
    f.policy(&admin, "", false).await?;
    let refused = f
        .connect(&alice, "", &id, "")
        .await
        .err()
        .context("created")?;
    ensure!(refused.code() == Code::PermissionDenied);
    ensure!(
        refused.message().contains("unattended_enabled"),
        "{}",
        refused.message()
    );
    f.policy(&admin, "", true).await?;
    ensure!(code_of(f.connect(&alice, "", &id, "").await) == Code::Ok);

    // Blocked.
    f.access(&admin, &id, true, &[], &[]).await?;
    let refused = f
        .connect(&alice, "", &id, "")
        .await
        .err()
        .context("created")?;
    ensure!(refused.code() == Code::PermissionDenied && refused.message().contains("blocked"));
    // Denied operator; another one still connects.
    f.access(&admin, &id, false, &[], &["alice"]).await?;
    let refused = f
        .connect(&alice, "", &id, "")
        .await
        .err()
        .context("created")?;
    ensure!(refused.code() == Code::PermissionDenied && refused.message().contains("deny"));
    ensure!(code_of(f.connect(&bob, "", &id, "").await) == Code::Ok);
    // Not on a non-empty allow list.
    f.access(&admin, &id, false, &["bob"], &[]).await?;
    let refused = f
        .connect(&alice, "", &id, "")
        .await
        .err()
        .context("created")?;
    ensure!(refused.code() == Code::PermissionDenied && refused.message().contains("allow"));
    ensure!(code_of(f.connect(&bob, "", &id, "").await) == Code::Ok);
    // Naming another operator does not get round the lists.
    let refused = f.connect(&alice, "", &id, "bob").await;
    ensure!(code_of(refused) == Code::PermissionDenied);

    // Another tenant's device: an acme operator may not reach globex's device, and
    // globex's admin may neither see nor change acme's.
    f.policy(&globex_admin, "", true).await?;
    let other = DeviceKey::generate()?;
    f.enroll(&globex_admin, "", &other, &[]).await?;
    let refused = f.connect(&alice, "", &other.device_id(), "").await;
    ensure!(code_of(refused) == Code::PermissionDenied);
    let refused = f.connect(&alice, "globex", &other.device_id(), "").await;
    ensure!(code_of(refused) == Code::PermissionDenied);
    let changed = f.access(&globex_admin, &id, false, &[], &[]).await;
    ensure!(changed.is_err(), "globex changed acme's device");
    let taken = f.enroll(&globex_admin, "", &key, &[]).await;
    ensure!(code_of(taken) == Code::PermissionDenied);
    // An operator key may not enrol.
    ensure!(
        code_of(f.enroll(&alice, "", &DeviceKey::generate()?, &[]).await) == Code::PermissionDenied
    );

    // Only the three accepted connections wait for the device.
    let waiting = f.poll(key.poll_request(unix_ms())).await?;
    ensure!(waiting.len() == 3, "waiting: {waiting:?}");

    // A removed device takes nothing more.
    f.admin
        .clone()
        .remove_device(authed(
            pb::RemoveDeviceRequest {
                device_id: id.clone(),
            },
            &admin,
        ))
        .await?;
    ensure!(code_of(f.connect(&bob, "", &id, "").await) == Code::PermissionDenied);
    f.cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn forged_expired_and_replayed_polls_are_unauthenticated() -> Result<()> {
    let f = Fixture::start(true, None).await?;
    let admin = f.key("acme", pb::ApiRole::Admin, "acme-admin").await?;
    let key = DeviceKey::generate()?;
    f.enroll(&admin, "", &key, &[]).await?;
    let now = unix_ms();

    let fresh = key.poll_request(now);
    ensure!(f.poll(fresh.clone()).await?.is_empty());
    let replayed = f.poll(fresh).await.err().context("replay accepted")?;
    ensure!(replayed.code() == Code::Unauthenticated, "{replayed:?}");
    ensure!(
        replayed.message().contains("replay"),
        "{}",
        replayed.message()
    );
    // Older than the last accepted poll, though within the window.
    ensure!(code_of(f.poll(key.poll_request(now - 1)).await) == Code::Unauthenticated);
    // Expired and from the future.
    let expired = f
        .poll(key.poll_request(now - 120_000))
        .await
        .err()
        .context("accepted")?;
    ensure!(expired.code() == Code::Unauthenticated && expired.message().contains("past"));
    ensure!(code_of(f.poll(key.poll_request(now + 120_000)).await) == Code::Unauthenticated);
    // Signed by another key, for this device id.
    let forger = DeviceKey::generate()?;
    let mut forged = forger.poll_request(now + 1);
    forged.device_id = key.device_id();
    let refused = f.poll(forged).await.err().context("forgery accepted")?;
    ensure!(refused.code() == Code::Unauthenticated && refused.message().contains("signature"));
    // A damaged signature, an unknown device.
    let mut bad = key.poll_request(now + 2);
    bad.signature[0] ^= 1;
    ensure!(code_of(f.poll(bad).await) == Code::Unauthenticated);
    ensure!(code_of(f.poll(forger.poll_request(now + 3)).await) == Code::Unauthenticated);
    // The device still polls fine afterwards.
    ensure!(f.poll(key.poll_request(now + 4)).await?.is_empty());

    // A device id that does not match the key cannot be enrolled.
    let mismatched = f
        .admin
        .clone()
        .enroll_device(authed(
            pb::EnrollDeviceRequest {
                tenant: String::new(),
                device_id: forger.device_id(),
                name: "x".into(),
                public_key: key.public_key().to_vec(),
                allowed_operators: vec![],
                monitoring: false,
            },
            &admin,
        ))
        .await;
    ensure!(code_of(mismatched) == Code::InvalidArgument);
    f.cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn with_auth_disabled_an_enrolled_device_takes_sessions() -> Result<()> {
    let f = Fixture::start(false, None).await?;
    let key = DeviceKey::generate()?;
    f.enroll("", "lab", &key, &[]).await?;
    let created = f.connect("", "", &key.device_id(), "dev").await?;
    let session = created.session.context("no session")?;
    ensure!(session.tenant == "lab");
    let waiting = f.poll(key.poll_request(unix_ms())).await?;
    ensure!(waiting == vec![session.session_id], "waiting: {waiting:?}");
    let unknown = DeviceKey::generate()?;
    ensure!(
        code_of(f.connect("", "lab", &unknown.device_id(), "dev").await) == Code::PermissionDenied
    );
    f.cluster.shutdown().await;
    Ok(())
}
