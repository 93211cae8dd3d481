//! Coordinator HA and etcd member loss, with every server a separate process:
//! killing the leader coordinator elects another and placement continues; losing one
//! etcd member of three does not stop placement.

use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::Client;
use kakehashi_loadtest::procs::client::{create_session, eventually};
use kakehashi_loadtest::procs::{Launcher, ProcClusterBuilder};
use kakehashi_loadtest::services::EtcdCluster;
use kakehashi_proto::pb::session_service_client::SessionServiceClient;
use kakehashi_proto::{membership, pb};

fn launcher() -> Launcher {
    Launcher::loadtest(env!("CARGO_BIN_EXE_kakehashi-loadtest"))
}

/// The replica id the election currently names, if any.
async fn leader(client: &Client, ns: &str) -> Result<String, String> {
    let resp = client
        .clone()
        .leader(membership::leader_election(ns))
        .await
        .map_err(|e| e.to_string())?;
    let kv = resp.kv().ok_or("no leader")?;
    Ok(String::from_utf8_lossy(kv.value()).into_owned())
}

#[tokio::test]
async fn killing_the_leader_elects_another_and_placement_continues() -> Result<()> {
    let Some(etcd) = EtcdCluster::start(1)? else {
        return Ok(());
    };
    let mut cluster = ProcClusterBuilder::new(launcher())
        .etcd(etcd.endpoints())
        .coordinators(3)
        .relays(1)
        .start()?;
    let client = Client::connect(etcd.endpoints(), None).await?;
    let ns = cluster.namespace.clone();
    let first = eventually(Duration::from_secs(20), "a leader elected", || {
        leader(&client, &ns)
    })
    .await
    .map_err(|e| e.context(cluster.logs(30)))?;

    // Every replica places sessions, leader or not.
    for url in cluster.coordinator_urls() {
        eventually(
            Duration::from_secs(20),
            "placement on every replica",
            || {
                let url = url.clone();
                async move {
                    create_session(&url)
                        .await
                        .map(|_| ())
                        .map_err(|s| s.to_string())
                }
            },
        )
        .await
        .map_err(|e| e.context(cluster.logs(30)))?;
    }

    cluster
        .coordinator(&first)
        .with_context(|| format!("leader {first:?} is not one of ours"))?
        .proc
        .kill();
    let killed = std::time::Instant::now();
    let second = eventually(Duration::from_secs(30), "a new leader", || {
        let (client, ns, first) = (&client, &ns, &first);
        async move {
            let now = leader(client, ns).await?;
            if &now == first {
                Err(format!("still {now}"))
            } else {
                Ok(now)
            }
        }
    })
    .await
    .map_err(|e| e.context(cluster.logs(30)))?;
    assert_ne!(first, second);
    // A figure for the README (bounded by the 5 s election lease), not an assertion.
    println!(
        "leader failover: {first} killed, {second} leads after {:.1} s",
        killed.elapsed().as_secs_f64()
    );

    // The survivors keep placing.
    let urls = cluster.coordinator_urls();
    assert_eq!(urls.len(), 2);
    for url in urls {
        for _ in 0..5 {
            create_session(&url).await?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn losing_one_etcd_member_of_three_keeps_placement_going() -> Result<()> {
    let Some(mut etcd) = EtcdCluster::start(3)? else {
        return Ok(());
    };
    let cluster = ProcClusterBuilder::new(launcher())
        .etcd(etcd.endpoints())
        .coordinators(1)
        .relays(1)
        .start()?;
    let url = cluster.coordinators[0].url().to_owned();
    eventually(Duration::from_secs(20), "placement", || {
        let url = url.clone();
        async move {
            create_session(&url)
                .await
                .map(|_| ())
                .map_err(|s| s.to_string())
        }
    })
    .await
    .map_err(|e| e.context(cluster.logs(30)))?;

    // The first member is the one every client dialled first.
    etcd.members[0].stop();
    let mut placed = 0;
    for _ in 0..30 {
        // A reconnect to another member may cost a retry, never an outage.
        let r = eventually(
            Duration::from_secs(10),
            "placement after a member loss",
            || {
                let url = url.clone();
                async move {
                    create_session(&url)
                        .await
                        .map(|_| ())
                        .map_err(|s| s.to_string())
                }
            },
        )
        .await;
        r.map_err(|e| e.context(cluster.logs(30)))?;
        placed += 1;
    }
    assert_eq!(placed, 30);

    // The member comes back and the cluster is whole again.
    etcd.members[0].start()?;
    create_session(&url).await?;
    Ok(())
}

#[tokio::test]
async fn the_leader_ends_sessions_stranded_on_a_lost_relay() -> Result<()> {
    let Some(etcd) = EtcdCluster::start(1)? else {
        return Ok(());
    };
    let mut cluster = ProcClusterBuilder::new(launcher())
        .etcd(etcd.endpoints())
        .coordinators(1)
        .relays(1)
        .coordinator_args(["--resume-window-secs", "2"])
        .start()?;
    let url = cluster.coordinators[0].url().to_owned();
    let created = eventually(Duration::from_secs(20), "placement", || {
        let url = url.clone();
        async move { create_session(&url).await.map_err(|s| s.to_string()) }
    })
    .await
    .map_err(|e| e.context(cluster.logs(30)))?;
    let session_id = created.session.context("no session")?.session_id;

    // The relay dies and nobody resumes: after its lease and the resume window, the
    // leader ends the session with RELAY_SHUTDOWN.
    cluster.relays[0].proc.kill();
    let sessions = SessionServiceClient::connect(url.clone()).await?;
    let ended = eventually(
        Duration::from_secs(60),
        "session ended by the leader",
        || {
            let (sessions, session_id) = (&sessions, &session_id);
            async move {
                let s = sessions
                    .clone()
                    .get_session(pb::GetSessionRequest {
                        session_id: session_id.clone(),
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                if s.state == pb::SessionState::Ended as i32 {
                    Ok(s)
                } else {
                    Err(format!("state {}", s.state))
                }
            }
        },
    )
    .await
    .map_err(|e| e.context(cluster.logs(30)))?;
    assert_eq!(ended.end_reason, pb::EndReason::RelayShutdown as i32);
    Ok(())
}

#[tokio::test]
async fn with_a_shared_store_killing_the_leader_loses_no_session() -> Result<()> {
    let Some(etcd) = EtcdCluster::start(1)? else {
        return Ok(());
    };
    let Some(redis) = kakehashi_loadtest::services::redis()? else {
        return Ok(());
    };
    let mut ns = [0u8; 6];
    getrandom::fill(&mut ns)?;
    let mut cluster = ProcClusterBuilder::new(launcher())
        .etcd(etcd.endpoints())
        .coordinators(2)
        .relays(1)
        .coordinator_args([
            "--redis-url".to_owned(),
            redis.url.clone(),
            "--redis-namespace".to_owned(),
            format!("ha-{}", hex::encode(ns)),
        ])
        .start()?;
    let client = Client::connect(etcd.endpoints(), None).await?;
    let ns = cluster.namespace.clone();
    let first = eventually(Duration::from_secs(20), "a leader elected", || {
        leader(&client, &ns)
    })
    .await
    .map_err(|e| e.context(cluster.logs(30)))?;
    let leader_url = cluster
        .coordinator(&first)
        .context("leader is one of ours")?
        .url()
        .to_owned();

    // Sessions created through the leader, before it dies.
    let mut created = Vec::new();
    for _ in 0..5 {
        let c = eventually(Duration::from_secs(20), "placement via the leader", || {
            let url = leader_url.clone();
            async move { create_session(&url).await.map_err(|s| s.to_string()) }
        })
        .await
        .map_err(|e| e.context(cluster.logs(30)))?;
        created.push(c);
    }
    cluster.coordinator(&first).context("leader")?.proc.kill();

    // The survivor has every one of them: readable, and their codes redeem.
    let urls = cluster.coordinator_urls();
    assert_eq!(urls.len(), 1);
    let survivor = urls[0].clone();
    let mut sessions = SessionServiceClient::connect(survivor.clone()).await?;
    let mut agents =
        pb::agent_service_client::AgentServiceClient::connect(survivor.clone()).await?;
    for c in &created {
        let id = c.session.as_ref().context("session")?.session_id.clone();
        let s = sessions
            .get_session(pb::GetSessionRequest { session_id: id })
            .await?
            .into_inner();
        assert_eq!(s.state, pb::SessionState::Waiting as i32);
        let joined = agents
            .join_by_code(pb::JoinByCodeRequest {
                code: c.code.clone(),
                public_key: vec![7; 32],
            })
            .await?
            .into_inner();
        assert!(!joined.token.is_empty());
    }
    // And it keeps placing, as the new leader.
    eventually(Duration::from_secs(30), "the survivor leads", || {
        let (client, ns, first) = (&client, &ns, &first);
        async move {
            let now = leader(client, ns).await?;
            if &now == first {
                Err(format!("still {now}"))
            } else {
                Ok(())
            }
        }
    })
    .await?;
    create_session(&survivor).await?;
    Ok(())
}
