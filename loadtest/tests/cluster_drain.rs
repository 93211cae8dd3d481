//! SIGTERM drains a relay process: it is marked draining in etcd (no new placements),
//! every participant of every session gets `Drain { grace_ms }`, and the process exits
//! once the grace period ends (its participants here stay, as agents that do not
//! resume would).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use etcd_client::Client;
use kakehashi_agent::{LinkError, RelayLink};
use kakehashi_loadtest::procs::client::{create_session, eventually, relay_of};
use kakehashi_loadtest::procs::{Launcher, ProcClusterBuilder};
use kakehashi_loadtest::services::EtcdCluster;
use kakehashi_proto::pb::agent_service_client::AgentServiceClient;
use kakehashi_proto::pb::signal::Kind;
use kakehashi_proto::{Claims, Mode, Permissions, Role, SessionId, membership, pb};

fn launcher() -> Launcher {
    Launcher::loadtest(env!("CARGO_BIN_EXE_kakehashi-loadtest"))
}

/// Attaches the customer (by code) and the operator (by ticket) of a created session.
async fn attach_both(
    url: &str,
    created: &pb::CreateSessionResponse,
) -> Result<(RelayLink, RelayLink)> {
    let mut agent = AgentServiceClient::connect(url.to_owned()).await?;
    let session = created.session.as_ref().context("no session")?;
    let sid: SessionId = session.session_id.parse()?;
    let host = agent
        .join_by_code(pb::JoinByCodeRequest {
            code: created.code.clone(),
            public_key: vec![7; 32],
        })
        .await?
        .into_inner();
    let viewer = agent
        .join_as_operator(pb::JoinAsOperatorRequest {
            session_id: session.session_id.clone(),
            operator_ticket: created.operator_ticket.clone(),
            public_key: vec![9; 32],
            supervisor: false,
            recorder: false,
        })
        .await?
        .into_inner();
    let relay = host.relay.clone().context("no relay for the host")?;
    let (host_link, _) = RelayLink::connect(&relay, &host.token, &sid).await?;
    let relay = viewer.relay.clone().context("no relay for the viewer")?;
    let (viewer_link, _) = RelayLink::connect(&relay, &viewer.token, &sid).await?;
    Ok((host_link, viewer_link))
}

/// Reads signals until a `Drain`; returns its grace.
async fn drain_signal(link: &mut RelayLink) -> Result<u32> {
    loop {
        match link.next_signal().await {
            Some(Ok(Kind::Drain(d))) => return Ok(d.grace_ms),
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("link failed before Drain: {e}"),
            None => bail!("link closed before Drain"),
        }
    }
}

#[tokio::test]
async fn sigterm_drains_the_relay_and_it_exits_after_the_grace() -> Result<()> {
    let Some(etcd) = EtcdCluster::start(1)? else {
        return Ok(());
    };
    let grace_secs = 3;
    let mut cluster = ProcClusterBuilder::new(launcher())
        .etcd(etcd.endpoints())
        .coordinators(1)
        .relays(2)
        .relay_args(["--drain-grace-secs", &grace_secs.to_string()])
        .start()?;
    let url = cluster.coordinators[0].url().to_owned();

    // A session with both participants on relay-1.
    let created = eventually(Duration::from_secs(20), "a session on relay-1", || {
        let url = url.clone();
        async move {
            let r = create_session(&url).await.map_err(|s| s.to_string())?;
            if relay_of(&r) == "relay-1" {
                Ok(r)
            } else {
                Err(relay_of(&r))
            }
        }
    })
    .await
    .map_err(|e| e.context(cluster.logs(30)))?;
    let (mut host, mut viewer) = attach_both(&url, &created).await?;

    let relay = cluster.relay("relay-1").context("relay-1")?;
    relay.proc.terminate()?;

    // Every participant is told to resume elsewhere, with the configured grace.
    let grace_ms = grace_secs * 1000;
    assert_eq!(drain_signal(&mut host).await?, grace_ms);
    assert_eq!(drain_signal(&mut viewer).await?, grace_ms);

    // etcd says draining; from then on no session is placed on relay-1.
    let mut client = Client::connect(etcd.endpoints(), None).await?;
    let key = membership::relay_key(&cluster.namespace, "relay-1");
    eventually(Duration::from_secs(10), "relay-1 draining in etcd", || {
        let (client, key) = (&client, &key);
        async move {
            let resp = client
                .clone()
                .get(key.as_bytes(), None)
                .await
                .map_err(|e| e.to_string())?;
            let kv = resp.kvs().first().ok_or("no registration")?;
            let reg = membership::decode_registration(kv.value()).map_err(|e| e.to_string())?;
            if reg.draining {
                Ok(())
            } else {
                Err("not draining".into())
            }
        }
    })
    .await?;
    for _ in 0..20 {
        let r = create_session(&url).await?;
        assert_eq!(
            relay_of(&r),
            "relay-2",
            "no new placement on a draining relay"
        );
    }

    // Even a valid token for a new session on relay-1 (as from a coordinator whose
    // view lagged) is refused while it drains.
    let relay1 = created
        .session
        .as_ref()
        .and_then(|s| s.relay.clone())
        .context("relay of the first session")?;
    let mut fresh = [0u8; 16];
    getrandom::fill(&mut fresh)?;
    let fresh = SessionId::from_bytes(fresh);
    let now = kakehashi_proto::unix_now();
    let token = Claims {
        role: Role::Host,
        mode: Mode::Control,
        session_id: fresh,
        participant_id: 42,
        issued_at: now,
        expires_at: now + 60,
        session_deadline: now + 60,
        permissions: Permissions::VIEW,
        public_key: [5; 32],
        relay_id: "relay-1".into(),
    }
    .sign(&cluster.signing_key);
    match RelayLink::connect(&relay1, &token, &fresh).await {
        Err(LinkError::Refused(reason)) => {
            assert!(reason.contains("draining"), "refused for {reason:?}")
        }
        Err(e) => bail!("expected a draining refusal, got {e}"),
        Ok(_) => bail!("a draining relay accepted a new session"),
    }

    // The participants did not move: the relay exits when the grace ends, cleanly.
    let relay = cluster.relay("relay-1").context("relay-1")?;
    let status = relay
        .proc
        .wait_exit(Duration::from_secs(grace_secs as u64 + 20))
        .await?;
    assert!(status.success(), "relay exited with {status}");
    // It revoked its lease on the way out.
    let resp = client.get(key.as_bytes(), None).await?;
    assert!(resp.kvs().is_empty(), "registration removed at exit");
    Ok(())
}
