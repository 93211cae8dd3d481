//! A minimal Prometheus scrape endpoint whose tasks this crate owns (the exporter's own
//! listener spawns a task nobody can stop). It answers `GET /metrics` and nothing else.

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Largest request head read before answering.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client gets to send its request and read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; further connections wait in the accept queue.
const MAX_CONNECTIONS: usize = 32;
/// How often histogram buckets are rolled (the exporter's upkeep).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Serves scrapes until `cancel` fires, then aborts unfinished ones.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, cancel: CancellationToken) {
    let mut connections = JoinSet::new();
    let mut upkeep = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = upkeep.tick() => handle.run_upkeep(),
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept(), if connections.len() < MAX_CONNECTIONS => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(respond(stream, handle.clone()));
                }
                Err(e) => tracing::debug!(error = %e, "metrics accept failed"),
            },
        }
    }
    connections.shutdown().await;
}

async fn respond(mut stream: TcpStream, handle: PrometheusHandle) {
    let exchange = async {
        let head = read_head(&mut stream).await?;
        let (status, body) = if is_metrics_request(&head) {
            ("200 OK", handle.render())
        } else {
            (
                "404 Not Found",
                "metrics are served at GET /metrics\n".to_owned(),
            )
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(IO_TIMEOUT, exchange).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics scrape failed"),
        Err(_) => tracing::debug!("metrics scrape timed out"),
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

/// `GET /metrics` (with or without a query string) over HTTP/1.x.
fn is_metrics_request(head: &[u8]) -> bool {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, target) = (parts.next(), parts.next());
    method == Some(b"GET")
        && target.is_some_and(|t| t == b"/metrics" || t.starts_with(b"/metrics?"))
}

#[cfg(test)]
mod tests {
    use super::is_metrics_request;

    #[test]
    fn only_get_metrics_is_served() {
        assert!(is_metrics_request(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        ));
        assert!(is_metrics_request(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n"));
        assert!(!is_metrics_request(b"POST /metrics HTTP/1.1\r\n\r\n"));
        assert!(!is_metrics_request(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(!is_metrics_request(b""));
    }
}
