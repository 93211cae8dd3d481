//! Session records: the coordinator's durable view of every session.

use std::collections::HashMap;
use std::sync::Mutex;

use kakehashi_proto::pb;
use kakehashi_proto::{Mode, Permissions, SessionId};

use super::relays::RelayInfo;
use super::{BackendError, BoxFuture};

/// Everything the coordinator keeps about one session. Internal: not serialisable, the
/// wire form is [`pb::Session`] via [`SessionRecord::to_pb`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: SessionId,
    /// Bumped by the store on every successful write; the compare-and-swap key.
    pub version: u64,
    pub tenant: String,
    pub operator: String,
    pub mode: Mode,
    /// The most the operator may ever be granted.
    pub permissions: Permissions,
    pub state: pb::SessionState,
    pub relay: RelayInfo,
    pub created_at_ms: i64,
    pub deadline_ms: i64,
    pub code_expires_at_ms: i64,
    /// The code handed out at creation (revoked when the session ends).
    pub code: String,
    /// What the customer has approved so far.
    pub granted: Permissions,
    pub end_reason: pb::EndReason,
    pub end_detail: String,
    /// When the session ended (0 while live); ended records are purged a while later.
    pub ended_at_ms: i64,
    /// SHA-256 of the operator ticket; the ticket itself is never stored.
    pub ticket_sha256: [u8; 32],
    /// Participant id of the host token, once the customer joined.
    pub host_participant: Option<u64>,
}

impl SessionRecord {
    pub fn is_ended(&self) -> bool {
        self.state == pb::SessionState::Ended
    }

    pub fn to_pb(&self) -> pb::Session {
        pb::Session {
            session_id: self.id.to_string(),
            tenant: self.tenant.clone(),
            operator: self.operator.clone(),
            mode: self.mode.to_pb() as i32,
            permissions: self.permissions.bits(),
            state: self.state as i32,
            relay: Some(self.relay.endpoint()),
            created_at_unix_ms: self.created_at_ms,
            deadline_unix_ms: self.deadline_ms,
            code_expires_at_unix_ms: self.code_expires_at_ms,
            granted: self.granted.bits(),
            end_reason: self.end_reason as i32,
            end_detail: self.end_detail.clone(),
        }
    }

    /// Whether the reaper should end this session at `now_ms`, and why.
    pub fn due(&self, now_ms: i64) -> Option<pb::EndReason> {
        if self.is_ended() {
            None
        } else if now_ms >= self.deadline_ms {
            Some(pb::EndReason::TimeLimit)
        } else if self.state == pb::SessionState::Waiting && now_ms >= self.code_expires_at_ms {
            Some(pb::EndReason::CodeExpired)
        } else {
            None
        }
    }
}

/// Which sessions [`SessionStore::list`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListFilter {
    /// `None` lists every tenant.
    pub tenant: Option<String>,
    pub include_ended: bool,
    pub limit: usize,
}

/// Stores session records.
///
/// Invariants: `insert` never overwrites; `compare_and_swap` writes only if the stored
/// version equals `expected_version`, and the stored version is then one higher; `list`
/// returns newest first (by creation time, then id).
pub trait SessionStore: Send + Sync + 'static {
    /// Stores a new record (its version is taken as given).
    fn insert(&self, record: SessionRecord) -> BoxFuture<'_, Result<(), BackendError>>;

    fn get(&self, id: SessionId) -> BoxFuture<'_, Result<Option<SessionRecord>, BackendError>>;

    /// Replaces the record if its stored version is `expected_version`; the stored copy
    /// gets version `expected_version + 1`. `false` when another writer got there first
    /// or the record is gone.
    fn compare_and_swap(
        &self,
        expected_version: u64,
        record: SessionRecord,
    ) -> BoxFuture<'_, Result<bool, BackendError>>;

    fn list(&self, filter: ListFilter) -> BoxFuture<'_, Result<Vec<SessionRecord>, BackendError>>;

    /// Up to `limit` live sessions that [`SessionRecord::due`] says must end at `now_ms`.
    fn due(&self, now_ms: i64, limit: usize)
    -> BoxFuture<'_, Result<Vec<SessionId>, BackendError>>;

    /// Deletes up to `limit` records of sessions that ended before `before_ms` and
    /// returns their ids. Live records are never deleted.
    fn purge_ended(
        &self,
        before_ms: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<SessionId>, BackendError>>;
}

/// In-process session store (the embedded default).
#[derive(Default)]
pub struct InMemorySessionStore {
    records: Mutex<HashMap<SessionId, SessionRecord>>,
}

impl InMemorySessionStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, SessionRecord>> {
        // Each critical section is one insert or lookup, so a poisoned map is consistent.
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SessionStore for InMemorySessionStore {
    fn insert(&self, record: SessionRecord) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let mut records = self.lock();
            if records.contains_key(&record.id) {
                return Err(BackendError::AlreadyExists(record.id));
            }
            records.insert(record.id, record);
            Ok(())
        })
    }

    fn get(&self, id: SessionId) -> BoxFuture<'_, Result<Option<SessionRecord>, BackendError>> {
        Box::pin(async move { Ok(self.lock().get(&id).cloned()) })
    }

    fn compare_and_swap(
        &self,
        expected_version: u64,
        mut record: SessionRecord,
    ) -> BoxFuture<'_, Result<bool, BackendError>> {
        Box::pin(async move {
            let mut records = self.lock();
            match records.get_mut(&record.id) {
                Some(stored) if stored.version == expected_version => {
                    record.version = expected_version + 1;
                    *stored = record;
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
    }

    fn list(&self, filter: ListFilter) -> BoxFuture<'_, Result<Vec<SessionRecord>, BackendError>> {
        Box::pin(async move {
            let records = self.lock();
            let mut out: Vec<SessionRecord> = records
                .values()
                .filter(|r| filter.include_ended || !r.is_ended())
                .filter(|r| filter.tenant.as_ref().is_none_or(|t| &r.tenant == t))
                .cloned()
                .collect();
            drop(records);
            out.sort_by(|a, b| {
                b.created_at_ms
                    .cmp(&a.created_at_ms)
                    .then_with(|| b.id.cmp(&a.id))
            });
            out.truncate(filter.limit);
            Ok(out)
        })
    }

    fn due(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<SessionId>, BackendError>> {
        Box::pin(async move {
            Ok(self
                .lock()
                .values()
                .filter(|r| r.due(now_ms).is_some())
                .take(limit)
                .map(|r| r.id)
                .collect())
        })
    }

    fn purge_ended(
        &self,
        before_ms: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<SessionId>, BackendError>> {
        Box::pin(async move {
            let mut records = self.lock();
            let old: Vec<SessionId> = records
                .values()
                .filter(|r| r.is_ended() && r.ended_at_ms < before_ms)
                .take(limit)
                .map(|r| r.id)
                .collect();
            for id in &old {
                records.remove(id);
            }
            Ok(old)
        })
    }
}
