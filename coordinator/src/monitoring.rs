//! Telework monitoring, the coordinator's part: an enrolled device asks
//! (`AgentService.GetMonitorTicket`) for the ticket it uploads presence events and
//! evidence snapshots to the evidence sink with. The coordinator signs the ticket with
//! its token key; the sink checks it offline, as relays check tokens.
//!
//! # Invariants
//! - A ticket is issued only for a request signed by the enrolled device key over
//!   [`TICKET_PROOF_DOMAIN`] (so a poll's signature is good for nothing here), with a
//!   timestamp within [`crate::unattended::POLL_WINDOW_MS`] of the coordinator's clock and newer than the
//!   device's last accepted ticket proof. That counter is the device's own, apart from
//!   PollDevice's: the poller and the monitor are two processes signing with one clock.
//! - Then only when the tenant's stored policy has `monitoring_enabled` (whatever the
//!   auth mode: monitoring is never on by default), the device is enrolled with
//!   `monitoring` and not blocked, and the cluster has an evidence sink.

use kakehashi_proto::monitor::{MAX_TENANT_LEN, MonitorTicket, TICKET_PROOF_DOMAIN};
use kakehashi_proto::pb;
use tonic::Status;

use crate::backend::BackendError;
use crate::error::ApiError;
use crate::service::{Core, now_ms};
use crate::unattended::{PollRate, validate_device_id, verify_proof_in};

pub const MONITOR_TICKETS: &str = "coordinator_monitor_tickets_total";

static TICKET_RATE: std::sync::LazyLock<PollRate> = std::sync::LazyLock::new(PollRate::default);

/// Registers the help text of the monitoring metrics.
pub fn describe() {
    metrics::describe_counter!(
        MONITOR_TICKETS,
        metrics::Unit::Count,
        "GetMonitorTicket calls, by outcome: issued, denied (policy, device flag, blocked), \
         unauthenticated (unknown device, bad or replayed proof), unavailable (no evidence \
         sink configured, or a tenant name too long for a ticket), rate_limited, error (a store failure)."
    );
}

/// Why a monitoring ticket was refused.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("monitoring ticket refused: {0}")]
    BadDeviceId(ApiError),
    #[error("monitoring ticket refused: device {device_id}: {reason}")]
    Unauthenticated { device_id: String, reason: String },
    #[error(
        "device {device_id} asks for monitoring tickets more than {} times a second",
        crate::unattended::MAX_POLLS_PER_SECOND
    )]
    RateLimited { device_id: String },
    #[error(
        "tenant {tenant:?} does not enable telework monitoring (tenant policy monitoring_enabled)"
    )]
    NotEnabled { tenant: String },
    #[error(
        "device {device_id} is not enrolled for monitoring (EnrollDevice/SetDeviceAccess monitoring)"
    )]
    DeviceNotMonitored { device_id: String },
    #[error("device {device_id} is blocked (SetDeviceAccess)")]
    Blocked { device_id: String },
    #[error("this cluster has no evidence sink (coordinator --evidence-sink-url)")]
    NoSink,
    #[error(
        "tenant {tenant:?} is longer than {MAX_TENANT_LEN} bytes, the most a monitoring ticket carries"
    )]
    TenantTooLong { tenant: String },
    #[error("could not sign a monitoring ticket: {0}")]
    Sign(#[from] kakehashi_proto::monitor::TicketError),
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl From<BackendError> for MonitorError {
    fn from(e: BackendError) -> Self {
        MonitorError::Api(e.into())
    }
}

impl MonitorError {
    /// The `outcome` label of [`MONITOR_TICKETS`].
    pub fn outcome(&self) -> &'static str {
        match self {
            MonitorError::BadDeviceId(_) | MonitorError::Unauthenticated { .. } => {
                "unauthenticated"
            }
            MonitorError::RateLimited { .. } => "rate_limited",
            MonitorError::NotEnabled { .. }
            | MonitorError::DeviceNotMonitored { .. }
            | MonitorError::Blocked { .. } => "denied",
            MonitorError::NoSink | MonitorError::TenantTooLong { .. } => "unavailable",
            MonitorError::Sign(_) | MonitorError::Api(_) => "error",
        }
    }

    /// Classifies, counts and logs the refusal once.
    pub fn status(self, rpc: &'static str) -> Status {
        metrics::counter!(MONITOR_TICKETS, "outcome" => self.outcome()).increment(1);
        let (kind, code) = match &self {
            MonitorError::Api(_) => ("", tonic::Code::Internal),
            MonitorError::Sign(_) => ("monitor_ticket_sign", tonic::Code::Internal),
            MonitorError::BadDeviceId(_) | MonitorError::Unauthenticated { .. } => {
                ("monitor_ticket_refused", tonic::Code::Unauthenticated)
            }
            MonitorError::RateLimited { .. } => {
                ("monitor_ticket_rate", tonic::Code::ResourceExhausted)
            }
            MonitorError::NoSink | MonitorError::TenantTooLong { .. } => {
                ("monitor_unavailable", tonic::Code::FailedPrecondition)
            }
            _ => ("monitor_denied", tonic::Code::PermissionDenied),
        };
        if let MonitorError::Api(e) = self {
            return e.status(rpc);
        }
        metrics::counter!(crate::telemetry::RPC_ERRORS, "rpc" => rpc, "kind" => kind).increment(1);
        if code == tonic::Code::Internal {
            tracing::warn!(rpc, error = %self, "monitoring ticket failed");
        } else {
            tracing::debug!(rpc, error = %self, "monitoring ticket refused");
        }
        Status::new(code, self.to_string())
    }
}

/// Seconds, rounded up, as the response's `u32`.
fn whole_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Core {
    /// `AgentService.GetMonitorTicket`.
    pub async fn get_monitor_ticket(
        &self,
        req: pb::MonitorTicketRequest,
    ) -> Result<pb::MonitorTicketResponse, MonitorError> {
        let refused = |reason: &str| MonitorError::Unauthenticated {
            device_id: req.device_id.clone(),
            reason: reason.to_owned(),
        };
        validate_device_id(&req.device_id).map_err(MonitorError::BadDeviceId)?;
        let device = self
            .backends
            .auth
            .get_device(&req.device_id)
            .await?
            .ok_or_else(|| refused("not enrolled"))?;
        let now = now_ms();
        verify_proof_in(
            TICKET_PROOF_DOMAIN,
            &device.public_key,
            &req.device_id,
            req.timestamp_ms,
            &req.signature,
            now,
        )
        .map_err(|e| refused(e.reason()))?;
        if !TICKET_RATE.allow(&req.device_id, now) {
            return Err(MonitorError::RateLimited {
                device_id: req.device_id,
            });
        }
        if !self
            .backends
            .auth
            .accept_monitor_proof(&req.device_id, req.timestamp_ms)
            .await?
        {
            return Err(refused(
                "the timestamp is not newer than the last accepted ticket request (replay)",
            ));
        }
        let enabled = self
            .backends
            .auth
            .get_policy(&device.tenant)
            .await?
            .is_some_and(|p| p.monitoring_enabled);
        if !enabled {
            return Err(MonitorError::NotEnabled {
                tenant: device.tenant,
            });
        }
        if !device.monitoring {
            return Err(MonitorError::DeviceNotMonitored {
                device_id: device.device_id,
            });
        }
        if device.blocked {
            return Err(MonitorError::Blocked {
                device_id: device.device_id,
            });
        }
        if self.config.evidence_sink_url.is_empty() {
            return Err(MonitorError::NoSink);
        }
        if device.tenant.len() > MAX_TENANT_LEN {
            return Err(MonitorError::TenantTooLong {
                tenant: device.tenant,
            });
        }
        let issued_at = kakehashi_proto::unix_now();
        let expires_at = issued_at.saturating_add(whole_secs(self.config.monitor_ticket_ttl));
        let ticket = MonitorTicket {
            device_id: device.device_id.clone(),
            public_key: device.public_key,
            tenant: device.tenant.clone(),
            issued_at,
            expires_at,
        }
        .sign(&self.config.signing_key)?;
        metrics::counter!(MONITOR_TICKETS, "outcome" => "issued").increment(1);
        tracing::info!(
            tenant = %device.tenant,
            device = %device.device_id,
            expires_at,
            "monitoring ticket issued"
        );
        Ok(pb::MonitorTicketResponse {
            ticket,
            sink_url: self.config.evidence_sink_url.clone(),
            snapshot_interval_secs: u32::try_from(whole_secs(
                self.config.monitor_snapshot_interval,
            ))
            .unwrap_or(u32::MAX),
            expires_at_unix_ms: i64::try_from(expires_at.saturating_mul(1000)).unwrap_or(i64::MAX),
        })
    }
}
