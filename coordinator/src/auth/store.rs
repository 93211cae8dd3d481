//! Where API keys and tenant policies live: the [`AuthStore`] trait and its in-memory
//! implementation (the embedded default). `backend::redis::RedisAuthStore` shares them
//! between replicas; both pass the same contract (`crate::contract`).

use std::collections::HashMap;
use std::sync::Mutex;

use super::ApiKeyRecord;
use crate::backend::{BackendError, BoxFuture};
use crate::tenants::TenantSettings;
use crate::unattended::{DeviceRecord, MAX_PENDING_PER_DEVICE, PendingSession};

/// API keys by id and tenant policies by tenant.
pub trait AuthStore: Send + Sync {
    /// Stores a new key; `false` if a key with its id exists already (nothing changes).
    fn insert_key(&self, record: ApiKeyRecord) -> BoxFuture<'_, Result<bool, BackendError>>;

    fn get_key<'a>(
        &'a self,
        key_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ApiKeyRecord>, BackendError>>;

    /// Marks a key revoked at `at_ms` (a key revoked earlier keeps its first time) and
    /// returns it; `None` for an unknown key.
    fn revoke_key<'a>(
        &'a self,
        key_id: &'a str,
        at_ms: i64,
    ) -> BoxFuture<'a, Result<Option<ApiKeyRecord>, BackendError>>;

    /// The tenant's keys, revoked ones included, oldest first; at most `limit`.
    fn list_keys<'a>(
        &'a self,
        tenant: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<ApiKeyRecord>, BackendError>>;

    /// Replaces the tenant's policy.
    fn set_policy<'a>(
        &'a self,
        tenant: &'a str,
        policy: TenantSettings,
    ) -> BoxFuture<'a, Result<(), BackendError>>;

    fn get_policy<'a>(
        &'a self,
        tenant: &'a str,
    ) -> BoxFuture<'a, Result<Option<TenantSettings>, BackendError>>;

    /// Stores or replaces an enrolled device (unattended access).
    fn put_device(&self, device: DeviceRecord) -> BoxFuture<'_, Result<(), BackendError>>;

    fn get_device<'a>(
        &'a self,
        device_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<DeviceRecord>, BackendError>>;

    /// The tenant's devices, by id; at most `limit`.
    fn list_devices<'a>(
        &'a self,
        tenant: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeviceRecord>, BackendError>>;

    /// Forgets a device, its pending sessions, its last poll and its last monitoring-ticket
    /// proof; the removed record.
    fn remove_device<'a>(
        &'a self,
        device_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<DeviceRecord>, BackendError>>;

    /// Leaves a session for the device to collect; beyond [`MAX_PENDING_PER_DEVICE`]
    /// the oldest is dropped.
    fn push_pending<'a>(
        &'a self,
        device_id: &'a str,
        session: PendingSession,
    ) -> BoxFuture<'a, Result<(), BackendError>>;

    /// One accepted poll: if `timestamp_ms` is newer than the device's last accepted
    /// poll, records it and returns (and removes) the pending sessions whose code has not
    /// expired at `now_ms`, oldest first; `None` (nothing changes) for a replayed or older
    /// timestamp. Atomic, so two replicas never both accept one poll.
    fn take_pending<'a>(
        &'a self,
        device_id: &'a str,
        timestamp_ms: i64,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Option<Vec<PendingSession>>, BackendError>>;

    /// One accepted monitoring-ticket proof: if `timestamp_ms` is newer than the
    /// device's last accepted one, records it and returns `true`; `false` (nothing
    /// changes) for a replayed or older timestamp. A counter of its own, apart from
    /// [`AuthStore::take_pending`]'s, because the device's poller and its monitor are two
    /// processes signing with one clock. Atomic, like `take_pending`.
    fn accept_monitor_proof<'a>(
        &'a self,
        device_id: &'a str,
        timestamp_ms: i64,
    ) -> BoxFuture<'a, Result<bool, BackendError>>;
}

#[derive(Default)]
struct State {
    keys: HashMap<String, ApiKeyRecord>,
    policies: HashMap<String, TenantSettings>,
    devices: HashMap<String, DeviceRecord>,
    /// Per device: the last accepted poll's timestamp and the sessions waiting.
    waiting: HashMap<String, (i64, Vec<PendingSession>)>,
    /// Per device: the last accepted monitoring-ticket proof's timestamp.
    monitor_proofs: HashMap<String, i64>,
}

/// Keys and policies in this process.
#[derive(Default)]
pub struct InMemoryAuthStore {
    state: Mutex<State>,
}

impl InMemoryAuthStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every critical section is one map operation, so a poisoned map is consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl AuthStore for InMemoryAuthStore {
    fn insert_key(&self, record: ApiKeyRecord) -> BoxFuture<'_, Result<bool, BackendError>> {
        let mut state = self.lock();
        let fresh = !state.keys.contains_key(&record.key_id);
        if fresh {
            state.keys.insert(record.key_id.clone(), record);
        }
        Box::pin(async move { Ok(fresh) })
    }

    fn get_key<'a>(
        &'a self,
        key_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ApiKeyRecord>, BackendError>> {
        let found = self.lock().keys.get(key_id).cloned();
        Box::pin(async move { Ok(found) })
    }

    fn revoke_key<'a>(
        &'a self,
        key_id: &'a str,
        at_ms: i64,
    ) -> BoxFuture<'a, Result<Option<ApiKeyRecord>, BackendError>> {
        let found = self.lock().keys.get_mut(key_id).map(|k| {
            if k.revoked_at_ms == 0 {
                k.revoked_at_ms = at_ms;
            }
            k.clone()
        });
        Box::pin(async move { Ok(found) })
    }

    fn list_keys<'a>(
        &'a self,
        tenant: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<ApiKeyRecord>, BackendError>> {
        let mut keys: Vec<ApiKeyRecord> = self
            .lock()
            .keys
            .values()
            .filter(|k| k.tenant == tenant)
            .cloned()
            .collect();
        keys.sort_by(|a, b| (a.created_at_ms, &a.key_id).cmp(&(b.created_at_ms, &b.key_id)));
        keys.truncate(limit);
        Box::pin(async move { Ok(keys) })
    }

    fn set_policy<'a>(
        &'a self,
        tenant: &'a str,
        policy: TenantSettings,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        self.lock().policies.insert(tenant.to_owned(), policy);
        Box::pin(async { Ok(()) })
    }

    fn get_policy<'a>(
        &'a self,
        tenant: &'a str,
    ) -> BoxFuture<'a, Result<Option<TenantSettings>, BackendError>> {
        let found = self.lock().policies.get(tenant).cloned();
        Box::pin(async move { Ok(found) })
    }

    fn put_device(&self, device: DeviceRecord) -> BoxFuture<'_, Result<(), BackendError>> {
        self.lock().devices.insert(device.device_id.clone(), device);
        Box::pin(async { Ok(()) })
    }

    fn get_device<'a>(
        &'a self,
        device_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<DeviceRecord>, BackendError>> {
        let found = self.lock().devices.get(device_id).cloned();
        Box::pin(async move { Ok(found) })
    }

    fn list_devices<'a>(
        &'a self,
        tenant: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeviceRecord>, BackendError>> {
        let mut devices: Vec<DeviceRecord> = self
            .lock()
            .devices
            .values()
            .filter(|d| d.tenant == tenant)
            .cloned()
            .collect();
        devices.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        devices.truncate(limit);
        Box::pin(async move { Ok(devices) })
    }

    fn remove_device<'a>(
        &'a self,
        device_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<DeviceRecord>, BackendError>> {
        let mut state = self.lock();
        state.waiting.remove(device_id);
        state.monitor_proofs.remove(device_id);
        let removed = state.devices.remove(device_id);
        Box::pin(async move { Ok(removed) })
    }

    fn push_pending<'a>(
        &'a self,
        device_id: &'a str,
        session: PendingSession,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        let mut state = self.lock();
        let (_, queue) = state.waiting.entry(device_id.to_owned()).or_default();
        queue.push(session);
        if queue.len() > MAX_PENDING_PER_DEVICE {
            let excess = queue.len() - MAX_PENDING_PER_DEVICE;
            queue.drain(..excess);
        }
        Box::pin(async { Ok(()) })
    }

    fn take_pending<'a>(
        &'a self,
        device_id: &'a str,
        timestamp_ms: i64,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Option<Vec<PendingSession>>, BackendError>> {
        let mut state = self.lock();
        let (last, queue) = state.waiting.entry(device_id.to_owned()).or_default();
        let taken = (timestamp_ms > *last).then(|| {
            *last = timestamp_ms;
            let mut all = std::mem::take(queue);
            all.retain(|p| p.expires_at_ms > now_ms);
            all
        });
        Box::pin(async move { Ok(taken) })
    }

    fn accept_monitor_proof<'a>(
        &'a self,
        device_id: &'a str,
        timestamp_ms: i64,
    ) -> BoxFuture<'a, Result<bool, BackendError>> {
        let mut state = self.lock();
        let last = state
            .monitor_proofs
            .entry(device_id.to_owned())
            .or_default();
        let fresh = timestamp_ms > *last;
        if fresh {
            *last = timestamp_ms;
        }
        Box::pin(async move { Ok(fresh) })
    }
}
