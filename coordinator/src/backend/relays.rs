//! Relay membership and placement: the [`RelayDirectory`] trait, the static in-memory
//! directory, and (in [`placement`]) the I/O-free view and policy both it and the etcd
//! directory (`backend::etcd`) place with.

pub mod placement;

use std::sync::Mutex;
use std::time::Instant;

pub use placement::{Accounting, RelayView};

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

/// A fixed relay list (`--relay`) with per-relay session counts kept in this process:
/// the embedded default, for one coordinator.
pub struct StaticRelayDirectory {
    relays: Vec<RelayInfo>,
    view: Mutex<RelayView>,
}

/// Sessions a statically configured relay is assumed to take: its real limit is
/// enforced by the relay itself (`--max-sessions`), which refuses attaches past it.
const STATIC_CAPACITY: u64 = u64::MAX / 2;

impl StaticRelayDirectory {
    pub fn new(relays: Vec<RelayInfo>) -> Self {
        let seed = crate::random::u64().unwrap_or(0x9E37_79B9_7F4A_7C15);
        let mut view = RelayView::new(Accounting::Local, seed);
        for r in &relays {
            view.upsert(r.clone(), STATIC_CAPACITY, 0, false);
        }
        Self {
            relays,
            view: Mutex::new(view),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RelayView> {
        // Counters only; a poisoned lock still holds usable numbers.
        self.view.lock().unwrap_or_else(|p| p.into_inner())
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
            self.lock()
                .pick(avoid, "", Instant::now())
                .ok_or(BackendError::NoRelays)
        })
    }

    fn release<'a>(&'a self, relay_id: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.lock().release(relay_id);
            Ok(())
        })
    }
}
