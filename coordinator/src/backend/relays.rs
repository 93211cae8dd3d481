//! Relay membership and placement.

use std::collections::HashMap;
use std::sync::Mutex;

use kakehashi_proto::pb;

use super::{BackendError, BoxFuture};

/// What the coordinator knows about one relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayInfo {
    /// Stable relay name; bound into tokens, at most 64 bytes.
    pub relay_id: String,
    /// host:port of the relay's QUIC endpoint.
    pub quic_addr: String,
    /// `http://host:port` of the relay's `RelayAdmin` gRPC service.
    pub admin_url: String,
    /// TLS server name on the relay's certificate.
    pub server_name: String,
    /// SHA-256 of the relay's DER certificate, pinned by agents.
    pub cert_sha256: [u8; 32],
    pub region: String,
}

impl RelayInfo {
    /// The wire form agents receive.
    pub fn endpoint(&self) -> pb::RelayEndpoint {
        pb::RelayEndpoint {
            relay_id: self.relay_id.clone(),
            address: self.quic_addr.clone(),
            server_name: self.server_name.clone(),
            cert_sha256: self.cert_sha256.to_vec(),
        }
    }
}

/// Which relays exist and where the next session goes.
pub trait RelayDirectory: Send + Sync + 'static {
    /// Every relay that may take sessions now.
    fn list(&self) -> BoxFuture<'_, Result<Vec<RelayInfo>, BackendError>>;

    /// Chooses a relay for a new (or resuming) session and counts the session against
    /// it, never `avoid` (the relay a resuming participant lost).
    /// [`BackendError::NoRelays`] when none is available.
    fn pick<'a>(&'a self, avoid: Option<&'a str>)
    -> BoxFuture<'a, Result<RelayInfo, BackendError>>;

    /// A session placed on `relay_id` ended; it no longer counts as load.
    fn release<'a>(&'a self, relay_id: &'a str) -> BoxFuture<'a, Result<(), BackendError>>;
}

/// Chooses the relay with the fewest live sessions; ties go to the earliest listed.
/// Returns an index into `load`.
pub fn least_loaded(load: &[u64]) -> Option<usize> {
    load.iter()
        .enumerate()
        .min_by_key(|(i, l)| (**l, *i))
        .map(|(i, _)| i)
}

/// A fixed relay list with per-relay session counts kept in this process.
pub struct StaticRelayDirectory {
    relays: Vec<RelayInfo>,
    live: Mutex<HashMap<String, u64>>,
}

impl StaticRelayDirectory {
    pub fn new(relays: Vec<RelayInfo>) -> Self {
        let live = relays.iter().map(|r| (r.relay_id.clone(), 0)).collect();
        Self {
            relays,
            live: Mutex::new(live),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        // Counters only; a poisoned lock still holds usable numbers.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RelayDirectory for StaticRelayDirectory {
    fn list(&self) -> BoxFuture<'_, Result<Vec<RelayInfo>, BackendError>> {
        Box::pin(async move { Ok(self.relays.clone()) })
    }

    fn pick<'a>(
        &'a self,
        avoid: Option<&'a str>,
    ) -> BoxFuture<'a, Result<RelayInfo, BackendError>> {
        Box::pin(async move {
            let mut live = self.lock();
            // An avoided relay counts as full, so it is chosen by no one.
            let load: Vec<u64> = self
                .relays
                .iter()
                .map(|r| match avoid {
                    Some(a) if a == r.relay_id => u64::MAX,
                    _ => live.get(&r.relay_id).copied().unwrap_or(0),
                })
                .collect();
            let i = least_loaded(&load)
                .filter(|&i| load[i] != u64::MAX)
                .ok_or(BackendError::NoRelays)?;
            let relay = self.relays[i].clone();
            *live.entry(relay.relay_id.clone()).or_insert(0) += 1;
            Ok(relay)
        })
    }

    fn release<'a>(&'a self, relay_id: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            if let Some(n) = self.lock().get_mut(relay_id) {
                *n = n.saturating_sub(1);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::least_loaded;

    #[test]
    fn placement_prefers_least_loaded_then_first() {
        assert_eq!(least_loaded(&[]), None);
        assert_eq!(least_loaded(&[3, 1, 1]), Some(1));
        assert_eq!(least_loaded(&[0, 0]), Some(0));
    }
}
