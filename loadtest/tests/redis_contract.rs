//! The backend contract suite, unchanged, on all three backends: in-memory, a real Redis
//! node and a real 3-master Redis Cluster.

use anyhow::Result;
use kakehashi_coordinator::Backends;
use kakehashi_coordinator::backend::redis::{self, RedisTarget};
use kakehashi_coordinator::contract;
use kakehashi_loadtest::services;
use kakehashi_loadtest::testkit::redis_config;

#[tokio::test]
async fn in_memory_backends_pass_the_contract() {
    contract::run_all(&Backends::in_memory(contract::sample_relays())).await;
}

#[tokio::test]
async fn redis_single_node_passes_the_contract() -> Result<()> {
    let Some(redis_server) = services::redis()? else {
        return Ok(());
    };
    let config = redis_config(RedisTarget::Single(redis_server.url.clone()))?;
    let backends = redis::backends(&config, contract::sample_relays()).await?;
    contract::run_all(&backends).await;
    Ok(())
}

#[tokio::test]
async fn redis_cluster_passes_the_contract() -> Result<()> {
    let Some(cluster) = services::redis_cluster()? else {
        return Ok(());
    };
    let config = redis_config(RedisTarget::Cluster(cluster.nodes.clone()))?;
    let backends = redis::backends(&config, contract::sample_relays()).await?;
    contract::run_all(&backends).await;
    Ok(())
}
