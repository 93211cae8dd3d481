//! A test coordinator: AgentService over gRPC on 127.0.0.1:0, code "1234", operator
//! ticket "ticket", recording every ReportConsent.

use std::sync::{Arc, Mutex};

use anyhow::Result;
use kakehashi_proto::token::{Claims, Role};
use kakehashi_proto::{Mode, Permissions, pb};
use tokio::task::JoinSet;

use super::relay::TestRelay;
use super::tokens::{session_id, signing_key};

struct TestCoordinator {
    relay: pb::RelayEndpoint,
    reports: Arc<Mutex<Vec<pb::ReportConsentRequest>>>,
}

impl TestCoordinator {
    fn respond(
        &self,
        role: Role,
        pid: u64,
        public_key: &[u8],
    ) -> Result<pb::JoinResponse, tonic::Status> {
        let public_key: [u8; 32] = public_key
            .try_into()
            .map_err(|_| tonic::Status::invalid_argument("public key must be 32 bytes"))?;
        let now = kakehashi_proto::unix_now();
        let session = pb::Session {
            session_id: session_id().to_string(),
            mode: pb::SessionMode::Control as i32,
            permissions: (Permissions::VIEW | Permissions::CONTROL).bits(),
            relay: Some(self.relay.clone()),
            ..Default::default()
        };
        let token = Claims {
            role,
            mode: Mode::Control,
            session_id: session_id(),
            participant_id: pid,
            issued_at: now,
            expires_at: now + 600,
            session_deadline: now + 600,
            permissions: Permissions::VIEW | Permissions::CONTROL,
            public_key,
            relay_id: self.relay.relay_id.clone(),
        }
        .sign(&signing_key());
        Ok(pb::JoinResponse {
            session: Some(session),
            token,
            relay: Some(self.relay.clone()),
            coordinator_public_key: signing_key().verifying_key().to_bytes().to_vec(),
        })
    }
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for TestCoordinator {
    async fn join_by_code(
        &self,
        req: tonic::Request<pb::JoinByCodeRequest>,
    ) -> Result<tonic::Response<pb::JoinResponse>, tonic::Status> {
        let req = req.into_inner();
        if req.code != "1234" {
            return Err(tonic::Status::not_found("no live session has this code"));
        }
        self.respond(Role::Host, 10, &req.public_key)
            .map(tonic::Response::new)
    }

    async fn join_as_operator(
        &self,
        req: tonic::Request<pb::JoinAsOperatorRequest>,
    ) -> Result<tonic::Response<pb::JoinResponse>, tonic::Status> {
        let req = req.into_inner();
        if req.operator_ticket != "ticket" {
            return Err(tonic::Status::permission_denied("bad ticket"));
        }
        self.respond(Role::Viewer, 20, &req.public_key)
            .map(tonic::Response::new)
    }

    async fn report_consent(
        &self,
        req: tonic::Request<pb::ReportConsentRequest>,
    ) -> Result<tonic::Response<pb::ReportConsentResponse>, tonic::Status> {
        self.reports
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?
            .push(req.into_inner());
        Ok(tonic::Response::new(pb::ReportConsentResponse {}))
    }

    async fn report_end(
        &self,
        _req: tonic::Request<pb::ReportEndRequest>,
    ) -> Result<tonic::Response<pb::ReportEndResponse>, tonic::Status> {
        // The real coordinator's handling is tested end to end in the loadtest crate.
        Ok(tonic::Response::new(pb::ReportEndResponse {}))
    }

    async fn report_activity(
        &self,
        _req: tonic::Request<pb::ReportActivityRequest>,
    ) -> Result<tonic::Response<pb::ReportActivityResponse>, tonic::Status> {
        // The real coordinator's handling is tested end to end in the loadtest crate.
        Ok(tonic::Response::new(pb::ReportActivityResponse {}))
    }

    async fn resume_session(
        &self,
        _req: tonic::Request<pb::ResumeSessionRequest>,
    ) -> Result<tonic::Response<pb::JoinResponse>, tonic::Status> {
        // This stand-in has one relay and nowhere to move a session to.
        Err(tonic::Status::unavailable("no other relay"))
    }

    async fn poll_device(
        &self,
        _req: tonic::Request<pb::PollDeviceRequest>,
    ) -> Result<tonic::Response<pb::PollDeviceResponse>, tonic::Status> {
        // Unattended access is tested against the real coordinator (loadtest crate).
        Err(tonic::Status::unauthenticated(
            "this stand-in enrols no devices",
        ))
    }

    async fn get_monitor_ticket(
        &self,
        _req: tonic::Request<pb::MonitorTicketRequest>,
    ) -> Result<tonic::Response<pb::MonitorTicketResponse>, tonic::Status> {
        // Monitoring is tested against the real coordinator (loadtest crate).
        Err(tonic::Status::unauthenticated(
            "this stand-in enrols no devices",
        ))
    }
}

pub async fn start_coordinator(
    relay: &TestRelay,
    tasks: &mut JoinSet<()>,
) -> Result<(String, Arc<Mutex<Vec<pb::ReportConsentRequest>>>)> {
    let reports = Arc::new(Mutex::new(Vec::new()));
    let svc = TestCoordinator {
        relay: relay.endpoint.clone(),
        reports: reports.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let incoming = futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| s);
        Some((next, l))
    });
    tasks.spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(pb::agent_service_server::AgentServiceServer::new(svc))
            .serve_with_incoming(incoming)
            .await;
    });
    Ok((url, reports))
}
