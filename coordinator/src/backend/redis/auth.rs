//! API keys and tenant policies in Redis.
//!
//! - `NS:{ak:KEY_ID}` — a key's hash (tenant, role, name, groups, secret digest,
//!   created, revoked); written by single-key scripts, never deleted (a revoked key
//!   stays revoked).
//! - `NS:{akt:TENANT}` — sorted set of the tenant's key ids by creation time, for
//!   listing; updated after the key's hash, and readers skip ids whose hash is missing.
//! - `NS:{tp:TENANT}` — the tenant's policy, as JSON.
//! - `NS:{dev:DEVICE_ID}` — an enrolled device, as JSON; `NS:{dev:DEVICE_ID}:pending`
//!   its waiting sessions (a list of JSON, oldest first, expiring with the newest code)
//!   and `NS:{dev:DEVICE_ID}:poll` its last accepted poll timestamp. One hash tag, so the
//!   take script sees all three on one node. `NS:{dev:DEVICE_ID}:monitor` is the last
//!   accepted monitoring-ticket proof's timestamp (a counter apart from the poll's).
//! - `NS:{devt:TENANT}` — set of the tenant's device ids, for listing; readers skip ids
//!   whose record is missing or names another tenant.

use std::collections::HashMap;

use redis::{AsyncCommands, Script};

use super::Shared;
use crate::auth::{ApiKeyRecord, AuthStore, Role};
use crate::backend::{BackendError, BoxFuture};
use crate::tenants::TenantSettings;
use crate::unattended::{DeviceRecord, MAX_PENDING_PER_DEVICE, PendingSession};

/// KEYS[1] = pending list; ARGV[1] = entry, ARGV[2] = most entries, ARGV[3] = TTL ms.
const PUSH_SCRIPT: &str = r"
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
local ttl = tonumber(ARGV[3])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
";

/// KEYS[1] = last poll, KEYS[2] = pending list; ARGV[1] = poll timestamp. Returns
/// false for a timestamp not newer than the last, else the entries (now removed).
const TAKE_SCRIPT: &str = r"
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) <= last then return false end
redis.call('SET', KEYS[1], ARGV[1])
local items = redis.call('LRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[2])
return {1, items}
";

/// KEYS[1] = last monitoring-ticket proof; ARGV[1] = its timestamp. 1 if newer (and
/// now recorded), 0 for a replayed or older one.
const MONITOR_PROOF_SCRIPT: &str = r"
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) <= last then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
";

const INSERT_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
";

/// ARGV[1] = revocation time; a key revoked before keeps its time.
const REVOKE_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[1], 'revoked') == '0' then
  redis.call('HSET', KEYS[1], 'revoked', ARGV[1])
end
return 1
";

/// The Redis auth store.
pub struct RedisAuthStore {
    shared: Shared,
    insert: Script,
    revoke: Script,
    push: Script,
    take: Script,
    monitor_proof: Script,
}

fn unreadable(what: &str, detail: impl std::fmt::Display) -> BackendError {
    BackendError::Unavailable {
        backend: super::BACKEND,
        detail: format!("stored {what} is unreadable: {detail}"),
    }
}

impl RedisAuthStore {
    pub fn new(shared: Shared) -> Self {
        Self {
            shared,
            insert: Script::new(INSERT_SCRIPT),
            revoke: Script::new(REVOKE_SCRIPT),
            push: Script::new(PUSH_SCRIPT),
            take: Script::new(TAKE_SCRIPT),
            monitor_proof: Script::new(MONITOR_PROOF_SCRIPT),
        }
    }

    fn device_key(&self, device_id: &str, suffix: &str) -> String {
        self.shared.key(&format!("dev:{device_id}"), suffix)
    }

    fn device_index_key(&self, tenant: &str) -> String {
        self.shared.key(&format!("devt:{tenant}"), "")
    }

    async fn read_device(&self, device_id: &str) -> Result<Option<DeviceRecord>, BackendError> {
        self.get_json(self.device_key(device_id, ""), "reading a device", || {
            format!("device {device_id}")
        })
        .await
    }

    /// The JSON value at `key`, if any; `what` names it when it does not decode.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: String,
        doing: &'static str,
        what: impl FnOnce() -> String,
    ) -> Result<Option<T>, BackendError> {
        let json: Option<String> = self
            .shared
            .run(doing, |mut c| async move { c.get(&key).await })
            .await?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| unreadable(&what(), e)))
            .transpose()
    }

    fn key_key(&self, key_id: &str) -> String {
        self.shared.key(&format!("ak:{key_id}"), "")
    }

    fn index_key(&self, tenant: &str) -> String {
        self.shared.key(&format!("akt:{tenant}"), "")
    }

    fn policy_key(&self, tenant: &str) -> String {
        self.shared.key(&format!("tp:{tenant}"), "")
    }

    fn decode(key_id: &str, h: HashMap<String, String>) -> Result<ApiKeyRecord, BackendError> {
        let what = format!("API key {key_id}");
        let field = |name: &str| {
            h.get(name)
                .cloned()
                .ok_or_else(|| unreadable(&what, format!("no field {name}")))
        };
        let int = |name: &str| -> Result<i64, BackendError> {
            field(name)?
                .parse()
                .map_err(|e| unreadable(&what, format!("{name}: {e}")))
        };
        let role_name = field("role")?;
        let role = Role::from_name(&role_name)
            .ok_or_else(|| unreadable(&what, format!("role {role_name:?}")))?;
        let groups: Vec<String> = serde_json::from_str(&field("groups")?)
            .map_err(|e| unreadable(&what, format!("groups: {e}")))?;
        let mut secret_sha256 = [0u8; 32];
        hex::decode_to_slice(field("secret")?, &mut secret_sha256)
            .map_err(|e| unreadable(&what, format!("secret digest: {e}")))?;
        Ok(ApiKeyRecord {
            key_id: key_id.to_owned(),
            tenant: field("tenant")?,
            role,
            name: field("name")?,
            groups,
            secret_sha256,
            created_at_ms: int("created")?,
            revoked_at_ms: int("revoked")?,
        })
    }

    async fn read_key(&self, key_id: &str) -> Result<Option<ApiKeyRecord>, BackendError> {
        let key = self.key_key(key_id);
        let h: HashMap<String, String> = self
            .shared
            .run("reading an API key", |mut c| async move {
                c.hgetall(&key).await
            })
            .await?;
        if h.is_empty() {
            return Ok(None);
        }
        Self::decode(key_id, h).map(Some)
    }
}

impl AuthStore for RedisAuthStore {
    fn insert_key(&self, record: ApiKeyRecord) -> BoxFuture<'_, Result<bool, BackendError>> {
        Box::pin(async move {
            let groups = serde_json::to_string(&record.groups)
                .map_err(|e| unreadable("API key groups", e))?;
            let fields = [
                ("tenant", record.tenant.clone()),
                ("role", record.role.name().to_owned()),
                ("name", record.name.clone()),
                ("groups", groups),
                ("secret", hex::encode(record.secret_sha256)),
                ("created", record.created_at_ms.to_string()),
                ("revoked", record.revoked_at_ms.to_string()),
            ];
            let key = self.key_key(&record.key_id);
            let script = &self.insert;
            let inserted: i64 = self
                .shared
                .run("storing an API key", |mut c| async move {
                    let mut inv = script.key(&key);
                    for (f, v) in &fields {
                        inv.arg(*f).arg(v);
                    }
                    inv.invoke_async(&mut c).await
                })
                .await?;
            if inserted == 0 {
                return Ok(false);
            }
            let index = self.index_key(&record.tenant);
            let (score, member) = (record.created_at_ms, record.key_id.clone());
            let _: i64 = self
                .shared
                .run("indexing an API key", |mut c| async move {
                    c.zadd(&index, member, score).await
                })
                .await?;
            Ok(true)
        })
    }

    fn get_key<'a>(
        &'a self,
        key_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ApiKeyRecord>, BackendError>> {
        Box::pin(self.read_key(key_id))
    }

    fn revoke_key<'a>(
        &'a self,
        key_id: &'a str,
        at_ms: i64,
    ) -> BoxFuture<'a, Result<Option<ApiKeyRecord>, BackendError>> {
        Box::pin(async move {
            let key = self.key_key(key_id);
            let script = &self.revoke;
            let found: i64 = self
                .shared
                .run("revoking an API key", |mut c| async move {
                    script.key(&key).arg(at_ms).invoke_async(&mut c).await
                })
                .await?;
            if found == 0 {
                return Ok(None);
            }
            self.read_key(key_id).await
        })
    }

    fn list_keys<'a>(
        &'a self,
        tenant: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<ApiKeyRecord>, BackendError>> {
        Box::pin(async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let index = self.index_key(tenant);
            let stop = isize::try_from(limit).unwrap_or(isize::MAX) - 1;
            let ids: Vec<String> = self
                .shared
                .run("listing API keys", |mut c| async move {
                    c.zrange(&index, 0, stop).await
                })
                .await?;
            let mut keys = Vec::with_capacity(ids.len());
            for id in ids {
                // Only records that still say this tenant: the index may lag its records.
                if let Some(record) = self.read_key(&id).await?
                    && record.tenant == tenant
                {
                    keys.push(record);
                }
            }
            Ok(keys)
        })
    }

    fn set_policy<'a>(
        &'a self,
        tenant: &'a str,
        policy: TenantSettings,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let json =
                serde_json::to_string(&policy).map_err(|e| unreadable("tenant policy", e))?;
            let key = self.policy_key(tenant);
            self.shared
                .run("storing a tenant policy", |mut c| async move {
                    c.set::<_, _, ()>(&key, json).await
                })
                .await
        })
    }

    fn get_policy<'a>(
        &'a self,
        tenant: &'a str,
    ) -> BoxFuture<'a, Result<Option<TenantSettings>, BackendError>> {
        Box::pin(self.get_json(
            self.policy_key(tenant),
            "reading a tenant policy",
            move || format!("policy of tenant {tenant:?}"),
        ))
    }

    fn put_device(&self, device: DeviceRecord) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let json = serde_json::to_string(&device).map_err(|e| unreadable("device", e))?;
            let key = self.device_key(&device.device_id, "");
            self.shared
                .run("storing a device", |mut c| async move {
                    c.set::<_, _, ()>(&key, json).await
                })
                .await?;
            let index = self.device_index_key(&device.tenant);
            let member = device.device_id.clone();
            self.shared
                .run("indexing a device", |mut c| async move {
                    c.sadd::<_, _, ()>(&index, member).await
                })
                .await
        })
    }

    fn get_device<'a>(
        &'a self,
        device_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<DeviceRecord>, BackendError>> {
        Box::pin(self.read_device(device_id))
    }

    fn list_devices<'a>(
        &'a self,
        tenant: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeviceRecord>, BackendError>> {
        Box::pin(async move {
            let index = self.device_index_key(tenant);
            let mut ids: Vec<String> = self
                .shared
                .run("listing devices", |mut c| async move {
                    c.smembers(&index).await
                })
                .await?;
            ids.sort();
            let mut devices = Vec::new();
            for id in ids {
                if devices.len() >= limit {
                    break;
                }
                if let Some(d) = self.read_device(&id).await?
                    && d.tenant == tenant
                {
                    devices.push(d);
                }
            }
            Ok(devices)
        })
    }

    fn remove_device<'a>(
        &'a self,
        device_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<DeviceRecord>, BackendError>> {
        Box::pin(async move {
            let Some(device) = self.read_device(device_id).await? else {
                return Ok(None);
            };
            let keys = [
                self.device_key(device_id, ""),
                self.device_key(device_id, ":pending"),
                self.device_key(device_id, ":poll"),
                self.device_key(device_id, ":monitor"),
            ];
            self.shared
                .run("removing a device", |mut c| async move {
                    c.del::<_, ()>(&keys[..]).await
                })
                .await?;
            let index = self.device_index_key(&device.tenant);
            let member = device_id.to_owned();
            self.shared
                .run("unindexing a device", |mut c| async move {
                    c.srem::<_, _, ()>(&index, member).await
                })
                .await?;
            Ok(Some(device))
        })
    }

    fn push_pending<'a>(
        &'a self,
        device_id: &'a str,
        session: PendingSession,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let ttl_ms = (session.expires_at_ms - crate::service::now_ms()).max(1);
            let json =
                serde_json::to_string(&session).map_err(|e| unreadable("pending session", e))?;
            let key = self.device_key(device_id, ":pending");
            let script = &self.push;
            let _: i64 = self
                .shared
                .run("leaving a session for a device", |mut c| async move {
                    script
                        .key(&key)
                        .arg(json)
                        .arg(MAX_PENDING_PER_DEVICE)
                        .arg(ttl_ms)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            Ok(())
        })
    }

    fn take_pending<'a>(
        &'a self,
        device_id: &'a str,
        timestamp_ms: i64,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Option<Vec<PendingSession>>, BackendError>> {
        Box::pin(async move {
            let poll = self.device_key(device_id, ":poll");
            let pending = self.device_key(device_id, ":pending");
            let script = &self.take;
            let taken: Option<(i64, Vec<String>)> = self
                .shared
                .run("taking a device's sessions", |mut c| async move {
                    script
                        .key(&poll)
                        .key(&pending)
                        .arg(timestamp_ms)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            let Some((_, items)) = taken else {
                return Ok(None);
            };
            let mut sessions = Vec::with_capacity(items.len());
            for item in items {
                let p: PendingSession = serde_json::from_str(&item).map_err(|e| {
                    unreadable(&format!("pending session of device {device_id}"), e)
                })?;
                if p.expires_at_ms > now_ms {
                    sessions.push(p);
                }
            }
            Ok(Some(sessions))
        })
    }

    fn accept_monitor_proof<'a>(
        &'a self,
        device_id: &'a str,
        timestamp_ms: i64,
    ) -> BoxFuture<'a, Result<bool, BackendError>> {
        Box::pin(async move {
            let key = self.device_key(device_id, ":monitor");
            let script = &self.monitor_proof;
            let fresh: i64 = self
                .shared
                .run("accepting a monitoring-ticket proof", |mut c| async move {
                    script
                        .key(&key)
                        .arg(timestamp_ms)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            Ok(fresh == 1)
        })
    }
}
