//! Monitoring tickets: `AgentService.GetMonitorTicket`, proven with the device key, and
//! the [`TicketSource`] seam the tests hand tickets through.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::Signer;
use kakehashi_proto::monitor::{MAX_TICKET_LEN, TICKET_PROOF_DOMAIN};
use kakehashi_proto::pb;
use kakehashi_proto::pb::agent_service_client::AgentServiceClient;

use crate::device::DeviceKey;

use super::{
    CONNECT_TIMEOUT, DEFAULT_SNAPSHOT_INTERVAL, MAX_RESPONSE_BYTES, MonitorError, Shared, unix_ms,
};

/// Bound on one GetMonitorTicket.
pub(super) const TICKET_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds on the interval a coordinator may ask for.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// A sink URL from the coordinator longer than this is not one.
const MAX_SINK_URL: usize = 2048;

/// A monitoring ticket as the coordinator handed it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub bytes: Vec<u8>,
    pub sink_url: String,
    pub interval: Duration,
    pub expires_at_unix_ms: i64,
}

/// Why no ticket was had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TicketError {
    #[error("monitoring is off for this device: {0}")]
    Denied(String),
    #[error("{0}")]
    Failed(String),
}

pub(crate) type TicketFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Ticket, TicketError>> + Send + 'a>>;

/// Where tickets come from: the coordinator in production, a test's hand otherwise.
pub(crate) trait TicketSource: Send {
    fn fetch(&mut self) -> TicketFuture<'_>;
}

/// `AgentService.GetMonitorTicket`, proven with the device key.
pub(super) struct CoordinatorTickets {
    shared: Arc<Shared>,
    client: AgentServiceClient<tonic::transport::Channel>,
    last_timestamp_ms: i64,
}

impl CoordinatorTickets {
    pub(super) fn new(url: &str, shared: Arc<Shared>) -> Result<Self, MonitorError> {
        // Lazy: an unreachable coordinator delays uploads, never the start (or capture).
        let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
            .map_err(|error| MonitorError::CoordinatorUrl {
                url: url.to_owned(),
                error,
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_lazy();
        Ok(Self {
            shared,
            client: AgentServiceClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES),
            last_timestamp_ms: 0,
        })
    }

    async fn get(&mut self) -> Result<Ticket, TicketError> {
        // The coordinator takes each timestamp once (as for PollDevice).
        let timestamp_ms = unix_ms().max(self.last_timestamp_ms + 1);
        self.last_timestamp_ms = timestamp_ms;
        let request = ticket_request(&self.shared.key, timestamp_ms);
        let resp =
            match tokio::time::timeout(TICKET_TIMEOUT, self.client.get_monitor_ticket(request))
                .await
            {
                Err(_) => {
                    return Err(TicketError::Failed(format!(
                        "GetMonitorTicket: no answer within {TICKET_TIMEOUT:?}"
                    )));
                }
                Ok(Err(s)) if s.code() == tonic::Code::PermissionDenied => {
                    return Err(TicketError::Denied(s.message().to_owned()));
                }
                Ok(Err(s)) => {
                    return Err(TicketError::Failed(format!(
                        "GetMonitorTicket: {} ({:?})",
                        s.message(),
                        s.code()
                    )));
                }
                Ok(Ok(r)) => r.into_inner(),
            };
        ticket_from(resp)
    }
}

impl TicketSource for CoordinatorTickets {
    fn fetch(&mut self) -> TicketFuture<'_> {
        Box::pin(self.get())
    }
}

/// A `GetMonitorTicket` request at `timestamp_ms` (unix ms), signed with the device key
/// over [`TICKET_PROOF_DOMAIN`] as the coordinator expects.
pub fn ticket_request(key: &DeviceKey, timestamp_ms: i64) -> pb::MonitorTicketRequest {
    let device_id = key.device_id();
    let proof =
        kakehashi_proto::device::proof_message_in(TICKET_PROOF_DOMAIN, &device_id, timestamp_ms);
    pb::MonitorTicketRequest {
        signature: key.signing_key().sign(&proof).to_bytes().to_vec(),
        device_id,
        timestamp_ms,
    }
}

/// Checks a coordinator's answer before anything is sent with it.
fn ticket_from(resp: pb::MonitorTicketResponse) -> Result<Ticket, TicketError> {
    let bad = |what: &str| TicketError::Failed(format!("GetMonitorTicket answer unusable: {what}"));
    if resp.ticket.is_empty() || resp.ticket.len() > MAX_TICKET_LEN {
        return Err(bad("no ticket, or one longer than any ticket"));
    }
    if resp.sink_url.is_empty() || resp.sink_url.len() > MAX_SINK_URL {
        return Err(bad("no sink URL, or an overlong one"));
    }
    let interval = match resp.snapshot_interval_secs {
        0 => DEFAULT_SNAPSHOT_INTERVAL,
        s => Duration::from_secs(u64::from(s)).clamp(MIN_INTERVAL, MAX_INTERVAL),
    };
    Ok(Ticket {
        bytes: resp.ticket,
        sink_url: resp.sink_url,
        interval,
        expires_at_unix_ms: resp.expires_at_unix_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_request_verifies_under_the_monitor_domain_only() {
        use ed25519_dalek::{Signature, VerifyingKey};
        let key = DeviceKey::from_secret([4; 32]);
        let req = ticket_request(&key, 1_800_000_000_000);
        assert_eq!(req.device_id, key.device_id());
        let public = VerifyingKey::from_bytes(&key.public_key()).expect("key");
        let sig = Signature::from_slice(&req.signature).expect("64 bytes");
        let message = |domain| {
            kakehashi_proto::device::proof_message_in(domain, &req.device_id, req.timestamp_ms)
        };
        assert!(
            public
                .verify_strict(&message(TICKET_PROOF_DOMAIN), &sig)
                .is_ok()
        );
        assert!(
            public
                .verify_strict(&message(kakehashi_proto::device::PROOF_DOMAIN), &sig)
                .is_err(),
            "a ticket proof is not a poll proof"
        );
    }

    #[test]
    fn unusable_answers_are_refused_and_intervals_bounded() {
        let answer = |ticket: Vec<u8>, sink: &str, secs| pb::MonitorTicketResponse {
            ticket,
            sink_url: sink.into(),
            snapshot_interval_secs: secs,
            expires_at_unix_ms: 1,
        };
        let t = ticket_from(answer(vec![1; 10], "http://sink:1", 300)).expect("usable");
        assert_eq!(t.interval, Duration::from_secs(300));
        assert_eq!(
            ticket_from(answer(vec![1; 10], "http://s", 0))
                .expect("usable")
                .interval,
            DEFAULT_SNAPSHOT_INTERVAL
        );
        assert_eq!(
            ticket_from(answer(vec![1; 10], "http://s", u32::MAX))
                .expect("usable")
                .interval,
            MAX_INTERVAL
        );
        assert!(ticket_from(answer(Vec::new(), "http://s", 1)).is_err());
        assert!(ticket_from(answer(vec![1; MAX_TICKET_LEN + 1], "http://s", 1)).is_err());
        assert!(ticket_from(answer(vec![1; 10], "", 1)).is_err());
    }
}
