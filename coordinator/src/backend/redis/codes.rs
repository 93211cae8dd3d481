//! Session codes in Redis: `SET NX PX` to allocate, `GETDEL` to redeem, both on one key.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use kakehashi_proto::SessionId;
use redis::Script;

use super::Shared;
use crate::backend::codes::{
    ALLOCATE_ATTEMPTS, CodeStore, MAX_CODE_DIGITS, MIN_CODE_DIGITS, digits_for, digits_for_attempt,
    random_code,
};
use crate::backend::{BackendError, BoxFuture};

/// Width of one bucket of the allocation counter.
const BUCKET: Duration = Duration::from_secs(10);
/// How often a coordinator pushes its allocations and reads the cluster's total.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// Adds this coordinator's allocations to the current bucket, drops buckets older than
/// a code's lifetime and returns the sum of the rest: the allocations of the last TTL,
/// an upper bound on live codes (redeemed and revoked codes are not subtracted, which
/// errs towards longer codes). One key, so one slot.
const SYNC_SCRIPT: &str = r"
if tonumber(ARGV[2]) > 0 then
  redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
end
local all = redis.call('HGETALL', KEYS[1])
local sum = 0
for i = 1, #all, 2 do
  if tonumber(all[i]) < tonumber(ARGV[3]) then
    redis.call('HDEL', KEYS[1], all[i])
  else
    sum = sum + tonumber(all[i + 1])
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return sum
";

struct Density {
    /// Live codes cluster-wide at the last sync.
    global: u64,
    /// Allocations here since the last sync (not yet in `global`).
    pending: u64,
    last_sync: Option<Instant>,
}

/// The Redis code store.
pub struct RedisCodeStore {
    shared: Shared,
    density: u64,
    estimate: Mutex<Density>,
    sync_script: Script,
}

impl RedisCodeStore {
    pub fn new(shared: Shared, density: u64) -> Self {
        Self {
            shared,
            density: density.max(1),
            estimate: Mutex::new(Density {
                global: 0,
                pending: 0,
                last_sync: None,
            }),
            sync_script: Script::new(SYNC_SCRIPT),
        }
    }

    /// The Redis key holding `code` (tests use it to watch native expiry).
    pub fn key_for(&self, code: &str) -> String {
        self.shared.key(&format!("c:{code}"), "")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Density> {
        // Plain counters; a poisoned lock still holds usable numbers.
        self.estimate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Live codes as this coordinator sees them: the cluster-wide count of the last sync
    /// plus its own allocations since. Syncs at most once per [`SYNC_EVERY`].
    async fn live_estimate(&self, ttl: Duration) -> Result<u64, BackendError> {
        let push = {
            let mut d = self.lock();
            let due = d.last_sync.is_none_or(|t| t.elapsed() >= SYNC_EVERY);
            if !due {
                return Ok(d.global + d.pending);
            }
            // Claim this sync so concurrent allocations do not all run it.
            d.last_sync = Some(Instant::now());
            std::mem::take(&mut d.pending)
        };
        let now_ms = crate::service::now_ms();
        let bucket_ms = BUCKET.as_millis() as i64;
        let bucket = now_ms / bucket_ms;
        let oldest = (now_ms - ttl.as_millis().min(i64::MAX as u128) as i64) / bucket_ms - 1;
        let keep_ms = ttl.as_millis() as u64 + 2 * BUCKET.as_millis() as u64;
        let key = self.shared.key("codes-live", "");
        let script = &self.sync_script;
        let result: Result<u64, BackendError> = self
            .shared
            .run("syncing the live-code count", |mut c| async move {
                script
                    .key(&key)
                    .arg(bucket)
                    .arg(push)
                    .arg(oldest)
                    .arg(keep_ms.max(1))
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        let mut d = self.lock();
        match result {
            Ok(total) => {
                d.global = total;
                Ok(d.global + d.pending)
            }
            Err(e) => {
                // Put the allocations back and let the next call retry the sync.
                d.pending += push;
                d.last_sync = None;
                Err(e)
            }
        }
    }
}

impl CodeStore for RedisCodeStore {
    fn allocate(
        &self,
        session: SessionId,
        digits: usize,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<String, BackendError>> {
        Box::pin(async move {
            if !(MIN_CODE_DIGITS..=MAX_CODE_DIGITS).contains(&digits) {
                return Err(BackendError::BadCodeLength(digits));
            }
            let live = self.live_estimate(ttl).await?;
            let base = digits_for(live, digits, self.density);
            // PX needs at least 1 ms; a zero TTL stores nothing: the code is born expired.
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            if ttl_ms == 0 {
                return random_code(base);
            }
            let value = session.to_string();
            for attempt in 0..ALLOCATE_ATTEMPTS {
                let code = random_code(digits_for_attempt(base, attempt))?;
                let key = self.key_for(&code);
                let value = value.as_str();
                let stored: Option<String> = self
                    .shared
                    .run("allocating a code", |mut c| async move {
                        redis::cmd("SET")
                            .arg(&key)
                            .arg(value)
                            .arg("NX")
                            .arg("PX")
                            .arg(ttl_ms)
                            .query_async(&mut c)
                            .await
                    })
                    .await?;
                if stored.is_some() {
                    self.lock().pending += 1;
                    return Ok(code);
                }
            }
            Err(BackendError::CodeSpaceExhausted {
                digits: digits_for_attempt(base, ALLOCATE_ATTEMPTS),
                attempts: ALLOCATE_ATTEMPTS,
            })
        })
    }

    fn redeem<'a>(
        &'a self,
        code: &'a str,
    ) -> BoxFuture<'a, Result<Option<SessionId>, BackendError>> {
        Box::pin(async move {
            let key = self.key_for(code);
            // GETDEL reads and deletes in one step on one key: of any number of
            // concurrent redeemers, exactly one sees the value.
            let value: Option<String> = self
                .shared
                .run("redeeming a code", |mut c| async move {
                    redis::cmd("GETDEL").arg(&key).query_async(&mut c).await
                })
                .await?;
            value
                .map(|v| {
                    v.parse::<SessionId>()
                        .map_err(|e| BackendError::Unavailable {
                            backend: super::BACKEND,
                            detail: format!("code {code} maps to a bad session id {v:?}: {e}"),
                        })
                })
                .transpose()
        })
    }

    fn revoke<'a>(&'a self, code: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let key = self.key_for(code);
            self.shared
                .run("revoking a code", |mut c| async move {
                    redis::cmd("DEL").arg(&key).query_async::<()>(&mut c).await
                })
                .await
        })
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<usize, BackendError>> {
        // Redis expires codes itself.
        Box::pin(async { Ok(0) })
    }
}
