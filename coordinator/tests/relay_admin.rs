//! EndSession reaches the session's relay with a coordinator-role token the relay can
//! verify offline. A stand-in RelayAdmin server records what it receives.

use anyhow::{Context, Result};
use kakehashi_coordinator::{Backends, Coordinator, CoordinatorConfig, RelayInfo};
use kakehashi_proto::pb;
use kakehashi_proto::pb::relay_admin_server::{RelayAdmin, RelayAdminServer};
use kakehashi_proto::pb::session_service_client::SessionServiceClient;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

struct RecordingRelay {
    seen: mpsc::UnboundedSender<pb::RelayEndSessionRequest>,
}

#[tonic::async_trait]
impl RelayAdmin for RecordingRelay {
    async fn end_session(
        &self,
        request: Request<pb::RelayEndSessionRequest>,
    ) -> Result<Response<pb::RelayEndSessionResponse>, Status> {
        // The test holds the receiver until it has read one request.
        let _ = self.seen.send(request.into_inner());
        Ok(Response::new(pb::RelayEndSessionResponse {
            was_live: true,
        }))
    }
}

#[tokio::test]
async fn end_session_calls_the_relay_with_a_verifiable_coordinator_token() -> Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let admin_addr = listener.local_addr()?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RelayAdminServer::new(RecordingRelay { seen: tx }))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                stop.clone().cancelled_owned(),
            ),
    );

    let relays = vec![RelayInfo {
        relay_id: "relay-admin-test".into(),
        quic_addr: "127.0.0.1:4433".into(),
        admin_url: format!("http://{admin_addr}"),
        server_name: "localhost".into(),
        cert_sha256: [1; 32],
        region: String::new(),
    }];
    let handle = Coordinator::start(
        CoordinatorConfig::dev(relays.clone()),
        Backends::in_memory(relays),
    )
    .await?;
    let mut sessions = SessionServiceClient::connect(handle.url()).await?;
    let created = sessions
        .create_session(pb::CreateSessionRequest {
            device_id: String::new(),
            tenant: "acme".into(),
            operator: "op".into(),
            mode: pb::SessionMode::Control as i32,
            permissions: 0,
            max_duration_secs: 0,
        })
        .await?
        .into_inner();
    let id = created.session.context("session")?.session_id;
    sessions
        .end_session(pb::EndSessionRequest {
            session_id: id.clone(),
            detail: "done".into(),
        })
        .await?;

    let got = rx.recv().await.context("the relay was called")?;
    assert_eq!(got.session_id, id);
    assert_eq!(got.reason, pb::EndReason::EndedByOperator as i32);
    assert_eq!(got.detail, "done");
    let claims = kakehashi_proto::token::verify(
        &got.token,
        &handle.public_key(),
        kakehashi_proto::unix_now(),
    )?;
    claims.expect_role(&[kakehashi_proto::Role::Coordinator])?;
    claims.expect_relay("relay-admin-test")?;
    claims.expect_session(&id.parse()?)?;

    handle.shutdown().await;
    stop.cancel();
    server.await??;
    Ok(())
}
