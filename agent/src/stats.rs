//! Latency percentiles over a window of samples: a sorted copy per report is plenty
//! at screen frame rates.

/// Samples collected since the last report.
#[derive(Debug, Default, Clone)]
pub struct LatencyWindow {
    samples: Vec<i64>,
}

/// One report's numbers, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percentiles {
    pub count: usize,
    pub p50: i64,
    pub p99: i64,
    pub max: i64,
}

impl LatencyWindow {
    pub fn record(&mut self, us: i64) {
        self.samples.push(us);
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The window's percentiles (nearest rank), emptying it. `None` without samples.
    pub fn take(&mut self) -> Option<Percentiles> {
        let mut s = std::mem::take(&mut self.samples);
        if s.is_empty() {
            return None;
        }
        s.sort_unstable();
        let rank = |q: f64| {
            let idx = (q * s.len() as f64).ceil() as usize;
            s[idx.clamp(1, s.len()) - 1]
        };
        Some(Percentiles {
            count: s.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            max: s[s.len() - 1],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut w = LatencyWindow::default();
        assert_eq!(w.take(), None);
        for v in (1..=100).rev() {
            w.record(v);
        }
        let p = w.take().expect("samples");
        assert_eq!(
            p,
            Percentiles {
                count: 100,
                p50: 50,
                p99: 99,
                max: 100
            }
        );
        assert!(w.is_empty());
        w.record(7);
        let p = w.take().expect("one sample");
        assert_eq!((p.p50, p.p99, p.max), (7, 7, 7));
    }
}
