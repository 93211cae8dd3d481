//! The relay's configuration: one struct, built from flags by `main.rs` or directly by tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::VerifyingKey;

#[derive(Clone)]
pub struct RelayConfig {
    /// Name coordinators put into tokens; a token for another relay is refused.
    pub relay_id: String,
    /// UDP address of the QUIC endpoint.
    pub listen: SocketAddr,
    /// TCP address of the `RelayAdmin` gRPC service (coordinators only).
    pub admin_listen: SocketAddr,
    /// Address agents are told to dial; defaults to the bound QUIC address.
    pub advertise: Option<String>,
    /// `RelayAdmin` URL published in etcd for coordinators (`http://host:port`);
    /// defaults to `http://` + the bound admin address, which is wrong for 0.0.0.0.
    pub admin_advertise: Option<String>,
    /// Name in the relay's certificate and the agents' SNI.
    pub server_name: String,
    /// PEM certificate chain and key; a self-signed dev certificate is generated when absent.
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// The key that signs every token this relay accepts.
    pub coordinator_key: VerifyingKey,
    pub max_sessions: usize,
    pub max_participants_per_session: usize,
    /// Time a client has to finish the handshake and say hello.
    pub attach_timeout: Duration,
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
    /// SO_RCVBUF / SO_SNDBUF for the UDP socket; small buffers lose packets under load.
    pub socket_buffer_bytes: usize,
    /// Register in etcd for placement; `None` registers nowhere (coordinators then
    /// know this relay from their static `--relay` list).
    pub registration: Option<crate::Registration>,
    /// How long a drain (SIGTERM) waits for participants to resume elsewhere before
    /// ending what is left.
    pub drain_grace: Duration,
    /// TCP address of the HTTP listener: `/livez`, `/readyz`, and `/metrics` when
    /// `metrics` is set. `None` serves none of them.
    pub metrics_listen: Option<SocketAddr>,
    /// The Prometheus recorder whose metrics `/metrics` renders (the binary installs it
    /// globally; tests usually leave it out).
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    #[cfg(feature = "test-hooks")]
    pub hooks: crate::TestHooks,
}

impl RelayConfig {
    /// Loopback defaults for tests and the embedded dev cluster.
    pub fn dev(relay_id: impl Into<String>, coordinator_key: VerifyingKey) -> Self {
        Self {
            relay_id: relay_id.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            admin_advertise: None,
            server_name: "localhost".into(),
            tls_files: None,
            coordinator_key,
            max_sessions: 10_000,
            max_participants_per_session: 8,
            attach_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            socket_buffer_bytes: 8 * 1024 * 1024,
            registration: None,
            drain_grace: Duration::from_secs(10),
            metrics_listen: None,
            metrics: None,
            #[cfg(feature = "test-hooks")]
            hooks: crate::TestHooks::default(),
        }
    }
}

/// Observes every forwarded frame's raw bytes (header and ciphertext).
pub type ForwardTap = Arc<dyn Fn(&[u8]) + Send + Sync>;
