//! `kakehashi-relay`: runs one relay node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use kakehashi_relay::{Relay, RelayConfig};
use tracing_subscriber::EnvFilter;

/// A Kakehashi relay node: forwards end-to-end-encrypted session frames over QUIC.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Name coordinators put into tokens for this relay.
    #[arg(long, env = "KAKEHASHI_RELAY_ID", default_value = "relay-1")]
    relay_id: String,
    /// UDP address for QUIC.
    #[arg(long, env = "KAKEHASHI_RELAY_LISTEN", default_value = "127.0.0.1:4433")]
    listen: SocketAddr,
    /// TCP address for the RelayAdmin gRPC service (coordinators only).
    #[arg(
        long,
        env = "KAKEHASHI_RELAY_ADMIN_LISTEN",
        default_value = "127.0.0.1:4434"
    )]
    admin_listen: SocketAddr,
    /// Prometheus metrics endpoint.
    #[arg(long, env = "KAKEHASHI_RELAY_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Address agents dial (host:port), if not the listen address.
    #[arg(long, env = "KAKEHASHI_RELAY_ADVERTISE")]
    advertise: Option<String>,
    /// TLS server name in the relay's certificate.
    #[arg(long, env = "KAKEHASHI_RELAY_SERVER_NAME", default_value = "localhost")]
    server_name: String,
    /// PEM certificate chain; with --tls-key. Without both, a dev certificate is generated.
    #[arg(long, env = "KAKEHASHI_RELAY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "KAKEHASHI_RELAY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The coordinators' Ed25519 public key, 64 hex digits (printed by the coordinator).
    #[arg(long, env = "KAKEHASHI_COORDINATOR_KEY")]
    coordinator_key: String,
    #[arg(long, env = "KAKEHASHI_RELAY_MAX_SESSIONS", default_value_t = 10_000)]
    max_sessions: usize,
    #[arg(long, env = "KAKEHASHI_RELAY_MAX_PARTICIPANTS", default_value_t = 8)]
    max_participants: usize,
    /// UDP socket buffer size in bytes (raise net.core.rmem_max/wmem_max to match).
    #[arg(long, env = "KAKEHASHI_RELAY_SOCKET_BUFFER", default_value_t = 8 * 1024 * 1024)]
    socket_buffer: usize,
    /// Write the `--relay` argument a coordinator needs for this relay to this file.
    #[arg(long, env = "KAKEHASHI_RELAY_ENDPOINT_FILE")]
    endpoint_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let mut key = [0u8; 32];
    hex::decode_to_slice(args.coordinator_key.trim(), &mut key)
        .context("--coordinator-key must be 64 hex digits")?;
    let coordinator_key = ed25519_dalek::VerifyingKey::from_bytes(&key)
        .context("--coordinator-key is not a valid Ed25519 public key")?;
    if let Some(addr) = args.metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .context("cannot start the metrics endpoint")?;
    }
    let mut config = RelayConfig::dev(args.relay_id, coordinator_key);
    config.listen = args.listen;
    config.admin_listen = args.admin_listen;
    config.advertise = args.advertise;
    config.server_name = args.server_name;
    config.tls_files = args.tls_cert.zip(args.tls_key);
    config.max_sessions = args.max_sessions;
    config.max_participants_per_session = args.max_participants;
    config.socket_buffer_bytes = args.socket_buffer;
    if config.max_participants_per_session < 2 {
        bail!("--max-participants must be at least 2 (a customer and an operator)");
    }
    let relay = Relay::start(config).await?;
    let ep = relay.endpoint();
    let relay_arg = format!(
        "id={},addr={},admin=http://{},cert-sha256={},server-name={}",
        ep.relay_id,
        ep.address,
        relay.admin_addr(),
        hex::encode(&ep.cert_sha256),
        ep.server_name
    );
    println!("relay ready; coordinator flag: --relay {relay_arg}");
    if let Some(path) = args.endpoint_file {
        std::fs::write(&path, &relay_arg)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    tokio::time::timeout(Duration::from_secs(10), relay.shutdown())
        .await
        .context("shutdown did not finish within 10 s")?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
