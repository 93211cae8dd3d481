//! The metrics endpoint. Its own test binary: a process has one global recorder.

use anyhow::{Context, Result};
use kakehashi_coordinator::{Backends, Coordinator, CoordinatorConfig, RelayInfo};
use kakehashi_proto::pb;
use kakehashi_proto::pb::session_service_client::SessionServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn metrics_endpoint_serves_coordinator_metrics() -> Result<()> {
    let relays = vec![RelayInfo {
        relay_id: "r1".into(),
        quic_addr: "127.0.0.1:4433".into(),
        admin_url: "http://127.0.0.1:9".into(),
        server_name: "localhost".into(),
        cert_sha256: [0; 32],
        region: String::new(),
    }];
    let mut config = CoordinatorConfig::dev(relays.clone());
    config.metrics_listen = Some("127.0.0.1:0".parse()?);
    let handle = Coordinator::start(config, Backends::in_memory(relays)).await?;
    let mut client = SessionServiceClient::connect(handle.url()).await?;
    client
        .create_session(pb::CreateSessionRequest {
            device_id: String::new(),
            tenant: "acme".into(),
            operator: "op".into(),
            mode: pb::SessionMode::View as i32,
            permissions: 0,
            max_duration_secs: 0,
        })
        .await?;

    let addr = handle.metrics_addr().context("metrics address")?;
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(
        body.contains("coordinator_sessions_created_total 1"),
        "{body}"
    );
    assert!(
        body.contains("# HELP coordinator_sessions_created_total"),
        "{body}"
    );

    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(b"GET /secret HTTP/1.1\r\n\r\n").await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    assert!(body.starts_with("HTTP/1.1 404"), "{body}");
    handle.shutdown().await;
    Ok(())
}
