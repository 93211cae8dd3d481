//! etcd stopped entirely: sessions already on relays keep flowing, new CreateSession
//! answers UNAVAILABLE naming the relay directory, and when etcd is back the relays
//! re-register and placement recovers. Every server is a separate process.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use kakehashi_agent::RelayLink;
use kakehashi_loadtest::procs::client::{create_session, eventually};
use kakehashi_loadtest::procs::{Launcher, ProcClusterBuilder};
use kakehashi_loadtest::services::EtcdCluster;
use kakehashi_proto::pb::agent_service_client::AgentServiceClient;
use kakehashi_proto::{Channel, Frame, FrameHeader, SessionId, pb};

fn launcher() -> Launcher {
    Launcher::loadtest(env!("CARGO_BIN_EXE_kakehashi-loadtest"))
}

/// Sends `n` chat frames (opaque bytes: the relay never reads them) from `from` and
/// checks `to` receives each, in order.
async fn chat_flows(from: &RelayLink, to: &mut RelayLink, first_seq: u64, n: u64) -> Result<()> {
    for seq in first_seq..first_seq + n {
        let payload = seq.to_be_bytes();
        let header = FrameHeader::new(Channel::Chat, 0, seq, 0, payload.len() as u32);
        from.send_frame(&Frame::new(header, &payload)).await?;
    }
    for seq in first_seq..first_seq + n {
        let frame = tokio::time::timeout(Duration::from_secs(10), to.next_frame())
            .await
            .context("no chat frame within 10 s")?
            .context("link closed")?;
        if frame.header.channel != Channel::Chat || frame.header.seq != seq {
            bail!("expected chat #{seq}, got {:?}", frame.header);
        }
    }
    Ok(())
}

#[tokio::test]
async fn sessions_keep_flowing_while_etcd_is_down_and_placement_recovers() -> Result<()> {
    let Some(mut etcd) = EtcdCluster::start(1)? else {
        return Ok(());
    };
    let cluster = ProcClusterBuilder::new(launcher())
        .etcd(etcd.endpoints())
        .coordinators(1)
        .relays(1)
        .start()?;
    let url = cluster.coordinators[0].url().to_owned();
    let created = eventually(Duration::from_secs(20), "placement", || {
        let url = url.clone();
        async move { create_session(&url).await.map_err(|s| s.to_string()) }
    })
    .await
    .map_err(|e| e.context(cluster.logs(30)))?;

    let session = created.session.clone().context("no session")?;
    let sid: SessionId = session.session_id.parse()?;
    let mut agent = AgentServiceClient::connect(url.clone()).await?;
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
    let (host, _) = RelayLink::connect(&host.relay.context("relay")?, &host.token, &sid).await?;
    let (mut viewer, _) =
        RelayLink::connect(&viewer.relay.context("relay")?, &viewer.token, &sid).await?;
    chat_flows(&host, &mut viewer, 1, 10).await?;

    etcd.stop_all();
    let status = eventually(Duration::from_secs(30), "CreateSession refused", || {
        let url = url.clone();
        async move {
            match create_session(&url).await {
                Err(s) if s.code() == tonic::Code::Unavailable => Ok(s),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await
    .map_err(|e| e.context(cluster.logs(30)))?;
    assert!(
        status
            .message()
            .contains("relay directory (etcd) unavailable"),
        "{}",
        status.message()
    );

    // The session on the relay does not notice.
    chat_flows(&host, &mut viewer, 11, 50).await?;

    etcd.start_all()?;
    eventually(
        Duration::from_secs(60),
        "placement after etcd returns",
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
    chat_flows(&host, &mut viewer, 61, 10).await?;

    // The coordinator leads again (its old election lease is revoked on reconnect).
    let client = etcd_client::Client::connect(etcd.endpoints(), None).await?;
    let election = kakehashi_proto::membership::leader_election(&cluster.namespace);
    eventually(Duration::from_secs(30), "a leader after the outage", || {
        let (client, election) = (&client, &election);
        async move {
            let resp = client
                .clone()
                .leader(election.as_str())
                .await
                .map_err(|e| e.to_string())?;
            resp.kv().map(|_| ()).ok_or_else(|| "no leader".to_owned())
        }
    })
    .await
    .map_err(|e| e.context(cluster.logs(30)))?;
    Ok(())
}
