//! The uploader: tickets, batches oldest first, acknowledgements, backoff, and the
//! OFFLINE presence event on reconnect.

use std::sync::Arc;
use std::time::Duration;

use kakehashi_proto::monitor::{MAX_ITEMS_PER_UPLOAD, MAX_UPLOAD_BYTES};
use kakehashi_proto::pb;
use kakehashi_proto::pb::evidence_service_client::EvidenceServiceClient;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::ticket::{TICKET_TIMEOUT, Ticket, TicketError, TicketSource};
use super::{CONNECT_TIMEOUT, MAX_RESPONSE_BYTES, MonitorError, Shared, unix_ms};

/// Bound on one upload: up to 12 MiB over a slow uplink.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// An upload's bytes, well under the sink's [`MAX_UPLOAD_BYTES`] (protobuf framing,
/// the ticket and headers ride on top).
const UPLOAD_BUDGET_BYTES: usize = MAX_UPLOAD_BYTES / 2;
/// Retry pacing after a failure: doubling from the first to the last.
pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often a device the coordinator refuses asks again.
const DENIED_RETRY: Duration = Duration::from_secs(60);

/// What one uploader step came to.
pub(super) enum Step {
    /// Something was delivered (or dropped): try the next batch now.
    Progress,
    /// Nothing to send.
    Idle,
    /// The coordinator or the sink failed: back off.
    Failed,
    /// The coordinator refuses: ask again much later.
    Denied,
}

/// Tickets and uploads. Returned by its task on cancellation, so [`Monitor::stop`]
/// can make a last delivery with the same ticket and connection.
pub(super) struct Uploader {
    shared: Arc<Shared>,
    tickets: Box<dyn TicketSource>,
    /// The ticket and when to renew it (unix ms).
    ticket: Option<(Ticket, i64)>,
    sink: Option<(String, EvidenceServiceClient<tonic::transport::Channel>)>,
    /// When uploads started failing (unix ms), for the OFFLINE event.
    offline_since_ms: Option<i64>,
    backoff: Duration,
    /// After the sink refused a batch as invalid: items to send one at a time, to find
    /// the one it refuses.
    singles_left: usize,
    denied_logged: bool,
}

impl Uploader {
    pub(super) fn new(shared: Arc<Shared>, tickets: Box<dyn TicketSource>) -> Self {
        Self {
            shared,
            tickets,
            ticket: None,
            sink: None,
            offline_since_ms: None,
            backoff: BACKOFF_MIN,
            singles_left: 0,
            denied_logged: false,
        }
    }

    pub(super) async fn run(mut self, cancel: CancellationToken) -> Self {
        loop {
            let step = tokio::select! {
                _ = cancel.cancelled() => None,
                s = self.step() => Some(s),
            };
            let pause = match step {
                None => return self,
                Some(Step::Progress) => continue,
                Some(Step::Idle) => {
                    // The ticket is renewed when there is something to send with it.
                    tokio::select! {
                        _ = cancel.cancelled() => return self,
                        _ = self.shared.wake.notified() => {}
                    }
                    continue;
                }
                Some(Step::Failed) => {
                    let pause = self.backoff;
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                    pause
                }
                Some(Step::Denied) => DENIED_RETRY,
            };
            tokio::select! {
                _ = cancel.cancelled() => return self,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Uploads until the spool is empty or an upload fails (bounded by the caller).
    pub(super) async fn flush(&mut self) {
        while let Step::Progress = self.step().await {}
    }

    fn failed(&mut self, what: &str) {
        warn!(
            error = what,
            "evidence upload failed; buffering and retrying"
        );
        let now = unix_ms();
        self.offline_since_ms.get_or_insert(now);
        self.shared.stats.send_modify(|s| {
            s.uploads_failed += 1;
            s.online = false;
        });
    }

    /// A ticket good for now, fetched or renewed if needed.
    async fn ticket(&mut self) -> Result<Ticket, Step> {
        let now = unix_ms();
        if let Some((t, renew_at)) = &self.ticket
            && now < *renew_at
        {
            return Ok(t.clone());
        }
        let answer = tokio::time::timeout(TICKET_TIMEOUT, self.tickets.fetch())
            .await
            .unwrap_or_else(|_| {
                Err(TicketError::Failed(format!(
                    "GetMonitorTicket: no answer within {TICKET_TIMEOUT:?}"
                )))
            });
        match answer {
            Ok(t) => {
                if !self.shared.interval_override {
                    self.shared.interval.send_if_modified(|i| {
                        let changed = *i != t.interval;
                        *i = t.interval;
                        changed
                    });
                }
                if self.denied_logged {
                    info!("monitoring is on again for this device");
                    self.denied_logged = false;
                }
                self.shared
                    .stats
                    .send_if_modified(|s| std::mem::replace(&mut s.monitoring_denied, false));
                self.ticket = Some((t.clone(), renew_at(now, t.expires_at_unix_ms)));
                Ok(t)
            }
            Err(TicketError::Denied(why)) => {
                if !self.denied_logged {
                    warn!(reason = %why, "the coordinator says monitoring is off for this device (tenant policy or device flag): not capturing or uploading; asking again every minute");
                    self.denied_logged = true;
                }
                self.ticket = None;
                self.shared.stats.send_if_modified(|s| {
                    let changed = !s.monitoring_denied || s.online;
                    s.monitoring_denied = true;
                    s.online = false;
                    changed
                });
                Err(Step::Denied)
            }
            Err(TicketError::Failed(e)) => {
                // A ticket not yet expired still works while the coordinator is away;
                // renewal is tried again a little later, not before every upload.
                if let Some((t, renew)) = &mut self.ticket
                    && now < t.expires_at_unix_ms
                {
                    debug!(error = %e, "ticket renewal failed; using the current one");
                    *renew = now.saturating_add(5000);
                    return Ok(t.clone());
                }
                self.failed(&e);
                Err(Step::Failed)
            }
        }
    }

    fn sink_client(
        &mut self,
        url: &str,
    ) -> Result<EvidenceServiceClient<tonic::transport::Channel>, String> {
        if let Some((u, c)) = &self.sink
            && u == url
        {
            return Ok(c.clone());
        }
        let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
            .map_err(|e| format!("sink URL {url:?} from the coordinator is not usable: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_lazy();
        let client = EvidenceServiceClient::new(channel)
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .max_encoding_message_size(MAX_UPLOAD_BYTES);
        self.sink = Some((url.to_owned(), client.clone()));
        Ok(client)
    }

    async fn step(&mut self) -> Step {
        let max_items = if self.singles_left > 0 {
            1
        } else {
            MAX_ITEMS_PER_UPLOAD
        };
        if self.shared.stats.borrow().buffered_items == 0 {
            // An item stored after this look wakes the uploader again.
            return Step::Idle;
        }
        // The ticket first: the batch is "on its way" (see `Ring::next_batch`) only
        // for as long as the upload itself takes.
        let ticket = match self.ticket().await {
            Ok(t) => t,
            Err(step) => return step,
        };
        let upload = match self
            .shared
            .spool(move |_, s| s.batch(max_items, UPLOAD_BUDGET_BYTES))
            .await
        {
            Ok(u) => u,
            Err(e) => {
                warn!(error = %e, "cannot read the spool");
                return Step::Failed;
            }
        };
        let Some(last_seq) = upload.items.last().map(|i| i.seq) else {
            return Step::Idle;
        };
        let mut client = match self.sink_client(&ticket.sink_url) {
            Ok(c) => c,
            Err(e) => {
                self.abandon().await;
                self.failed(&e);
                return Step::Failed;
            }
        };
        let first_seq = upload.items.first().map_or(0, |i| i.seq);
        let count = upload.items.len();
        let overwritten = upload.overwritten;
        let request = pb::UploadEvidenceRequest {
            ticket: ticket.bytes.clone(),
            items: upload.items,
            snapshots_overwritten: overwritten,
        };
        let answer = tokio::time::timeout(UPLOAD_TIMEOUT, client.upload(request)).await;
        let resp = match answer {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                self.abandon().await;
                return self.refused(status, first_seq, count).await;
            }
            Err(_) => {
                self.abandon().await;
                self.failed(&format!(
                    "the sink did not answer within {UPLOAD_TIMEOUT:?}"
                ));
                return Step::Failed;
            }
        };
        let through = resp.stored_through_seq;
        if let Err(e) = self
            .shared
            .spool(move |_, s| s.acknowledge(through, overwritten))
            .await
            .and_then(|r| r.map_err(MonitorError::from))
        {
            warn!(error = %e, "could not record the sink's acknowledgement");
        }
        if through < last_seq {
            self.failed(&format!(
                "the sink acknowledged only through seq {through} of an upload through {last_seq}"
            ));
            return Step::Failed;
        }
        debug!(
            first_seq,
            last_seq,
            stored = resp.stored,
            duplicates = resp.duplicates,
            "evidence uploaded"
        );
        self.singles_left = self.singles_left.saturating_sub(1);
        self.backoff = BACKOFF_MIN;
        self.shared.stats.send_modify(|s| {
            s.uploads_ok += 1;
            s.online = true;
            s.stored_through_seq = s.stored_through_seq.max(through);
        });
        if let Some(since) = self.offline_since_ms.take() {
            let now = unix_ms();
            let secs = u32::try_from((now - since).max(0) / 1000).unwrap_or(u32::MAX);
            info!(offline_secs = secs, "the sink is reachable again");
            self.shared
                .presence(since, pb::PresenceState::Offline, secs)
                .await;
        }
        Step::Progress
    }

    async fn abandon(&mut self) {
        if let Err(e) = self.shared.spool(|_, s| s.abandon()).await {
            warn!(error = %e, "cannot update the spool");
        }
    }

    /// The sink answered with an error status.
    async fn refused(&mut self, status: tonic::Status, first_seq: u64, count: usize) -> Step {
        match status.code() {
            tonic::Code::Unauthenticated => {
                // Expired, or the coordinator's key changed: a new ticket may do.
                self.ticket = None;
                self.failed(&format!(
                    "the sink refused the ticket: {}",
                    status.message()
                ));
                Step::Failed
            }
            tonic::Code::InvalidArgument if count == 1 => {
                warn!(seq = first_seq, reason = %status.message(), "the sink refuses this evidence item; dropping it");
                if let Err(e) = self.shared.spool(move |_, s| s.discard(first_seq)).await {
                    warn!(error = %e, "cannot update the spool");
                }
                self.shared.stats.send_modify(|s| s.items_rejected += 1);
                self.singles_left = 0;
                Step::Progress
            }
            tonic::Code::InvalidArgument => {
                // One item of the batch is refused: send them one by one to find it,
                // and deliver the others meanwhile.
                warn!(reason = %status.message(), "the sink refused a batch; sending items one at a time");
                self.singles_left = count;
                Step::Progress
            }
            _ => {
                self.failed(&format!(
                    "the sink answered {:?}: {}",
                    status.code(),
                    status.message()
                ));
                Step::Failed
            }
        }
    }
}

/// When to renew a ticket received at `now` that expires at `expires_at` (unix ms): a
/// minute ahead, or halfway for a short one, and never sooner than a second from now
/// (a clock far off the coordinator's must not turn into a request per upload).
fn renew_at(now: i64, expires_at: i64) -> i64 {
    let left = expires_at.saturating_sub(now);
    let ahead = if left > 120_000 {
        left - 60_000
    } else {
        left / 2
    };
    now.saturating_add(ahead.max(1000))
}

#[cfg(test)]
mod tests {
    use super::renew_at;

    #[test]
    fn tickets_are_renewed_ahead_of_expiry_and_never_in_a_loop() {
        // An hour's ticket: a minute ahead.
        assert_eq!(renew_at(0, 3_600_000), 3_540_000);
        // A short one: halfway.
        assert_eq!(renew_at(0, 100_000), 50_000);
        // Already expired by this clock: a second from now, not at once.
        assert_eq!(renew_at(10_000, 5_000), 11_000);
    }
}
