//! Frame-latency summaries, recorded in microseconds into an HdrHistogram.

use hdrhistogram::Histogram;
use serde::Serialize;

pub struct LatencyRecorder {
    hist: Histogram<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyRecorder {
    pub fn new() -> Self {
        // 1 µs to 60 s with 3 significant digits; values outside are clamped.
        let hist = Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds are valid");
        Self { hist }
    }

    pub fn record_us(&mut self, us: u64) {
        self.hist.saturating_record(us.max(1));
    }

    pub fn summary(&self) -> Percentiles {
        let q = |p: f64| self.hist.value_at_quantile(p);
        Percentiles {
            count: self.hist.len(),
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
            p999: q(0.999),
            max: self.hist.max(),
        }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} p50={}µs p90={}µs p99={}µs p99.9={}µs max={}µs",
            self.count, self.p50, self.p90, self.p99, self.p999, self.max
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_follow_the_data() {
        let mut r = LatencyRecorder::new();
        for v in 1..=1000 {
            r.record_us(v);
        }
        let s = r.summary();
        assert_eq!(s.count, 1000);
        assert!((495..=505).contains(&s.p50), "{s}");
        assert!((985..=995).contains(&s.p99), "{s}");
        assert_eq!(s.max, 1000);
    }
}
