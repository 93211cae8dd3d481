//! Coordinators sharing Redis: a session created and watched through one replica is
//! joined through another, and every replica's watch stream sees the same events; Redis
//! killed and restarted under a running coordinator: UNAVAILABLE naming Redis, then
//! recovery by itself.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use kakehashi_coordinator::backend::redis::{self, RedisConfig, RedisTarget};
use kakehashi_coordinator::contract::sample_relays;
use kakehashi_coordinator::{Coordinator, CoordinatorConfig, CoordinatorHandle};
use kakehashi_loadtest::services;
use kakehashi_proto::pb;
use kakehashi_proto::pb::agent_service_client::AgentServiceClient;
use kakehashi_proto::pb::session_service_client::SessionServiceClient;
use tonic::Code;
use tonic::transport::Channel;

fn config(target: RedisTarget, namespace: &str) -> RedisConfig {
    let mut config = RedisConfig::new(target);
    config.namespace = namespace.to_owned();
    config
}

fn namespace() -> Result<String> {
    let mut rand = [0u8; 6];
    getrandom::fill(&mut rand)?;
    Ok(format!("test-{}", hex::encode(rand)))
}

/// A coordinator with its own connections to the shared Redis; all replicas of a test
/// share one signing key, as a real cluster does.
async fn replica(
    redis_config: &RedisConfig,
    key: &ed25519_dalek::SigningKey,
) -> Result<CoordinatorHandle> {
    let mut config = CoordinatorConfig::dev(sample_relays());
    config.signing_key = key.clone();
    let backends = redis::backends(redis_config, sample_relays()).await?;
    Ok(Coordinator::start(config, backends).await?)
}

fn create_req() -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        device_id: String::new(),
        tenant: "acme".into(),
        operator: "op-1".into(),
        mode: pb::SessionMode::Control as i32,
        permissions: 0,
        max_duration_secs: 0,
    }
}

async fn next_kind(stream: &mut tonic::Streaming<pb::SessionEvent>) -> Result<pb::EventKind> {
    let event = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .context("no event within 20 s")??
        .context("watch stream ended")?;
    Ok(pb::EventKind::try_from(event.kind)?)
}

async fn create_on_one_join_through_another(target: RedisTarget) -> Result<()> {
    let redis_config = config(target, &namespace()?);
    let key = kakehashi_coordinator::generate_signing_key()?;
    let a = replica(&redis_config, &key).await?;
    let b = replica(&redis_config, &key).await?;
    let mut sessions_a = SessionServiceClient::connect(a.url()).await?;
    let mut sessions_b = SessionServiceClient::connect(b.url()).await?;
    let mut agents_b = AgentServiceClient::connect(b.url()).await?;

    let created = sessions_a.create_session(create_req()).await?.into_inner();
    let id = created
        .session
        .as_ref()
        .map(|s| s.session_id.clone())
        .context("session in response")?;
    let mut watch_a = sessions_a
        .watch_session(pb::WatchSessionRequest {
            session_id: id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(next_kind(&mut watch_a).await?, pb::EventKind::Created);

    // B reads the record A wrote.
    let seen_by_b = sessions_b
        .get_session(pb::GetSessionRequest {
            session_id: id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(seen_by_b.state, pb::SessionState::Waiting as i32);

    let joined = agents_b
        .join_by_code(pb::JoinByCodeRequest {
            code: created.code.clone(),
            public_key: vec![9; 32],
        })
        .await?
        .into_inner();
    assert!(!joined.token.is_empty());
    // A's watcher sees the join that happened on B.
    assert_eq!(next_kind(&mut watch_a).await?, pb::EventKind::CodeEntered);
    // The code was single use across replicas.
    let again = sessions_a
        .get_session(pb::GetSessionRequest {
            session_id: id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(again.state, pb::SessionState::Joined as i32);
    let mut agents_a = AgentServiceClient::connect(a.url()).await?;
    let reused = agents_a
        .join_by_code(pb::JoinByCodeRequest {
            code: created.code.clone(),
            public_key: vec![9; 32],
        })
        .await
        .expect_err("a redeemed code is gone on every replica");
    assert_eq!(reused.code(), Code::NotFound);

    // B's watcher replays the same log, and both see B end it.
    let mut watch_b = sessions_b
        .watch_session(pb::WatchSessionRequest {
            session_id: id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(next_kind(&mut watch_b).await?, pb::EventKind::Created);
    assert_eq!(next_kind(&mut watch_b).await?, pb::EventKind::CodeEntered);
    sessions_b
        .end_session(pb::EndSessionRequest {
            session_id: id.clone(),
            detail: "done".into(),
        })
        .await?;
    assert_eq!(next_kind(&mut watch_a).await?, pb::EventKind::Ended);
    assert_eq!(next_kind(&mut watch_b).await?, pb::EventKind::Ended);
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_share_one_redis_node() -> Result<()> {
    let Some(server) = services::redis()? else {
        return Ok(());
    };
    create_on_one_join_through_another(RedisTarget::Single(server.url.clone())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_share_one_redis_cluster() -> Result<()> {
    let Some(cluster) = services::redis_cluster()? else {
        return Ok(());
    };
    create_on_one_join_through_another(RedisTarget::Cluster(cluster.nodes.clone())).await
}

async fn create(
    client: &mut SessionServiceClient<Channel>,
) -> Result<pb::CreateSessionResponse, tonic::Status> {
    client
        .create_session(create_req())
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_a_running_coordinator() -> Result<()> {
    if std::env::var("KAKEHASHI_TEST_REDIS_URL").is_ok() {
        eprintln!("SKIPPING: an external Redis cannot be killed by this test");
        return Ok(());
    }
    let Some(mut server) = services::redis()? else {
        return Ok(());
    };
    let redis_config = config(RedisTarget::Single(server.url.clone()), &namespace()?);
    let key = kakehashi_coordinator::generate_signing_key()?;
    let coordinator = replica(&redis_config, &key).await?;
    let mut sessions = SessionServiceClient::connect(coordinator.url()).await?;
    let mut agents = AgentServiceClient::connect(coordinator.url()).await?;
    create(&mut sessions).await?;

    server.kill();
    // Calls fail with UNAVAILABLE and say that Redis is the cause; none hangs (each
    // command has a 1 s budget) and the coordinator keeps serving.
    let err = create(&mut sessions).await.expect_err("Redis is down");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("redis"), "{}", err.message());
    let err = agents
        .join_by_code(pb::JoinByCodeRequest {
            code: "5724".into(),
            public_key: vec![1; 32],
        })
        .await
        .expect_err("Redis is down");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("redis"), "{}", err.message());

    server.restart()?;
    // The connection manager reconnects by itself; the first calls may still see the
    // old connection fail.
    let mut recovered = None;
    for _ in 0..50 {
        match create(&mut sessions).await {
            Ok(created) => {
                recovered = Some(created);
                break;
            }
            Err(s) if s.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => bail!("unexpected error after the restart: {s:?}"),
        }
    }
    let created = recovered.context("the coordinator did not recover after Redis returned")?;
    let joined = agents
        .join_by_code(pb::JoinByCodeRequest {
            code: created.code.clone(),
            public_key: vec![1; 32],
        })
        .await?
        .into_inner();
    assert!(!joined.token.is_empty());
    coordinator.shutdown().await;
    Ok(())
}
