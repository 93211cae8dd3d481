//! Per-source limit on wrong codes: plain state, the caller passes the clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Wrong codes allowed per source and window before it is refused.
pub const MAX_FAILURES: u32 = 10;
/// Length of a source's window, counted from its first wrong code.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Most sources tracked at once; beyond this, untracked sources are refused until
/// windows expire (a global cap on guessing when many addresses guess at once).
pub const MAX_SOURCES: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

/// Counts wrong codes per source IP in fixed windows.
#[derive(Debug, Default)]
pub struct GuessLimiter {
    sources: HashMap<IpAddr, Window>,
}

impl GuessLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// May `source` try a code now?
    pub fn allows(&mut self, source: IpAddr, now: Instant) -> bool {
        match self.sources.get(&source) {
            Some(w) if now.duration_since(w.started) < WINDOW => w.failures < MAX_FAILURES,
            Some(_) => {
                self.sources.remove(&source);
                true
            }
            None if self.sources.len() >= MAX_SOURCES => {
                self.prune(now);
                self.sources.len() < MAX_SOURCES
            }
            None => true,
        }
    }

    /// Records a wrong code from `source`.
    pub fn record_failure(&mut self, source: IpAddr, now: Instant) {
        if self.sources.len() >= MAX_SOURCES && !self.sources.contains_key(&source) {
            self.prune(now);
            if self.sources.len() >= MAX_SOURCES {
                return;
            }
        }
        let w = self.sources.entry(source).or_insert(Window {
            started: now,
            failures: 0,
        });
        if now.duration_since(w.started) >= WINDOW {
            *w = Window {
                started: now,
                failures: 0,
            };
        }
        w.failures = w.failures.saturating_add(1);
    }

    /// Forgets sources whose window has passed.
    pub fn prune(&mut self, now: Instant) {
        self.sources
            .retain(|_, w| now.duration_since(w.started) < WINDOW);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trips_after_max_failures_and_resets_after_window() {
        let mut l = GuessLimiter::new();
        let ip: IpAddr = [10, 0, 0, 1].into();
        let other: IpAddr = [10, 0, 0, 2].into();
        let t0 = Instant::now();
        for _ in 0..MAX_FAILURES {
            assert!(l.allows(ip, t0));
            l.record_failure(ip, t0);
        }
        assert!(!l.allows(ip, t0 + Duration::from_secs(59)));
        assert!(l.allows(other, t0));
        assert!(l.allows(ip, t0 + WINDOW));
        l.record_failure(ip, t0 + WINDOW);
        assert!(l.allows(ip, t0 + WINDOW));
    }
}
