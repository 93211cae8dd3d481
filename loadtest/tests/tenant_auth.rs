//! Tenants, roles and API keys through a real coordinator over gRPC: every SessionService
//! RPC is scoped to the caller's tenant, unauthenticated calls are refused, roles limit
//! what a key may do, AdminService manages keys and policies, a whole session runs with
//! an operator key, and a Python client (grpcio, no Rust) authenticates the same way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use kakehashi_agent::{Consent, HostEvent, ViewerEvent};
use kakehashi_coordinator::backend::redis::{RedisConfig, RedisTarget};
use kakehashi_loadtest::testkit::{api_key, authed, hex_random, join_created, redis_config};
use kakehashi_loadtest::{LocalCluster, services};
use kakehashi_proto::Permissions;
use kakehashi_proto::pb::{
    self, admin_service_client::AdminServiceClient, session_service_client::SessionServiceClient,
};
use tonic::Code;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(20);

struct Fixture {
    cluster: LocalCluster,
    admin: String,
    sessions: SessionServiceClient<Channel>,
    keys: AdminServiceClient<Channel>,
}

impl Fixture {
    async fn start(redis: Option<RedisConfig>) -> Result<Self> {
        let admin = api_key()?;
        let mut builder = LocalCluster::builder().api_keys(admin.clone());
        if let Some(redis) = redis {
            builder = builder.redis(redis);
        }
        let cluster = builder.start().await?;
        let url = cluster.coordinator_url();
        Ok(Self {
            sessions: SessionServiceClient::connect(url.clone()).await?,
            keys: AdminServiceClient::connect(url).await?,
            cluster,
            admin,
        })
    }

    /// A key made by `by` (an admin key).
    async fn key(&self, by: &str, tenant: &str, role: pb::ApiRole, name: &str) -> Result<String> {
        let made = self
            .keys
            .clone()
            .create_api_key(authed(
                pb::CreateApiKeyRequest {
                    tenant: tenant.into(),
                    role: role as i32,
                    name: name.into(),
                    groups: vec!["tier1".into()],
                },
                by,
            ))
            .await?
            .into_inner();
        let info = made.key.context("no key info")?;
        ensure!((tenant.is_empty() || info.tenant == tenant) && info.name == name);
        ensure!(made.api_key.starts_with(&format!("kh_{}_", info.key_id)));
        Ok(made.api_key)
    }

    async fn create(
        &self,
        key: &str,
        tenant: &str,
    ) -> Result<pb::CreateSessionResponse, tonic::Status> {
        self.sessions
            .clone()
            .create_session(authed(
                pb::CreateSessionRequest {
                    device_id: String::new(),
                    tenant: tenant.into(),
                    operator: String::new(),
                    mode: pb::SessionMode::Control as i32,
                    permissions: 0,
                    max_duration_secs: 600,
                },
                key,
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    /// The code of each SessionService RPC made with `key` on session `sid` (create:
    /// naming `tenant`; list: naming `tenant`).
    async fn every_rpc(&self, key: &str, sid: &str, tenant: &str) -> Vec<(&'static str, Code)> {
        let mut api = self.sessions.clone();
        let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
        let sid = sid.to_owned();
        vec![
            (
                "CreateSession",
                code(self.create(key, tenant).await.map(drop)),
            ),
            (
                "GetSession",
                code(
                    api.get_session(authed(
                        pb::GetSessionRequest {
                            session_id: sid.clone(),
                        },
                        key,
                    ))
                    .await
                    .map(drop),
                ),
            ),
            (
                "ListSessions",
                code(
                    api.list_sessions(authed(
                        pb::ListSessionsRequest {
                            tenant: tenant.into(),
                            limit: 0,
                            include_ended: true,
                        },
                        key,
                    ))
                    .await
                    .map(drop),
                ),
            ),
            (
                "WatchSession",
                code(
                    api.watch_session(authed(
                        pb::WatchSessionRequest {
                            session_id: sid.clone(),
                        },
                        key,
                    ))
                    .await
                    .map(drop),
                ),
            ),
            (
                "GetAuditLog",
                code(
                    api.get_audit_log(authed(
                        pb::GetAuditLogRequest {
                            session_id: sid.clone(),
                        },
                        key,
                    ))
                    .await
                    .map(drop),
                ),
            ),
            (
                "EndSession",
                code(
                    api.end_session(authed(
                        pb::EndSessionRequest {
                            session_id: sid.clone(),
                            detail: String::new(),
                        },
                        key,
                    ))
                    .await
                    .map(drop),
                ),
            ),
        ]
    }

    async fn list(&self, key: &str) -> Result<Vec<pb::Session>> {
        Ok(self
            .sessions
            .clone()
            .list_sessions(authed(
                pb::ListSessionsRequest {
                    tenant: String::new(),
                    limit: 0,
                    include_ended: true,
                },
                key,
            ))
            .await?
            .into_inner()
            .sessions)
    }
}

fn assert_all(results: &[(&str, Code)], want: Code, who: &str) {
    for (rpc, got) in results {
        assert_eq!(
            *got, want,
            "{who}: {rpc} answered {got:?}, expected {want:?}"
        );
    }
}

/// Two tenants; tenant B's keys (operator and admin) get PERMISSION_DENIED on every
/// SessionService RPC about tenant A's session, and never see it in a listing.
async fn cross_tenant_is_denied(redis: Option<RedisConfig>) -> Result<()> {
    let f = Fixture::start(redis).await?;
    let a_op = f
        .key(&f.admin, "acme", pb::ApiRole::Operator, "alice")
        .await?;
    let b_op = f
        .key(&f.admin, "globex", pb::ApiRole::Operator, "bob")
        .await?;
    let b_admin = f
        .key(&f.admin, "globex", pb::ApiRole::Admin, "boss")
        .await?;

    let a_session = f.create(&a_op, "").await?;
    let a = a_session.session.context("no session")?;
    assert_eq!(a.tenant, "acme", "an empty tenant is the key's");
    assert_eq!(a.operator, "alice", "an empty operator is the key's name");
    let b_session = f.create(&b_op, "").await?.session.context("no session")?;

    for key in [&b_op, &b_admin] {
        let results = f.every_rpc(key, &a.session_id, "acme").await;
        assert_all(&results, Code::PermissionDenied, "tenant B on tenant A");
    }
    let b_sees: Vec<String> = f.list(&b_op).await?.into_iter().map(|s| s.tenant).collect();
    assert!(
        !b_sees.is_empty() && b_sees.iter().all(|t| t == "globex"),
        "B lists only its own sessions: {b_sees:?}"
    );
    let a_sees: Vec<String> = f
        .list(&a_op)
        .await?
        .into_iter()
        .map(|s| s.session_id)
        .collect();
    assert_eq!(a_sees, vec![a.session_id.clone()]);
    assert!(!a_sees.contains(&b_session.session_id));
    // The cluster admin sees both.
    assert_eq!(f.list(&f.admin).await?.len(), 2);

    // A's own key still may do everything with its session (end last).
    let results = f.every_rpc(&a_op, &a.session_id, "acme").await;
    assert_all(&results, Code::Ok, "tenant A on its own session");
    f.cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn cross_tenant_calls_are_denied_on_every_rpc() -> Result<()> {
    cross_tenant_is_denied(None).await
}

#[tokio::test]
async fn cross_tenant_calls_are_denied_with_keys_and_sessions_in_redis() -> Result<()> {
    let Some(redis) = services::redis()? else {
        return Ok(());
    };
    let config = redis_config(RedisTarget::Single(redis.url.clone()))?;
    cross_tenant_is_denied(Some(config)).await
}

#[tokio::test]
async fn missing_bad_unknown_and_revoked_keys_are_unauthenticated() -> Result<()> {
    let f = Fixture::start(None).await?;
    let op = f
        .key(&f.admin, "acme", pb::ApiRole::Operator, "alice")
        .await?;
    let session = f.create(&op, "").await?.session.context("no session")?;
    let sid = session.session_id;
    let (key_id, secret) = op
        .strip_prefix("kh_")
        .and_then(|r| r.split_once('_'))
        .context("key format")?;
    let wrong_secret = format!("kh_{key_id}_{}", hex_random::<32>()?);
    let unknown = api_key()?;
    for (what, key, says) in [
        ("no key", String::new(), "missing API key"),
        ("not a key", "hunter2".to_owned(), "malformed"),
        ("unknown key", unknown.clone(), "unknown API key"),
        ("wrong secret", wrong_secret.clone(), "unknown API key"),
    ] {
        for (rpc, code) in f.every_rpc(&key, &sid, "acme").await {
            assert_eq!(code, Code::Unauthenticated, "{what}: {rpc}");
        }
        let status = f.create(&key, "acme").await.expect_err(what);
        assert!(
            status.message().contains(says),
            "{what}: message {:?} names the problem",
            status.message()
        );
        assert!(!status.message().contains(secret), "never echoes a secret");
        assert!(
            unknown.len() < 20 || !status.message().contains(&unknown[20..]),
            "never echoes a secret"
        );
    }
    // Revoke the operator key: it stops working at once.
    let key_info = f
        .keys
        .clone()
        .revoke_api_key(authed(
            pb::RevokeApiKeyRequest {
                key_id: key_id.into(),
            },
            &f.admin,
        ))
        .await?
        .into_inner();
    assert!(key_info.revoked_at_unix_ms > 0);
    let results = f.every_rpc(&op, &sid, "acme").await;
    assert_all(&results, Code::Unauthenticated, "revoked key");
    let status = f.create(&op, "acme").await.expect_err("revoked");
    assert!(status.message().contains("revoked"), "{}", status.message());
    // The AdminService is behind the same check.
    let status = f
        .keys
        .clone()
        .list_api_keys(authed(
            pb::ListApiKeysRequest {
                tenant: "acme".into(),
            },
            "",
        ))
        .await
        .expect_err("no key");
    assert_eq!(status.code(), Code::Unauthenticated);
    f.cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn roles_limit_what_a_key_may_do() -> Result<()> {
    let f = Fixture::start(None).await?;
    let a_admin = f.key(&f.admin, "acme", pb::ApiRole::Admin, "root").await?;
    // A tenant admin makes keys for its own tenant (an empty tenant means its own) ...
    let op = f
        .key(&a_admin, "acme", pb::ApiRole::Operator, "alice")
        .await?;
    let auditor = f.key(&a_admin, "", pb::ApiRole::Auditor, "audit").await?;
    // ... and not for another tenant, nor lists or revokes another tenant's keys.
    let status = f
        .key(&a_admin, "globex", pb::ApiRole::Operator, "mallory")
        .await
        .expect_err("other tenant");
    let status = status.downcast::<tonic::Status>()?;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let b_key = f
        .key(&f.admin, "globex", pb::ApiRole::Operator, "bob")
        .await?;
    let b_key_id = b_key[3..19].to_owned();
    let mut keys = f.keys.clone();
    let denied = keys
        .list_api_keys(authed(
            pb::ListApiKeysRequest {
                tenant: "globex".into(),
            },
            &a_admin,
        ))
        .await
        .expect_err("other tenant's keys");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = keys
        .revoke_api_key(authed(
            pb::RevokeApiKeyRequest { key_id: b_key_id },
            &a_admin,
        ))
        .await
        .expect_err("other tenant's key");
    assert_eq!(denied.code(), Code::PermissionDenied);
    // Listing shows the tenant's keys and never a secret.
    let listed = keys
        .list_api_keys(authed(
            pb::ListApiKeysRequest {
                tenant: String::new(),
            },
            &a_admin,
        ))
        .await?
        .into_inner()
        .keys;
    // Keys made within the same millisecond have no order between them.
    let mut names: Vec<_> = listed.iter().map(|k| k.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["alice", "audit", "root"]);
    let text = format!("{listed:?}");
    for key in [&a_admin, &op, &auditor] {
        assert!(!text.contains(&key[20..]), "a listing never holds a secret");
    }
    // Operators and auditors may not administer.
    for key in [&op, &auditor] {
        let denied = keys
            .list_api_keys(authed(
                pb::ListApiKeysRequest {
                    tenant: String::new(),
                },
                key,
            ))
            .await
            .expect_err("not an admin");
        assert_eq!(denied.code(), Code::PermissionDenied);
    }

    // An auditor reads but may not create or end.
    let session = f.create(&op, "").await?.session.context("no session")?;
    let results = f.every_rpc(&auditor, &session.session_id, "acme").await;
    for (rpc, code) in results {
        let want = if matches!(rpc, "CreateSession" | "EndSession") {
            Code::PermissionDenied
        } else {
            Code::Ok
        };
        assert_eq!(code, want, "auditor: {rpc}");
    }
    f.cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn tenant_policy_limits_modes_and_durations() -> Result<()> {
    let f = Fixture::start(None).await?;
    let a_admin = f.key(&f.admin, "acme", pb::ApiRole::Admin, "root").await?;
    let op = f
        .key(&a_admin, "acme", pb::ApiRole::Operator, "alice")
        .await?;
    let mut keys = f.keys.clone();
    let policy = pb::TenantPolicy {
        tenant: String::new(),
        max_duration_secs: 300,
        default_duration_secs: 120,
        allowed_modes: vec![pb::SessionMode::View as i32],
        recording_enabled: true,
        unattended_enabled: false,
        monitoring_enabled: false,
    };
    let set = keys
        .set_tenant_policy(authed(
            pb::SetTenantPolicyRequest {
                policy: Some(policy.clone()),
            },
            &a_admin,
        ))
        .await?
        .into_inner();
    assert_eq!(set.tenant, "acme");
    let got = keys
        .get_tenant_policy(authed(
            pb::GetTenantPolicyRequest {
                tenant: String::new(),
            },
            &a_admin,
        ))
        .await?
        .into_inner();
    assert_eq!(got, set);
    assert!(got.recording_enabled, "stored as set");
    // A tenant admin may not set another tenant's policy; a max above the cluster's is refused.
    let mut other = policy.clone();
    other.tenant = "globex".into();
    let denied = keys
        .set_tenant_policy(authed(
            pb::SetTenantPolicyRequest {
                policy: Some(other),
            },
            &a_admin,
        ))
        .await
        .expect_err("other tenant");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let mut too_long = policy.clone();
    too_long.max_duration_secs = 100 * 3600;
    let refused = keys
        .set_tenant_policy(authed(
            pb::SetTenantPolicyRequest {
                policy: Some(too_long),
            },
            &a_admin,
        ))
        .await
        .expect_err("above the cluster max");
    assert_eq!(refused.code(), Code::InvalidArgument);

    // Control mode is not allowed; view mode is, cut to the tenant's maximum.
    let denied = f.create(&op, "").await.expect_err("control not allowed");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied.message().contains("does not allow"),
        "{}",
        denied.message()
    );
    let made = f
        .sessions
        .clone()
        .create_session(authed(
            pb::CreateSessionRequest {
                device_id: String::new(),
                tenant: String::new(),
                operator: "op-7".into(),
                mode: pb::SessionMode::View as i32,
                permissions: 0,
                max_duration_secs: 3600,
            },
            &op,
        ))
        .await?
        .into_inner()
        .session
        .context("no session")?;
    assert_eq!(made.operator, "op-7", "a given operator is kept");
    assert_eq!(made.deadline_unix_ms - made.created_at_unix_ms, 300_000);
    f.cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn recording_needs_the_tenant_policy() -> Result<()> {
    let f = Fixture::start(None).await?;
    let a_admin = f.key(&f.admin, "acme", pb::ApiRole::Admin, "root").await?;
    let op = f
        .key(&a_admin, "acme", pb::ApiRole::Operator, "alice")
        .await?;
    let recorded = |key: String| {
        let mut api = f.sessions.clone();
        async move {
            api.create_session(authed(
                pb::CreateSessionRequest {
                    device_id: String::new(),
                    tenant: String::new(),
                    operator: String::new(),
                    mode: pb::SessionMode::View as i32,
                    permissions: (Permissions::VIEW | Permissions::RECORDING).bits(),
                    max_duration_secs: 600,
                },
                &key,
            ))
            .await
            .map(tonic::Response::into_inner)
        }
    };
    let set_policy = |recording_enabled: bool| {
        let mut keys = f.keys.clone();
        let by = a_admin.clone();
        async move {
            keys.set_tenant_policy(authed(
                pb::SetTenantPolicyRequest {
                    policy: Some(pb::TenantPolicy {
                        tenant: "acme".into(),
                        recording_enabled,
                        ..Default::default()
                    }),
                },
                &by,
            ))
            .await
        }
    };
    // No policy, then a policy without recording: refused, saying why.
    for step in [None, Some(false)] {
        if let Some(enabled) = step {
            set_policy(enabled).await?;
        }
        let denied = recorded(op.clone()).await.expect_err("recording refused");
        assert_eq!(denied.code(), Code::PermissionDenied, "{step:?}");
        assert!(
            denied.message().contains("recording_enabled"),
            "{}",
            denied.message()
        );
    }
    // A session without the recording permission needs nothing.
    f.create(&op, "").await?;
    set_policy(true).await?;
    let made = recorded(op.clone()).await?.session.context("no session")?;
    assert_eq!(
        Permissions::from_bits(made.permissions),
        Some(Permissions::VIEW | Permissions::RECORDING)
    );
    f.cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_whole_session_runs_with_an_operator_key() -> Result<()> {
    let f = Fixture::start(None).await?;
    let op = f
        .key(&f.admin, "acme", pb::ApiRole::Operator, "alice")
        .await?;
    let created = f.create(&op, "").await?;
    let sid = created
        .session
        .as_ref()
        .context("no session")?
        .session_id
        .clone();
    let url = f.cluster.coordinator_url();
    // Agents authenticate with the ticket and the code, not with API keys.
    let (mut host, mut viewer) =
        join_created(&url, &created, Consent::Approve(Permissions::VIEW)).await?;
    tokio::time::timeout(WAIT, async {
        while let Some(ev) = viewer.next_event().await {
            if matches!(ev, ViewerEvent::GrantsChanged(g) if g.contains(Permissions::VIEW)) {
                return Ok(());
            }
        }
        bail!("viewer stream closed before the grant")
    })
    .await
    .context("waiting for the grant")??;
    let ended = f
        .sessions
        .clone()
        .end_session(authed(
            pb::EndSessionRequest {
                session_id: sid.clone(),
                detail: "done".into(),
            },
            &op,
        ))
        .await?
        .into_inner();
    assert_eq!(ended.end_reason(), pb::EndReason::EndedByOperator);
    let reason = tokio::time::timeout(WAIT, async {
        while let Some(ev) = host.next_event().await {
            if let HostEvent::Ended { reason, .. } = ev {
                return Ok(reason);
            }
        }
        bail!("host stream closed without an end")
    })
    .await
    .context("waiting for the host to see the end")??;
    assert_eq!(reason, pb::EndReason::EndedByOperator);
    let log = f
        .sessions
        .clone()
        .get_audit_log(authed(pb::GetAuditLogRequest { session_id: sid }, &op))
        .await?
        .into_inner()
        .events;
    assert_eq!(log.last().map(|e| e.kind()), Some(pb::EventKind::Ended));
    f.cluster.shutdown().await;
    Ok(())
}

/// An interpreter with grpcio and protobuf, or None (an error under CI=true).
async fn python() -> Result<Option<String>> {
    let mut candidates = Vec::new();
    if let Ok(p) = std::env::var("KAKEHASHI_PYTHON") {
        candidates.push(p);
    }
    candidates.extend(["/usr/bin/python3".to_owned(), "python3".to_owned()]);
    for p in candidates {
        let ok = tokio::process::Command::new(&p)
            .args(["-c", "import grpc, google.protobuf"])
            .kill_on_drop(true)
            .output()
            .await
            .is_ok_and(|o| o.status.success());
        if ok {
            return Ok(Some(p));
        }
    }
    if services::in_ci() {
        bail!(
            "no python3 with grpc and protobuf (install python3-grpcio python3-protobuf: ops/install-deps.sh)"
        );
    }
    eprintln!("skipping: no python3 with grpc and protobuf (ops/install-deps.sh installs them)");
    Ok(None)
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the example with `key`; its JSON output and exit status.
async fn run_example(
    python: &str,
    gen_dir: &Path,
    addr: &str,
    key: &str,
    extra: &[&str],
) -> Result<(serde_json::Value, i32)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(python)
            .arg(root.join("ops/examples/python/create_session.py"))
            .args(["--coordinator", addr])
            .args(extra)
            .env("PYTHONPATH", gen_dir)
            .env("KAKEHASHI_API_KEY", key)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the Python example did not finish")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "example printed {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((json, out.status.code().unwrap_or(-1)))
}

#[tokio::test]
async fn the_python_client_creates_a_session_with_an_api_key() -> Result<()> {
    let Some(python) = python().await? else {
        return Ok(());
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let gen_dir = TempDir(std::env::temp_dir().join(format!("kh-pygen-{}", hex_random::<6>()?)));
    std::fs::create_dir_all(&gen_dir.0)?;
    let protoc = tokio::process::Command::new("protoc")
        .arg("-I")
        .arg(root.join("proto/proto"))
        .arg(format!("--python_out={}", gen_dir.0.display()))
        .arg(root.join("proto/proto/kakehashi/v1/kakehashi.proto"))
        .kill_on_drop(true)
        .output()
        .await;
    match protoc {
        Ok(o) if o.status.success() => {}
        Ok(o) => bail!("protoc failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) if services::in_ci() => bail!("protoc is not installed: {e}"),
        Err(e) => {
            eprintln!("skipping: protoc is not runnable: {e}");
            return Ok(());
        }
    }

    let f = Fixture::start(None).await?;
    let op = f
        .key(&f.admin, "acme", pb::ApiRole::Operator, "alice")
        .await?;
    let addr = f.cluster.coordinator.grpc_addr().to_string();

    let (made, status) = run_example(&python, &gen_dir.0, &addr, &op, &[]).await?;
    assert_eq!(status, 0, "{made}");
    let code = made["code"].as_str().context("code")?;
    assert!(
        code.len() >= 6 && code.bytes().all(|b| b.is_ascii_digit()),
        "{made}"
    );
    let ticket = made["operator_ticket"].as_str().context("ticket")?;
    assert_eq!(ticket.len(), 64, "{made}");
    assert_eq!(made["tenant"], "acme");
    assert_eq!(made["operator"], "alice");
    // The session is real: the same key reads it back over the Rust client.
    let sid = made["session_id"]
        .as_str()
        .context("session id")?
        .to_owned();
    let got = f
        .sessions
        .clone()
        .get_session(authed(pb::GetSessionRequest { session_id: sid }, &op))
        .await?
        .into_inner();
    assert_eq!(got.state(), pb::SessionState::Waiting);

    let (ended, status) = run_example(
        &python,
        &gen_dir.0,
        &addr,
        &op,
        &["--end", "--mode", "view"],
    )
    .await?;
    assert_eq!(status, 0, "{ended}");
    assert_eq!(ended["ended_state"], "SESSION_STATE_ENDED");

    let wrong = api_key()?;
    let (refused, status) = run_example(&python, &gen_dir.0, &addr, &wrong, &[]).await?;
    assert_eq!(status, 2, "{refused}");
    assert_eq!(refused["error"], "UNAUTHENTICATED");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("unknown API key") && !m.contains(&wrong[20..])),
        "{refused}"
    );
    f.cluster.shutdown().await;
    Ok(())
}
