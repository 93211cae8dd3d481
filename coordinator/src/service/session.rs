//! `SessionService`: what call-center software calls.
//!
//! Every call is authenticated first (`crate::auth`) and scoped to the caller's tenant:
//! a session of another tenant answers PERMISSION_DENIED on every RPC, ListSessions
//! lists only the caller's tenant, and an auditor key may only read.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};
use kakehashi_proto::{Permissions, pb};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use super::{Core, now_ms};
use crate::auth::{Action, AuthMode, Authenticator, CallError, Caller};
use crate::backend::sessions::{ListFilter, SessionRecord};
use crate::error::ApiError;
use crate::{random, telemetry, validate};

/// The tonic service; cheap to clone.
#[derive(Clone)]
pub struct SessionApi {
    core: Arc<Core>,
    auth: Arc<dyn Authenticator>,
}

impl SessionApi {
    /// Authenticates as `core.config.auth` says, against `core.backends.auth`.
    pub fn new(core: Arc<Core>) -> Self {
        let auth = crate::auth::authenticator(&core.config.auth, core.backends.auth.clone());
        Self { core, auth }
    }

    /// The caller of `request`, allowed to do `action` (tenant checks come later, once
    /// the session is known).
    async fn caller<T>(&self, request: &Request<T>, action: Action) -> Result<Caller, CallError> {
        let caller = self.auth.authenticate(request.metadata()).await?;
        caller.require(action)?;
        Ok(caller)
    }
}

impl Core {
    /// Creates a session in WAITING with a fresh code. Its duration is the request's
    /// `max_duration_secs` (0: the tenant's default, else the cluster's), capped at the
    /// tenant's maximum (else the cluster's): an over-long request is shortened, never
    /// refused, and the returned session's deadline is the one the relay enforces.
    ///
    /// An empty `tenant` is the caller's, an empty `operator` the caller's key name; a
    /// tenant key may create sessions of its own tenant only, and only in the modes the
    /// tenant's stored policy allows.
    pub async fn create_session(
        &self,
        caller: &Caller,
        mut req: pb::CreateSessionRequest,
    ) -> Result<pb::CreateSessionResponse, CallError> {
        let started = Instant::now();
        if req.tenant.is_empty() && !caller.is_cluster_wide() {
            req.tenant = caller.tenant.clone();
        }
        // Unattended access: checked before anything is allocated; it fixes the tenant
        // (for a cluster-wide caller naming none) and the operator (the key's name).
        let device = if req.device_id.is_empty() {
            None
        } else {
            caller.require_tenant(&req.tenant, "the tenant named in the request")?;
            Some(self.check_unattended(caller, &mut req).await?)
        };
        if req.operator.is_empty() && !caller.name.is_empty() {
            req.operator = caller.name.clone();
        }
        validate::name("tenant", &req.tenant)?;
        caller.require_tenant(&req.tenant, "the tenant named in the request")?;
        validate::name("operator", &req.operator)?;
        let mode = validate::mode(req.mode)?;
        let requested = validate::permission_bits("permissions", req.permissions)?;
        let permissions = validate::session_permissions(requested, mode);
        // The tenant's policy (else the cluster's) sets the default and the cap. A request
        // for longer than the cap is cut to it, not refused, as the cluster maximum always
        // was; the response's `deadline_unix_ms` shows the duration granted. A policy set
        // through AdminService lies over the static `--tenant-policy` one.
        let mut limits = self.config.tenants.limits(
            &req.tenant,
            self.config.default_max_duration,
            self.config.max_max_duration,
        );
        let stored = self.backends.auth.get_policy(&req.tenant).await?;
        if let Some(stored) = &stored {
            if !stored.allows(mode) {
                return Err(CallError::ModeNotAllowed {
                    tenant: req.tenant,
                    mode: mode.name(),
                });
            }
            limits = stored.limits(limits, self.config.max_max_duration);
        }
        // Recording needs the tenant's say-so (as unattended access does); with auth
        // disabled (dev mode) every caller is the cluster admin and may record.
        if permissions.contains(Permissions::RECORDING)
            && self.config.auth.mode != AuthMode::Disabled
            && !stored.as_ref().is_some_and(|p| p.recording_enabled)
        {
            return Err(CallError::RecordingNotAllowed { tenant: req.tenant });
        }
        let duration = limits.session_duration(req.max_duration_secs);

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
                return Err(ApiError::from(e).into());
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
            return Err(ApiError::from(e).into());
        }
        self.publish(&record, pb::EventKind::Created).await?;
        if let Some(grant) = &device {
            self.start_unattended(grant, &record).await?;
        }
        metrics::counter!(telemetry::SESSIONS_CREATED).increment(1);
        metrics::histogram!(telemetry::CREATE_SESSION_SECONDS)
            .record(started.elapsed().as_secs_f64());
        tracing::info!(
            session = %id,
            tenant = %record.tenant,
            mode = mode.name(),
            duration_secs = duration.as_secs(),
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

    /// The session, if the caller may see it.
    pub async fn get_for(&self, caller: &Caller, id: &str) -> Result<SessionRecord, CallError> {
        let id = validate::session_id(id)?;
        let record = self.get(id).await?;
        caller.require_tenant(&record.tenant, "the session")?;
        Ok(record)
    }

    /// The caller's tenant's sessions. A tenant key lists only its own tenant (an empty
    /// `tenant` means it; another tenant's name is refused); the cluster admin (and every
    /// caller with auth disabled) lists any tenant, or all with an empty `tenant`.
    pub async fn list_sessions(
        &self,
        caller: &Caller,
        req: pb::ListSessionsRequest,
    ) -> Result<pb::ListSessionsResponse, CallError> {
        let tenant = if req.tenant.is_empty() {
            (!caller.is_cluster_wide()).then(|| caller.tenant.clone())
        } else {
            validate::name("tenant", &req.tenant)?;
            caller.require_tenant(&req.tenant, "the tenant named in the request")?;
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

    pub async fn end_session(
        &self,
        caller: &Caller,
        req: pb::EndSessionRequest,
    ) -> Result<pb::Session, CallError> {
        validate::bounded_text("detail", &req.detail, validate::MAX_DETAIL_CHARS)?;
        // A session's tenant never changes, so checking it before the end is enough.
        let id = self.get_for(caller, &req.session_id).await?.id;
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
        caller: &Caller,
        req: pb::GetAuditLogRequest,
    ) -> Result<pb::GetAuditLogResponse, CallError> {
        let id = self.get_for(caller, &req.session_id).await?.id;
        let events = self.backends.events.read(id).await?;
        Ok(pb::GetAuditLogResponse { events })
    }

    pub async fn watch_session(
        &self,
        caller: &Caller,
        req: pb::WatchSessionRequest,
    ) -> Result<WatchStream, CallError> {
        let id = self.get_for(caller, &req.session_id).await?.id;
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
        let result = async {
            let caller = self.caller(&request, Action::WriteSessions).await?;
            self.core
                .create_session(&caller, request.into_inner())
                .await
        }
        .await;
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
            let caller = self.caller(&request, Action::ReadSessions).await?;
            let record = self
                .core
                .get_for(&caller, &request.get_ref().session_id)
                .await?;
            Ok::<_, CallError>(record.to_pb())
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
        let result = async {
            let caller = self.caller(&request, Action::ReadSessions).await?;
            self.core.list_sessions(&caller, request.into_inner()).await
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e| e.status("ListSessions"))
    }

    async fn end_session(
        &self,
        request: Request<pb::EndSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let started = Instant::now();
        let result = async {
            let caller = self.caller(&request, Action::WriteSessions).await?;
            self.core.end_session(&caller, request.into_inner()).await
        }
        .await;
        crate::telemetry::otel::rpc_step("session.end", started, result.as_ref().ok());
        result
            .map(Response::new)
            .map_err(|e| e.status("EndSession"))
    }

    async fn get_audit_log(
        &self,
        request: Request<pb::GetAuditLogRequest>,
    ) -> Result<Response<pb::GetAuditLogResponse>, Status> {
        let result = async {
            let caller = self.caller(&request, Action::ReadSessions).await?;
            self.core.get_audit_log(&caller, request.into_inner()).await
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e| e.status("GetAuditLog"))
    }

    type WatchSessionStream = WatchStream;

    async fn watch_session(
        &self,
        request: Request<pb::WatchSessionRequest>,
    ) -> Result<Response<Self::WatchSessionStream>, Status> {
        let result = async {
            let caller = self.caller(&request, Action::ReadSessions).await?;
            self.core.watch_session(&caller, request.into_inner()).await
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e| e.status("WatchSession"))
    }
}
