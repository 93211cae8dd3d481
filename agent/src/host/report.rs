//! Reports to the coordinator for the session's event log, sent one at a time, in
//! the order they happened.

use std::sync::Arc;

use kakehashi_proto::pb::agent_service_client::AgentServiceClient;
use kakehashi_proto::{Permissions, pb};
use tokio::sync::mpsc;
use tracing::warn;

use super::{Driver, REPORT_TIMEOUT, Shared};

/// One report for the coordinator's event log.
pub(super) enum Report {
    Consent {
        granted: Permissions,
        denied: Permissions,
    },
    Activity {
        kind: pb::EventKind,
        permissions: Permissions,
        remaining_secs: u32,
        detail: String,
    },
    End {
        reason: pb::EndReason,
        detail: String,
    },
}

/// Sends reports one at a time, so the event log has them in the order they happened.
/// Best effort: the relay is what enforces; a failed report is logged and dropped.
pub(super) async fn run_reporter(
    mut client: AgentServiceClient<tonic::transport::Channel>,
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Report>,
) {
    while let Some(report) = rx.recv().await {
        let token = shared.token();
        let (call, result) = match report {
            Report::Consent { granted, denied } => {
                let req = pb::ReportConsentRequest {
                    token,
                    granted: granted.bits(),
                    denied: denied.bits(),
                };
                let r = tokio::time::timeout(REPORT_TIMEOUT, client.report_consent(req)).await;
                ("ReportConsent", r.map(|r| r.map(|_| ())))
            }
            Report::Activity {
                kind,
                permissions,
                remaining_secs,
                detail,
            } => {
                let req = pb::ReportActivityRequest {
                    token,
                    kind: kind as i32,
                    permissions: permissions.bits(),
                    detail,
                    remaining_secs,
                };
                let r = tokio::time::timeout(REPORT_TIMEOUT, client.report_activity(req)).await;
                ("ReportActivity", r.map(|r| r.map(|_| ())))
            }
            Report::End { reason, detail } => {
                let req = pb::ReportEndRequest {
                    token,
                    reason: reason as i32,
                    detail,
                };
                let r = tokio::time::timeout(REPORT_TIMEOUT, client.report_end(req)).await;
                ("ReportEnd", r.map(|r| r.map(|_| ())))
            }
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(status)) => warn!(%status, call, "report failed"),
            Err(_) => warn!(call, "report timed out"),
        }
    }
}

impl Driver {
    /// Tells the coordinator what the customer decided, for the session's events.
    pub(super) fn report(&mut self, granted: Permissions, denied: Permissions) {
        self.queue_report(Report::Consent { granted, denied });
    }

    pub(super) fn report_activity(&mut self, kind: pb::EventKind, permissions: Permissions) {
        self.queue_report(Report::Activity {
            kind,
            permissions,
            remaining_secs: 0,
            detail: String::new(),
        });
    }

    /// A FILE_TRANSFER event: what happened to which file.
    pub(super) fn report_file(&mut self, detail: String) {
        self.queue_report(Report::Activity {
            kind: pb::EventKind::FileTransfer,
            permissions: Permissions::FILE_TRANSFER,
            remaining_secs: 0,
            // The coordinator bounds details; a long file name is cut, not refused.
            detail: detail.chars().take(500).collect(),
        });
    }

    pub(super) fn queue_report(&mut self, report: Report) {
        let Some(tx) = &self.reporter else {
            return;
        };
        if tx.try_send(report).is_err() {
            warn!("the coordinator is not taking reports; one was dropped from the event log");
        }
    }
}
