//! The relay binary's flags and what it does with them, as a library so that
//! `kakehashi-relay` and `kakehashi-loadtest relay` (which the process-level cluster
//! tests start) run exactly the same code. This is a binary edge, hence `anyhow`.
//!
//! Signals: SIGTERM drains (no new sessions, `Drain` to every participant, exit once
//! they have moved or `--drain-grace-secs` has passed); SIGINT shuts down at once,
//! ending sessions with `RELAY_SHUTDOWN`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;

use crate::{Registration, Relay, RelayConfig};

/// A Kakehashi relay node: forwards end-to-end-encrypted session frames over QUIC.
#[derive(Debug, Clone, Parser)]
#[command(version)]
pub struct Args {
    /// Name coordinators put into tokens for this relay.
    #[arg(long, env = "KAKEHASHI_RELAY_ID", default_value = "relay-1")]
    pub relay_id: String,
    /// UDP address for QUIC.
    #[arg(long, env = "KAKEHASHI_RELAY_LISTEN", default_value = "127.0.0.1:4433")]
    pub listen: SocketAddr,
    /// TCP address for the RelayAdmin gRPC service (coordinators only).
    #[arg(
        long,
        env = "KAKEHASHI_RELAY_ADMIN_LISTEN",
        default_value = "127.0.0.1:4434"
    )]
    pub admin_listen: SocketAddr,
    /// HTTP listener for Prometheus (`/metrics`) and Kubernetes probes (`/livez`,
    /// `/readyz`: ready once registered and while not draining).
    #[arg(long, env = "KAKEHASHI_RELAY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Address agents dial (host:port), if not the listen address.
    #[arg(long, env = "KAKEHASHI_RELAY_ADVERTISE")]
    pub advertise: Option<String>,
    /// RelayAdmin URL published in etcd for coordinators (http://host:port), if not
    /// http:// + the admin listen address (needed when that is 0.0.0.0).
    #[arg(long, env = "KAKEHASHI_RELAY_ADMIN_ADVERTISE")]
    pub admin_advertise: Option<String>,
    /// TLS server name in the relay's certificate.
    #[arg(long, env = "KAKEHASHI_RELAY_SERVER_NAME", default_value = "localhost")]
    pub server_name: String,
    /// PEM certificate chain; with --tls-key. Without both, a dev certificate is generated.
    #[arg(long, env = "KAKEHASHI_RELAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "KAKEHASHI_RELAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The coordinators' Ed25519 public key, 64 hex digits (printed by the coordinator).
    #[arg(long, env = "KAKEHASHI_COORDINATOR_KEY")]
    pub coordinator_key: String,
    /// Most sessions this relay takes (also its capacity in etcd).
    #[arg(long, env = "KAKEHASHI_RELAY_MAX_SESSIONS", default_value_t = 10_000)]
    pub max_sessions: usize,
    #[arg(long, env = "KAKEHASHI_RELAY_MAX_PARTICIPANTS", default_value_t = 8)]
    pub max_participants: usize,
    /// UDP socket buffer size in bytes (raise net.core.rmem_max/wmem_max to match).
    #[arg(long, env = "KAKEHASHI_RELAY_SOCKET_BUFFER", default_value_t = 8 * 1024 * 1024)]
    pub socket_buffer: usize,
    /// Write the `--relay` argument a coordinator needs for this relay to this file
    /// (atomically, once the relay serves: harnesses wait for it).
    #[arg(long, env = "KAKEHASHI_RELAY_ENDPOINT_FILE")]
    pub endpoint_file: Option<PathBuf>,
    /// etcd client URLs, comma separated. When set, the relay registers there under a
    /// lease for coordinators to place sessions on; otherwise it registers nowhere.
    #[arg(long, env = "KAKEHASHI_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// etcd key namespace shared with the coordinators.
    #[arg(long, env = "KAKEHASHI_ETCD_NAMESPACE", default_value = kakehashi_proto::membership::DEFAULT_NAMESPACE)]
    pub etcd_namespace: String,
    /// Region published in the registration; coordinators prefer relays of theirs.
    #[arg(long, env = "KAKEHASHI_RELAY_REGION", default_value = "")]
    pub region: String,
    /// Seconds the etcd lease outlives the last refresh (refreshed every second).
    #[arg(long, env = "KAKEHASHI_RELAY_LEASE_TTL_SECS", default_value_t = 3)]
    pub lease_ttl_secs: u64,
    /// Seconds SIGTERM waits for participants to resume elsewhere.
    #[arg(long, env = "KAKEHASHI_RELAY_DRAIN_GRACE_SECS", default_value_t = 10)]
    pub drain_grace_secs: u64,
}

impl Args {
    /// The relay configuration these flags describe.
    pub fn config(&self) -> Result<RelayConfig> {
        let mut key = [0u8; 32];
        hex::decode_to_slice(self.coordinator_key.trim(), &mut key)
            .context("--coordinator-key must be 64 hex digits")?;
        let coordinator_key = ed25519_dalek::VerifyingKey::from_bytes(&key)
            .context("--coordinator-key is not a valid Ed25519 public key")?;
        if self.max_participants < 2 {
            bail!("--max-participants must be at least 2 (a customer and an operator)");
        }
        if self.lease_ttl_secs < 2 {
            bail!("--lease-ttl-secs must be at least 2 (the lease is refreshed every second)");
        }
        let mut config = RelayConfig::dev(self.relay_id.clone(), coordinator_key);
        config.listen = self.listen;
        config.admin_listen = self.admin_listen;
        config.advertise = self.advertise.clone();
        if let Some(url) = &self.admin_advertise
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            bail!("--admin-advertise must be an http:// or https:// URL, got {url:?}");
        }
        config.admin_advertise = self.admin_advertise.clone();
        config.server_name = self.server_name.clone();
        config.tls_files = self.tls_cert.clone().zip(self.tls_key.clone());
        config.max_sessions = self.max_sessions;
        config.max_participants_per_session = self.max_participants;
        config.socket_buffer_bytes = self.socket_buffer;
        config.drain_grace = Duration::from_secs(self.drain_grace_secs);
        config.metrics_listen = self.metrics_listen;
        let endpoints: Vec<String> = self
            .etcd_endpoints
            .iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if !endpoints.is_empty() {
            let mut reg = Registration::new(endpoints);
            reg.region = self.region.clone();
            reg.namespace = self.etcd_namespace.clone();
            reg.lease_ttl = Duration::from_secs(self.lease_ttl_secs);
            config.registration = Some(reg);
        }
        Ok(config)
    }
}

/// Runs a relay from parsed flags until SIGTERM (drain) or SIGINT (immediate stop).
/// The caller installs logging.
pub async fn run(args: Args) -> Result<()> {
    let mut config = args.config()?;
    if args.metrics_listen.is_some() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        config.metrics = Some(recorder.handle());
        metrics::set_global_recorder(recorder)
            .context("a metrics recorder is already installed in this process")?;
    }
    let relay = Relay::start(config).await?;
    let ep = relay.endpoint();
    let admin_url = args
        .admin_advertise
        .clone()
        .unwrap_or_else(|| relay.admin_url());
    let relay_arg = format!(
        "id={},addr={},admin={},cert-sha256={},server-name={}",
        ep.relay_id,
        ep.address,
        admin_url,
        hex::encode(&ep.cert_sha256),
        ep.server_name
    );
    println!("relay ready; coordinator flag: --relay {relay_arg}");
    if let Some(path) = &args.endpoint_file {
        write_atomically(path, &relay_arg)?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => {
            r.context("waiting for SIGINT")?;
            tracing::info!("SIGINT: shutting down now");
            tokio::time::timeout(Duration::from_secs(10), relay.shutdown())
                .await
                .context("shutdown did not finish within 10 s")?;
        }
        _ = term.recv() => {
            let grace = relay.drain_grace();
            tracing::info!(?grace, "SIGTERM: draining");
            // The drain itself is bounded by `grace`; the rest is closing sockets.
            let left = tokio::time::timeout(grace + Duration::from_secs(10), relay.drain(grace))
                .await
                .context("drain did not finish within its grace period plus 10 s")?;
            tracing::info!(sessions_left = left, "drained");
        }
    }
    Ok(())
}

/// Writes through a temporary file and a rename, so a reader never sees half a line.
fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_build_a_config_with_registration() {
        let key = hex::encode(
            ed25519_dalek::SigningKey::from_bytes(&[3; 32])
                .verifying_key()
                .as_bytes(),
        );
        let args = Args::try_parse_from([
            "kakehashi-relay",
            "--coordinator-key",
            &key,
            "--etcd-endpoints",
            "http://127.0.0.1:1,http://127.0.0.1:2",
            "--region",
            "tokyo",
            "--drain-grace-secs",
            "4",
        ])
        .expect("valid flags");
        let config = args.config().expect("valid config");
        let reg = config.registration.expect("registers");
        assert_eq!(reg.etcd_endpoints.len(), 2);
        assert_eq!(reg.region, "tokyo");
        assert_eq!(config.drain_grace, Duration::from_secs(4));

        let plain = Args::try_parse_from(["kakehashi-relay", "--coordinator-key", &key])
            .expect("valid flags");
        assert!(plain.config().expect("config").registration.is_none());
        let bad =
            Args::try_parse_from(["kakehashi-relay", "--coordinator-key", "zz"]).expect("parses");
        assert!(bad.config().is_err());
        let advertised = Args::try_parse_from([
            "kakehashi-relay",
            "--coordinator-key",
            &key,
            "--admin-advertise",
            "http://10.0.0.7:4434",
        ])
        .expect("valid flags");
        assert_eq!(
            advertised
                .config()
                .expect("config")
                .admin_advertise
                .as_deref(),
            Some("http://10.0.0.7:4434")
        );
        let not_a_url = Args::try_parse_from([
            "kakehashi-relay",
            "--coordinator-key",
            &key,
            "--admin-advertise",
            "10.0.0.7:4434",
        ])
        .expect("parses");
        assert!(not_a_url.config().is_err());
    }
}
