//! The etcd relay directory against a real etcd: the same relay contract the in-memory
//! directory passes, placement spread over 1,000 registrations, draining and expired
//! relays, and etcd going away and coming back.

use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::{Client, PutOptions};
use kakehashi_coordinator::RelayInfo;
use kakehashi_coordinator::backend::BackendError;
use kakehashi_coordinator::backend::etcd::{EtcdDirectoryConfig, EtcdRelayDirectory};
use kakehashi_coordinator::backend::relays::RelayDirectory;
use kakehashi_coordinator::contract;
use kakehashi_loadtest::procs::client::eventually;
use kakehashi_loadtest::services::EtcdCluster;
use kakehashi_proto::{membership, pb};
use prost::Message;

fn namespace() -> Result<String> {
    let mut r = [0u8; 6];
    getrandom::fill(&mut r).context("no randomness")?;
    Ok(format!("/kakehashi-dir-test-{}/", hex::encode(r)))
}

fn registration(r: &RelayInfo, capacity: u32, draining: bool) -> Vec<u8> {
    pb::RelayRegistration {
        relay_id: r.relay_id.clone(),
        quic_address: r.quic_addr.clone(),
        admin_url: r.admin_url.clone(),
        server_name: r.server_name.clone(),
        cert_sha256: r.cert_sha256.to_vec(),
        region: r.region.clone(),
        capacity,
        live_sessions: 0,
        load: 0.0,
        draining,
        updated_unix_ms: 0,
    }
    .encode_to_vec()
}

/// Registers `relays` under one lease, as relays would under theirs.
async fn register(
    client: &mut Client,
    ns: &str,
    relays: &[RelayInfo],
    capacity: u32,
) -> Result<i64> {
    let lease = client.lease_grant(60, None).await?.id();
    for r in relays {
        client
            .put(
                membership::relay_key(ns, &r.relay_id),
                registration(r, capacity, false),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
    }
    Ok(lease)
}

fn directory(endpoints: Vec<String>, ns: &str) -> EtcdRelayDirectory {
    let mut config = EtcdDirectoryConfig::new(endpoints);
    config.namespace = ns.to_owned();
    // The spread test places 100,000 sessions with no relay reporting; they must all
    // still count.
    config.recent_window = Duration::from_secs(3600);
    config.stale_grace = Duration::from_secs(1);
    EtcdRelayDirectory::start(config)
}

#[tokio::test]
async fn etcd_directory_passes_the_relay_contract() -> Result<()> {
    let Some(etcd) = EtcdCluster::start(1)? else {
        return Ok(());
    };
    let ns = namespace()?;
    let mut client = Client::connect(etcd.endpoints(), None).await?;
    register(&mut client, &ns, &contract::sample_relays(), 1000).await?;
    let dir = directory(etcd.endpoints(), &ns);
    dir.wait_synced(1).await;
    contract::relay_directory_places_least_loaded(&dir).await;
    contract::relay_directory_respects_avoid(&dir).await;
    Ok(())
}

#[tokio::test]
async fn etcd_directory_spreads_over_a_thousand_registrations() -> Result<()> {
    let Some(etcd) = EtcdCluster::start(1)? else {
        return Ok(());
    };
    let ns = namespace()?;
    let mut client = Client::connect(etcd.endpoints(), None).await?;
    let relays = contract::many_relays(1000);
    register(&mut client, &ns, &relays, 10_000).await?;
    let dir = directory(etcd.endpoints(), &ns);
    dir.wait_synced(1).await;
    assert_eq!(
        dir.snapshot().len(),
        1000,
        "every registration is in the view"
    );
    let ratio = contract::relay_directory_spreads_load(&dir, 1000, 100_000).await;
    println!("etcd directory: 1000 relays, 100000 sessions, max/mean = {ratio:.3}");
    Ok(())
}

#[tokio::test]
async fn draining_and_expired_relays_are_never_placed_on() -> Result<()> {
    let Some(etcd) = EtcdCluster::start(1)? else {
        return Ok(());
    };
    let ns = namespace()?;
    let mut client = Client::connect(etcd.endpoints(), None).await?;
    let relays = contract::sample_relays();
    let dir = directory(etcd.endpoints(), &ns);
    dir.wait_synced(1).await;
    assert!(
        matches!(dir.pick(None).await, Err(BackendError::NoRelays)),
        "an empty directory refuses placement"
    );

    // r1 under a lease of its own, r2 under another.
    let l1 = register(&mut client, &ns, &relays[..1], 100).await?;
    register(&mut client, &ns, &relays[1..], 100).await?;
    eventually(
        Duration::from_secs(10),
        "both relays in the view",
        || async {
            let n = dir.snapshot().len();
            if n == 2 {
                Ok(())
            } else {
                Err(format!("{n} relays"))
            }
        },
    )
    .await?;

    // r2 starts draining: only r1 takes sessions.
    client
        .put(
            membership::relay_key(&ns, &relays[1].relay_id),
            registration(&relays[1], 100, true),
            None,
        )
        .await?;
    eventually(Duration::from_secs(10), "r2 seen draining", || async {
        let draining = dir
            .snapshot()
            .iter()
            .any(|(r, _, _, d)| r.relay_id == "contract-r2" && *d);
        if draining {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .await?;
    for _ in 0..20 {
        assert_eq!(dir.pick(None).await?.relay_id, "contract-r1");
    }

    // r1's lease ends (as when a relay dies and its TTL passes): nothing is left.
    client.lease_revoke(l1).await?;
    eventually(Duration::from_secs(10), "r1 gone from the view", || async {
        let gone = !dir
            .snapshot()
            .iter()
            .any(|(r, ..)| r.relay_id == "contract-r1");
        if gone {
            Ok(())
        } else {
            Err("still there".into())
        }
    })
    .await?;
    assert!(matches!(dir.pick(None).await, Err(BackendError::NoRelays)));
    Ok(())
}

#[tokio::test]
async fn etcd_outage_makes_placement_unavailable_until_it_returns() -> Result<()> {
    let Some(mut etcd) = EtcdCluster::start(1)? else {
        return Ok(());
    };
    let ns = namespace()?;
    let mut client = Client::connect(etcd.endpoints(), None).await?;
    register(&mut client, &ns, &contract::sample_relays(), 100).await?;
    let dir = directory(etcd.endpoints(), &ns);
    dir.wait_synced(1).await;
    dir.pick(None).await?;

    etcd.stop_all();
    let err = eventually(Duration::from_secs(20), "placement refused", || async {
        match dir.pick(None).await {
            Err(e @ BackendError::DirectoryUnavailable(_)) => Ok(e),
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    assert!(
        err.to_string()
            .contains("relay directory (etcd) unavailable"),
        "{err}"
    );

    etcd.start_all()?;
    // The registrations' lease survived the restart (etcd keeps leases across one).
    eventually(Duration::from_secs(30), "placement back", || async {
        dir.pick(None).await.map(|_| ()).map_err(|e| e.to_string())
    })
    .await?;
    Ok(())
}
