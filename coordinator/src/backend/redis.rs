//! Redis implementations of the code store, the session store, the event bus and the
//! guess limiter, for a single Redis node or a Redis Cluster.
//!
//! # Keys
//! Every key starts with a namespace (`kh` by default) and carries a hash tag, so each
//! script touches keys of one slot only and works unchanged on Redis Cluster:
//! - `NS:{c:CODE}` — a code → its session id, with the code's TTL; redeemed by `GETDEL`.
//! - `NS:{s:ID}` — a session record (a hash); `NS:{s:ID}:ev` — its event stream. Both
//!   share the session's slot.
//! - `NS:{idx}:…` — sorted sets indexing records for `list`, `due` and `purge_ended`.
//!   They are updated after the record, not atomically with it; readers check every
//!   id against its record and drop stale entries.
//! - `NS:{codes-live}` — allocations per 10-second bucket, the density estimate.
//! - `NS:{g:SOURCE}` and `NS:{guess-budget}` — the guess limiter's counters.
//! - `NS:{ak:KEY_ID}`, `NS:{akt:TENANT}`, `NS:{tp:TENANT}` — API keys, their per-tenant
//!   index and tenant policies (`auth`).
//!
//! # Failure
//! Every command runs under a response timeout and the connection under a connect
//! timeout, so a dead Redis turns into [`BackendError::Unavailable`] (backend `redis`)
//! within [`RedisConfig::timeout`] and the call answers `UNAVAILABLE`. Connections
//! reconnect by themselves (`ConnectionManager`, and the cluster client's own
//! reconnects) when Redis returns.
//!
//! # Layout
//! - this file: configuration, the connection type shared by all stores, [`connect`].
//! - `codes`, `sessions`, `events`, `limiter`: one store each.

mod auth;
mod codes;
mod events;
mod limiter;
mod sessions;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

pub use auth::RedisAuthStore;
pub use codes::RedisCodeStore;
pub use events::RedisEventBus;
pub use limiter::RedisGuessLimiter;
pub use sessions::RedisSessionStore;

use super::BackendError;
use super::relays::RelayInfo;
use crate::config::Backends;
use crate::limiter::GuessPolicy;

/// The label [`BackendError::Unavailable`] carries for every Redis failure.
pub const BACKEND: &str = "redis";

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One node: `redis://HOST:PORT[/DB]`.
    Single(String),
    /// Seed nodes of a Redis Cluster: `redis://HOST:PORT` each.
    Cluster(Vec<String>),
}

/// How the coordinator talks to Redis.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub target: RedisTarget,
    /// Prefix of every key, so several clusters (or tests) can share one Redis.
    pub namespace: String,
    /// Budget for connecting and for each command; a call fails with `UNAVAILABLE`
    /// after about this long when Redis does not answer.
    pub timeout: Duration,
    /// Possible codes per live code (see `backend::codes`).
    pub code_density: u64,
    pub guess_policy: GuessPolicy,
}

impl RedisConfig {
    /// Production defaults for `target`: namespace `kh`, 1-second timeouts, the default
    /// density and guess policy.
    pub fn new(target: RedisTarget) -> Self {
        Self {
            target,
            namespace: "kh".into(),
            timeout: Duration::from_secs(1),
            code_density: super::codes::DEFAULT_DENSITY,
            guess_policy: GuessPolicy::default(),
        }
    }
}

/// A failure of Redis, as every store reports it.
pub(crate) fn unavailable(what: &str, e: impl std::fmt::Display) -> BackendError {
    crate::telemetry::backend_error(BACKEND);
    BackendError::Unavailable {
        backend: BACKEND,
        detail: format!("{what}: {e}"),
    }
}

/// One connection handle for every store: a reconnecting single-node manager or a
/// cluster connection. Both are multiplexed and cheap to clone.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

/// Opens dedicated connections for blocking reads (`XREAD BLOCK`), which must not hold
/// up the shared multiplexed connection.
#[derive(Clone)]
pub(crate) enum Dialer {
    Single(redis::Client),
    Cluster(Box<ClusterClient>),
}

impl Dialer {
    /// A fresh connection whose commands may take up to `response_timeout`.
    pub(crate) async fn dial(
        &self,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<BlockingConn, BackendError> {
        let conn = match self {
            Dialer::Single(client) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(Some(response_timeout));
                BlockingConn::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                        .map_err(|e| unavailable("connecting for a watch", e))?,
                )
            }
            Dialer::Cluster(client) => BlockingConn::Cluster(
                client
                    .get_async_connection()
                    .await
                    .map_err(|e| unavailable("connecting to the cluster for a watch", e))?,
            ),
        };
        Ok(conn)
    }
}

/// A connection used by one watcher only.
pub(crate) enum BlockingConn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for BlockingConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            BlockingConn::Single(c) => c.req_packed_command(cmd),
            BlockingConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            BlockingConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            BlockingConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            BlockingConn::Single(c) => c.get_db(),
            BlockingConn::Cluster(c) => c.get_db(),
        }
    }
}

/// What every store shares: the connection, the key prefix and the time budget.
#[derive(Clone)]
pub struct Shared {
    pub(crate) conn: RedisConn,
    pub(crate) dialer: Dialer,
    pub(crate) namespace: Arc<str>,
    pub(crate) timeout: Duration,
}

impl Shared {
    /// A key of this namespace: `NS:{tag}` plus `suffix`.
    pub(crate) fn key(&self, tag: &str, suffix: &str) -> String {
        format!("{}:{{{tag}}}{suffix}", self.namespace)
    }

    /// Runs a command (or a script invocation) with the shared connection under the
    /// time budget, so a hung Redis fails the call instead of hanging it.
    pub(crate) async fn run<T, F, Fut>(&self, what: &str, f: F) -> Result<T, BackendError>
    where
        F: FnOnce(RedisConn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        // The connection's own response timeout normally fires first; this outer bound
        // also covers reconnect attempts queued inside the connection manager.
        match tokio::time::timeout(self.timeout * 2, f(self.conn.clone())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(unavailable(what, e)),
            Err(_) => Err(unavailable(
                what,
                format!("no answer within {:?}", self.timeout * 2),
            )),
        }
    }
}

/// Connects to Redis as `config` says. Fails if Redis cannot be reached now; once
/// connected, later outages are survived and healed by reconnecting.
pub async fn connect(config: &RedisConfig) -> Result<Shared, BackendError> {
    let timeout = config.timeout;
    let (conn, dialer) = match &config.target {
        RedisTarget::Single(url) => {
            let client = redis::Client::open(url.as_str())
                .map_err(|e| unavailable(&format!("bad Redis URL {url:?}"), e))?;
            let manager_config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(2)
                .set_max_delay(timeout);
            let fut = ConnectionManager::new_with_config(client.clone(), manager_config);
            let manager = tokio::time::timeout(timeout * 3, fut)
                .await
                .map_err(|_| unavailable(&format!("connecting to {url}"), "timed out"))?
                .map_err(|e| unavailable(&format!("connecting to {url}"), e))?;
            (RedisConn::Single(manager), Dialer::Single(client))
        }
        RedisTarget::Cluster(nodes) => {
            if nodes.is_empty() {
                return Err(unavailable("Redis Cluster", "no seed nodes given"));
            }
            let client = ClusterClient::builder(nodes.clone())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(2)
                .build()
                .map_err(|e| unavailable("bad Redis Cluster node list", e))?;
            // Watchers block for up to `events::BLOCK`, so their client waits longer.
            let watch_client = ClusterClient::builder(nodes.clone())
                .connection_timeout(timeout)
                .response_timeout(events::BLOCK + timeout)
                .retries(2)
                .build()
                .map_err(|e| unavailable("bad Redis Cluster node list", e))?;
            let conn = tokio::time::timeout(timeout * 3, client.get_async_connection())
                .await
                .map_err(|_| unavailable("connecting to the Redis Cluster", "timed out"))?
                .map_err(|e| unavailable("connecting to the Redis Cluster", e))?;
            (
                RedisConn::Cluster(conn),
                Dialer::Cluster(Box::new(watch_client)),
            )
        }
    };
    Ok(Shared {
        conn,
        dialer,
        namespace: config.namespace.as_str().into(),
        timeout,
    })
}

/// Backends with codes, session records, events and guess limits in Redis, and the
/// given static relays (relay membership lives in etcd when configured, not here).
pub async fn backends(
    config: &RedisConfig,
    relays: Vec<RelayInfo>,
) -> Result<Backends, BackendError> {
    let shared = connect(config).await?;
    // Anything not in Redis keeps its embedded default (relays from the static list).
    Ok(Backends {
        codes: Arc::new(RedisCodeStore::new(shared.clone(), config.code_density)),
        sessions: Arc::new(RedisSessionStore::new(shared.clone())),
        events: Arc::new(RedisEventBus::new(shared.clone())),
        auth: Arc::new(RedisAuthStore::new(shared.clone())),
        limiter: Arc::new(RedisGuessLimiter::new(shared, config.guess_policy.clone())),
        ..Backends::in_memory(relays)
    })
}
