//! Guess limits on `JoinByCode`: per-source exponential backoff and a cluster-wide
//! failure budget.
//!
//! The policy is plain arithmetic over counters and a clock the caller passes
//! ([`GuessPolicy::verdict`]); the [`GuessLimiter`] trait keeps the counters, in this
//! process ([`InMemoryGuessLimiter`]) or in Redis (`backend::redis::RedisGuessLimiter`),
//! so every coordinator replica sees the same sources and the same budget.
//!
//! - **Backoff**: a source (an IPv4 address, or an IPv6 /64, which one subscriber
//!   usually holds whole) has `free_failures` wrong codes for free; after that each wrong
//!   code doubles the wait before the next try, from `base_wait` up to `max_wait`
//!   (17 hours, TeamViewer's ceiling). A source's record is forgotten `forget_after` its
//!   last wrong code.
//! - **Budget**: wrong codes from all sources together are counted per `budget_window`.
//!   While the current or the previous window is over `budget`, the cluster is under
//!   attack and every source loses its free failures: its first wrong code already
//!   starts the backoff. Customers rarely notice, because a mistyped code fails its check
//!   digit and never counts as a wrong code.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use crate::backend::{BackendError, BoxFuture};

/// Refused `JoinByCode` calls, by reason (`backoff`).
pub const GUESS_REFUSALS: &str = "coordinator_guess_refusals_total";
/// Wrong codes counted in the current budget window, cluster-wide.
pub const GUESS_BUDGET_FAILURES: &str = "coordinator_guess_budget_failures";
/// 1 while the cluster-wide failure budget is exceeded (free failures withdrawn).
pub const GUESS_BUDGET_EXCEEDED: &str = "coordinator_guess_budget_exceeded";

/// Registers help text for the limiter's metrics.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_counter!(
        GUESS_REFUSALS,
        Unit::Count,
        "JoinByCode calls refused by the guess limiter, by reason."
    );
    describe_gauge!(
        GUESS_BUDGET_FAILURES,
        Unit::Count,
        "Wrong codes in the current cluster-wide budget window."
    );
    describe_gauge!(
        GUESS_BUDGET_EXCEEDED,
        Unit::Count,
        "1 while the cluster-wide wrong-code budget is exceeded, else 0."
    );
}

/// The numbers of the guess limits. [`Default`] is what production runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuessPolicy {
    /// Wrong codes a source may make before backoff starts (outside an attack).
    pub free_failures: u32,
    /// Wait after the first wrong code past the free ones; doubles with each further one.
    pub base_wait: Duration,
    /// The longest wait.
    pub max_wait: Duration,
    /// A source is forgotten this long after its last wrong code.
    pub forget_after: Duration,
    /// Wrong codes per window, cluster-wide, before the budget counts as exceeded.
    pub budget: u64,
    pub budget_window: Duration,
}

impl Default for GuessPolicy {
    fn default() -> Self {
        Self {
            free_failures: 5,
            base_wait: Duration::from_secs(4),
            max_wait: Duration::from_secs(17 * 3600),
            forget_after: Duration::from_secs(48 * 3600),
            budget: 600,
            budget_window: Duration::from_secs(60),
        }
    }
}

/// What a source has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SourceState {
    pub failures: u32,
    pub last_failure_ms: i64,
}

/// Whether a source may try a code now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Refused; the source may try again after this long.
    Wait(Duration),
}

/// The budget's state as a limiter sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BudgetState {
    /// Wrong codes in the current window.
    pub current: u64,
    /// Wrong codes in the window before it.
    pub previous: u64,
}

impl GuessPolicy {
    /// Whether the budget counts as exceeded.
    pub fn under_attack(&self, budget: BudgetState) -> bool {
        budget.current > self.budget || budget.previous > self.budget
    }

    /// How long a source with `failures` wrong codes must wait after its last one.
    pub fn wait_after(&self, failures: u32, under_attack: bool) -> Duration {
        let free = if under_attack { 0 } else { self.free_failures };
        if failures <= free {
            return Duration::ZERO;
        }
        let doublings = (failures - free - 1).min(40);
        self.base_wait
            .checked_mul(1u32 << doublings.min(31))
            .unwrap_or(self.max_wait)
            .min(self.max_wait)
    }

    /// The verdict for a source at `now_ms`.
    pub fn verdict(&self, state: SourceState, under_attack: bool, now_ms: i64) -> Verdict {
        let wait = self.wait_after(state.failures, under_attack);
        let wait_ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
        let free_at = state.last_failure_ms.saturating_add(wait_ms);
        if wait.is_zero() || now_ms >= free_at {
            Verdict::Allowed
        } else {
            Verdict::Wait(Duration::from_millis(
                u64::try_from(free_at - now_ms).unwrap_or(0),
            ))
        }
    }

    /// The index of the budget window holding `now_ms`.
    pub fn window_index(&self, now_ms: i64) -> i64 {
        let len = i64::try_from(self.budget_window.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        now_ms.div_euclid(len)
    }
}

/// The key a source's counters live under: the IPv4 address, or the /64 of an IPv6
/// address (an attacker gets a whole /64 as easily as one address).
pub fn source_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// Keeps the counters the policy reads. Object safe; one per coordinator.
pub trait GuessLimiter: Send + Sync + 'static {
    fn policy(&self) -> &GuessPolicy;

    /// Whether `source` may try a code now (reads the source and the budget).
    fn check(&self, source: IpAddr, now_ms: i64) -> BoxFuture<'_, Result<Verdict, BackendError>>;

    /// Counts a wrong code from `source` against it and against the budget.
    fn record_failure(
        &self,
        source: IpAddr,
        now_ms: i64,
    ) -> BoxFuture<'_, Result<(), BackendError>>;
}

/// Publishes the budget's state as metrics; every implementation calls this on check.
pub fn report_budget(policy: &GuessPolicy, budget: BudgetState) {
    metrics::gauge!(GUESS_BUDGET_FAILURES).set(budget.current as f64);
    metrics::gauge!(GUESS_BUDGET_EXCEEDED).set(if policy.under_attack(budget) {
        1.0
    } else {
        0.0
    });
}

/// Most sources tracked in memory; past this the oldest records are dropped first.
pub const MAX_SOURCES: usize = 100_000;

#[derive(Default)]
struct MemState {
    sources: HashMap<String, SourceState>,
    /// (window index, wrong codes in it) for the current and the previous window.
    windows: [(i64, u64); 2],
}

/// The limiter of a single coordinator (the embedded default).
pub struct InMemoryGuessLimiter {
    policy: GuessPolicy,
    state: Mutex<MemState>,
}

impl InMemoryGuessLimiter {
    pub fn new(policy: GuessPolicy) -> Self {
        Self {
            policy,
            state: Mutex::new(MemState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        // Each critical section is a few map/array updates; a poisoned lock is consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn budget(&self, state: &MemState, now_ms: i64) -> BudgetState {
        let idx = self.policy.window_index(now_ms);
        let count = |i: i64| {
            state
                .windows
                .iter()
                .find(|(w, _)| *w == i)
                .map_or(0, |(_, n)| *n)
        };
        BudgetState {
            current: count(idx),
            previous: count(idx - 1),
        }
    }
}

impl Default for InMemoryGuessLimiter {
    fn default() -> Self {
        Self::new(GuessPolicy::default())
    }
}

impl GuessLimiter for InMemoryGuessLimiter {
    fn policy(&self) -> &GuessPolicy {
        &self.policy
    }

    fn check(&self, source: IpAddr, now_ms: i64) -> BoxFuture<'_, Result<Verdict, BackendError>> {
        Box::pin(async move {
            let state = self.lock();
            let budget = self.budget(&state, now_ms);
            report_budget(&self.policy, budget);
            let forget_ms = i64::try_from(self.policy.forget_after.as_millis()).unwrap_or(i64::MAX);
            let source_state = state
                .sources
                .get(&source_key(source))
                .copied()
                .filter(|s| now_ms < s.last_failure_ms.saturating_add(forget_ms))
                .unwrap_or_default();
            Ok(self
                .policy
                .verdict(source_state, self.policy.under_attack(budget), now_ms))
        })
    }

    fn record_failure(
        &self,
        source: IpAddr,
        now_ms: i64,
    ) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let mut state = self.lock();
            let forget_ms = i64::try_from(self.policy.forget_after.as_millis()).unwrap_or(i64::MAX);
            if state.sources.len() >= MAX_SOURCES {
                state
                    .sources
                    .retain(|_, s| now_ms < s.last_failure_ms.saturating_add(forget_ms));
                if state.sources.len() >= MAX_SOURCES {
                    // Still full of active sources: drop the one idle longest.
                    if let Some(oldest) = state
                        .sources
                        .iter()
                        .min_by_key(|(_, s)| s.last_failure_ms)
                        .map(|(k, _)| k.clone())
                    {
                        state.sources.remove(&oldest);
                    }
                }
            }
            let entry = state.sources.entry(source_key(source)).or_default();
            if now_ms >= entry.last_failure_ms.saturating_add(forget_ms) {
                *entry = SourceState::default();
            }
            entry.failures = entry.failures.saturating_add(1);
            entry.last_failure_ms = now_ms;
            let idx = self.policy.window_index(now_ms);
            if let Some(slot) = state.windows.iter_mut().find(|(w, _)| *w == idx) {
                slot.1 += 1;
            } else {
                // Replace the older of the two slots.
                let oldest = usize::from(state.windows[0].0 > state.windows[1].0);
                state.windows[oldest] = (idx, 1);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> GuessPolicy {
        GuessPolicy::default()
    }

    #[test]
    fn backoff_doubles_after_the_free_failures_and_caps_at_17_hours() {
        let p = policy();
        for n in 0..=5 {
            assert_eq!(p.wait_after(n, false), Duration::ZERO);
        }
        assert_eq!(p.wait_after(6, false), Duration::from_secs(4));
        assert_eq!(p.wait_after(7, false), Duration::from_secs(8));
        assert_eq!(p.wait_after(10, false), Duration::from_secs(64));
        assert_eq!(p.wait_after(24, false), Duration::from_secs(17 * 3600));
        assert_eq!(
            p.wait_after(u32::MAX, false),
            Duration::from_secs(17 * 3600)
        );
        // Under attack the free failures are gone.
        assert_eq!(p.wait_after(1, true), Duration::from_secs(4));
        assert_eq!(p.wait_after(0, true), Duration::ZERO);
    }

    #[test]
    fn verdict_counts_from_the_last_failure() {
        let p = policy();
        let s = SourceState {
            failures: 6,
            last_failure_ms: 10_000,
        };
        assert_eq!(
            p.verdict(s, false, 10_000),
            Verdict::Wait(Duration::from_secs(4))
        );
        assert_eq!(
            p.verdict(s, false, 13_000),
            Verdict::Wait(Duration::from_secs(1))
        );
        assert_eq!(p.verdict(s, false, 14_000), Verdict::Allowed);
        let fresh = SourceState::default();
        assert_eq!(p.verdict(fresh, true, 0), Verdict::Allowed);
    }

    #[test]
    fn ipv6_sources_are_grouped_by_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert_eq!(source_key(mapped), "10.0.0.1");
    }

    #[tokio::test]
    async fn in_memory_limiter_backs_off_and_tightens_when_the_budget_is_spent() {
        let p = GuessPolicy {
            budget: 20,
            ..policy()
        };
        let l = InMemoryGuessLimiter::new(p.clone());
        let ip: IpAddr = [10, 0, 0, 1].into();
        let t = 1_000_000;
        for _ in 0..p.free_failures {
            assert_eq!(l.check(ip, t).await.expect("check"), Verdict::Allowed);
            l.record_failure(ip, t).await.expect("record");
        }
        assert_eq!(l.check(ip, t).await.expect("check"), Verdict::Allowed);
        l.record_failure(ip, t).await.expect("record");
        assert_eq!(
            l.check(ip, t).await.expect("check"),
            Verdict::Wait(Duration::from_secs(4))
        );
        assert_eq!(
            l.check(ip, t + 4000).await.expect("check"),
            Verdict::Allowed
        );
        // Forgotten after `forget_after` of quiet.
        let quiet = InMemoryGuessLimiter::new(p.clone());
        for _ in 0..10 {
            quiet.record_failure(ip, t).await.expect("record");
        }
        let later = t + i64::try_from(p.forget_after.as_millis()).expect("fits");
        quiet.record_failure(ip, later).await.expect("record");
        assert_eq!(
            quiet.check(ip, later).await.expect("check"),
            Verdict::Allowed
        );

        // Many sources with one wrong code each spend the budget ...
        for i in 0..=20u8 {
            l.record_failure([10, 1, 0, i].into(), t)
                .await
                .expect("record");
        }
        // ... and then a fresh source's first wrong code starts its backoff, in this
        // window and the next.
        let fresh: IpAddr = [10, 2, 0, 1].into();
        l.record_failure(fresh, t).await.expect("record");
        assert!(matches!(
            l.check(fresh, t).await.expect("check"),
            Verdict::Wait(_)
        ));
        let next_window = t + 60_000;
        let other: IpAddr = [10, 2, 0, 2].into();
        l.record_failure(other, next_window).await.expect("record");
        assert!(matches!(
            l.check(other, next_window).await.expect("check"),
            Verdict::Wait(_)
        ));
        // Two quiet windows later the free failures are back.
        let calm = t + 180_000;
        let third: IpAddr = [10, 2, 0, 3].into();
        l.record_failure(third, calm).await.expect("record");
        assert_eq!(l.check(third, calm).await.expect("check"), Verdict::Allowed);
    }
}
