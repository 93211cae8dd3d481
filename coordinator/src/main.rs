//! `kakehashi-coordinator`: runs one coordinator on the embedded in-memory backends.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use ed25519_dalek::SigningKey;
use kakehashi_coordinator::{
    Backends, Coordinator, CoordinatorConfig, RelayInfo, config::validate_relay,
    generate_signing_key,
};
use tracing_subscriber::EnvFilter;

/// Kakehashi coordinator: session API, codes, placement and tokens.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// gRPC listen address (SessionService and AgentService).
    #[arg(long, env = "KAKEHASHI_LISTEN", default_value = "127.0.0.1:7700")]
    listen: SocketAddr,

    /// Prometheus metrics listen address; no metrics endpoint when absent.
    #[arg(long, env = "KAKEHASHI_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,

    /// File holding the hex of a 32-byte Ed25519 seed. Without it a throwaway dev key is
    /// generated and every token dies with the process.
    #[arg(long, env = "KAKEHASHI_SIGNING_KEY_FILE")]
    signing_key_file: Option<PathBuf>,

    /// A relay, repeated:
    /// `id=r1,addr=127.0.0.1:4433,admin=http://127.0.0.1:4434,cert-sha256=HEX,server-name=localhost[,region=x]`.
    /// Several relays in the environment variable are separated by `;`.
    #[arg(long = "relay", env = "KAKEHASHI_RELAYS", value_delimiter = ';', value_parser = parse_relay)]
    relays: Vec<RelayInfo>,

    /// Digits in a session code (4..=12).
    #[arg(long, env = "KAKEHASHI_CODE_DIGITS", default_value_t = 6)]
    code_digits: usize,

    /// Seconds a code stays valid.
    #[arg(long, env = "KAKEHASHI_CODE_TTL_SECS", default_value_t = 600)]
    code_ttl_secs: u64,

    /// Session duration when the caller asks for none.
    #[arg(
        long,
        env = "KAKEHASHI_DEFAULT_MAX_DURATION_SECS",
        default_value_t = 2400
    )]
    default_max_duration_secs: u64,

    /// Longest session anyone may ask for.
    #[arg(
        long,
        env = "KAKEHASHI_MAX_MAX_DURATION_SECS",
        default_value_t = 14_400
    )]
    max_max_duration_secs: u64,
}

/// Parses one `--relay` value into a relay entry, naming the field that is wrong.
fn parse_relay(spec: &str) -> Result<RelayInfo, String> {
    let (mut id, mut addr, mut admin, mut cert, mut name, mut region) =
        (None, None, None, None, None, String::new());
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not key=value"))?;
        let value = value.trim().to_owned();
        match key.trim() {
            "id" => id = Some(value),
            "addr" => addr = Some(value),
            "admin" => admin = Some(value),
            "cert-sha256" => cert = Some(value),
            "server-name" => name = Some(value),
            "region" => region = value,
            other => {
                return Err(format!(
                    "unknown key {other:?}; expected id, addr, admin, cert-sha256, server-name, region"
                ));
            }
        }
    }
    let need = |v: Option<String>, key: &str| v.ok_or_else(|| format!("missing {key}=..."));
    let cert_hex = need(cert, "cert-sha256")?;
    let mut cert_sha256 = [0u8; 32];
    hex::decode_to_slice(&cert_hex, &mut cert_sha256).map_err(|_| {
        "cert-sha256 must be 64 hex digits (SHA-256 of the DER certificate)".to_owned()
    })?;
    let relay = RelayInfo {
        relay_id: need(id, "id")?,
        quic_addr: need(addr, "addr")?,
        admin_url: need(admin, "admin")?,
        server_name: need(name, "server-name")?,
        cert_sha256,
        region,
    };
    validate_relay(&relay)?;
    Ok(relay)
}

fn load_signing_key(path: &PathBuf) -> Result<SigningKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading signing key file {}", path.display()))?;
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed).with_context(|| {
        format!(
            "signing key file {} must hold 64 hex digits (a 32-byte Ed25519 seed)",
            path.display()
        )
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();

    let signing_key = match &args.signing_key_file {
        Some(path) => load_signing_key(path)?,
        None => {
            let key = generate_signing_key().context("generating a dev signing key")?;
            tracing::warn!(
                public_key = %hex::encode(key.verifying_key().as_bytes()),
                "NO --signing-key-file: using a throwaway DEV signing key; tokens will not survive a restart"
            );
            key
        }
    };
    if args.relays.is_empty() {
        tracing::warn!(
            "no relays configured: CreateSession will answer UNAVAILABLE; pass --relay id=...,addr=...,admin=...,cert-sha256=...,server-name=..."
        );
    }
    let config = CoordinatorConfig {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        signing_key,
        code_digits: args.code_digits,
        code_ttl: Duration::from_secs(args.code_ttl_secs),
        default_max_duration: Duration::from_secs(args.default_max_duration_secs),
        max_max_duration: Duration::from_secs(args.max_max_duration_secs),
        relays: args.relays.clone(),
    };
    let backends = Backends::in_memory(args.relays);
    let handle = Coordinator::start(config, backends)
        .await
        .context("starting the coordinator")?;
    let public_key = hex::encode(handle.public_key().as_bytes());
    // Relays need this key (`--coordinator-key HEX`), so it goes to stdout as well as the log.
    println!("coordinator public key: {public_key}");
    println!("coordinator listening on {}", handle.url());
    if let Some(addr) = handle.metrics_addr() {
        println!("metrics at http://{addr}/metrics");
    }

    shutdown_signal().await?;
    tracing::info!("shutting down");
    handle.shutdown().await;
    Ok(())
}

async fn shutdown_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_specs_parse_with_clear_errors() {
        let cert = "ab".repeat(32);
        let r = parse_relay(&format!(
            "id=r1,addr=127.0.0.1:4433,admin=http://127.0.0.1:4434,cert-sha256={cert},server-name=localhost,region=tokyo"
        ))
        .expect("valid spec");
        assert_eq!(r.relay_id, "r1");
        assert_eq!(r.cert_sha256, [0xab; 32]);
        assert_eq!(r.region, "tokyo");

        let missing = parse_relay("id=r1,addr=a:1").expect_err("incomplete");
        assert!(missing.contains("cert-sha256"), "{missing}");
        let bad = parse_relay("id=r1,addr=a:1,admin=http://a:2,cert-sha256=zz,server-name=x")
            .expect_err("bad hex");
        assert!(bad.contains("64 hex digits"), "{bad}");
        let unknown = parse_relay("color=red").expect_err("unknown key");
        assert!(unknown.contains("unknown key"), "{unknown}");
        let url = parse_relay(&format!(
            "id=r1,addr=a:1,admin=a:2,cert-sha256={cert},server-name=x"
        ))
        .expect_err("admin without scheme");
        assert!(url.contains("http://"), "{url}");
    }

    #[test]
    fn signing_key_file_is_hex_seed() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("kakehashi-coord-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let good = dir.join("good");
        std::fs::write(&good, format!("{}\n", "07".repeat(32)))?;
        let key = load_signing_key(&good)?;
        assert_eq!(key.to_bytes(), [7; 32]);
        let bad = dir.join("bad");
        std::fs::write(&bad, "not hex")?;
        let err = load_signing_key(&bad).expect_err("not hex");
        assert!(format!("{err:#}").contains("64 hex digits"), "{err:#}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn args_parse() {
        let cert = "00".repeat(32);
        let args = Args::try_parse_from([
            "kakehashi-coordinator",
            "--relay",
            &format!("id=a,addr=h:1,admin=http://h:2,cert-sha256={cert},server-name=h"),
            "--relay",
            &format!("id=b,addr=h:3,admin=http://h:4,cert-sha256={cert},server-name=h"),
            "--code-digits",
            "8",
        ])
        .expect("valid args");
        assert_eq!(args.relays.len(), 2);
        assert_eq!(args.code_digits, 8);
        assert_eq!(args.listen, "127.0.0.1:7700".parse().expect("addr"));
    }
}
