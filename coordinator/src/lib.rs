//! Kakehashi coordinator: the control plane. It creates sessions for call-center
//! software, hands out the codes customers type, places each session on a relay, signs
//! the tokens relays verify offline, and streams each session's events.
//!
//! # Layout
//! - [`Coordinator`] / [`CoordinatorHandle`] (this file): start and stop the gRPC server
//!   and the background tasks.
//! - [`config`]: [`CoordinatorConfig`] and [`Backends`].
//! - [`backend`]: the storage traits (`CodeStore`, `SessionStore`, `EventBus`,
//!   `RelayDirectory`) with their in-memory implementations; `contract` (feature
//!   `test-support`) is the behaviour every implementation must pass.
//!   `backend::redis`: codes, session records, events (Redis Streams) and guess limits
//!   in Redis or Redis Cluster, shared by every replica.
//! - `service`: the shared core and the `SessionService` / `AgentService` impls.
//! - `reaper`: ends sessions past their deadline or with an expired code, and purges
//!   records and event logs an hour after a session ended.
//! - [`tenants`]: per-tenant session limits set by the operator (`--tenant-policy`).
//! - [`unattended`]: enrolled devices, the checks on a device session and the signed
//!   `PollDevice` through which a device collects its sessions.
//! - [`monitoring`]: telework monitoring tickets (`GetMonitorTicket`) for enrolled
//!   devices, pointing them at the evidence sink.
//! - [`auth`]: API keys, roles and the `Authenticator` every `SessionService` and
//!   `AdminService` call goes through; `service::admin` manages keys and tenant policies.
//! - `validate`: pure input checks. [`limiter`]: the guess limits on `JoinByCode`
//!   (per-source backoff, cluster-wide failure budget) behind the `GuessLimiter` trait.
//! - [`error`]: [`ApiError`], classified once into gRPC status, message and metric label.
//! - [`telemetry`]: metric names, described at start, and the owned `/metrics` endpoint.
//! - [`health`]: `grpc.health.v1` fed by a backend probe, and server reflection.
//! - [`leader`]: etcd leader election (fenced by revision) and the leader's chores
//!   (relays that left placement, sessions stranded on them).
//! - [`cli`]: the binary's flags and `run`, shared with `kakehashi-loadtest coordinator`;
//!   `main.rs` only installs logging and calls it.
//!
//! # Invariants
//! - A code redeems at most once; an ended session never ends again (compare-and-swap).
//! - Operator tickets are stored only as SHA-256 digests.
//! - Every task is owned by the [`CoordinatorHandle`]; `shutdown` waits for all of them.

pub mod auth;
pub mod backend;
pub mod cli;
pub mod config;
#[cfg(any(test, feature = "test-support"))]
pub mod contract;
pub mod error;
pub mod health;
pub mod leader;
pub mod limiter;
pub mod monitoring;
mod random;
mod reaper;
mod service;
pub mod telemetry;
pub mod tenants;
pub mod unattended;
mod validate;

use std::net::SocketAddr;

use ed25519_dalek::VerifyingKey;
use kakehashi_proto::pb;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use backend::relays::RelayInfo;
pub use config::{Backends, CoordinatorConfig, generate_signing_key};
pub use error::{ApiError, StartError};
pub use tenants::{TenantPolicies, TenantPolicy};

/// Starts coordinators. See [`Coordinator::start`].
pub struct Coordinator;

impl Coordinator {
    /// Binds the gRPC listener (and the metrics listener, if configured), starts the
    /// services and the reaper, and returns once the listener accepts connections.
    pub async fn start(
        config: CoordinatorConfig,
        backends: Backends,
    ) -> Result<CoordinatorHandle, StartError> {
        config.validate()?;
        // Descriptions go to whatever recorder is installed now (the binary's or a
        // test's); with `metrics_listen` they are repeated for the recorder set below.
        telemetry::describe();
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();

        let metrics_addr = match config.metrics_listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::MetricsBind { addr, source })?;
                let bound = listener
                    .local_addr()
                    .map_err(|source| StartError::MetricsBind { addr, source })?;
                let recorder =
                    metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
                let handle = recorder.handle();
                metrics::set_global_recorder(recorder)
                    .map_err(|_| StartError::MetricsRecorderInstalled)?;
                telemetry::describe();
                tasks.spawn(telemetry::http::serve(listener, handle, cancel.clone()));
                Some(bound)
            }
            None => None,
        };

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;
        let grpc_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let public_key = config.signing_key.verifying_key();

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        // Not serving until the first backend probe has answered.
        health::set_all(&health_reporter, tonic_health::ServingStatus::NotServing).await;
        let (reflection_v1, reflection_v1alpha) = health::reflection()
            .map_err(|e| StartError::Config(format!("gRPC reflection descriptors: {e}")))?;
        tasks.spawn(health::run(
            health_reporter,
            backends.clone(),
            cancel.clone(),
        ));

        let core = service::Core::new(config, backends, cancel.clone());
        let router = tonic::transport::Server::builder()
            .trace_fn(telemetry::otel::grpc_span)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(pb::session_service_server::SessionServiceServer::new(
                service::session::SessionApi::new(core.clone()),
            ))
            .add_service(pb::agent_service_server::AgentServiceServer::new(
                service::agent::AgentApi::new(core.clone()),
            ))
            .add_service(pb::admin_service_server::AdminServiceServer::new(
                service::admin::AdminApi::new(core.clone()),
            ));
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let stop = cancel.clone();
        tasks.spawn(async move {
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "gRPC server failed");
            }
        });
        let (leader_tx, leader_rx) = tokio::sync::watch::channel(false);
        if let Some(leader_config) = core.config.leader.clone() {
            tasks.spawn(leader::run(
                leader_config,
                core.clone(),
                leader_tx,
                cancel.clone(),
            ));
        }
        tasks.spawn(reaper::run(core, cancel.clone()));
        tracing::info!(%grpc_addr, public_key = %hex::encode(public_key.as_bytes()), "coordinator started");

        Ok(CoordinatorHandle {
            grpc_addr,
            metrics_addr,
            public_key,
            cancel,
            tasks,
            leader: leader_rx,
        })
    }
}

/// A running coordinator. Dropping it aborts its tasks; [`CoordinatorHandle::shutdown`]
/// stops them in order.
pub struct CoordinatorHandle {
    grpc_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    public_key: VerifyingKey,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
    leader: tokio::sync::watch::Receiver<bool>,
}

impl CoordinatorHandle {
    /// Whether this replica is the elected leader now (always false without etcd).
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Where Prometheus scrapes `GET /metrics`, if `metrics_listen` was set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// `http://IP:PORT` for tonic clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// The key that verifies every token this coordinator signs.
    pub fn public_key(&self) -> VerifyingKey {
        self.public_key
    }

    /// Requests graceful shutdown. Returns once all tasks have stopped: the server stops
    /// accepting, open watch streams end, in-flight calls finish, the reaper stops.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        while let Some(result) = self.tasks.join_next().await {
            if let Err(e) = result
                && e.is_panic()
            {
                tracing::error!(error = %e, "coordinator task panicked");
            }
        }
    }
}
