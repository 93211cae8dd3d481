//! The Kakehashi relay: a stateless QUIC data-plane node.
//!
//! Participants attach with a coordinator-signed token, which the relay verifies with
//! nothing but the coordinator's public key. A root actor ([`node`]) supervises one
//! actor per session ([`session`]); each participant's connection ([`conn`]) reads its
//! data streams and forwards what the consent policy allows straight into the other
//! participants' outboxes ([`outbox`]), so frames never queue behind actor messages.
//!
//! # Layout
//! - `config`: [`RelayConfig`], built from flags by `main.rs` or directly by tests.
//! - `tls`: the relay's certificate (a dev certificate is generated when none is given)
//!   and QUIC transport settings.
//! - `node`: the supervisor; starts, ends and forgets sessions; survives their failures.
//! - `session`: a session's members, grants, deadline and ending.
//! - `conn`: one participant's connection: attach, signals, data streams.
//! - `outbox`: per-participant queues and the writer tasks that drain them.
//! - `admin`: the `RelayAdmin` gRPC service coordinators call.
//! - `stats`: counters for tests, mirrored into Prometheus metrics.
//! - `registry`: membership in etcd under a lease (optional; [`Registration`]).
//! - [`otel`]: OTLP trace export and the session-trace spans (`relay.attach`,
//!   `relay.session`).
//! - `health`: the HTTP listener (`--metrics-listen`): `/metrics`, `/livez`, `/readyz`.
//! - [`cli`]: the binary's flags and `run`, shared with `kakehashi-loadtest relay`.
//! - `RelayHandle::drain`: what SIGTERM does — stop taking sessions, send `Drain` to
//!   every participant, exit once they have gone or the grace period ends.
//!
//! # Invariants
//! - **A relay never persists anything**: kill it at any moment and nothing durable is
//!   lost. All session state lives in its actor and dies with it.
//! - The relay reads frame headers and `Signal` messages only; payloads are end-to-end
//!   ciphertext it forwards unchanged.
//! - A failure in one session's actor or tasks ends that session only.

mod admin;
pub mod cli;
mod config;
mod conn;
mod health;
mod node;
pub mod otel;
mod outbox;
mod registry;
mod session;
mod stats;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kakehashi_proto::pb::{self, relay_admin_server::RelayAdminServer};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::{ForwardTap, RelayConfig};
pub use registry::Registration;
pub use stats::RelayStats;
pub use tls::TlsError;

use node::{NodeCtx, NodeMsg, NodeSupervisor};

/// Hooks that only tests compile in (`test-hooks` feature).
#[cfg(feature = "test-hooks")]
#[derive(Clone, Default)]
pub struct TestHooks {
    /// Sees the raw bytes of every frame the relay forwards.
    pub forward_tap: Option<ForwardTap>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot bind QUIC endpoint on {addr}: {source}")]
    BindQuic {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot bind admin listener on {addr}: {source}")]
    BindAdmin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot bind metrics/health listener on {addr}: {source}")]
    BindHttp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("relay id must be 1 to {max} characters", max = kakehashi_proto::token::MAX_RELAY_ID_LEN)]
    RelayId,
    #[error("cannot start the node supervisor: {0}")]
    Supervisor(String),
}

/// Time sessions get to tell their participants the relay is going away.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

pub struct Relay;

impl Relay {
    /// Binds the QUIC endpoint and the admin service and starts serving.
    pub async fn start(config: RelayConfig) -> Result<RelayHandle, StartError> {
        if config.relay_id.is_empty()
            || config.relay_id.len() > kakehashi_proto::token::MAX_RELAY_ID_LEN
        {
            return Err(StartError::RelayId);
        }
        stats::describe();
        health::describe();
        let identity = tls::Identity::load_or_generate(&config)?;
        let server_config = identity.server_config(&config)?;
        let socket = bind_udp(config.listen, config.socket_buffer_bytes).map_err(|source| {
            StartError::BindQuic {
                addr: config.listen,
                source,
            }
        })?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| StartError::BindQuic {
            addr: config.listen,
            source,
        })?;
        let quic_addr = endpoint
            .local_addr()
            .map_err(|source| StartError::BindQuic {
                addr: config.listen,
                source,
            })?;
        let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
            .await
            .map_err(|source| StartError::BindAdmin {
                addr: config.admin_listen,
                source,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| StartError::BindAdmin {
                addr: config.admin_listen,
                source,
            })?;

        let http_listener = match config.metrics_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::BindHttp { addr, source })?,
            ),
            None => None,
        };
        let http_addr = match (&http_listener, config.metrics_listen) {
            (Some(l), Some(addr)) => Some(
                l.local_addr()
                    .map_err(|source| StartError::BindHttp { addr, source })?,
            ),
            _ => None,
        };

        #[cfg(feature = "test-hooks")]
        let tap = config.hooks.forward_tap.clone();
        #[cfg(not(feature = "test-hooks"))]
        let tap = None;
        let stats = Arc::new(RelayStats::default());
        let (live_tx, live_rx) = watch::channel(0usize);
        let (draining_tx, draining_rx) = watch::channel(false);
        let ctx = Arc::new(NodeCtx {
            config: config.clone(),
            stats: stats.clone(),
            tap,
            live_sessions: live_tx,
            draining: draining_tx,
        });
        let (node, node_join) = Actor::spawn(None, NodeSupervisor, ctx.clone())
            .await
            .map_err(|e| StartError::Supervisor(e.to_string()))?;

        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(
            endpoint.clone(),
            node.clone(),
            ctx.clone(),
            cancel.clone(),
        ));
        let admin = RelayAdminServer::new(admin::AdminService {
            node: node.clone(),
            ctx: ctx.clone(),
        });
        let admin_cancel = cancel.clone();
        tasks.spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(admin_listener);
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(admin)
                .serve_with_incoming_shutdown(incoming, admin_cancel.cancelled())
                .await
            {
                warn!(error = %e, "admin service stopped");
            }
        });

        let advertised = config
            .advertise
            .clone()
            .unwrap_or_else(|| quic_addr.to_string());
        let endpoint_info = pb::RelayEndpoint {
            relay_id: config.relay_id.clone(),
            address: advertised,
            server_name: config.server_name.clone(),
            cert_sha256: identity.cert_sha256.to_vec(),
        };
        // The registration has its own token: it must outlive the drain (publishing the
        // draining flag) and stop before the endpoint closes.
        let registration_cancel = CancellationToken::new();
        let mut registration = JoinSet::new();
        // Without etcd there is nothing to wait for before taking sessions.
        let (registered_tx, registered_rx) = watch::channel(config.registration.is_none());
        metrics::gauge!(health::CAPACITY).set(config.max_sessions as f64);
        let probes = health::Probes {
            registered: registered_rx,
            draining: draining_rx.clone(),
            alive: {
                let node = node.clone();
                Arc::new(move || {
                    matches!(
                        node.get_status(),
                        ractor::ActorStatus::Starting | ractor::ActorStatus::Running
                    )
                })
            },
        };
        tasks.spawn(health::track(probes.clone(), cancel.clone()));
        if let Some(listener) = http_listener {
            tasks.spawn(health::serve(
                listener,
                config.metrics.clone(),
                probes,
                cancel.clone(),
            ));
        }
        if let Some(reg) = config.registration.clone() {
            let me = registry::Identity {
                relay_id: config.relay_id.clone(),
                quic_address: endpoint_info.address.clone(),
                admin_url: config
                    .admin_advertise
                    .clone()
                    .unwrap_or_else(|| format!("http://{admin_addr}")),
                server_name: config.server_name.clone(),
                cert_sha256: identity.cert_sha256.to_vec(),
                region: reg.region.clone(),
                capacity: u32::try_from(config.max_sessions).unwrap_or(u32::MAX),
            };
            registration.spawn(registry::run(
                reg,
                me,
                live_rx.clone(),
                draining_rx,
                registered_tx,
                registration_cancel.clone(),
            ));
        }
        info!(relay = %config.relay_id, %quic_addr, %admin_addr, cert_sha256 = %hex::encode(identity.cert_sha256), "relay serving");
        Ok(RelayHandle {
            endpoint_info,
            quic_addr,
            admin_addr,
            http_addr,
            stats,
            node,
            node_join,
            endpoint,
            cancel,
            tasks,
            live: live_rx,
            drain_grace: config.drain_grace,
            registration_cancel,
            registration,
        })
    }
}

fn bind_udp(addr: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    if let Err(e) = socket
        .set_recv_buffer_size(buffer)
        .and_then(|()| socket.set_send_buffer_size(buffer))
    {
        warn!(error = %e, "cannot set UDP socket buffers");
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    node: ActorRef<NodeMsg>,
    ctx: Arc<NodeCtx>,
    cancel: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => { conns.spawn(conn::serve(incoming, node.clone(), ctx.clone())); }
                None => break,
            },
            Some(_) = conns.join_next() => {}
        }
    }
    // Connections end with their sessions during shutdown; whatever is left is closed
    // with the endpoint.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.shutdown().await;
}

/// A running relay. Dropping it does not stop it; call [`RelayHandle::shutdown`].
pub struct RelayHandle {
    endpoint_info: pb::RelayEndpoint,
    quic_addr: SocketAddr,
    admin_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    stats: Arc<RelayStats>,
    node: ActorRef<NodeMsg>,
    node_join: tokio::task::JoinHandle<()>,
    endpoint: quinn::Endpoint,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
    live: watch::Receiver<usize>,
    drain_grace: Duration,
    registration_cancel: CancellationToken,
    registration: JoinSet<()>,
}

impl RelayHandle {
    /// What coordinators hand to agents: id, address, server name, certificate hash.
    pub fn endpoint(&self) -> pb::RelayEndpoint {
        self.endpoint_info.clone()
    }

    pub fn relay_id(&self) -> &str {
        &self.endpoint_info.relay_id
    }

    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Where `/metrics`, `/livez` and `/readyz` are served, if `metrics_listen` was set.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    pub fn cert_sha256(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(&self.endpoint_info.cert_sha256);
        out
    }

    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Sessions with a live actor on this relay.
    pub async fn live_sessions(&self) -> usize {
        match self
            .node
            .call(NodeMsg::Count, Some(Duration::from_secs(5)))
            .await
        {
            Ok(CallResult::Success(n)) => n,
            _ => 0,
        }
    }

    /// Makes the session's actor panic. Returns whether the session was live here.
    #[cfg(feature = "test-hooks")]
    pub async fn inject_panic(&self, session: kakehashi_proto::SessionId) -> bool {
        matches!(
            self.node
                .call(|r| NodeMsg::Panic(session, r), Some(Duration::from_secs(5)))
                .await,
            Ok(CallResult::Success(true))
        )
    }

    /// Whether the node supervisor is still running.
    pub fn is_running(&self) -> bool {
        !self.node_join.is_finished()
    }

    /// The configured drain grace period (`--drain-grace-secs`).
    pub fn drain_grace(&self) -> Duration {
        self.drain_grace
    }

    /// Starts a drain and returns at once: the relay takes no new session, tells every
    /// participant to resume elsewhere within `grace`, and `/readyz` answers 503.
    /// [`RelayHandle::drain`] does this and then waits.
    pub fn begin_drain(&self, grace: Duration) {
        let grace_ms = u32::try_from(grace.as_millis()).unwrap_or(u32::MAX);
        let _ = self.node.cast(NodeMsg::Drain { grace_ms });
    }

    /// Drains the relay, then shuts it down: marks it draining (in etcd too, so no new
    /// session is placed here), sends `Drain { grace_ms }` to every participant of every
    /// session so they resume elsewhere, waits until every session is gone or `grace`
    /// has passed, and ends whatever is left with `RELAY_SHUTDOWN`. Returns how many
    /// sessions were still live when the grace period ended.
    pub async fn drain(mut self, grace: Duration) -> usize {
        self.begin_drain(grace);
        let mut live = self.live.clone();
        let emptied = tokio::time::timeout(grace, live.wait_for(|n| *n == 0)).await;
        let left = match emptied {
            Ok(_) => 0,
            Err(_) => *self.live.borrow(),
        };
        info!(sessions_left = left, "drain finished");
        // Sessions that did not move in time end now; the pause becomes a resume.
        self.shutdown_inner().await;
        left
    }

    /// Ends every session (participants are told the relay is shutting down), closes
    /// the endpoint, and returns once every task has stopped.
    pub async fn shutdown(mut self) {
        self.shutdown_inner().await;
    }

    async fn shutdown_inner(&mut self) {
        // Leave placement first (revoking the lease), so no coordinator sends a new
        // session to a relay that is about to close.
        self.registration_cancel.cancel();
        while self.registration.join_next().await.is_some() {}
        let _ = self.node.cast(NodeMsg::EndAll {
            reason: pb::EndReason::RelayShutdown,
            detail: "the relay is shutting down".into(),
        });
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.endpoint.close(
            kakehashi_proto::dataplane::close::SHUTDOWN.into(),
            b"relay shutting down",
        );
        self.node.stop(None);
        let _ = (&mut self.node_join).await;
        self.endpoint.wait_idle().await;
    }
}
