//! `AgentService`: what the customer's and the operator's agents call.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use kakehashi_proto::token::{self, Role};
use kakehashi_proto::{Permissions, SessionId, pb, policy};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use super::{Core, EventNote, digests_equal};
use crate::backend::codes;
use crate::backend::sessions::SessionRecord;
use crate::error::ApiError;
use crate::limiter::{self, Verdict};
use crate::{telemetry, validate};

/// The tonic service; cheap to clone.
#[derive(Clone)]
pub struct AgentApi {
    core: Arc<Core>,
}

impl AgentApi {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

impl Core {
    fn join_response(&self, record: &SessionRecord, token: Vec<u8>) -> pb::JoinResponse {
        pb::JoinResponse {
            session: Some(record.to_pb()),
            token,
            relay: Some(record.relay.endpoint()),
            coordinator_public_key: self.config.signing_key.verifying_key().to_bytes().to_vec(),
        }
    }

    /// Counts a wrong code against its source and the cluster-wide budget. A failure to
    /// count fails the call: a limiter that cannot count must not let guesses through.
    async fn record_wrong_code(&self, source: IpAddr) -> Result<(), ApiError> {
        metrics::counter!(telemetry::CODE_GUESS_FAILURES).increment(1);
        self.backends
            .limiter
            .record_failure(source, super::now_ms())
            .await?;
        Ok(())
    }

    pub async fn join_by_code(
        &self,
        source: IpAddr,
        req: pb::JoinByCodeRequest,
    ) -> Result<pb::JoinResponse, ApiError> {
        let code = validate::code(&req.code)?;
        // A typo fails the check digit here and costs the customer no guess.
        if !codes::is_well_formed(&code) {
            return Err(ApiError::invalid(
                "code",
                "is not a code we issue (its last digit does not check out); \
                 ask the operator to read it again",
            ));
        }
        let public_key = validate::public_key(&req.public_key)?;
        if let Verdict::Wait(wait) = self.backends.limiter.check(source, super::now_ms()).await? {
            metrics::counter!(limiter::GUESS_REFUSALS, "reason" => "backoff").increment(1);
            return Err(ApiError::GuessLimited {
                source_ip: source,
                retry_after_secs: wait.as_secs().max(1),
            });
        }
        let Some(id) = self.backends.codes.redeem(&code).await? else {
            self.record_wrong_code(source).await?;
            return Err(ApiError::CodeNotFound);
        };
        metrics::counter!(telemetry::CODES_REDEEMED).increment(1);
        let participant = Self::new_participant_id()?;
        let record = self
            .modify(id, |r| {
                if r.is_ended() {
                    return Err(ApiError::SessionEnded(id));
                }
                if r.state != pb::SessionState::Waiting {
                    return Err(ApiError::NotWaiting {
                        session: id,
                        state: r.state.as_str_name(),
                    });
                }
                r.state = pb::SessionState::Joined;
                r.host_participant = Some(participant);
                Ok(())
            })
            .await?;
        self.publish(&record, pb::EventKind::CodeEntered).await?;
        let token = self.participant_token(&record, Role::Host, participant, public_key)?;
        metrics::counter!(telemetry::JOINS, "role" => "host").increment(1);
        tracing::info!(session = %id, participant, "customer joined by code");
        Ok(self.join_response(&record, token))
    }

    pub async fn join_as_operator(
        &self,
        req: pb::JoinAsOperatorRequest,
    ) -> Result<pb::JoinResponse, ApiError> {
        let id = validate::session_id(&req.session_id)?;
        validate::ticket(&req.operator_ticket)?;
        let public_key = validate::public_key(&req.public_key)?;
        let record = self.get(id).await?;
        let presented: [u8; 32] = Sha256::digest(req.operator_ticket.as_bytes()).into();
        if !digests_equal(&presented, &record.ticket_sha256) {
            return Err(ApiError::BadTicket(id));
        }
        if record.is_ended() {
            return Err(ApiError::SessionEnded(id));
        }
        let participant = Self::new_participant_id()?;
        // The same ticket admits the operator and supervisors: the call-center software
        // that holds it decides who watches; the customer then admits each supervisor.
        let role = match (req.supervisor, req.recorder) {
            (false, false) => Role::Viewer,
            (true, false) => Role::Supervisor,
            (false, true) if record.permissions.contains(Permissions::RECORDING) => Role::Recorder,
            (false, true) => {
                return Err(ApiError::invalid(
                    "recorder",
                    "this session was not created with the recording permission",
                ));
            }
            (true, true) => {
                return Err(ApiError::invalid(
                    "recorder",
                    "a participant is a supervisor or a recorder, not both",
                ));
            }
        };
        self.publish_event(
            &record,
            EventNote::new(pb::EventKind::OperatorJoined, pb::EventActor::Operator)
                .detail(format!("{} {participant}", role.name())),
        )
        .await?;
        let token = self.participant_token(&record, role, participant, public_key)?;
        metrics::counter!(telemetry::JOINS, "role" => role.name()).increment(1);
        tracing::info!(session = %id, participant, role = role.name(), "operator joined");
        Ok(self.join_response(&record, token))
    }

    /// Checks a participant's token: signed by this cluster and not expired. Its
    /// decoding bounds the size, so an oversized token costs nothing.
    fn verify_token(&self, bytes: &[u8]) -> Result<token::Claims, ApiError> {
        token::verify(
            bytes,
            &self.config.signing_key.verifying_key(),
            kakehashi_proto::unix_now(),
        )
        .map_err(ApiError::BadToken)
    }

    pub async fn report_consent(&self, req: pb::ReportConsentRequest) -> Result<(), ApiError> {
        let claims = self.verify_token(&req.token)?;
        claims
            .expect_role(&[Role::Host])
            .map_err(|_| ApiError::NotHost)?;
        let granted = validate::permission_bits("granted", req.granted)?;
        let denied = validate::permission_bits("denied", req.denied)?;
        let id = claims.session_id;
        let mut changed = false;
        let mut added = kakehashi_proto::Permissions::NONE;
        let record = self
            .modify(id, |r| {
                if r.is_ended() {
                    return Err(ApiError::SessionEnded(id));
                }
                if r.host_participant != Some(claims.participant_id) {
                    return Err(ApiError::NotHost);
                }
                let new = policy::cap_grant(granted, r.permissions, r.mode);
                changed = new != r.granted;
                added = new.without(r.granted);
                r.granted = new;
                if r.state == pb::SessionState::Joined
                    && new.contains(kakehashi_proto::Permissions::VIEW)
                {
                    r.state = pb::SessionState::Active;
                }
                Ok(())
            })
            .await?;
        let customer = pb::EventActor::Customer;
        telemetry::count_consent("granted", added);
        telemetry::count_consent("denied", denied);
        if !record.granted.is_empty() || changed {
            let note = EventNote::new(pb::EventKind::ConsentGiven, customer).permissions(added);
            self.publish_event(&record, note).await?;
        }
        if !denied.is_empty() {
            let note = EventNote::new(pb::EventKind::ConsentDenied, customer).permissions(denied);
            self.publish_event(&record, note).await?;
        }
        tracing::info!(session = %id, granted = %record.granted, denied = %denied, "consent reported");
        Ok(())
    }
}

impl Core {
    /// Records how a session ended on its relay, as reported by its host. Idempotent:
    /// an end already recorded (by the API, the reaper or an earlier report) stands.
    pub async fn report_end(&self, req: pb::ReportEndRequest) -> Result<(), ApiError> {
        let claims = self.verify_token(&req.token)?;
        claims
            .expect_role(&[Role::Host])
            .map_err(|_| ApiError::NotHost)?;
        validate::bounded_text("detail", &req.detail, validate::MAX_DETAIL_CHARS)?;
        let reason = match pb::EndReason::try_from(req.reason) {
            Ok(
                r @ (pb::EndReason::EndedByCustomer
                | pb::EndReason::EndedByOperator
                | pb::EndReason::SessionFailed
                | pb::EndReason::RelayShutdown
                | pb::EndReason::IdleTimeout),
            ) => r,
            _ => {
                return Err(ApiError::InvalidArgument {
                    field: "reason",
                    reason: "a host may report ended_by_customer, ended_by_operator, \
                             session_failed, relay_shutdown or idle_timeout"
                        .into(),
                });
            }
        };
        let id = claims.session_id;
        let record = self.get(id).await?;
        if record.host_participant != Some(claims.participant_id) {
            return Err(ApiError::NotHost);
        }
        match self.end(id, reason, &req.detail).await {
            Ok(_) | Err(ApiError::SessionEnded(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Core {
    /// Records what the host saw happen that is not a grant or denial: the operator's
    /// request, the customer's revoke, pause and resume, a time warning. A revoke also
    /// shrinks the record's granted set.
    pub async fn report_activity(&self, req: pb::ReportActivityRequest) -> Result<(), ApiError> {
        let claims = self.verify_token(&req.token)?;
        claims
            .expect_role(&[Role::Host])
            .map_err(|_| ApiError::NotHost)?;
        validate::bounded_text("detail", &req.detail, validate::MAX_DETAIL_CHARS)?;
        let perms = validate::permission_bits("permissions", req.permissions)?;
        let kind = match pb::EventKind::try_from(req.kind) {
            Ok(
                k @ (pb::EventKind::PermissionRequested
                | pb::EventKind::ConsentRevoked
                | pb::EventKind::Paused
                | pb::EventKind::Resumed
                | pb::EventKind::TimeWarning
                | pb::EventKind::FileTransfer
                | pb::EventKind::SupervisorAdmitted
                | pb::EventKind::SupervisorRefused),
            ) => k,
            _ => {
                return Err(ApiError::InvalidArgument {
                    field: "kind",
                    reason: "a host may report permission_requested, consent_revoked, \
                             paused, resumed, time_warning, file_transfer, \
                             supervisor_admitted or supervisor_refused"
                        .into(),
                });
            }
        };
        let id = claims.session_id;
        let host = claims.participant_id;
        let check = |r: &SessionRecord| {
            if r.is_ended() {
                return Err(ApiError::SessionEnded(id));
            }
            if r.host_participant != Some(host) {
                return Err(ApiError::NotHost);
            }
            Ok(())
        };
        if kind == pb::EventKind::ConsentRevoked {
            telemetry::count_consent("revoked", perms);
        }
        let record = if kind == pb::EventKind::ConsentRevoked {
            self.modify(id, |r| {
                check(r)?;
                r.granted = r.granted.without(perms);
                Ok(())
            })
            .await?
        } else {
            let r = self.get(id).await?;
            check(&r)?;
            r
        };
        let mut note = EventNote::new(kind, super::default_actor(kind, &record)).permissions(perms);
        note.remaining_secs = req.remaining_secs;
        note.detail = req.detail;
        self.publish_event(&record, note).await?;
        tracing::info!(session = %id, kind = kind.as_str_name(), permissions = %perms, "activity reported");
        Ok(())
    }
}

impl Core {
    /// Moves a participant whose relay died or is draining: the session stays where
    /// another participant already moved it, or goes to a fresh relay (never the failed
    /// one). The new token keeps the participant's id and public key, so end-to-end keys
    /// survive; the call-center software sees one `RELAY_MIGRATED` per move.
    pub async fn resume_session(
        &self,
        req: pb::ResumeSessionRequest,
    ) -> Result<pb::JoinResponse, ApiError> {
        let claims = self.verify_token(&req.token)?;
        claims
            .expect_role(&[Role::Host, Role::Viewer, Role::Supervisor, Role::Recorder])
            .map_err(ApiError::BadToken)?;
        validate::bounded_text(
            "failed_relay_id",
            &req.failed_relay_id,
            token::MAX_RELAY_ID_LEN,
        )?;
        let id = claims.session_id;
        let record = self.get(id).await?;
        if record.is_ended() {
            return Err(ApiError::SessionEnded(id));
        }
        if claims.role == Role::Host && record.host_participant != Some(claims.participant_id) {
            return Err(ApiError::NotHost);
        }
        let failed = req.failed_relay_id;
        // The session's relay as the directory sees it now: a restarted relay has a new
        // certificate, and a draining or vanished one is not listed at all.
        let listed = self
            .backends
            .relays
            .list()
            .await?
            .into_iter()
            .find(|r| r.relay_id == record.relay.relay_id);
        let record = match listed {
            Some(current) if record.relay.relay_id != failed => {
                if current != record.relay {
                    self.modify(id, |r| {
                        if r.relay.relay_id == current.relay_id {
                            r.relay = current.clone();
                        }
                        Ok(())
                    })
                    .await?
                } else {
                    record
                }
            }
            _ => {
                self.move_session(id, &record.relay.relay_id, &failed)
                    .await?
            }
        };
        let token = self.participant_token(
            &record,
            claims.role,
            claims.participant_id,
            claims.public_key,
        )?;
        Ok(self.join_response(&record, token))
    }
}

impl Core {
    /// Moves session `id` off `from` (its relay in the record) onto a relay that is
    /// neither `from` nor `failed`, unless another participant moved it meanwhile.
    async fn move_session(
        &self,
        id: SessionId,
        from: &str,
        failed: &str,
    ) -> Result<SessionRecord, ApiError> {
        // `from` is either `failed` (avoided here) or no longer listed (gone or
        // draining), so the directory never picks it.
        let fresh = telemetry::timed_placement(self.backends.relays.pick(Some(failed))).await?;
        let mut moved = false;
        let record = self
            .modify(id, |r| {
                if r.is_ended() {
                    return Err(ApiError::SessionEnded(id));
                }
                // Another participant may have moved it meanwhile: follow them.
                moved = r.relay.relay_id == from;
                if moved {
                    r.relay = fresh.clone();
                }
                Ok(())
            })
            .await?;
        // Exactly one of the two relays keeps this session's count.
        let unused = if moved { from } else { &fresh.relay_id };
        if let Err(e) = self.backends.relays.release(unused).await {
            tracing::warn!(session = %id, error = %e, "could not release a relay placement");
        }
        if moved {
            metrics::counter!(telemetry::RESUMES).increment(1);
            tracing::info!(session = %id, from, to = %record.relay.relay_id, "session migrated");
            self.publish(&record, pb::EventKind::RelayMigrated).await?;
        }
        Ok(record)
    }
}

/// The caller's address for the guess limiter; callers without one share a bucket.
fn source_ip<T>(request: &Request<T>) -> IpAddr {
    request
        .remote_addr()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip())
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    async fn join_by_code(
        &self,
        request: Request<pb::JoinByCodeRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let source = source_ip(&request);
        let started = std::time::Instant::now();
        let result = self.core.join_by_code(source, request.into_inner()).await;
        let session = result.as_ref().ok().and_then(|r| r.session.as_ref());
        telemetry::otel::rpc_step("session.join_by_code", started, session);
        result
            .map(Response::new)
            .map_err(|e| e.status("JoinByCode"))
    }

    async fn join_as_operator(
        &self,
        request: Request<pb::JoinAsOperatorRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let started = std::time::Instant::now();
        let result = self.core.join_as_operator(request.into_inner()).await;
        let session = result.as_ref().ok().and_then(|r| r.session.as_ref());
        telemetry::otel::rpc_step("session.join_as_operator", started, session);
        result
            .map(Response::new)
            .map_err(|e| e.status("JoinAsOperator"))
    }

    async fn report_consent(
        &self,
        request: Request<pb::ReportConsentRequest>,
    ) -> Result<Response<pb::ReportConsentResponse>, Status> {
        self.core
            .report_consent(request.into_inner())
            .await
            .map(|()| Response::new(pb::ReportConsentResponse {}))
            .map_err(|e| e.status("ReportConsent"))
    }

    async fn report_end(
        &self,
        request: Request<pb::ReportEndRequest>,
    ) -> Result<Response<pb::ReportEndResponse>, Status> {
        self.core
            .report_end(request.into_inner())
            .await
            .map(|()| Response::new(pb::ReportEndResponse {}))
            .map_err(|e| e.status("ReportEnd"))
    }

    async fn report_activity(
        &self,
        request: Request<pb::ReportActivityRequest>,
    ) -> Result<Response<pb::ReportActivityResponse>, Status> {
        self.core
            .report_activity(request.into_inner())
            .await
            .map(|()| Response::new(pb::ReportActivityResponse {}))
            .map_err(|e| e.status("ReportActivity"))
    }

    async fn resume_session(
        &self,
        request: Request<pb::ResumeSessionRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let started = std::time::Instant::now();
        let result = self.core.resume_session(request.into_inner()).await;
        telemetry::record_resume(result.is_ok(), started.elapsed());
        let session = result.as_ref().ok().and_then(|r| r.session.as_ref());
        telemetry::otel::rpc_step("session.resume", started, session);
        result
            .map(Response::new)
            .map_err(|e| e.status("ResumeSession"))
    }

    async fn poll_device(
        &self,
        request: Request<pb::PollDeviceRequest>,
    ) -> Result<Response<pb::PollDeviceResponse>, Status> {
        self.core
            .poll_device(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.status("PollDevice"))
    }

    async fn get_monitor_ticket(
        &self,
        request: Request<pb::MonitorTicketRequest>,
    ) -> Result<Response<pb::MonitorTicketResponse>, Status> {
        self.core
            .get_monitor_ticket(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.status("GetMonitorTicket"))
    }
}
