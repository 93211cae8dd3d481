//! `RelayAdmin`: the gRPC service coordinators call. Requests carry a coordinator-role
//! token for the session and this relay, verified offline like every other token.

use std::sync::Arc;
use std::time::Duration;

use kakehashi_proto::pb::{self, relay_admin_server::RelayAdmin};
use kakehashi_proto::{Role, SessionId, token};
use ractor::ActorRef;
use ractor::rpc::CallResult;
use tonic::{Request, Response, Status};

use crate::node::{NodeCtx, NodeMsg};

pub(crate) struct AdminService {
    pub node: ActorRef<NodeMsg>,
    pub ctx: Arc<NodeCtx>,
}

#[tonic::async_trait]
impl RelayAdmin for AdminService {
    async fn end_session(
        &self,
        request: Request<pb::RelayEndSessionRequest>,
    ) -> Result<Response<pb::RelayEndSessionResponse>, Status> {
        let req = request.into_inner();
        let session_id: SessionId = req
            .session_id
            .parse()
            .map_err(|e| Status::invalid_argument(format!("{e}")))?;
        let claims = token::verify(
            &req.token,
            &self.ctx.config.coordinator_key,
            kakehashi_proto::unix_now(),
        )
        .map_err(|e| Status::unauthenticated(e.to_string()))?;
        claims
            .expect_role(&[Role::Coordinator])
            .and_then(|()| claims.expect_relay(&self.ctx.config.relay_id))
            .and_then(|()| claims.expect_session(&session_id))
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        let reason = pb::EndReason::try_from(req.reason).unwrap_or(pb::EndReason::EndedByOperator);
        let detail: String = req.detail.chars().take(256).collect();
        let live = match self
            .node
            .call(
                |reply| NodeMsg::End {
                    session_id,
                    reason,
                    detail,
                    reply,
                },
                Some(Duration::from_secs(5)),
            )
            .await
        {
            Ok(CallResult::Success(live)) => live,
            _ => {
                return Err(Status::unavailable(
                    "the relay's node supervisor is not answering",
                ));
            }
        };
        Ok(Response::new(pb::RelayEndSessionResponse {
            was_live: live,
        }))
    }
}
