//! Session records in Redis: one hash per session, written by single-key scripts
//! (insert-if-absent, compare-and-swap on the version field), plus sorted-set indexes.

use std::collections::HashMap;

use kakehashi_proto::{Mode, Permissions, SessionId, pb};
use redis::Script;

use super::Shared;
use crate::backend::relays::RelayInfo;
use crate::backend::sessions::{ListFilter, SessionRecord, SessionStore};
use crate::backend::{BackendError, BoxFuture};

/// How long a record outlives its deadline (or its end) in Redis, so readers of an ended
/// session (the reaper keeps them an hour) never find it gone early.
const RECORD_SLACK_MS: i64 = 2 * 3600 * 1000;
/// Index entries examined per `list` call at most, whatever the filter.
const LIST_SCAN_LIMIT: usize = 10_000;
/// Index entries read per round trip in `list`.
const LIST_PAGE: usize = 256;

const INSERT_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
";

/// ARGV[1] = expected version, ARGV[2] = TTL ms, the rest = field/value pairs.
const CAS_SCRIPT: &str = r"
local v = redis.call('HGET', KEYS[1], 'version')
if not v or v ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// The Redis session store.
pub struct RedisSessionStore {
    shared: Shared,
    insert: Script,
    cas: Script,
}

fn bad_record(id: SessionId, what: &str) -> BackendError {
    BackendError::Unavailable {
        backend: super::BACKEND,
        detail: format!("stored record of session {id} is unreadable: {what}"),
    }
}

/// The field/value pairs of a record's hash. The encoding is this module's alone; the
/// wire form of a session is `pb::Session`.
fn encode(r: &SessionRecord) -> Vec<(&'static str, String)> {
    vec![
        ("version", r.version.to_string()),
        ("tenant", r.tenant.clone()),
        ("operator", r.operator.clone()),
        ("mode", (r.mode as u8).to_string()),
        ("permissions", r.permissions.bits().to_string()),
        ("state", (r.state as i32).to_string()),
        ("relay_id", r.relay.relay_id.clone()),
        ("relay_quic", r.relay.quic_addr.clone()),
        ("relay_admin", r.relay.admin_url.clone()),
        ("relay_name", r.relay.server_name.clone()),
        ("relay_cert", hex::encode(r.relay.cert_sha256)),
        ("relay_region", r.relay.region.clone()),
        ("created", r.created_at_ms.to_string()),
        ("deadline", r.deadline_ms.to_string()),
        ("code_expires", r.code_expires_at_ms.to_string()),
        ("code", r.code.clone()),
        ("granted", r.granted.bits().to_string()),
        ("end_reason", (r.end_reason as i32).to_string()),
        ("end_detail", r.end_detail.clone()),
        ("ended_at", r.ended_at_ms.to_string()),
        ("ticket", hex::encode(r.ticket_sha256)),
        (
            "host",
            r.host_participant
                .map(|h| h.to_string())
                .unwrap_or_default(),
        ),
    ]
}

fn decode(id: SessionId, mut h: HashMap<String, String>) -> Result<SessionRecord, BackendError> {
    let mut take = |k: &str| {
        h.remove(k)
            .ok_or_else(|| bad_record(id, &format!("no {k}")))
    };
    fn num<T: std::str::FromStr>(id: SessionId, k: &str, v: String) -> Result<T, BackendError> {
        v.parse()
            .map_err(|_| bad_record(id, &format!("{k} = {v:?}")))
    }
    fn hex32(id: SessionId, k: &str, v: String) -> Result<[u8; 32], BackendError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(&v, &mut out).map_err(|_| bad_record(id, &format!("{k} = {v:?}")))?;
        Ok(out)
    }
    let mode =
        Mode::from_u8(num(id, "mode", take("mode")?)?).ok_or_else(|| bad_record(id, "mode"))?;
    let perms = |v: u32, k: &str| Permissions::from_bits(v).ok_or_else(|| bad_record(id, k));
    let permissions = perms(num(id, "permissions", take("permissions")?)?, "permissions")?;
    let granted = perms(num(id, "granted", take("granted")?)?, "granted")?;
    let state = pb::SessionState::try_from(num::<i32>(id, "state", take("state")?)?)
        .map_err(|_| bad_record(id, "state"))?;
    let end_reason = pb::EndReason::try_from(num::<i32>(id, "end_reason", take("end_reason")?)?)
        .map_err(|_| bad_record(id, "end_reason"))?;
    let host = take("host")?;
    Ok(SessionRecord {
        id,
        version: num(id, "version", take("version")?)?,
        tenant: take("tenant")?,
        operator: take("operator")?,
        mode,
        permissions,
        state,
        relay: RelayInfo {
            relay_id: take("relay_id")?,
            quic_addr: take("relay_quic")?,
            admin_url: take("relay_admin")?,
            server_name: take("relay_name")?,
            cert_sha256: hex32(id, "relay_cert", take("relay_cert")?)?,
            region: take("relay_region")?,
        },
        created_at_ms: num(id, "created", take("created")?)?,
        deadline_ms: num(id, "deadline", take("deadline")?)?,
        code_expires_at_ms: num(id, "code_expires", take("code_expires")?)?,
        code: take("code")?,
        granted,
        end_reason,
        end_detail: take("end_detail")?,
        ended_at_ms: num(id, "ended_at", take("ended_at")?)?,
        ticket_sha256: hex32(id, "ticket", take("ticket")?)?,
        host_participant: if host.is_empty() {
            None
        } else {
            Some(num(id, "host", host)?)
        },
    })
}

/// Milliseconds the record should live in Redis from now.
fn ttl_ms(r: &SessionRecord) -> i64 {
    let now = crate::service::now_ms();
    let until = r.deadline_ms.max(r.ended_at_ms).max(r.code_expires_at_ms);
    until
        .saturating_sub(now)
        .max(0)
        .saturating_add(RECORD_SLACK_MS)
}

/// When the reaper should look at a live record.
fn due_at(r: &SessionRecord) -> i64 {
    if r.state == pb::SessionState::Waiting {
        r.deadline_ms.min(r.code_expires_at_ms)
    } else {
        r.deadline_ms
    }
}

impl RedisSessionStore {
    pub fn new(shared: Shared) -> Self {
        Self {
            shared,
            insert: Script::new(INSERT_SCRIPT),
            cas: Script::new(CAS_SCRIPT),
        }
    }

    fn record_key(&self, id: SessionId) -> String {
        self.shared.key(&format!("s:{id}"), "")
    }

    fn index(&self, name: &str) -> String {
        self.shared.key("idx", &format!(":{name}"))
    }

    fn tenant_index(&self, tenant: &str) -> String {
        self.index(&format!("t:{tenant}"))
    }

    /// Brings the `due` / `ended` indexes in line with `r` (and `all` / tenant on insert).
    async fn reindex(&self, r: &SessionRecord, with_listing: bool) -> Result<(), BackendError> {
        let id = r.id.to_string();
        let mut pipe = redis::pipe();
        if with_listing {
            pipe.zadd(self.index("all"), &id, r.created_at_ms).ignore();
            pipe.zadd(self.tenant_index(&r.tenant), &id, r.created_at_ms)
                .ignore();
        }
        if r.is_ended() {
            pipe.zrem(self.index("due"), &id).ignore();
            pipe.zadd(self.index("ended"), &id, r.ended_at_ms).ignore();
        } else {
            pipe.zadd(self.index("due"), &id, due_at(r)).ignore();
        }
        let pipe = &pipe;
        // All index keys share the `{idx}` tag, so this pipeline stays on one node.
        self.shared
            .run("updating the session indexes", |mut c| async move {
                pipe.query_async::<()>(&mut c).await
            })
            .await
    }

    async fn unindex(&self, id: SessionId, tenant: Option<&str>) -> Result<(), BackendError> {
        let member = id.to_string();
        let mut pipe = redis::pipe();
        for name in ["all", "due", "ended"] {
            pipe.zrem(self.index(name), &member).ignore();
        }
        if let Some(t) = tenant {
            pipe.zrem(self.tenant_index(t), &member).ignore();
        }
        let pipe = &pipe;
        self.shared
            .run("cleaning the session indexes", |mut c| async move {
                pipe.query_async::<()>(&mut c).await
            })
            .await
    }

    async fn ids_by_score(
        &self,
        index: String,
        max: String,
        limit: usize,
    ) -> Result<Vec<SessionId>, BackendError> {
        let (index, max) = (&index, &max);
        let raw: Vec<String> = self
            .shared
            .run("reading a session index", |mut c| async move {
                redis::cmd("ZRANGEBYSCORE")
                    .arg(index)
                    .arg("-inf")
                    .arg(max)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(raw.iter().filter_map(|s| s.parse().ok()).collect())
    }
}

impl SessionStore for RedisSessionStore {
    fn insert(&self, record: SessionRecord) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let key = self.record_key(record.id);
            let fields = encode(&record);
            let ttl = ttl_ms(&record);
            let script = &self.insert;
            let (key, fields) = (&key, &fields);
            let inserted: i64 = self
                .shared
                .run("inserting a session record", |mut c| async move {
                    let mut inv = script.key(key);
                    inv.arg(ttl);
                    for (k, v) in fields {
                        inv.arg(*k).arg(v);
                    }
                    inv.invoke_async(&mut c).await
                })
                .await?;
            if inserted == 0 {
                return Err(BackendError::AlreadyExists(record.id));
            }
            self.reindex(&record, true).await
        })
    }

    fn get(&self, id: SessionId) -> BoxFuture<'_, Result<Option<SessionRecord>, BackendError>> {
        Box::pin(async move {
            let key = self.record_key(id);
            let key = &key;
            let h: HashMap<String, String> = self
                .shared
                .run("reading a session record", |mut c| async move {
                    redis::cmd("HGETALL").arg(key).query_async(&mut c).await
                })
                .await?;
            if h.is_empty() {
                return Ok(None);
            }
            decode(id, h).map(Some)
        })
    }

    fn compare_and_swap(
        &self,
        expected_version: u64,
        mut record: SessionRecord,
    ) -> BoxFuture<'_, Result<bool, BackendError>> {
        Box::pin(async move {
            record.version = expected_version + 1;
            let key = self.record_key(record.id);
            let fields = encode(&record);
            let ttl = ttl_ms(&record);
            let script = &self.cas;
            let (key, fields) = (&key, &fields);
            let swapped: i64 = self
                .shared
                .run("updating a session record", |mut c| async move {
                    let mut inv = script.key(key);
                    inv.arg(expected_version).arg(ttl);
                    for (k, v) in fields {
                        inv.arg(*k).arg(v);
                    }
                    inv.invoke_async(&mut c).await
                })
                .await?;
            if swapped == 0 {
                return Ok(false);
            }
            // The record is written; a failed index update is healed by `due` and
            // `purge_ended`, which check every id against its record.
            if let Err(e) = self.reindex(&record, false).await {
                tracing::warn!(session = %record.id, error = %e, "session index update failed");
            }
            Ok(true)
        })
    }

    fn list(&self, filter: ListFilter) -> BoxFuture<'_, Result<Vec<SessionRecord>, BackendError>> {
        Box::pin(async move {
            let index = match &filter.tenant {
                Some(t) => self.tenant_index(t),
                None => self.index("all"),
            };
            let mut out = Vec::new();
            let mut offset = 0usize;
            while out.len() < filter.limit && offset < LIST_SCAN_LIMIT {
                let index_ref = &index;
                // Newest first; equal scores come in reverse member order, i.e. by id
                // descending, as the contract asks.
                let page: Vec<String> = self
                    .shared
                    .run("listing sessions", |mut c| async move {
                        redis::cmd("ZREVRANGE")
                            .arg(index_ref)
                            .arg(offset)
                            .arg(offset + LIST_PAGE - 1)
                            .query_async(&mut c)
                            .await
                    })
                    .await?;
                if page.is_empty() {
                    break;
                }
                offset += page.len();
                let ids: Vec<SessionId> = page.iter().filter_map(|s| s.parse().ok()).collect();
                let records =
                    futures::future::try_join_all(ids.iter().map(|id| self.get(*id))).await?;
                for (id, record) in ids.iter().zip(records) {
                    match record {
                        None => {
                            // Expired from Redis: drop the stale index entries.
                            self.unindex(*id, filter.tenant.as_deref()).await?;
                        }
                        Some(r) if filter.include_ended || !r.is_ended() => {
                            if out.len() < filter.limit {
                                out.push(r);
                            }
                        }
                        Some(_) => {}
                    }
                }
            }
            out.sort_by(|a, b| {
                b.created_at_ms
                    .cmp(&a.created_at_ms)
                    .then_with(|| b.id.cmp(&a.id))
            });
            Ok(out)
        })
    }

    fn due(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<SessionId>, BackendError>> {
        Box::pin(async move {
            let candidates = self
                .ids_by_score(self.index("due"), now_ms.to_string(), limit)
                .await?;
            let mut out = Vec::new();
            for id in candidates {
                match self.get(id).await? {
                    None => self.unindex(id, None).await?,
                    Some(r) if r.due(now_ms).is_some() => out.push(id),
                    // The index was behind the record: put it right.
                    Some(r) => self.reindex(&r, false).await?,
                }
            }
            Ok(out)
        })
    }

    fn purge_ended(
        &self,
        before_ms: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<SessionId>, BackendError>> {
        Box::pin(async move {
            // `(` makes the bound exclusive: a session that ended exactly at the cut-off
            // stays.
            let candidates = self
                .ids_by_score(self.index("ended"), format!("({before_ms}"), limit)
                .await?;
            let mut purged = Vec::new();
            for id in candidates {
                match self.get(id).await? {
                    Some(r) if !(r.is_ended() && r.ended_at_ms < before_ms) => {
                        self.reindex(&r, false).await?;
                    }
                    record => {
                        let key = self.record_key(id);
                        let key = &key;
                        self.shared
                            .run("deleting a session record", |mut c| async move {
                                redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await
                            })
                            .await?;
                        let tenant = record.as_ref().map(|r| r.tenant.as_str());
                        self.unindex(id, tenant).await?;
                        purged.push(id);
                    }
                }
            }
            Ok(purged)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_the_hash_encoding() {
        let id = SessionId::from_bytes([3; 16]);
        let mut r = crate::contract::sample_record(id, "acme", 1234);
        r.host_participant = Some(42);
        r.end_detail = "with, commas = and\nnewlines".into();
        let h: HashMap<String, String> = encode(&r)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(decode(id, h.clone()).expect("decodes"), r);
        let mut broken = h;
        broken.insert("state".into(), "99".into());
        assert!(decode(id, broken).is_err());
    }
}
