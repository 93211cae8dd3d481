//! The relay's HTTP listener (`--metrics-listen`): `GET /metrics` for Prometheus,
//! `GET /livez` and `GET /readyz` for Kubernetes probes. The tasks are owned here (the
//! exporter's own listener spawns one nobody can stop).
//!
//! - **live** while the node supervisor runs: a relay whose supervisor died serves
//!   nobody and should be restarted.
//! - **ready** once the relay has registered in etcd (at once without etcd) and while
//!   it is not draining. A relay that loses etcd later stays ready: its sessions keep
//!   flowing, and coordinators stop placing on it through the lease anyway.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Largest request head read before answering.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client gets to send its request and read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests served at once; further connections wait in the accept queue.
const MAX_CONNECTIONS: usize = 32;
/// How often histogram buckets are rolled (the exporter's upkeep).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

pub const DRAINING: &str = "relay_draining";
pub const CAPACITY: &str = "relay_capacity_sessions";
pub const READY: &str = "relay_ready";

/// Registers this module's metric help text.
pub fn describe() {
    metrics::describe_gauge!(
        DRAINING,
        "1 while the relay drains (SIGTERM): it takes no new sessions and /readyz answers 503."
    );
    metrics::describe_gauge!(
        CAPACITY,
        "Most sessions this relay takes (--max-sessions), as published in etcd."
    );
    metrics::describe_gauge!(
        READY,
        "1 while /readyz answers 200 (registered and not draining), else 0."
    );
}

/// What the probes read.
#[derive(Clone)]
pub struct Probes {
    /// True once the relay is registered (or registers nowhere).
    pub registered: watch::Receiver<bool>,
    pub draining: watch::Receiver<bool>,
    /// Whether the node supervisor still runs.
    pub alive: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl Probes {
    pub fn ready(&self) -> bool {
        *self.registered.borrow() && !*self.draining.borrow() && (self.alive)()
    }
}

/// Keeps `relay_draining` and `relay_ready` in step with the relay until `cancel`.
pub async fn track(mut probes: Probes, cancel: CancellationToken) {
    loop {
        let draining = *probes.draining.borrow_and_update();
        metrics::gauge!(DRAINING).set(if draining { 1.0 } else { 0.0 });
        let _ = probes.registered.borrow_and_update();
        metrics::gauge!(READY).set(if probes.ready() { 1.0 } else { 0.0 });
        tokio::select! {
            () = cancel.cancelled() => break,
            Ok(()) = probes.draining.changed() => {}
            Ok(()) = probes.registered.changed() => {}
        }
    }
}

/// Serves requests until `cancel` fires, then aborts unfinished ones.
pub async fn serve(
    listener: TcpListener,
    metrics: Option<PrometheusHandle>,
    probes: Probes,
    cancel: CancellationToken,
) {
    let mut connections = JoinSet::new();
    let mut upkeep = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = upkeep.tick() => if let Some(h) = &metrics { h.run_upkeep() },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept(), if connections.len() < MAX_CONNECTIONS => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(respond(stream, metrics.clone(), probes.clone()));
                }
                Err(e) => tracing::debug!(error = %e, "HTTP accept failed"),
            },
        }
    }
    connections.shutdown().await;
}

/// The routes, as a pure function of the request head and the relay's state.
fn route(
    head: &[u8],
    metrics: Option<&PrometheusHandle>,
    probes: &Probes,
) -> (&'static str, String) {
    match request_target(head) {
        Some(b"/livez") => {
            if (probes.alive)() {
                ("200 OK", "ok\n".into())
            } else {
                (
                    "503 Service Unavailable",
                    "node supervisor stopped\n".into(),
                )
            }
        }
        Some(b"/readyz") => {
            if !(probes.alive)() {
                (
                    "503 Service Unavailable",
                    "node supervisor stopped\n".into(),
                )
            } else if *probes.draining.borrow() {
                ("503 Service Unavailable", "draining\n".into())
            } else if !*probes.registered.borrow() {
                (
                    "503 Service Unavailable",
                    "not registered in etcd yet\n".into(),
                )
            } else {
                ("200 OK", "ready\n".into())
            }
        }
        Some(b"/metrics") => match metrics {
            Some(h) => ("200 OK", h.render()),
            None => ("404 Not Found", "no metrics recorder here\n".into()),
        },
        _ => (
            "404 Not Found",
            "GET /metrics, /livez or /readyz\n".to_owned(),
        ),
    }
}

async fn respond(mut stream: TcpStream, metrics: Option<PrometheusHandle>, probes: Probes) {
    let exchange = async {
        let head = read_head(&mut stream).await?;
        let (status, body) = route(&head, metrics.as_ref(), &probes);
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(IO_TIMEOUT, exchange).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "HTTP request failed"),
        Err(_) => tracing::debug!("HTTP request timed out"),
    }
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while head.len() < MAX_REQUEST_BYTES && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(head)
}

/// The path of a `GET` request line, without its query string.
fn request_target(head: &[u8]) -> Option<&[u8]> {
    let line = head.split(|&b| b == b'\r').next()?;
    let mut parts = line.split(|&b| b == b' ');
    if parts.next()? != b"GET" {
        return None;
    }
    let target = parts.next()?;
    Some(target.split(|&b| b == b'?').next().unwrap_or(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probes(registered: bool, draining: bool, alive: bool) -> Probes {
        Probes {
            registered: watch::channel(registered).1,
            draining: watch::channel(draining).1,
            alive: Arc::new(move || alive),
        }
    }

    fn status(head: &[u8], p: &Probes) -> &'static str {
        route(head, None, p).0
    }

    #[test]
    fn readiness_needs_registration_and_no_drain() {
        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        let ready = probes(true, false, true);
        assert_eq!(status(get("/readyz").as_bytes(), &ready), "200 OK");
        assert_eq!(status(get("/readyz?verbose").as_bytes(), &ready), "200 OK");
        assert_eq!(status(get("/livez").as_bytes(), &ready), "200 OK");
        let draining = probes(true, true, true);
        assert!(status(get("/readyz").as_bytes(), &draining).starts_with("503"));
        assert_eq!(status(get("/livez").as_bytes(), &draining), "200 OK");
        let unregistered = probes(false, false, true);
        assert!(status(get("/readyz").as_bytes(), &unregistered).starts_with("503"));
        let dead = probes(true, false, false);
        assert!(status(get("/livez").as_bytes(), &dead).starts_with("503"));
        assert!(status(b"POST /readyz HTTP/1.1\r\n\r\n", &ready).starts_with("404"));
        assert!(status(get("/metrics").as_bytes(), &ready).starts_with("404"));
        assert!(status(b"", &ready).starts_with("404"));
    }
}
