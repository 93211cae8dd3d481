//! Capacity search: run the load at growing session counts until the relayed p99 passes
//! a threshold or drops pass a bound, then bisect between the last pass and the first
//! failure. The knee is the largest session count that passed. Each step is a complete,
//! fresh run (new cluster, new sessions), so steps do not inherit each other's backlog.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use super::{LoadConfig, run};
use crate::latency::Percentiles;
use crate::report::{LoadReport, plot_lines};

#[derive(Debug, Clone)]
pub struct CapacityConfig {
    /// First step's relayed sessions.
    pub start: usize,
    /// Never go past this many sessions.
    pub max: usize,
    /// A step fails when the relayed p99 exceeds this.
    pub p99_limit: Duration,
    /// A step fails when more than this fraction of relayed frames is dropped.
    pub drop_limit: f64,
    /// Bisection steps after the first failure.
    pub refine: u32,
    /// Direct sessions per relayed session at each step.
    pub baseline_fraction: f64,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        Self {
            start: 50,
            max: 4000,
            p99_limit: Duration::from_millis(50),
            drop_limit: 0.001,
            refine: 3,
            baseline_fraction: 0.25,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub sessions: usize,
    pub sessions_up: u64,
    pub latency_us: Percentiles,
    pub baseline_latency_us: Percentiles,
    pub drop_ratio: f64,
    pub throughput_mbps: f64,
    pub relay_cpu_s: Option<f64>,
    pub relay_gbit_per_cpu_s: Option<f64>,
    pub generator_skipped_frames: u64,
    pub passed: bool,
    /// Why the step failed, if it did.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CapacityReport {
    /// The largest session count that passed (0 if none did).
    pub knee_sessions: usize,
    /// The smallest that failed, if any did.
    pub first_failure: Option<usize>,
    pub p99_limit_us: u64,
    pub drop_limit: f64,
    pub step_duration_s: f64,
    pub steps: Vec<Step>,
    /// The full report of the knee's run.
    pub knee: Option<LoadReport>,
}

fn judge(r: &LoadReport, cap: &CapacityConfig) -> Option<String> {
    let limit = cap.p99_limit.as_micros() as u64;
    let up_short = r.sessions_up < r.sessions as u64;
    if up_short {
        return Some(format!(
            "{} of {} sessions failed to start",
            r.sessions as u64 - r.sessions_up,
            r.sessions
        ));
    }
    if r.latency_us.p99 > limit {
        return Some(format!("p99 {} µs > {} µs", r.latency_us.p99, limit));
    }
    if r.drop_ratio() > cap.drop_limit {
        return Some(format!(
            "drops {:.3} % > {:.3} %",
            r.drop_ratio() * 100.0,
            cap.drop_limit * 100.0
        ));
    }
    None
}

async fn step(base: &LoadConfig, cap: &CapacityConfig, n: usize) -> Result<(Step, LoadReport)> {
    let mut cfg = base.clone();
    cfg.sessions = n;
    cfg.baseline_sessions = ((n as f64 * cap.baseline_fraction).ceil() as usize).max(1);
    let r = run(&cfg).await?;
    let reason = judge(&r, cap);
    let s = Step {
        sessions: n,
        sessions_up: r.sessions_up,
        latency_us: r.latency_us,
        baseline_latency_us: r.baseline_latency_us,
        drop_ratio: r.drop_ratio(),
        throughput_mbps: r.throughput_mbps,
        relay_cpu_s: r.cpu.relay_cpu_s,
        relay_gbit_per_cpu_s: r.cpu.relay_gbit_per_cpu_s,
        generator_skipped_frames: r.generator.skipped_frames,
        passed: reason.is_none(),
        reason,
    };
    Ok((s, r))
}

/// Runs the search. `on_step` sees each step as it finishes (for the terminal).
pub async fn find(
    base: &LoadConfig,
    cap: &CapacityConfig,
    mut on_step: impl FnMut(&Step),
) -> Result<CapacityReport> {
    let mut steps = Vec::new();
    let mut best: Option<LoadReport> = None;
    let mut pass_n = 0usize;
    let mut fail_n: Option<usize> = None;
    // Grow by half each step until something fails.
    let mut n = cap.start.max(1);
    loop {
        let (st, r) = step(base, cap, n).await?;
        on_step(&st);
        let passed = st.passed;
        steps.push(st);
        if passed {
            pass_n = n;
            best = Some(r);
            if n >= cap.max {
                break;
            }
            n = (n + n / 2).max(n + 1).min(cap.max);
        } else {
            fail_n = Some(n);
            break;
        }
    }
    // Bisect between the last pass and the first failure.
    if let Some(mut hi) = fail_n {
        let mut lo = pass_n;
        for _ in 0..cap.refine {
            let mid = lo + (hi - lo) / 2;
            if mid <= lo || hi - lo <= (hi / 20).max(1) {
                break;
            }
            let (st, r) = step(base, cap, mid).await?;
            on_step(&st);
            let passed = st.passed;
            steps.push(st);
            if passed {
                lo = mid;
                best = Some(r);
            } else {
                hi = mid;
            }
        }
        pass_n = lo;
        fail_n = Some(hi);
    }
    Ok(CapacityReport {
        knee_sessions: pass_n,
        first_failure: fail_n,
        p99_limit_us: cap.p99_limit.as_micros() as u64,
        drop_limit: cap.drop_limit,
        step_duration_s: base.duration.as_secs_f64(),
        steps,
        knee: best,
    })
}

impl CapacityReport {
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:>9} {:>5} {:>10} {:>10} {:>10} {:>10} {:>8} {:>9} {:>10}  result\n",
            "sessions",
            "up",
            "p50 µs",
            "p99 µs",
            "base p99",
            "p99.9 µs",
            "drop %",
            "Mbit/s",
            "Gbit/cpu-s"
        );
        let mut sorted = self.steps.clone();
        sorted.sort_by_key(|s| s.sessions);
        for st in &sorted {
            s.push_str(&format!(
                "{:>9} {:>5} {:>10} {:>10} {:>10} {:>10} {:>8.3} {:>9.1} {:>10}  {}\n",
                st.sessions,
                st.sessions_up,
                st.latency_us.p50,
                st.latency_us.p99,
                st.baseline_latency_us.p99,
                st.latency_us.p999,
                st.drop_ratio * 100.0,
                st.throughput_mbps,
                st.relay_gbit_per_cpu_s
                    .map(|g| format!("{g:.2}"))
                    .unwrap_or_else(|| "-".into()),
                st.reason.as_deref().unwrap_or("pass"),
            ));
        }
        s.push_str(&format!(
            "knee: {} sessions (p99 limit {} µs, drop limit {:.3} %){}\n",
            self.knee_sessions,
            self.p99_limit_us,
            self.drop_limit * 100.0,
            self.first_failure
                .map(|f| format!("; first failure at {f}"))
                .unwrap_or_default()
        ));
        s
    }

    /// Writes the JSON and `<stem>.svg` (p50/p99 against sessions); returns the SVG path.
    pub fn write(&self, path: &Path) -> Result<PathBuf> {
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(path, json)?;
        let svg = path.with_extension("svg");
        let mut sorted = self.steps.clone();
        sorted.sort_by_key(|s| s.sessions);
        let pts = |f: &dyn Fn(&Step) -> u64| -> Vec<(f64, f64)> {
            sorted
                .iter()
                .map(|s| (s.sessions as f64, f(s).max(1) as f64))
                .collect()
        };
        plot_lines(
            &svg,
            &format!(
                "capacity search: knee at {} sessions (p99 ≤ {} µs, drops ≤ {:.2} %)",
                self.knee_sessions,
                self.p99_limit_us,
                self.drop_limit * 100.0
            ),
            "relayed sessions",
            "latency µs",
            &[
                ("relayed p99", pts(&|s| s.latency_us.p99)),
                ("relayed p50", pts(&|s| s.latency_us.p50)),
                ("direct p99", pts(&|s| s.baseline_latency_us.p99)),
                ("direct p50", pts(&|s| s.baseline_latency_us.p50)),
            ],
        )?;
        Ok(svg)
    }
}
