//! Guess limits in Redis, shared by every coordinator: one hash per source
//! (`NS:{g:SOURCE}`: failures, last failure) and one hash for the cluster-wide budget
//! (`NS:{guess-budget}`: wrong codes per window index). Each update is one script on one
//! key.

use std::net::IpAddr;

use redis::Script;

use super::Shared;
use crate::backend::{BackendError, BoxFuture};
use crate::limiter::{
    BudgetState, GuessLimiter, GuessPolicy, SourceState, Verdict, report_budget, source_key,
};

/// ARGV[1] = now ms, ARGV[2] = forget-after ms. Starts over if the last failure is older
/// than forget-after (the key's TTL normally does that already).
const SOURCE_SCRIPT: &str = r"
local last = tonumber(redis.call('HGET', KEYS[1], 'last') or '0')
if tonumber(ARGV[1]) >= last + tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[1])
end
redis.call('HINCRBY', KEYS[1], 'failures', 1)
redis.call('HSET', KEYS[1], 'last', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// ARGV[1] = current window index, ARGV[2] = TTL ms. Counts one wrong code and drops
/// windows older than the previous one.
const BUDGET_SCRIPT: &str = r"
local c = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
local all = redis.call('HKEYS', KEYS[1])
for _, w in ipairs(all) do
  if tonumber(w) < tonumber(ARGV[1]) - 1 then redis.call('HDEL', KEYS[1], w) end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return c
";

/// The Redis guess limiter.
pub struct RedisGuessLimiter {
    shared: Shared,
    policy: GuessPolicy,
    source_script: Script,
    budget_script: Script,
}

impl RedisGuessLimiter {
    pub fn new(shared: Shared, policy: GuessPolicy) -> Self {
        Self {
            shared,
            policy,
            source_script: Script::new(SOURCE_SCRIPT),
            budget_script: Script::new(BUDGET_SCRIPT),
        }
    }

    fn source_key(&self, source: IpAddr) -> String {
        self.shared.key(&format!("g:{}", source_key(source)), "")
    }

    fn budget_key(&self) -> String {
        self.shared.key("guess-budget", "")
    }

    fn forget_ms(&self) -> u64 {
        u64::try_from(self.policy.forget_after.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    async fn budget(&self, now_ms: i64) -> Result<BudgetState, BackendError> {
        let idx = self.policy.window_index(now_ms);
        let key = self.budget_key();
        let key = &key;
        let (current, previous): (Option<u64>, Option<u64>) = self
            .shared
            .run("reading the guess budget", |mut c| async move {
                redis::cmd("HMGET")
                    .arg(key)
                    .arg(idx)
                    .arg(idx - 1)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(BudgetState {
            current: current.unwrap_or(0),
            previous: previous.unwrap_or(0),
        })
    }
}

impl GuessLimiter for RedisGuessLimiter {
    fn policy(&self) -> &GuessPolicy {
        &self.policy
    }

    fn check(&self, source: IpAddr, now_ms: i64) -> BoxFuture<'_, Result<Verdict, BackendError>> {
        Box::pin(async move {
            let key = self.source_key(source);
            let key = &key;
            let (failures, last): (Option<u32>, Option<i64>) = self
                .shared
                .run("reading a source's wrong codes", |mut c| async move {
                    redis::cmd("HMGET")
                        .arg(key)
                        .arg("failures")
                        .arg("last")
                        .query_async(&mut c)
                        .await
                })
                .await?;
            let budget = self.budget(now_ms).await?;
            report_budget(&self.policy, budget);
            let forget = i64::try_from(self.forget_ms()).unwrap_or(i64::MAX);
            let state = match (failures, last) {
                (Some(failures), Some(last)) if now_ms < last.saturating_add(forget) => {
                    SourceState {
                        failures,
                        last_failure_ms: last,
                    }
                }
                _ => SourceState::default(),
            };
            Ok(self
                .policy
                .verdict(state, self.policy.under_attack(budget), now_ms))
        })
    }

    fn record_failure(
        &self,
        source: IpAddr,
        now_ms: i64,
    ) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let key = self.source_key(source);
            let forget = self.forget_ms();
            let script = &self.source_script;
            let key = &key;
            self.shared
                .run("counting a wrong code", |mut c| async move {
                    script
                        .key(key)
                        .arg(now_ms)
                        .arg(forget)
                        .invoke_async::<i64>(&mut c)
                        .await
                })
                .await?;
            let idx = self.policy.window_index(now_ms);
            let ttl = u64::try_from(self.policy.budget_window.as_millis())
                .unwrap_or(u64::MAX / 4)
                .saturating_mul(3)
                .max(1);
            let budget_key = self.budget_key();
            let budget_key = &budget_key;
            let script = &self.budget_script;
            self.shared
                .run("counting against the guess budget", |mut c| async move {
                    script
                        .key(budget_key)
                        .arg(idx)
                        .arg(ttl)
                        .invoke_async::<i64>(&mut c)
                        .await
                })
                .await?;
            Ok(())
        })
    }
}
