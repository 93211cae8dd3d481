//! An in-process cluster: one coordinator on the embedded backends and any number of
//! relays, all on loopback ports chosen by the OS. Used by the dev command and the
//! end-to-end tests; nothing in it is a stand-in — real gRPC, real QUIC.

use anyhow::{Context, Result};
use ed25519_dalek::SigningKey;
use kakehashi_coordinator::{
    Backends, Coordinator, CoordinatorConfig, CoordinatorHandle, RelayInfo,
};
use kakehashi_relay::{Relay, RelayConfig, RelayHandle};

use crate::proxy::UdpProxy;

pub struct LocalCluster {
    pub coordinator: CoordinatorHandle,
    pub relays: Vec<RelayHandle>,
    /// With [`ClusterBuilder::proxied`]: one UDP proxy in front of each relay, which is
    /// the address agents are given; `proxies[i]` fronts `relays[i]`.
    pub proxies: Vec<UdpProxy>,
    /// The cluster's token-signing key, for tests that forge or craft tokens.
    pub signing_key: SigningKey,
}

type RelayHook = Box<dyn Fn(usize, &mut RelayConfig) + Send>;
type CoordinatorHook = Box<dyn Fn(&mut CoordinatorConfig) + Send>;

/// Builds a [`LocalCluster`]; the hooks let tests adjust each config before start.
pub struct ClusterBuilder {
    relays: usize,
    proxied: bool,
    relay_config: RelayHook,
    coordinator_config: CoordinatorHook,
    api_keys: Option<String>,
    redis: Option<kakehashi_coordinator::backend::redis::RedisConfig>,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self {
            relays: 1,
            proxied: false,
            relay_config: Box::new(|_, _| {}),
            coordinator_config: Box::new(|_| {}),
            api_keys: None,
            redis: None,
        }
    }
}

impl ClusterBuilder {
    pub fn relays(mut self, n: usize) -> Self {
        self.relays = n;
        self
    }

    /// Puts a [`UdpProxy`] in front of every relay, for WAN impairment or to make a
    /// relay vanish silently (`proxies[i].blackhole(true)`).
    pub fn proxied(mut self) -> Self {
        self.proxied = true;
        self
    }

    pub fn relay_config(mut self, f: impl Fn(usize, &mut RelayConfig) + Send + 'static) -> Self {
        self.relay_config = Box::new(f);
        self
    }

    pub fn coordinator_config(
        mut self,
        f: impl Fn(&mut CoordinatorConfig) + Send + 'static,
    ) -> Self {
        self.coordinator_config = Box::new(f);
        self
    }

    /// Turns API-key auth on (`--auth api-keys`) with `bootstrap_key`
    /// (`kh_<16 hex>_<64 hex>`) as the cluster-admin key. Without it auth is disabled,
    /// as in the dev cluster.
    pub fn api_keys(mut self, bootstrap_key: impl Into<String>) -> Self {
        self.api_keys = Some(bootstrap_key.into());
        self
    }

    /// Keeps codes, sessions, events, guess limits, API keys and tenant policies in
    /// Redis instead of this process.
    pub fn redis(mut self, config: kakehashi_coordinator::backend::redis::RedisConfig) -> Self {
        self.redis = Some(config);
        self
    }

    pub async fn start(self) -> Result<LocalCluster> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).context("no randomness for the signing key")?;
        let signing_key = SigningKey::from_bytes(&seed);
        let mut relays = Vec::with_capacity(self.relays);
        for i in 0..self.relays {
            let mut config =
                RelayConfig::dev(format!("relay-{}", i + 1), signing_key.verifying_key());
            (self.relay_config)(i, &mut config);
            relays.push(
                Relay::start(config)
                    .await
                    .context("relay failed to start")?,
            );
        }
        let mut infos = relays.iter().map(relay_info).collect::<Vec<_>>();
        let mut proxies = Vec::new();
        if self.proxied {
            for (relay, info) in relays.iter().zip(infos.iter_mut()) {
                let proxy = UdpProxy::start(relay.quic_addr())
                    .await
                    .context("proxy failed to start")?;
                info.quic_addr = proxy.local_addr().to_string();
                proxies.push(proxy);
            }
        }
        let mut config = CoordinatorConfig::dev(infos.clone());
        config.signing_key = signing_key.clone();
        if let Some(key) = &self.api_keys {
            config.auth = kakehashi_coordinator::auth::AuthConfig {
                mode: kakehashi_coordinator::auth::AuthMode::ApiKeys,
                bootstrap_admin: Some(
                    kakehashi_coordinator::auth::BootstrapKey::parse(key)
                        .context("the bootstrap admin key")?,
                ),
            };
        }
        (self.coordinator_config)(&mut config);
        let backends = match &self.redis {
            Some(redis) => kakehashi_coordinator::backend::redis::backends(redis, infos)
                .await
                .context("connecting the coordinator to Redis")?,
            None => Backends::in_memory(infos),
        };
        let coordinator = Coordinator::start(config, backends)
            .await
            .context("coordinator failed to start")?;
        Ok(LocalCluster {
            coordinator,
            relays,
            proxies,
            signing_key,
        })
    }
}

/// How a coordinator learns about an in-process relay.
pub fn relay_info(relay: &RelayHandle) -> RelayInfo {
    let ep = relay.endpoint();
    RelayInfo {
        relay_id: ep.relay_id,
        quic_addr: ep.address,
        admin_url: relay.admin_url(),
        server_name: ep.server_name,
        cert_sha256: relay.cert_sha256(),
        region: String::new(),
    }
}

impl LocalCluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    pub fn coordinator_url(&self) -> String {
        self.coordinator.url()
    }

    /// Stops the coordinator, then every relay.
    pub async fn shutdown(self) {
        self.coordinator.shutdown().await;
        for relay in self.relays {
            relay.shutdown().await;
        }
    }
}
