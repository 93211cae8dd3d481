//! The coordinator binary's flags and what it does with them, as a library so that
//! `kakehashi-coordinator` and `kakehashi-loadtest coordinator` (which the process-level
//! cluster tests start) run exactly the same code. This is a binary edge, hence `anyhow`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use ed25519_dalek::SigningKey;

use crate::backend::etcd::{EtcdDirectoryConfig, EtcdRelayDirectory};
use crate::leader::LeaderConfig;
use crate::tenants::{self, TenantPolicies, TenantPolicy, TenantPolicyError};
use crate::{
    Backends, Coordinator, CoordinatorConfig, RelayInfo, config::validate_relay,
    generate_signing_key,
};

/// Kakehashi coordinator: session API, codes, placement and tokens.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub struct Args {
    /// gRPC listen address (SessionService and AgentService).
    #[arg(long, env = "KAKEHASHI_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,

    /// Prometheus metrics listen address; no metrics endpoint when absent.
    #[arg(long, env = "KAKEHASHI_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// File holding the hex of a 32-byte Ed25519 seed. Without it a throwaway dev key is
    /// generated and every token dies with the process.
    #[arg(long, env = "KAKEHASHI_SIGNING_KEY_FILE")]
    pub signing_key_file: Option<PathBuf>,

    /// A relay, repeated:
    /// `id=r1,addr=127.0.0.1:4433,admin=http://127.0.0.1:4434,cert-sha256=HEX,server-name=localhost[,region=x]`.
    /// Several relays in the environment variable are separated by `;`.
    #[arg(long = "relay", env = "KAKEHASHI_RELAYS", value_delimiter = ';', value_parser = parse_relay)]
    pub relays: Vec<RelayInfo>,

    /// Digits in a session code (4..=12).
    #[arg(long, env = "KAKEHASHI_CODE_DIGITS", default_value_t = 6)]
    pub code_digits: usize,

    /// Seconds a code stays valid.
    #[arg(long, env = "KAKEHASHI_CODE_TTL_SECS", default_value_t = 600)]
    pub code_ttl_secs: u64,

    /// Session duration when the caller asks for none.
    #[arg(
        long,
        env = "KAKEHASHI_DEFAULT_MAX_DURATION_SECS",
        default_value_t = 2400
    )]
    pub default_max_duration_secs: u64,

    /// Longest session anyone may ask for.
    #[arg(
        long,
        env = "KAKEHASHI_MAX_MAX_DURATION_SECS",
        default_value_t = 14_400
    )]
    pub max_max_duration_secs: u64,

    /// A tenant's own session limits, repeated: `TENANT:max=2400,default=1800`, in seconds
    /// or with a unit (`40m`, `2h`); either key may be left out and falls back to the
    /// cluster's. Requests for longer than the tenant's max are cut to it. Several in the
    /// environment variable are separated by `;`.
    #[arg(
        long = "tenant-policy",
        value_name = "TENANT:max=SECS,default=SECS",
        env = "KAKEHASHI_TENANT_POLICIES",
        value_delimiter = ';',
        value_parser = parse_tenant_policy
    )]
    pub tenant_policies: Vec<(String, TenantPolicy)>,

    /// JSON file of tenant limits, read at start:
    /// `[{"tenant": "acme", "maxSeconds": 2400, "defaultSeconds": "30m"}]`. Merged with
    /// `--tenant-policy`; a tenant in both is an error.
    #[arg(long, env = "KAKEHASHI_TENANT_POLICY_FILE")]
    pub tenant_policy_file: Option<PathBuf>,

    /// etcd client URLs, comma separated. When set, relays are found in etcd (they
    /// register themselves) and this replica joins the leader election; `--relay` is
    /// then ignored.
    #[arg(long, env = "KAKEHASHI_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,

    /// etcd key namespace shared with the relays.
    #[arg(long, env = "KAKEHASHI_ETCD_NAMESPACE", default_value = kakehashi_proto::membership::DEFAULT_NAMESPACE)]
    pub etcd_namespace: String,

    /// Placement prefers relays of this region while they have room.
    #[arg(long, env = "KAKEHASHI_REGION", default_value = "")]
    pub region: String,

    /// This replica's name in the leader election; defaults to `coordinator-<pid>@<listen>`.
    #[arg(long, env = "KAKEHASHI_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// Seconds sessions on a vanished relay wait for their participants to resume
    /// before the leader ends them (RELAY_SHUTDOWN).
    #[arg(long, env = "KAKEHASHI_RESUME_WINDOW_SECS", default_value_t = 60)]
    pub resume_window_secs: u64,

    /// Seconds a dead leader's election lease outlives it.
    #[arg(long, env = "KAKEHASHI_LEADER_LEASE_TTL_SECS", default_value_t = 5)]
    pub leader_lease_ttl_secs: u64,

    /// Write `http://IP:PORT` of the gRPC listener here (atomically) once it accepts
    /// connections; harnesses wait for it.
    #[arg(long, env = "KAKEHASHI_URL_FILE")]
    pub url_file: Option<PathBuf>,

    /// A single Redis node (`redis://HOST:PORT[/DB]`) for codes, session records, events
    /// and guess limits, shared by every replica. Without it (and without
    /// `--redis-cluster-nodes`) they stay in this process.
    #[arg(
        long,
        env = "KAKEHASHI_REDIS_URL",
        conflicts_with = "redis_cluster_nodes"
    )]
    pub redis_url: Option<String>,

    /// Redis Cluster seed nodes, comma separated (`redis://HOST:PORT,...`).
    #[arg(long, env = "KAKEHASHI_REDIS_CLUSTER_NODES", value_delimiter = ',')]
    pub redis_cluster_nodes: Vec<String>,

    /// Prefix of every Redis key; replicas of one cluster must agree on it.
    #[arg(long, env = "KAKEHASHI_REDIS_NAMESPACE", default_value = "kh")]
    pub redis_namespace: String,

    /// Milliseconds allowed for connecting to Redis and for each command; past it a call
    /// answers UNAVAILABLE.
    #[arg(long, env = "KAKEHASHI_REDIS_TIMEOUT_MS", default_value_t = 1000)]
    pub redis_timeout_ms: u64,

    /// Possible codes per live code: codes lengthen as live codes grow so that a guess
    /// hits one with probability at most 1 / this.
    #[arg(long, env = "KAKEHASHI_CODE_DENSITY", default_value_t = crate::backend::codes::DEFAULT_DENSITY)]
    pub code_density: u64,

    /// How SessionService and AdminService callers authenticate: `api-keys` (every call
    /// carries `authorization: Bearer kh_<key_id>_<secret>`; the production mode) or
    /// `disabled` (everyone is a cluster admin; for a laptop only, logged loudly).
    #[arg(long, env = "KAKEHASHI_AUTH", default_value = "disabled")]
    pub auth: crate::auth::AuthMode,

    /// File holding the cluster-admin API key (`kh_<16 hex>_<64 hex>`), which may manage
    /// every tenant's keys and policies. Make one with
    /// `printf 'kh_%s_%s\n' $(openssl rand -hex 8) $(openssl rand -hex 32)`.
    #[arg(
        long,
        env = "KAKEHASHI_BOOTSTRAP_ADMIN_KEY_FILE",
        conflicts_with = "bootstrap_admin_key"
    )]
    pub bootstrap_admin_key_file: Option<PathBuf>,

    /// The cluster-admin API key itself; prefer the environment variable (or the file)
    /// to a flag, which other users can read from the process list.
    #[arg(long, env = "KAKEHASHI_BOOTSTRAP_ADMIN_KEY", hide_env_values = true)]
    pub bootstrap_admin_key: Option<String>,

    /// Telework monitoring: the gRPC URL of the evidence sink (`kakehashi sink`) that
    /// monitored devices upload to, handed out with their monitoring tickets. Empty: no
    /// monitoring (GetMonitorTicket answers FAILED_PRECONDITION).
    #[arg(long, env = "KAKEHASHI_EVIDENCE_SINK_URL", default_value = "")]
    pub evidence_sink_url: String,

    /// Seconds between a monitored device's evidence snapshots (1..=86400).
    #[arg(
        long,
        env = "KAKEHASHI_MONITOR_SNAPSHOT_INTERVAL_SECS",
        default_value_t = crate::config::DEFAULT_MONITOR_SNAPSHOT_INTERVAL_SECS,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub monitor_snapshot_interval_secs: u64,

    /// Seconds a monitoring ticket stays valid (60..=86400); devices ask for a new one
    /// before it expires.
    #[arg(
        long,
        env = "KAKEHASHI_MONITOR_TICKET_TTL_SECS",
        default_value_t = crate::config::DEFAULT_MONITOR_TICKET_TTL_SECS,
        value_parser = clap::value_parser!(u64).range(60..=86_400)
    )]
    pub monitor_ticket_ttl_secs: u64,
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

fn parse_tenant_policy(spec: &str) -> Result<(String, TenantPolicy), TenantPolicyError> {
    tenants::parse_spec(spec.trim())
}

/// A key file's text, at most 4 KiB.
fn read_small_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(4097)
        .read_to_string(&mut text)?;
    anyhow::ensure!(text.len() <= 4096, "larger than 4096 bytes");
    Ok(text)
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

impl Args {
    /// The auth mode and the cluster-admin key, read and checked.
    fn auth_config(&self) -> Result<crate::auth::AuthConfig> {
        use crate::auth::{AuthConfig, AuthMode, BootstrapKey};
        let text =
            match (&self.bootstrap_admin_key_file, &self.bootstrap_admin_key) {
                (Some(path), _) => Some(read_small_file(path).with_context(|| {
                    format!("reading bootstrap admin key file {}", path.display())
                })?),
                (None, Some(key)) => Some(key.clone()),
                (None, None) => None,
            };
        let bootstrap_admin = text
            .map(|t| BootstrapKey::parse(&t))
            .transpose()
            .context("the bootstrap admin key (expected kh_<16 hex>_<64 hex>)")?;
        match self.auth {
            AuthMode::Disabled => tracing::warn!(
                "AUTH IS DISABLED (--auth disabled): every SessionService/AdminService caller is a cluster admin of every tenant; use --auth api-keys outside a laptop"
            ),
            AuthMode::ApiKeys if bootstrap_admin.is_none() => tracing::warn!(
                "--auth api-keys without --bootstrap-admin-key-file: only keys already in the store can call; no one can create the first key of a tenant"
            ),
            AuthMode::ApiKeys => tracing::info!("API-key authentication on"),
        }
        Ok(AuthConfig {
            mode: self.auth,
            bootstrap_admin,
        })
    }

    /// etcd endpoints given, trimmed, empty ones dropped.
    fn etcd(&self) -> Vec<String> {
        self.etcd_endpoints
            .iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect()
    }

    /// The tenant policies of `--tenant-policy` and `--tenant-policy-file` together.
    /// Their limits are checked against the cluster's by `CoordinatorConfig::validate`.
    fn tenants(&self) -> Result<TenantPolicies> {
        let mut tenants = TenantPolicies::new();
        for (tenant, policy) in &self.tenant_policies {
            tenants.insert(tenant.clone(), *policy)?;
        }
        if let Some(path) = &self.tenant_policy_file {
            tenants.merge(TenantPolicies::load_file(path)?)?;
        }
        Ok(tenants)
    }

    /// The coordinator configuration and backends these flags describe.
    pub fn build(&self) -> Result<(CoordinatorConfig, Backends)> {
        let tenants = self.tenants()?;
        if !tenants.is_empty() {
            tracing::info!(tenants = tenants.len(), "per-tenant session limits");
        }
        let signing_key = match &self.signing_key_file {
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
        let etcd = self.etcd();
        let mut config = CoordinatorConfig {
            listen: self.listen,
            metrics_listen: self.metrics_listen,
            signing_key,
            code_digits: self.code_digits,
            code_ttl: Duration::from_secs(self.code_ttl_secs),
            default_max_duration: Duration::from_secs(self.default_max_duration_secs),
            max_max_duration: Duration::from_secs(self.max_max_duration_secs),
            tenants,
            relays: self.relays.clone(),
            leader: None,
            auth: self.auth_config()?,
            evidence_sink_url: self.evidence_sink_url.trim().to_owned(),
            monitor_snapshot_interval: Duration::from_secs(self.monitor_snapshot_interval_secs),
            monitor_ticket_ttl: Duration::from_secs(self.monitor_ticket_ttl_secs),
        };
        if config.evidence_sink_url.is_empty() {
            tracing::info!("no --evidence-sink-url: telework monitoring is off");
        } else {
            tracing::info!(sink = %config.evidence_sink_url, "telework monitoring tickets point at this evidence sink");
        }
        let mut backends = Backends::in_memory(self.relays.clone());
        if etcd.is_empty() {
            if self.relays.is_empty() {
                tracing::warn!(
                    "no relays configured: CreateSession will answer UNAVAILABLE; pass --etcd-endpoints or --relay id=...,addr=...,admin=...,cert-sha256=...,server-name=..."
                );
            }
        } else {
            if !self.relays.is_empty() {
                tracing::warn!(
                    "--etcd-endpoints is set: relays come from etcd and --relay is ignored"
                );
            }
            config.relays = Vec::new();
            let mut directory = EtcdDirectoryConfig::new(etcd.clone());
            directory.namespace = self.etcd_namespace.clone();
            directory.preferred_region = self.region.clone();
            backends.relays = Arc::new(EtcdRelayDirectory::start(directory));
            let replica_id = self
                .replica_id
                .clone()
                .unwrap_or_else(|| format!("coordinator-{}@{}", std::process::id(), self.listen));
            let mut leader = LeaderConfig::new(etcd, replica_id);
            leader.namespace = self.etcd_namespace.clone();
            leader.resume_window = Duration::from_secs(self.resume_window_secs);
            leader.lease_ttl = Duration::from_secs(self.leader_lease_ttl_secs.max(2));
            config.leader = Some(leader);
        }
        Ok((config, backends))
    }
}

impl Args {
    /// Puts codes, session records, events and guess limits where the Redis flags say
    /// (or keeps them in memory, with the configured code density). Connects to Redis,
    /// so it fails here, naming Redis, if Redis cannot be reached at start-up.
    pub async fn with_code_backends(&self, mut backends: Backends) -> Result<Backends> {
        use crate::backend::redis::{self, RedisConfig, RedisTarget};
        let cluster: Vec<String> = self
            .redis_cluster_nodes
            .iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        let target = match (&self.redis_url, cluster.is_empty()) {
            (Some(url), _) => RedisTarget::Single(url.clone()),
            (None, false) => RedisTarget::Cluster(cluster),
            (None, true) => {
                backends.codes = Arc::new(crate::backend::codes::InMemoryCodeStore::with_density(
                    self.code_density,
                ));
                return Ok(backends);
            }
        };
        let mut config = RedisConfig::new(target);
        config.namespace = self.redis_namespace.clone();
        config.timeout = Duration::from_millis(self.redis_timeout_ms.max(1));
        config.code_density = self.code_density;
        let in_redis = redis::backends(&config, Vec::new())
            .await
            .with_context(|| format!("connecting to Redis ({:?})", config.target))?;
        // These move to Redis; relay membership stays where `build` put it.
        backends.codes = in_redis.codes;
        backends.sessions = in_redis.sessions;
        backends.events = in_redis.events;
        backends.limiter = in_redis.limiter;
        backends.auth = in_redis.auth;
        tracing::info!(target = ?config.target, namespace = %config.namespace, "codes, sessions, events, guess limits, API keys and tenant policies in Redis");
        Ok(backends)
    }
}

/// Runs a coordinator from parsed flags until SIGINT or SIGTERM. The caller installs
/// logging.
pub async fn run(args: Args) -> Result<()> {
    let (config, backends) = args.build()?;
    let backends = args.with_code_backends(backends).await?;
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
    if let Some(path) = &args.url_file {
        write_atomically(path, &handle.url())?;
    }

    shutdown_signal().await?;
    tracing::info!("shutting down");
    handle.shutdown().await;
    Ok(())
}

/// Writes through a temporary file and a rename, so a reader never sees half a line.
fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
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
    fn auth_flags_build_the_auth_config() -> Result<()> {
        use crate::auth::AuthMode;
        let key = format!("kh_{}_{}", "a1".repeat(8), "b2".repeat(32));
        let args = Args::try_parse_from([
            "coordinator",
            "--auth",
            "api-keys",
            "--bootstrap-admin-key",
            key.as_str(),
        ])?;
        let auth = args.auth_config()?;
        assert_eq!(auth.mode, AuthMode::ApiKeys);
        assert_eq!(auth.bootstrap_admin.map(|k| k.key_id), Some("a1".repeat(8)));
        assert!(
            Args::try_parse_from(["coordinator", "--auth", "maybe"]).is_err(),
            "an unknown mode is refused"
        );
        let bad = Args::try_parse_from(["coordinator", "--bootstrap-admin-key", "kh_nope"])?;
        let e = bad.auth_config().expect_err("malformed bootstrap key");
        assert!(format!("{e:#}").contains("bootstrap admin key"), "{e:#}");
        assert!(
            !format!("{e:#}").contains("nope"),
            "never echoes the key: {e:#}"
        );
        Ok(())
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
    fn monitoring_flags_build_the_monitoring_config() -> Result<()> {
        let defaults = Args::try_parse_from(["coordinator"])?.build()?.0;
        assert_eq!(defaults.monitor_snapshot_interval, Duration::from_secs(300));
        assert_eq!(defaults.monitor_ticket_ttl, Duration::from_secs(3600));
        let args = Args::try_parse_from([
            "coordinator",
            "--evidence-sink-url",
            " http://sink:7900 ",
            "--monitor-snapshot-interval-secs",
            "60",
            "--monitor-ticket-ttl-secs",
            "900",
        ])?;
        let config = args.build()?.0;
        assert_eq!(config.evidence_sink_url, "http://sink:7900");
        assert_eq!(config.monitor_snapshot_interval, Duration::from_secs(60));
        assert_eq!(config.monitor_ticket_ttl, Duration::from_secs(900));
        for bad in [
            ["--monitor-snapshot-interval-secs", "0"],
            ["--monitor-snapshot-interval-secs", "86401"],
            ["--monitor-ticket-ttl-secs", "59"],
            ["--monitor-ticket-ttl-secs", "86401"],
        ] {
            assert!(
                Args::try_parse_from(["coordinator", bad[0], bad[1]]).is_err(),
                "{bad:?} accepted"
            );
        }
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

    #[test]
    fn tenant_policies_from_flags_env_syntax_and_file() -> Result<()> {
        let dir =
            std::env::temp_dir().join(format!("kakehashi-coord-tenants-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("tenants.json");
        std::fs::write(&file, r#"[{"tenant": "globex", "maxSeconds": "2h"}]"#)?;
        let file_arg = file.display().to_string();
        let args = Args::try_parse_from([
            "kakehashi-coordinator",
            "--tenant-policy",
            "acme:max=40m,default=1800",
            "--tenant-policy",
            "initech:default=10m;umbrella:max=600",
            "--tenant-policy-file",
            &file_arg,
        ])
        .expect("valid args");
        let (config, _) = args.build()?;
        config.validate()?;
        let t = &config.tenants;
        assert_eq!(t.len(), 4);
        let acme = t.get("acme").context("acme")?;
        assert_eq!(acme.max_duration, Some(Duration::from_secs(2400)));
        assert_eq!(acme.default_max_duration, Some(Duration::from_secs(1800)));
        assert!(t.get("initech").is_some() && t.get("umbrella").is_some());
        assert_eq!(
            t.get("globex").and_then(|p| p.max_duration),
            Some(Duration::from_secs(7200))
        );

        // A flag that does not parse names the tenant and the field.
        let err = Args::try_parse_from(["kakehashi-coordinator", "--tenant-policy", "acme:max=x"])
            .expect_err("bad duration");
        let msg = err.to_string();
        assert!(msg.contains("\"acme\"") && msg.contains("max"), "{msg}");

        // The same tenant in a flag and in the file is refused.
        let twice = Args::try_parse_from([
            "kakehashi-coordinator",
            "--tenant-policy",
            "globex:max=1h",
            "--tenant-policy-file",
            &file_arg,
        ])
        .expect("parses");
        let err = twice.build().err().context("duplicate tenant")?;
        assert!(format!("{err:#}").contains("more than one"), "{err:#}");

        // A tenant maximum above the cluster's is refused at start.
        let over = Args::try_parse_from([
            "kakehashi-coordinator",
            "--max-max-duration-secs",
            "3600",
            "--tenant-policy",
            "acme:max=2h",
        ])
        .expect("parses");
        let (config, _) = over.build()?;
        let err = config.validate().expect_err("over the cluster maximum");
        assert!(
            err.to_string().contains("\"acme\"") && err.to_string().contains("cluster maximum"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[tokio::test]
    async fn etcd_flags_select_the_etcd_directory_and_the_election() {
        let cert = "00".repeat(32);
        let args = Args::try_parse_from([
            "kakehashi-coordinator",
            "--etcd-endpoints",
            "http://127.0.0.1:1, http://127.0.0.1:2",
            "--etcd-namespace",
            "/ns/",
            "--replica-id",
            "c9",
            "--resume-window-secs",
            "7",
            "--relay",
            &format!("id=a,addr=h:1,admin=http://h:2,cert-sha256={cert},server-name=h"),
        ])
        .expect("valid args");
        let (config, _backends) = args.build().expect("builds");
        let leader = config.leader.expect("joins the election");
        assert_eq!(
            leader.endpoints,
            ["http://127.0.0.1:1", "http://127.0.0.1:2"]
        );
        assert_eq!(leader.namespace, "/ns/");
        assert_eq!(leader.replica_id, "c9");
        assert_eq!(leader.resume_window, Duration::from_secs(7));
        assert!(
            config.relays.is_empty(),
            "the static list is ignored with etcd"
        );

        let plain = Args::try_parse_from(["kakehashi-coordinator"]).expect("valid args");
        let (config, _) = plain.build().expect("builds");
        assert!(config.leader.is_none(), "no election without etcd");
    }
}
