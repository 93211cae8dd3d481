//! What a load run reports: the JSON written by `--report FILE`, the terminal table, and
//! the SVG latency plot written next to the JSON.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::latency::Percentiles;
use crate::load::LoadConfig;

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct SetupMs {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// Screen frames intended inside the measurement window.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    /// Frames the schedule gave the senders.
    pub sent: u64,
    /// Frames the viewers received.
    pub received: u64,
    /// `sent − received`: dropped by the relay (latency-first), lost to a failed send,
    /// or not arrived by the end of the drain.
    pub dropped: u64,
    /// Of `dropped`, frames the sending agent could not send (withheld or errored).
    pub unsent: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ReliableBytes {
    /// Plaintext chat and input bytes sent, both directions, the whole run.
    pub sent: u64,
    pub delivered: u64,
}

/// What one path measured.
#[derive(Debug, Clone)]
pub struct PathReport {
    pub sessions: usize,
    pub sessions_up: u64,
    pub sessions_failed: u64,
    pub latency_us: Percentiles,
    pub setup_ms: SetupMs,
    pub frames: Counts,
    pub reliable_bytes: ReliableBytes,
    pub throughput_mbps: f64,
    pub histogram: Histogram<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CpuReport {
    /// CPU seconds the relay used during the window (see `scope`).
    pub relay_cpu_s: Option<f64>,
    /// Screen payload forwarded (header + ciphertext), Gbit per relay CPU-second.
    pub relay_gbit_per_cpu_s: Option<f64>,
    /// CPU seconds of this whole process during the window (generator + embedded
    /// cluster), from getrusage.
    pub process_cpu_s: f64,
    /// Which threads `relay_cpu_s` covers.
    pub scope: String,
    /// Mean time a frame spent inside the embedded relay, from fully read off the
    /// sender's stream to handed to the receiver's stream (`relay_forward_latency_seconds`).
    pub relay_forward_mean_us: Option<f64>,
}

/// How well the load generator itself kept up.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Generator {
    /// Counted frames the generator could not hand to a sender in time (its queue was
    /// full): the generator, not the cluster, was the bottleneck.
    pub skipped_frames: u64,
    /// How late the schedule thread handed out counted frames, µs: the generator's own
    /// share of every latency sample, on both paths alike.
    pub pacer_lateness_us: Percentiles,
}

/// Relayed minus direct, per percentile, and the ratio relayed / direct.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Added {
    pub p50: i64,
    pub p90: i64,
    pub p99: i64,
    pub p999: i64,
    pub max: i64,
    pub ratio_p50: f64,
    pub ratio_p99: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Wan {
    pub profile: String,
    pub delay_ms: f64,
    pub jitter_ms: f64,
    pub loss: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RunConfig {
    pub fps: u32,
    pub frame_bytes: usize,
    pub key_frame_bytes: usize,
    pub key_interval: u64,
    pub chat_per_sec: f64,
    pub input_per_sec: f64,
    pub arrival_rate: f64,
    pub warmup_s: f64,
    pub cluster: String,
    pub wan: Option<Wan>,
}

/// The `--report` JSON.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub sessions: usize,
    pub sessions_up: u64,
    pub sessions_failed: u64,
    pub baseline_sessions: usize,
    pub baseline_sessions_up: u64,
    pub duration_s: f64,
    /// Relayed path, intended send time → viewer receipt, µs.
    pub latency_us: Percentiles,
    /// Direct path (no relay), same traffic, same run, µs.
    pub baseline_latency_us: Percentiles,
    pub relay_added_us: Added,
    pub setup_ms: SetupMs,
    pub baseline_setup_ms: SetupMs,
    pub frames: Counts,
    pub baseline_frames: Counts,
    pub reliable_bytes: ReliableBytes,
    pub baseline_reliable_bytes: ReliableBytes,
    /// Relayed screen traffic delivered in the window (header + ciphertext), Mbit/s.
    pub throughput_mbps: f64,
    pub baseline_throughput_mbps: f64,
    pub generator: Generator,
    /// Every counted frame and reliable byte arrived (or was accounted for) in the drain.
    pub drained: bool,
    pub cpu: CpuReport,
    pub config: RunConfig,
    /// The first failures (setup or session), if any.
    pub errors: Vec<String>,
    #[serde(skip)]
    pub histograms: Option<(Histogram<u64>, Histogram<u64>)>,
}

pub fn relay_added(relayed: u64, direct: u64) -> (i64, f64) {
    let diff = relayed as i64 - direct as i64;
    let ratio = if direct == 0 {
        0.0
    } else {
        relayed as f64 / direct as f64
    };
    (diff, ratio)
}

const MAX_ERRORS: usize = 10;

impl LoadReport {
    pub fn new(
        cfg: &LoadConfig,
        relayed: PathReport,
        direct: PathReport,
        cpu: CpuReport,
        drained: bool,
        generator: Generator,
        mut errors: Vec<String>,
    ) -> Self {
        let (r, d) = (relayed.latency_us, direct.latency_us);
        let added = Added {
            p50: relay_added(r.p50, d.p50).0,
            p90: relay_added(r.p90, d.p90).0,
            p99: relay_added(r.p99, d.p99).0,
            p999: relay_added(r.p999, d.p999).0,
            max: relay_added(r.max, d.max).0,
            ratio_p50: relay_added(r.p50, d.p50).1,
            ratio_p99: relay_added(r.p99, d.p99).1,
        };
        errors.truncate(MAX_ERRORS);
        let t = cfg.traffic;
        Self {
            sessions: relayed.sessions,
            sessions_up: relayed.sessions_up,
            sessions_failed: relayed.sessions_failed,
            baseline_sessions: direct.sessions,
            baseline_sessions_up: direct.sessions_up,
            duration_s: cfg.duration.as_secs_f64(),
            latency_us: r,
            baseline_latency_us: d,
            relay_added_us: added,
            setup_ms: relayed.setup_ms,
            baseline_setup_ms: direct.setup_ms,
            frames: relayed.frames,
            baseline_frames: direct.frames,
            reliable_bytes: relayed.reliable_bytes,
            baseline_reliable_bytes: direct.reliable_bytes,
            throughput_mbps: relayed.throughput_mbps,
            baseline_throughput_mbps: direct.throughput_mbps,
            generator,
            drained,
            cpu,
            config: RunConfig {
                fps: t.fps,
                frame_bytes: t.frame_bytes,
                key_frame_bytes: t.key_frame_bytes,
                key_interval: t.key_interval,
                chat_per_sec: t.chat_per_sec,
                input_per_sec: t.input_per_sec,
                arrival_rate: cfg.arrival_rate,
                warmup_s: cfg.warmup.as_secs_f64(),
                cluster: cfg.coordinator.clone().unwrap_or_else(|| "embedded".into()),
                wan: cfg.wan.as_ref().map(|(name, i)| Wan {
                    profile: name.clone(),
                    delay_ms: i.delay.as_secs_f64() * 1e3,
                    jitter_ms: i.jitter.as_secs_f64() * 1e3,
                    loss: i.loss,
                }),
            },
            errors,
            histograms: Some((relayed.histogram, direct.histogram)),
        }
    }

    /// Fraction of counted relayed frames that did not arrive.
    pub fn drop_ratio(&self) -> f64 {
        if self.frames.sent == 0 {
            0.0
        } else {
            self.frames.dropped as f64 / self.frames.sent as f64
        }
    }

    /// The terminal table.
    pub fn table(&self) -> String {
        let (r, d, a) = (
            self.latency_us,
            self.baseline_latency_us,
            self.relay_added_us,
        );
        let mut s = String::new();
        let line = |s: &mut String, name: &str, rv: String, dv: String, av: String| {
            s.push_str(&format!("{name:<24}{rv:>16}{dv:>16}{av:>18}\n"));
        };
        line(
            &mut s,
            "",
            "relayed".into(),
            "direct".into(),
            "relay adds".into(),
        );
        line(
            &mut s,
            "sessions (up)",
            format!("{} ({})", self.sessions, self.sessions_up),
            format!("{} ({})", self.baseline_sessions, self.baseline_sessions_up),
            String::new(),
        );
        for (name, rv, dv, av, ratio) in [
            ("latency p50 µs", r.p50, d.p50, a.p50, Some(a.ratio_p50)),
            ("latency p90 µs", r.p90, d.p90, a.p90, None),
            ("latency p99 µs", r.p99, d.p99, a.p99, Some(a.ratio_p99)),
            ("latency p99.9 µs", r.p999, d.p999, a.p999, None),
            ("latency max µs", r.max, d.max, a.max, None),
        ] {
            let av = match ratio {
                Some(x) => format!("{av:+} (×{x:.2})"),
                None => format!("{av:+}"),
            };
            line(&mut s, name, rv.to_string(), dv.to_string(), av);
        }
        line(
            &mut s,
            "setup p50 / p99 ms",
            format!("{:.1} / {:.1}", self.setup_ms.p50, self.setup_ms.p99),
            format!(
                "{:.1} / {:.1}",
                self.baseline_setup_ms.p50, self.baseline_setup_ms.p99
            ),
            String::new(),
        );
        let f = |c: Counts| format!("{}/{}/{}", c.sent, c.received, c.dropped);
        line(
            &mut s,
            "frames sent/recv/drop",
            f(self.frames),
            f(self.baseline_frames),
            String::new(),
        );
        let b = |c: ReliableBytes| format!("{}/{}", c.sent, c.delivered);
        line(
            &mut s,
            "reliable B sent/deliv",
            b(self.reliable_bytes),
            b(self.baseline_reliable_bytes),
            String::new(),
        );
        line(
            &mut s,
            "throughput Mbit/s",
            format!("{:.1}", self.throughput_mbps),
            format!("{:.1}", self.baseline_throughput_mbps),
            String::new(),
        );
        s.push_str(&format!(
            "window {:.1} s; generator-skipped frames {}; drained {}; pacer lateness p50 {} µs, p99 {} µs, max {} µs\n",
            self.duration_s,
            self.generator.skipped_frames,
            self.drained,
            self.generator.pacer_lateness_us.p50,
            self.generator.pacer_lateness_us.p99,
            self.generator.pacer_lateness_us.max
        ));
        match (self.cpu.relay_cpu_s, self.cpu.relay_gbit_per_cpu_s) {
            (Some(c), Some(g)) => s.push_str(&format!(
                "relay CPU {c:.2} s in the window ({:.0} % of one core): {g:.2} Gbit forwarded per CPU-second [{}]\n",
                100.0 * c / self.duration_s.max(1e-9),
                self.cpu.scope
            )),
            _ => s.push_str(&format!("relay CPU: {}\n", self.cpu.scope)),
        }
        if let Some(us) = self.cpu.relay_forward_mean_us {
            s.push_str(&format!(
                "inside the relay (read off the sender's stream → handed to the receiver's): mean {us:.1} µs\n"
            ));
        }
        s.push_str(&format!(
            "whole process CPU {:.2} s in the window\n",
            self.cpu.process_cpu_s
        ));
        if let Some(wan) = &self.config.wan {
            s.push_str(&format!(
                "WAN profile {} (each proxy hop, each direction): delay {} ms ± {} ms, loss {:.2} %\n",
                wan.profile,
                wan.delay_ms,
                wan.jitter_ms,
                wan.loss * 100.0
            ));
        }
        for e in &self.errors {
            s.push_str(&format!("error: {e}\n"));
        }
        s
    }

    /// Writes the JSON report and, beside it, `<stem>.svg`; returns the SVG's path.
    pub fn write(&self, path: &Path) -> Result<PathBuf> {
        let json = serde_json::to_string_pretty(self).context("serialising the report")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        let svg = path.with_extension("svg");
        if let Some((r, d)) = &self.histograms {
            plot_percentiles(&svg, r, d, &self.title())?;
        }
        Ok(svg)
    }

    fn title(&self) -> String {
        let t = &self.config;
        format!(
            "{} sessions, {} fps, {} B frames (key {} B every {}){}",
            self.sessions,
            t.fps,
            t.frame_bytes,
            t.key_frame_bytes,
            t.key_interval,
            t.wan
                .as_ref()
                .map(|w| format!(", WAN {}", w.profile))
                .unwrap_or_default()
        )
    }
}

/// Latency by percentile, relayed and direct, on log axes (the HdrHistogram plot).
pub fn plot_percentiles(
    path: &Path,
    relayed: &Histogram<u64>,
    direct: &Histogram<u64>,
    title: &str,
) -> Result<()> {
    use plotters::prelude::*;
    let series = |h: &Histogram<u64>| -> Vec<(f64, f64)> {
        if h.is_empty() {
            return Vec::new();
        }
        // x = 1 / (1 − q): 10 is p90, 100 is p99, 1000 is p99.9.
        let mut v = Vec::new();
        let mut q = 0.0f64;
        while q < 0.99999 {
            v.push((1.0 / (1.0 - q), h.value_at_quantile(q).max(1) as f64));
            q += (1.0 - q) * 0.05;
        }
        v.push((1e5, h.max().max(1) as f64));
        v
    };
    let (r, d) = (series(relayed), series(direct));
    let ymax = r.iter().chain(d.iter()).map(|p| p.1).fold(10.0, f64::max) * 2.0;
    let ymin = r
        .iter()
        .chain(d.iter())
        .map(|p| p.1)
        .fold(f64::MAX, f64::min)
        .min(ymax / 4.0)
        / 2.0;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("plotting {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0f64..1e5).log_scale(), (ymin.max(1.0)..ymax).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs, intended send → viewer receipt)")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .x_label_formatter(&|x| {
            let p = 100.0 * (1.0 - 1.0 / x);
            if p < 99.0 {
                format!("{p:.0}%")
            } else {
                let digits = format!("{p:.3}");
                format!("{}%", digits.trim_end_matches('0').trim_end_matches('.'))
            }
        })
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(r, RED.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("relayed (host → relay → viewer)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .draw_series(LineSeries::new(d, BLUE.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("direct baseline (host → viewer)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// One point of a series drawn by [`plot_lines`].
pub type Point = (f64, f64);

/// A simple line plot with a linear x and a log y, for the capacity ramp.
pub fn plot_lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    lines: &[(&str, Vec<Point>)],
) -> Result<()> {
    use plotters::prelude::*;
    let all = lines.iter().flat_map(|(_, v)| v.iter());
    let xmax = all.clone().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let ymax = all.clone().map(|p| p.1).fold(10.0, f64::max) * 2.0;
    let ymin = all
        .map(|p| p.1)
        .fold(f64::MAX, f64::min)
        .min(ymax / 4.0)
        .max(1.0)
        / 2.0;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("plotting {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..xmax, (ymin.max(0.5)..ymax).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(|e| err(&e))?;
    let colors = [RED, BLUE, GREEN, MAGENTA];
    for (i, (name, pts)) in lines.iter().enumerate() {
        let c = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 3, c.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
