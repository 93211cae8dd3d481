//! Codes and guess limits on real Redis: uniqueness under 32 concurrent allocators,
//! exactly one winner among 100 concurrent redeemers, native expiry, and limiter state
//! shared between coordinators.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kakehashi_coordinator::backend::codes::{CodeStore, is_well_formed};
use kakehashi_coordinator::backend::redis::{self, RedisCodeStore, RedisGuessLimiter, RedisTarget};
use kakehashi_coordinator::limiter::{GuessLimiter, GuessPolicy, Verdict};
use kakehashi_loadtest::services;
use kakehashi_loadtest::testkit::redis_config;
use kakehashi_proto::SessionId;

fn session(n: u64) -> SessionId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&n.to_be_bytes());
    SessionId::from_bytes(b)
}

const ALLOCATORS: u64 = 32;
const PER_ALLOCATOR: u64 = 5_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_allocators_never_share_a_live_code() -> Result<()> {
    let Some(server) = services::redis()? else {
        return Ok(());
    };
    let config = redis_config(RedisTarget::Single(server.url.clone()))?;
    let shared = redis::connect(&config).await?;
    let store = Arc::new(RedisCodeStore::new(shared, config.code_density));
    let ttl = Duration::from_secs(600);
    let mut tasks = tokio::task::JoinSet::new();
    for a in 0..ALLOCATORS {
        let store = store.clone();
        tasks.spawn(async move {
            let mut codes = Vec::with_capacity(PER_ALLOCATOR as usize);
            for i in 0..PER_ALLOCATOR {
                let id = session(a * PER_ALLOCATOR + i);
                codes.push((store.allocate(id, 6, ttl).await?, id));
            }
            anyhow::Ok(codes)
        });
    }
    let mut all = Vec::new();
    while let Some(result) = tasks.join_next().await {
        all.extend(result??);
    }
    ensure!(all.len() as u64 == ALLOCATORS * PER_ALLOCATOR);
    let distinct: HashSet<&str> = all.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(distinct.len(), all.len(), "no two live codes are equal");
    assert!(all.iter().all(|(c, _)| is_well_formed(c)));
    let longest = all.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
    assert!(
        longest > 6,
        "160,000 live codes pushed codes past 6 digits (got {longest})"
    );
    // Every code still maps to its own session (spot check, then single use).
    for (code, id) in all.iter().step_by(997) {
        assert_eq!(store.redeem(code).await?, Some(*id));
        assert_eq!(store.redeem(code).await?, None);
    }
    Ok(())
}

async fn hundred_redeemers(target: RedisTarget) -> Result<()> {
    let config = redis_config(target)?;
    let shared = redis::connect(&config).await?;
    let store = Arc::new(RedisCodeStore::new(shared, config.code_density));
    for round in 0..5u64 {
        let id = session(round);
        let code = store.allocate(id, 8, Duration::from_secs(60)).await?;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let (store, code) = (store.clone(), code.clone());
            tasks.spawn(async move { store.redeem(&code).await });
        }
        let mut winners = Vec::new();
        while let Some(r) = tasks.join_next().await {
            winners.extend(r??);
        }
        assert_eq!(winners, vec![id], "exactly one of 100 redeemers wins");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_redeemers_one_winner_single_node() -> Result<()> {
    let Some(server) = services::redis()? else {
        return Ok(());
    };
    hundred_redeemers(RedisTarget::Single(server.url.clone())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_redeemers_one_winner_cluster() -> Result<()> {
    let Some(cluster) = services::redis_cluster()? else {
        return Ok(());
    };
    hundred_redeemers(RedisTarget::Cluster(cluster.nodes.clone())).await
}

#[tokio::test]
async fn codes_expire_in_redis_itself() -> Result<()> {
    let Some(server) = services::redis()? else {
        return Ok(());
    };
    let config = redis_config(RedisTarget::Single(server.url.clone()))?;
    let store = RedisCodeStore::new(redis::connect(&config).await?, config.code_density);
    let code = store
        .allocate(session(1), 6, Duration::from_millis(100))
        .await?;
    let key = store.key_for(&code);
    // Watch the key until Redis drops it; no clock in the assertion.
    let client = ::redis::Client::open(server.url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut gone = false;
    for _ in 0..200 {
        let exists: bool = ::redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut conn)
            .await?;
        if !exists {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "Redis expired the code key");
    assert_eq!(
        store.redeem(&code).await?,
        None,
        "an expired code redeems to nothing"
    );
    Ok(())
}

#[tokio::test]
async fn guess_limits_are_shared_by_coordinators_and_tighten_under_attack() -> Result<()> {
    let Some(server) = services::redis()? else {
        return Ok(());
    };
    let mut config = redis_config(RedisTarget::Single(server.url.clone()))?;
    config.guess_policy = GuessPolicy {
        budget: 30,
        ..GuessPolicy::default()
    };
    // Two coordinators' limiters over one Redis.
    let a = RedisGuessLimiter::new(redis::connect(&config).await?, config.guess_policy.clone());
    let b = RedisGuessLimiter::new(redis::connect(&config).await?, config.guess_policy.clone());
    let attacker: IpAddr = [192, 0, 2, 1].into();
    let now = 1_700_000_000_000i64;
    let free = config.guess_policy.free_failures;
    for i in 0..=free {
        let limiter: &dyn GuessLimiter = if i % 2 == 0 { &a } else { &b };
        assert_eq!(
            limiter.check(attacker, now).await?,
            Verdict::Allowed,
            "try {i}"
        );
        limiter.record_failure(attacker, now).await?;
    }
    // Past the free failures on either replica, the next try waits 4 s, then 8 s.
    assert_eq!(
        a.check(attacker, now).await?,
        Verdict::Wait(Duration::from_secs(4))
    );
    assert_eq!(b.check(attacker, now + 4_000).await?, Verdict::Allowed);
    b.record_failure(attacker, now + 4_000).await?;
    assert_eq!(
        a.check(attacker, now + 4_000).await?,
        Verdict::Wait(Duration::from_secs(8))
    );

    // A distributed guesser: 30 sources, one wrong code each, spends the budget.
    let before: IpAddr = [198, 51, 100, 200].into();
    b.record_failure(before, now).await?;
    assert_eq!(
        a.check(before, now).await?,
        Verdict::Allowed,
        "one free failure used"
    );
    for i in 0..30u8 {
        a.record_failure([198, 51, 100, i].into(), now).await?;
    }
    // Now a fresh source's first wrong code already starts its backoff.
    let fresh: IpAddr = "2001:db8:77::1".parse().context("ip")?;
    b.record_failure(fresh, now).await?;
    assert!(matches!(a.check(fresh, now).await?, Verdict::Wait(_)));
    // The same /64 is the same source.
    let neighbour: IpAddr = "2001:db8:77::2".parse().context("ip")?;
    assert!(matches!(b.check(neighbour, now).await?, Verdict::Wait(_)));
    Ok(())
}
