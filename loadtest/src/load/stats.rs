//! What one path (relayed or direct) measured: counters the progress bar reads live, and
//! histograms that session tasks fill locally and merge when they finish.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use hdrhistogram::Histogram;

use kakehashi_proto::pb;

use super::{pacer, traffic};
use crate::latency::Percentiles;

/// 1 µs to 100 s at 3 significant digits; values outside are clamped, never lost.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("static bounds are valid")
}

pub fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let q = |p: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(p)
        }
    };
    Percentiles {
        count: h.len(),
        p50: q(0.50),
        p90: q(0.90),
        p99: q(0.99),
        p999: q(0.999),
        max: h.max(),
    }
}

/// Reads a counter.
pub fn get(counter: &AtomicU64) -> u64 {
    counter.load(std::sync::atomic::Ordering::Relaxed)
}

#[derive(Default)]
pub struct PathStats {
    pub sessions_up: AtomicU64,
    pub sessions_failed: AtomicU64,
    /// Counted frames the schedule gave this path (each one has an intended time).
    pub frames_sent: AtomicU64,
    /// Counted frames the sender could not send (withheld by the agent or a send error).
    pub frames_unsent: AtomicU64,
    pub frames_received: AtomicU64,
    /// Header + ciphertext bytes of counted frames received.
    pub wire_bytes_received: AtomicU64,
    /// Plaintext bytes of chat and input sent / delivered, the whole run.
    pub reliable_sent: AtomicU64,
    pub reliable_delivered: AtomicU64,
    latency_us: Mutex<Option<Histogram<u64>>>,
    setup_us: Mutex<Option<Histogram<u64>>>,
}

/// What one session's viewer measures, on either path: set-up time at its first screen
/// frame, then each counted frame's latency from its intended send time.
pub struct ViewerTally {
    created_at: Instant,
    first: bool,
    latency: Histogram<u64>,
}

impl ViewerTally {
    pub fn new(created_at: Instant) -> Self {
        Self {
            created_at,
            first: true,
            latency: histogram(),
        }
    }

    pub fn screen(&mut self, stats: &PathStats, frame: &pb::ScreenFrame) {
        let now = pacer::now_us();
        if self.first {
            self.first = false;
            stats.record_setup(self.created_at.elapsed().as_micros() as u64);
        }
        if let Some((intended, true)) = traffic::stamp(frame) {
            self.latency
                .saturating_record(now.saturating_sub(intended).max(1));
            stats.frames_received.fetch_add(1, Ordering::Relaxed);
            stats
                .wire_bytes_received
                .fetch_add(traffic::wire_len(frame), Ordering::Relaxed);
        }
    }

    /// Adds this session's latencies to the path's.
    pub fn finish(self, stats: &PathStats) {
        stats.merge_latency(&self.latency);
    }
}

impl PathStats {
    /// Merges a session's latency histogram into the path's.
    pub fn merge_latency(&self, h: &Histogram<u64>) {
        merge(&self.latency_us, h);
    }

    pub fn record_setup(&self, us: u64) {
        let mut one = histogram();
        one.saturating_record(us.max(1));
        merge(&self.setup_us, &one);
    }

    pub fn latency(&self) -> Histogram<u64> {
        take(&self.latency_us)
    }

    pub fn setup(&self) -> Histogram<u64> {
        take(&self.setup_us)
    }
}

fn merge(slot: &Mutex<Option<Histogram<u64>>>, h: &Histogram<u64>) {
    let mut g = slot.lock().unwrap_or_else(|p| p.into_inner());
    let total = g.get_or_insert_with(histogram);
    // Both come from `histogram()`, so the bounds match and `add` cannot fail; a
    // value beyond them was already clamped on record.
    let _ = total.add(h);
}

fn take(slot: &Mutex<Option<Histogram<u64>>>) -> Histogram<u64> {
    slot.lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_else(histogram)
}

/// CPU time, in nanoseconds, of the threads of process `pid` (None: this process)
/// whose name starts with `prefix` (empty: all threads), from `/proc/.../schedstat`,
/// which counts in nanoseconds rather than the 10 ms ticks of `stat`.
pub fn threads_cpu_ns(pid: Option<u32>, prefix: &str) -> Option<u64> {
    let base = match pid {
        Some(p) => format!("/proc/{p}/task"),
        None => "/proc/self/task".to_owned(),
    };
    let mut total = 0u64;
    for entry in std::fs::read_dir(&base).ok()?.flatten() {
        let dir = entry.path();
        if !prefix.is_empty() {
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if !comm.trim_end().starts_with(prefix) {
                continue;
            }
        }
        let sched = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
        total += sched
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total)
}

/// User + system CPU of this whole process so far (getrusage), in nanoseconds.
pub fn process_cpu_ns() -> u64 {
    // SAFETY: getrusage fills the struct we own; RUSAGE_SELF is always valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0;
    }
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_histograms_count_everything() {
        let s = PathStats::default();
        let mut a = histogram();
        let mut b = histogram();
        for v in 1..=100 {
            a.record(v).expect("in range");
            b.record(v * 10).expect("in range");
        }
        s.merge_latency(&a);
        s.merge_latency(&b);
        let p = percentiles(&s.latency());
        assert_eq!(p.count, 200);
        assert_eq!(p.max, 1000);
        assert_eq!(percentiles(&histogram()).p99, 0);
    }

    #[test]
    fn this_process_has_cpu_time() {
        assert!(threads_cpu_ns(None, "").is_some());
        let _ = process_cpu_ns();
    }
}
