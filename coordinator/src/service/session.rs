//! `SessionService`: what call-center software calls.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};
use kakehashi_proto::{Permissions, pb};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use super::{Core, now_ms};
use crate::backend::sessions::{ListFilter, SessionRecord};
use crate::error::ApiError;
use crate::{random, telemetry, validate};

/// The tonic service; cheap to clone.
#[derive(Clone)]
pub struct SessionApi {
    core: Arc<Core>,
}

impl SessionApi {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

impl Core {
    pub async fn create_session(
        &self,
        req: pb::CreateSessionRequest,
    ) -> Result<pb::CreateSessionResponse, ApiError> {
        let started = Instant::now();
        validate::name("tenant", &req.tenant)?;
        validate::name("operator", &req.operator)?;
        let mode = validate::mode(req.mode)?;
        let requested = validate::permission_bits("permissions", req.permissions)?;
        let permissions = validate::session_permissions(requested, mode);
        let duration = validate::max_duration(
            req.max_duration_secs,
            self.config.default_max_duration,
            self.config.max_max_duration,
        );

        let id = Self::new_session_id()?;
        let ticket = random::bytes::<32>()?;
        let relay = telemetry::timed_placement(self.backends.relays.pick(None)).await?;
        let code = match self
            .backends
            .codes
            .allocate(id, self.config.code_digits, self.config.code_ttl)
            .await
        {
            Ok(code) => {
                metrics::counter!(telemetry::CODES_ALLOCATED).increment(1);
                code
            }
            Err(e) => {
                self.release_quietly(&relay.relay_id).await;
                return Err(e.into());
            }
        };
        let created = now_ms();
        let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let record = SessionRecord {
            id,
            version: 0,
            tenant: req.tenant,
            operator: req.operator,
            mode,
            permissions,
            state: pb::SessionState::Waiting,
            relay,
            created_at_ms: created,
            deadline_ms: created.saturating_add(ms(duration)),
            code_expires_at_ms: created.saturating_add(ms(self.config.code_ttl)),
            code: code.clone(),
            granted: Permissions::NONE,
            end_reason: pb::EndReason::Unspecified,
            end_detail: String::new(),
            ended_at_ms: 0,
            ticket_sha256: Sha256::digest(hex::encode(ticket).as_bytes()).into(),
            host_participant: None,
        };
        if let Err(e) = self.backends.sessions.insert(record.clone()).await {
            self.release_quietly(&record.relay.relay_id).await;
            if let Err(e) = self.backends.codes.revoke(&code).await {
                tracing::warn!(session = %id, error = %e, "could not revoke the code of a failed create");
            }
            return Err(e.into());
        }
        self.publish(&record, pb::EventKind::Created).await?;
        metrics::counter!(telemetry::SESSIONS_CREATED).increment(1);
        metrics::histogram!(telemetry::CREATE_SESSION_SECONDS)
            .record(started.elapsed().as_secs_f64());
        tracing::info!(
            session = %id,
            tenant = %record.tenant,
            mode = mode.name(),
            relay = %record.relay.relay_id,
            "session created"
        );
        Ok(pb::CreateSessionResponse {
            session: Some(record.to_pb()),
            code,
            operator_ticket: hex::encode(ticket),
        })
    }

    async fn release_quietly(&self, relay_id: &str) {
        if let Err(e) = self.backends.relays.release(relay_id).await {
            tracing::warn!(relay = relay_id, error = %e, "could not release a placement");
        }
    }

    pub async fn list_sessions(
        &self,
        req: pb::ListSessionsRequest,
    ) -> Result<pb::ListSessionsResponse, ApiError> {
        let tenant = if req.tenant.is_empty() {
            None
        } else {
            validate::name("tenant", &req.tenant)?;
            Some(req.tenant)
        };
        let records = self
            .backends
            .sessions
            .list(ListFilter {
                tenant,
                include_ended: req.include_ended,
                limit: validate::list_limit(req.limit),
            })
            .await?;
        Ok(pb::ListSessionsResponse {
            sessions: records.iter().map(SessionRecord::to_pb).collect(),
        })
    }

    pub async fn end_session(&self, req: pb::EndSessionRequest) -> Result<pb::Session, ApiError> {
        let id = validate::session_id(&req.session_id)?;
        validate::bounded_text("detail", &req.detail, validate::MAX_DETAIL_CHARS)?;
        let record = self
            .end_by(
                id,
                pb::EndReason::EndedByOperator,
                &req.detail,
                pb::EventActor::Api,
            )
            .await?;
        self.end_on_relay(&record).await;
        Ok(record.to_pb())
    }

    /// Every event of the session so far, from the event backend: the audit log.
    pub async fn get_audit_log(
        &self,
        req: pb::GetAuditLogRequest,
    ) -> Result<pb::GetAuditLogResponse, ApiError> {
        let id = validate::session_id(&req.session_id)?;
        self.get(id).await?;
        let events = self.backends.events.read(id).await?;
        Ok(pb::GetAuditLogResponse { events })
    }

    pub async fn watch_session(
        &self,
        req: pb::WatchSessionRequest,
    ) -> Result<WatchStream, ApiError> {
        let id = validate::session_id(&req.session_id)?;
        self.get(id).await?;
        let events = self.backends.events.subscribe(id).await?;
        // Yield events up to and including ENDED, then close; also close at shutdown so a
        // graceful stop does not wait on watchers.
        let stream = futures::stream::unfold((events, false), |(mut events, done)| async move {
            if done {
                return None;
            }
            let item = events.next().await?;
            let ended = matches!(&item, Ok(ev) if ev.kind == pb::EventKind::Ended as i32);
            let item = item.map_err(|e| ApiError::from(e).status("WatchSession"));
            let stop = ended || item.is_err();
            Some((item, (events, stop)))
        })
        .take_until(self.shutdown.clone().cancelled_owned());
        Ok(Box::pin(stream))
    }
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::SessionEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::session_service_server::SessionService for SessionApi {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let started = Instant::now();
        let result = self.core.create_session(request.into_inner()).await;
        let session = result.as_ref().ok().and_then(|r| r.session.as_ref());
        crate::telemetry::otel::rpc_step("session.create", started, session);
        result
            .map(Response::new)
            .map_err(|e| e.status("CreateSession"))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let result = async {
            let id = validate::session_id(&request.get_ref().session_id)?;
            Ok::<_, ApiError>(self.core.get(id).await?.to_pb())
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e| e.status("GetSession"))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        self.core
            .list_sessions(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.status("ListSessions"))
    }

    async fn end_session(
        &self,
        request: Request<pb::EndSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let started = Instant::now();
        let result = self.core.end_session(request.into_inner()).await;
        crate::telemetry::otel::rpc_step("session.end", started, result.as_ref().ok());
        result
            .map(Response::new)
            .map_err(|e| e.status("EndSession"))
    }

    async fn get_audit_log(
        &self,
        request: Request<pb::GetAuditLogRequest>,
    ) -> Result<Response<pb::GetAuditLogResponse>, Status> {
        self.core
            .get_audit_log(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.status("GetAuditLog"))
    }

    type WatchSessionStream = WatchStream;

    async fn watch_session(
        &self,
        request: Request<pb::WatchSessionRequest>,
    ) -> Result<Response<Self::WatchSessionStream>, Status> {
        self.core
            .watch_session(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.status("WatchSession"))
    }
}
