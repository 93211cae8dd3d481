//! Relays as separate processes register in etcd; placement follows their leases:
//! a killed relay leaves placement when its lease expires, a restarted one comes back.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Result;
use kakehashi_loadtest::procs::client::{create_session, eventually, relay_of};
use kakehashi_loadtest::procs::{Launcher, ProcClusterBuilder};
use kakehashi_loadtest::services::EtcdCluster;

fn launcher() -> Launcher {
    Launcher::loadtest(env!("CARGO_BIN_EXE_kakehashi-loadtest"))
}

#[tokio::test]
async fn relays_join_and_leave_placement_with_their_leases() -> Result<()> {
    let Some(etcd) = EtcdCluster::start(1)? else {
        return Ok(());
    };
    let mut cluster = ProcClusterBuilder::new(launcher())
        .etcd(etcd.endpoints())
        .coordinators(1)
        .relays(2)
        .start()?;
    let url = cluster.coordinators[0].url().to_owned();

    // Both relays take sessions once their registrations reach the coordinator.
    let seen = std::sync::Mutex::new(HashSet::new());
    eventually(Duration::from_secs(20), "sessions on both relays", || {
        let url = url.clone();
        let seen = &seen;
        async move {
            let placed = create_session(&url).await.map(|r| relay_of(&r));
            let mut seen = seen.lock().map_err(|e| e.to_string())?;
            if let Ok(relay) = placed {
                seen.insert(relay);
            }
            if seen.len() == 2 {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        }
    })
    .await
    .map_err(|e| e.context(cluster.logs(30)))?;

    // relay-1 dies without a word: once its lease expires, nothing goes there.
    cluster.relays[0].proc.kill();
    let killed = std::time::Instant::now();
    eventually(
        Duration::from_secs(30),
        "placement avoids the dead relay",
        || {
            let url = url.clone();
            async move {
                for _ in 0..10 {
                    let r = create_session(&url).await.map_err(|s| s.to_string())?;
                    if relay_of(&r) == "relay-1" {
                        return Err("still placing on relay-1".into());
                    }
                }
                Ok(())
            }
        },
    )
    .await
    .map_err(|e| e.context(cluster.logs(30)))?;

    // A figure for the README (the 3 s lease plus the watch), not an assertion.
    println!(
        "dead relay out of placement after {:.1} s",
        killed.elapsed().as_secs_f64()
    );

    // Back with a new lease (and new ports): it takes sessions again.
    cluster.relays[0].proc.restart()?;
    eventually(
        Duration::from_secs(30),
        "placement returns to the restarted relay",
        || {
            let url = url.clone();
            async move {
                let r = create_session(&url).await.map_err(|s| s.to_string())?;
                if relay_of(&r) == "relay-1" {
                    Ok(())
                } else {
                    Err(relay_of(&r))
                }
            }
        },
    )
    .await
    .map_err(|e| e.context(cluster.logs(30)))?;
    Ok(())
}
