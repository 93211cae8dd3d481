//! The behaviour every backend implementation must show, as plain async functions that
//! panic on a violation. This crate runs them against the in-memory backends; the Redis
//! and etcd backends run the same functions against real servers.
//!
//! Each function takes fresh-enough backends: it uses random session ids and tenants so
//! several can share one server. [`relay_directory_places_least_loaded`] needs a
//! directory holding exactly the relays of [`sample_relays`] with no sessions placed.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kakehashi_proto::{Mode, Permissions, SessionId, pb};

use crate::backend::codes::CodeStore;
use crate::backend::events::EventBus;
use crate::backend::relays::{RelayDirectory, RelayInfo};
use crate::backend::sessions::{ListFilter, SessionRecord, SessionStore};
use crate::config::Backends;
use crate::random;

/// Two relays for directory tests.
pub fn sample_relays() -> Vec<RelayInfo> {
    (1..=2)
        .map(|i| RelayInfo {
            relay_id: format!("contract-r{i}"),
            quic_addr: format!("127.0.0.1:{}", 4430 + i),
            admin_url: format!("http://127.0.0.1:{}", 4440 + i),
            server_name: "localhost".into(),
            cert_sha256: [i as u8; 32],
            region: "test".into(),
        })
        .collect()
}

fn fresh_id() -> SessionId {
    SessionId::from_bytes(random::bytes::<16>().expect("OS randomness"))
}

fn fresh_tenant() -> String {
    format!(
        "tenant-{}",
        hex::encode(random::bytes::<6>().expect("OS randomness"))
    )
}

/// A waiting session record for store tests.
pub fn sample_record(id: SessionId, tenant: &str, created_at_ms: i64) -> SessionRecord {
    SessionRecord {
        id,
        version: 0,
        tenant: tenant.to_owned(),
        operator: "op".into(),
        mode: Mode::Control,
        permissions: Permissions::VIEW | Permissions::CONTROL,
        state: pb::SessionState::Waiting,
        relay: sample_relays().remove(0),
        created_at_ms,
        deadline_ms: created_at_ms + 60_000,
        code_expires_at_ms: created_at_ms + 30_000,
        code: "000000".into(),
        granted: Permissions::NONE,
        end_reason: pb::EndReason::Unspecified,
        end_detail: String::new(),
        ended_at_ms: 0,
        ticket_sha256: [7; 32],
        host_participant: None,
    }
}

/// Codes have at least the asked length and a valid check digit, are unique among live
/// codes, and redeem exactly once.
pub async fn code_store_allocates_and_redeems_once(codes: &dyn CodeStore) {
    let ttl = Duration::from_secs(60);
    let mut seen = std::collections::HashSet::new();
    let mut issued = Vec::new();
    for _ in 0..50 {
        let id = fresh_id();
        let code = codes.allocate(id, 6, ttl).await.expect("allocate");
        assert!(
            code.len() >= 6,
            "code {code:?} has at least the asked length"
        );
        assert!(
            crate::backend::codes::is_well_formed(&code),
            "code {code:?} ends in a valid check digit"
        );
        assert!(
            code.bytes().all(|b| b.is_ascii_digit()),
            "code {code:?} is numeric"
        );
        assert!(
            seen.insert(code.clone()),
            "code {code:?} is unique among live codes"
        );
        issued.push((code, id));
    }
    for (code, id) in &issued {
        assert_eq!(codes.redeem(code).await.expect("redeem"), Some(*id));
        assert_eq!(
            codes.redeem(code).await.expect("redeem again"),
            None,
            "single use"
        );
    }
}

/// Under concurrent redeems of one code, exactly one caller gets the session.
pub async fn code_store_concurrent_redeem_has_one_winner(codes: Arc<dyn CodeStore>) {
    let id = fresh_id();
    let code = codes
        .allocate(id, 8, Duration::from_secs(60))
        .await
        .expect("allocate");
    let attempts = (0..16).map(|_| {
        let codes = codes.clone();
        let code = code.clone();
        async move { codes.redeem(&code).await.expect("redeem") }
    });
    let results = futures::future::join_all(attempts).await;
    let winners: Vec<_> = results.into_iter().flatten().collect();
    assert_eq!(winners, vec![id], "exactly one redeem wins");
}

/// Expired and revoked codes redeem to nothing; unknown codes too.
pub async fn code_store_expired_and_revoked_codes_are_gone(codes: &dyn CodeStore) {
    let expired = codes
        .allocate(fresh_id(), 6, Duration::ZERO)
        .await
        .expect("allocate");
    assert_eq!(codes.redeem(&expired).await.expect("redeem"), None);
    let revoked = codes
        .allocate(fresh_id(), 6, Duration::from_secs(60))
        .await
        .expect("allocate");
    codes.revoke(&revoked).await.expect("revoke");
    assert_eq!(codes.redeem(&revoked).await.expect("redeem"), None);
    codes
        .revoke("123456789012")
        .await
        .expect("revoking an unknown code is fine");
    codes.purge_expired().await.expect("purge");
    assert!(
        codes
            .allocate(fresh_id(), 3, Duration::from_secs(1))
            .await
            .is_err(),
        "code lengths outside 4..=12 are refused"
    );
}

/// Insert never overwrites; compare-and-swap writes only at the expected version.
pub async fn session_store_insert_get_and_cas(sessions: &dyn SessionStore) {
    let id = fresh_id();
    let record = sample_record(id, &fresh_tenant(), 1_000);
    assert_eq!(sessions.get(id).await.expect("get"), None);
    sessions.insert(record.clone()).await.expect("insert");
    assert!(
        sessions.insert(record.clone()).await.is_err(),
        "insert never overwrites"
    );
    assert_eq!(sessions.get(id).await.expect("get"), Some(record.clone()));

    let mut changed = record.clone();
    changed.state = pb::SessionState::Joined;
    changed.host_participant = Some(9);
    assert!(
        sessions
            .compare_and_swap(0, changed.clone())
            .await
            .expect("cas")
    );
    let stored = sessions.get(id).await.expect("get").expect("present");
    assert_eq!(stored.version, 1);
    assert_eq!(stored.state, pb::SessionState::Joined);
    assert_eq!(stored.host_participant, Some(9));

    let mut stale = record.clone();
    stale.state = pb::SessionState::Ended;
    assert!(
        !sessions.compare_and_swap(0, stale).await.expect("cas"),
        "a stale version is refused"
    );
    assert_eq!(
        sessions.get(id).await.expect("get").expect("present").state,
        pb::SessionState::Joined
    );
    let missing = sample_record(fresh_id(), "t", 0);
    assert!(
        !sessions
            .compare_and_swap(0, missing)
            .await
            .expect("cas on a missing record")
    );
}

/// `list` filters by tenant and liveness, orders newest first and honours the limit;
/// `due` finds sessions past their deadline or with an expired code while waiting.
pub async fn session_store_list_and_due(sessions: &dyn SessionStore) {
    let tenant = fresh_tenant();
    let other = fresh_tenant();
    let mut ids = Vec::new();
    for created in [100, 300, 200] {
        let id = fresh_id();
        sessions
            .insert(sample_record(id, &tenant, created))
            .await
            .expect("insert");
        ids.push((created, id));
    }
    sessions
        .insert(sample_record(fresh_id(), &other, 400))
        .await
        .expect("insert");
    let mut ended = sample_record(fresh_id(), &tenant, 500);
    ended.state = pb::SessionState::Ended;
    ended.ended_at_ms = 600;
    sessions.insert(ended.clone()).await.expect("insert");

    let live = sessions
        .list(ListFilter {
            tenant: Some(tenant.clone()),
            include_ended: false,
            limit: 10,
        })
        .await
        .expect("list");
    let order: Vec<i64> = live.iter().map(|r| r.created_at_ms).collect();
    assert_eq!(
        order,
        vec![300, 200, 100],
        "live sessions of the tenant, newest first"
    );

    let all = sessions
        .list(ListFilter {
            tenant: Some(tenant.clone()),
            include_ended: true,
            limit: 2,
        })
        .await
        .expect("list");
    let order: Vec<i64> = all.iter().map(|r| r.created_at_ms).collect();
    assert_eq!(order, vec![500, 300], "ended included, limit honoured");

    // At 100 + 30_000 the oldest session's code has expired while it still waits; at
    // 100 + 60_000 its deadline has passed. The ended session is never due.
    let due = sessions.due(100 + 30_000, 1000).await.expect("due");
    assert!(
        due.contains(&ids[0].1),
        "waiting session with an expired code is due"
    );
    assert!(!due.contains(&ended.id), "ended sessions are never due");
    let due = sessions.due(99, 1000).await.expect("due");
    assert!(
        !due.iter().any(|id| ids.iter().any(|(_, x)| x == id)),
        "nothing due early"
    );

    // Purging removes only records that ended before the cut-off.
    let purged = sessions.purge_ended(600, 1000).await.expect("purge");
    assert!(
        !purged.contains(&ended.id),
        "ended exactly at the cut-off is kept"
    );
    let purged = sessions.purge_ended(601, 1000).await.expect("purge");
    assert!(purged.contains(&ended.id));
    assert!(
        !purged.iter().any(|id| ids.iter().any(|(_, x)| x == id)),
        "live records stay"
    );
    assert_eq!(sessions.get(ended.id).await.expect("get"), None);
    assert!(sessions.get(ids[0].1).await.expect("get").is_some());
}

fn event(session: SessionId, kind: pb::EventKind) -> pb::SessionEvent {
    pb::SessionEvent {
        session_id: session.to_string(),
        seq: 0,
        at_unix_ms: 1,
        kind: kind as i32,
        ..Default::default()
    }
}

/// Seq starts at 1 per session; subscribers replay from the start, then follow live.
pub async fn event_bus_orders_replays_and_follows(events: &dyn EventBus) {
    let a = fresh_id();
    let b = fresh_id();
    let first = events
        .publish(event(a, pb::EventKind::Created))
        .await
        .expect("publish");
    assert_eq!(first.seq, 1);
    let other = events
        .publish(event(b, pb::EventKind::Created))
        .await
        .expect("publish");
    assert_eq!(other.seq, 1, "seq is per session");
    let second = events
        .publish(event(a, pb::EventKind::CodeEntered))
        .await
        .expect("publish");
    assert_eq!(second.seq, 2);

    let mut stream = events.subscribe(a).await.expect("subscribe");
    let replayed: Vec<u64> = stream
        .by_ref()
        .take(2)
        .map(|e| e.expect("event").seq)
        .collect()
        .await;
    assert_eq!(replayed, vec![1, 2], "replay from the start");

    events
        .publish(event(a, pb::EventKind::Ended))
        .await
        .expect("publish");
    let live = stream.next().await.expect("stream open").expect("event");
    assert_eq!((live.seq, live.kind), (3, pb::EventKind::Ended as i32));

    let log = events.read(a).await.expect("read");
    let seqs: Vec<u64> = log.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3], "read is the whole log, in order");
    assert_eq!(log[0].kind, pb::EventKind::Created as i32);
    assert_eq!(log[2].kind, pb::EventKind::Ended as i32);
    assert!(
        events.read(fresh_id()).await.expect("read").is_empty(),
        "an unknown session has an empty log"
    );
    let mut late = events.subscribe(a).await.expect("subscribe");
    for want in 1..=3 {
        let got = late.next().await.expect("stream open").expect("event");
        assert_eq!(got.seq, want, "a late subscriber sees everything in order");
    }

    // A forgotten log starts over; other sessions keep theirs.
    events.forget(a).await.expect("forget");
    let restarted = events
        .publish(event(a, pb::EventKind::Created))
        .await
        .expect("publish");
    assert_eq!(restarted.seq, 1);
    let next_b = events
        .publish(event(b, pb::EventKind::Ended))
        .await
        .expect("publish");
    assert_eq!(next_b.seq, 2);
}

/// Placement goes to the relay with the fewest live sessions; release frees a place.
pub async fn relay_directory_places_least_loaded(relays: &dyn RelayDirectory) {
    let known = relays.list().await.expect("list");
    let ids: Vec<String> = known.iter().map(|r| r.relay_id.clone()).collect();
    assert_eq!(ids, vec!["contract-r1", "contract-r2"]);
    let first = relays.pick(None).await.expect("pick").relay_id;
    let second = relays.pick(None).await.expect("pick").relay_id;
    assert_ne!(
        first, second,
        "the second session goes to the emptier relay"
    );
    relays.release(&first).await.expect("release");
    assert_eq!(
        relays.pick(None).await.expect("pick").relay_id,
        first,
        "freed place is reused"
    );
}

/// `n` relays for spread tests: ids `spread-r0000`…, one region, a distinct cert each.
pub fn many_relays(n: usize) -> Vec<RelayInfo> {
    (0..n)
        .map(|i| RelayInfo {
            relay_id: format!("spread-r{i:04}"),
            quic_addr: format!("127.0.0.1:{}", 10_000 + i),
            admin_url: format!("http://127.0.0.1:{}", 20_000 + i),
            server_name: "localhost".into(),
            cert_sha256: [(i % 251) as u8; 32],
            region: "test".into(),
        })
        .collect()
}

/// Never places on the avoided relay; with only the avoided relay left, refuses.
pub async fn relay_directory_respects_avoid(relays: &dyn RelayDirectory) {
    for _ in 0..20 {
        let got = relays.pick(Some("contract-r1")).await.expect("pick");
        assert_eq!(
            got.relay_id, "contract-r2",
            "the avoided relay is never chosen"
        );
        relays.release(&got.relay_id).await.expect("release");
    }
}

/// Places `picks` sessions on a directory holding exactly `relay_count` equal relays
/// (e.g. [`many_relays`]) with nothing placed, and returns max/mean sessions per relay.
/// Every relay must get some, and the ratio must stay close to 1.
pub async fn relay_directory_spreads_load(
    relays: &dyn RelayDirectory,
    relay_count: usize,
    picks: usize,
) -> f64 {
    let mut per: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for _ in 0..picks {
        let r = relays.pick(None).await.expect("pick");
        *per.entry(r.relay_id).or_default() += 1;
    }
    assert_eq!(per.len(), relay_count, "every relay gets sessions");
    let max = per.values().copied().max().unwrap_or(0) as f64;
    let mean = picks as f64 / relay_count as f64;
    let ratio = max / mean;
    assert!(ratio < 1.25, "max/mean load {ratio:.3} is far from 1");
    for (id, n) in &per {
        for _ in 0..*n {
            relays.release(id).await.expect("release");
        }
    }
    ratio
}

/// Runs every contract function on one set of backends whose relay directory holds
/// [`sample_relays`].
pub async fn run_all(backends: &Backends) {
    code_store_allocates_and_redeems_once(backends.codes.as_ref()).await;
    code_store_concurrent_redeem_has_one_winner(backends.codes.clone()).await;
    code_store_expired_and_revoked_codes_are_gone(backends.codes.as_ref()).await;
    session_store_insert_get_and_cas(backends.sessions.as_ref()).await;
    session_store_list_and_due(backends.sessions.as_ref()).await;
    event_bus_orders_replays_and_follows(backends.events.as_ref()).await;
    relay_directory_places_least_loaded(backends.relays.as_ref()).await;
    relay_directory_respects_avoid(backends.relays.as_ref()).await;
    auth_store_keys_insert_get_revoke_list(backends.auth.as_ref()).await;
    auth_store_policies_replace(backends.auth.as_ref()).await;
    auth_store_devices_and_pending_sessions(backends.auth.as_ref()).await;
}

/// Keys insert once (a second insert of the same id changes nothing), read back whole,
/// revoke once (the first revocation time stays), and list per tenant, oldest first,
/// revoked ones included, bounded by the limit.
pub async fn auth_store_keys_insert_get_revoke_list(store: &dyn crate::auth::AuthStore) {
    use crate::auth::{Role, new_key};
    let tenant = fresh_tenant();
    let other = fresh_tenant();
    let a = new_key(
        tenant.clone(),
        Role::Operator,
        "alice".into(),
        vec!["tier1".into(), "night shift".into()],
        1_000,
    )
    .expect("randomness")
    .record;
    let b = new_key(tenant.clone(), Role::Auditor, "bob".into(), vec![], 2_000)
        .expect("randomness")
        .record;
    let c = new_key(other.clone(), Role::Admin, "carol".into(), vec![], 1_500)
        .expect("randomness")
        .record;
    for k in [&a, &b, &c] {
        assert!(
            store.insert_key(k.clone()).await.expect("insert"),
            "fresh id"
        );
    }
    let mut clash = a.clone();
    clash.tenant = other.clone();
    assert!(
        !store.insert_key(clash).await.expect("insert again"),
        "an existing id is not overwritten"
    );
    assert_eq!(
        store.get_key(&a.key_id).await.expect("get"),
        Some(a.clone())
    );
    assert_eq!(store.get_key("0123456789abcdef").await.expect("get"), None);

    let listed = store.list_keys(&tenant, 100).await.expect("list");
    assert_eq!(
        listed,
        vec![a.clone(), b.clone()],
        "own tenant only, oldest first"
    );
    assert_eq!(store.list_keys(&tenant, 1).await.expect("list").len(), 1);
    assert_eq!(store.list_keys(&other, 100).await.expect("list"), vec![c]);

    let revoked = store
        .revoke_key(&a.key_id, 5_000)
        .await
        .expect("revoke")
        .expect("known key");
    assert_eq!(revoked.revoked_at_ms, 5_000);
    let again = store
        .revoke_key(&a.key_id, 9_000)
        .await
        .expect("revoke again")
        .expect("known key");
    assert_eq!(
        again.revoked_at_ms, 5_000,
        "the first revocation time stays"
    );
    assert!(
        store
            .get_key(&a.key_id)
            .await
            .expect("get")
            .expect("kept")
            .is_revoked()
    );
    assert_eq!(
        store
            .revoke_key("fedcba9876543210", 1)
            .await
            .expect("revoke"),
        None,
        "unknown key"
    );
    assert_eq!(
        store.list_keys(&tenant, 100).await.expect("list").len(),
        2,
        "revoked keys are still listed"
    );
}

/// A tenant's policy reads back as set, a new one replaces it, tenants do not share.
pub async fn auth_store_policies_replace(store: &dyn crate::auth::AuthStore) {
    use crate::tenants::TenantSettings;
    let tenant = fresh_tenant();
    assert_eq!(store.get_policy(&tenant).await.expect("get"), None);
    let first = TenantSettings {
        max_duration_secs: Some(2400),
        default_duration_secs: Some(600),
        allowed_modes: vec![Mode::View as u8],
        recording_enabled: true,
        unattended_enabled: false,
        monitoring_enabled: true,
    };
    store.set_policy(&tenant, first.clone()).await.expect("set");
    assert_eq!(store.get_policy(&tenant).await.expect("get"), Some(first));
    let second = TenantSettings::default();
    store
        .set_policy(&tenant, second.clone())
        .await
        .expect("set");
    assert_eq!(store.get_policy(&tenant).await.expect("get"), Some(second));
    assert_eq!(store.get_policy(&fresh_tenant()).await.expect("get"), None);
}

/// Devices put, read, list per tenant and remove; pending sessions are taken once, only
/// by a poll newer than the last accepted one, without expired entries, at most
/// `MAX_PENDING_PER_DEVICE` (the newest) kept.
pub async fn auth_store_devices_and_pending_sessions(store: &dyn crate::auth::AuthStore) {
    use crate::unattended::{DeviceRecord, MAX_PENDING_PER_DEVICE, PendingSession};
    let tenant = fresh_tenant();
    let other = fresh_tenant();
    let device = |n: u8, tenant: &str| DeviceRecord {
        device_id: format!("{}{n:02x}", &tenant_suffix(tenant)),
        tenant: tenant.to_owned(),
        name: format!("pc-{n}"),
        public_key: [n; 32],
        blocked: false,
        allowed_operators: vec!["alice".into()],
        denied_operators: vec![],
        enrolled_at_ms: 1000 + i64::from(n),
        monitoring: n == 1,
    };
    let (a, b, c) = (device(1, &tenant), device(2, &tenant), device(3, &other));
    assert_eq!(store.get_device(&a.device_id).await.expect("get"), None);
    for d in [&b, &a, &c] {
        store.put_device(d.clone()).await.expect("put");
    }
    assert_eq!(
        store.get_device(&a.device_id).await.expect("get"),
        Some(a.clone())
    );
    assert!(
        store
            .get_device(&a.device_id)
            .await
            .expect("get")
            .is_some_and(|d| d.monitoring),
        "the monitoring flag round-trips"
    );
    let mut blocked = a.clone();
    blocked.blocked = true;
    blocked.denied_operators = vec!["mallory".into()];
    blocked.monitoring = false;
    store.put_device(blocked.clone()).await.expect("replace");
    assert_eq!(
        store.get_device(&a.device_id).await.expect("get"),
        Some(blocked.clone()),
        "a replaced record turns monitoring off"
    );
    assert_eq!(
        store.list_devices(&tenant, 10).await.expect("list"),
        vec![blocked.clone(), b.clone()]
    );
    assert_eq!(store.list_devices(&tenant, 1).await.expect("list").len(), 1);
    assert_eq!(
        store.list_devices(&other, 10).await.expect("list"),
        vec![c.clone()]
    );

    let pending = |n: usize, expires_at_ms: i64| PendingSession {
        session_id: format!("s{n}"),
        code: format!("{n:07}"),
        operator: "alice".into(),
        mode: 2,
        permissions: 3,
        expires_at_ms,
    };
    let far = crate::service::now_ms() + 600_000;
    store
        .push_pending(&b.device_id, pending(1, far))
        .await
        .expect("push");
    store
        .push_pending(&b.device_id, pending(2, 1))
        .await
        .expect("push");
    store
        .push_pending(&b.device_id, pending(3, far))
        .await
        .expect("push");
    let now = crate::service::now_ms();
    let taken = store
        .take_pending(&b.device_id, 5000, now)
        .await
        .expect("take");
    assert_eq!(
        taken,
        Some(vec![pending(1, far), pending(3, far)]),
        "expired entry dropped"
    );
    assert_eq!(
        store
            .take_pending(&b.device_id, 5000, now)
            .await
            .expect("take"),
        None,
        "the same timestamp again is a replay"
    );
    assert_eq!(
        store
            .take_pending(&b.device_id, 4999, now)
            .await
            .expect("take"),
        None
    );
    assert_eq!(
        store
            .take_pending(&b.device_id, 5001, now)
            .await
            .expect("take"),
        Some(vec![]),
        "each session is handed out once"
    );
    for n in 0..MAX_PENDING_PER_DEVICE + 3 {
        store
            .push_pending(&b.device_id, pending(n, far))
            .await
            .expect("push");
    }
    let kept = store
        .take_pending(&b.device_id, 6000, now)
        .await
        .expect("take")
        .expect("fresh timestamp");
    assert_eq!(kept.len(), MAX_PENDING_PER_DEVICE);
    assert_eq!(kept[0], pending(3, far), "the oldest are pushed out");

    // Monitoring-ticket proofs count apart from polls: the same timestamp as an accepted
    // poll is fresh here, then a replay here, and polls do not notice either.
    let accept = |ts: i64| store.accept_monitor_proof(&b.device_id, ts);
    assert!(accept(6000).await.expect("accept"), "apart from the poll's");
    assert!(!accept(6000).await.expect("accept"), "a replay");
    assert!(!accept(5999).await.expect("accept"), "older");
    assert!(accept(6001).await.expect("accept"));
    assert_eq!(
        store
            .take_pending(&b.device_id, 6001, now)
            .await
            .expect("take"),
        Some(vec![]),
        "a monitoring proof does not advance the poll's counter"
    );

    assert_eq!(
        store.remove_device(&b.device_id).await.expect("remove"),
        Some(b.clone())
    );
    assert_eq!(store.get_device(&b.device_id).await.expect("get"), None);
    assert_eq!(
        store.remove_device(&b.device_id).await.expect("remove"),
        None
    );
    assert!(
        store
            .accept_monitor_proof(&b.device_id, 1)
            .await
            .expect("accept"),
        "removing a device forgets its last monitoring proof"
    );
    assert_eq!(
        store.list_devices(&tenant, 10).await.expect("list"),
        vec![blocked]
    );
}

/// 30 hex digits unique to the test tenant, so device ids of parallel runs differ.
fn tenant_suffix(tenant: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(tenant.as_bytes()))[..30].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_memory_backends_pass_the_contract() {
        run_all(&Backends::in_memory(sample_relays())).await;
    }

    #[tokio::test]
    async fn in_memory_directory_spreads_over_a_thousand_relays() {
        let dir = crate::backend::relays::StaticRelayDirectory::new(many_relays(1000));
        let ratio = relay_directory_spreads_load(&dir, 1000, 100_000).await;
        println!("static directory: 1000 relays, 100000 sessions, max/mean = {ratio:.3}");
    }

    #[tokio::test]
    async fn an_empty_directory_refuses_placement() {
        let backends = Backends::in_memory(Vec::new());
        assert!(matches!(
            backends.relays.pick(None).await,
            Err(crate::backend::BackendError::NoRelays)
        ));
    }
}
