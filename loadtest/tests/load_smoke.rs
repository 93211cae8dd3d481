//! A tiny load run through the embedded cluster: checks the report's invariants (counts
//! add up, every field present, the baseline measured), never its timings.

use std::time::Duration;

use anyhow::{Context, Result};
use kakehashi_loadtest::load::{self, LoadConfig, Traffic};
use serde_json::Value;

fn tiny() -> LoadConfig {
    LoadConfig {
        sessions: 3,
        baseline_sessions: 2,
        traffic: Traffic {
            fps: 30,
            frame_bytes: 2_000,
            key_frame_bytes: 8_000,
            key_interval: 10,
            chat_per_sec: 5.0,
            input_per_sec: 10.0,
        },
        arrival_rate: 50.0,
        warmup: Duration::from_millis(200),
        duration: Duration::from_millis(1500),
        // Generous: a loaded CI machine must not turn in-flight frames into drops.
        drain: Duration::from_secs(10),
        cluster_threads: 1,
        progress: false,
        ..LoadConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_run_reports_consistent_counts_and_a_baseline() -> Result<()> {
    let report = load::run(&tiny()).await?;
    assert_eq!(report.sessions, 3);
    assert_eq!(report.sessions_up, 3, "errors: {:?}", report.errors);
    assert_eq!(
        report.baseline_sessions_up, 2,
        "errors: {:?}",
        report.errors
    );
    for (name, f) in [
        ("relayed", report.frames),
        ("direct", report.baseline_frames),
    ] {
        assert!(f.sent > 0, "{name}: frames were scheduled");
        assert_eq!(f.dropped, f.sent - f.received, "{name}: {f:?}");
        assert!(f.unsent <= f.dropped, "{name}: {f:?}");
    }
    // Both histograms hold exactly the received counted frames.
    assert_eq!(report.latency_us.count, report.frames.received);
    assert_eq!(
        report.baseline_latency_us.count,
        report.baseline_frames.received
    );
    for p in [report.latency_us, report.baseline_latency_us] {
        assert!(p.count > 0);
        assert!(p.p50 <= p.p90 && p.p90 <= p.p99 && p.p99 <= p.p999 && p.p999 <= p.max);
    }
    // Unloaded loopback: everything arrives, reliable bytes too (no timing involved:
    // the drain waits until counts match or its bound passes).
    assert!(report.drained, "{}", report.table());
    assert_eq!(report.frames.dropped, 0, "{}", report.table());
    assert!(report.reliable_bytes.sent > 0);
    assert_eq!(report.reliable_bytes.sent, report.reliable_bytes.delivered);
    assert_eq!(
        report.baseline_reliable_bytes.sent,
        report.baseline_reliable_bytes.delivered
    );
    assert!(report.setup_ms.p50 > 0.0 && report.setup_ms.p50 <= report.setup_ms.p99);
    assert!(report.throughput_mbps > 0.0);
    assert!(
        report.cpu.relay_cpu_s.is_some(),
        "embedded relay CPU is measured"
    );

    // The JSON has every field the issue names, and the plot is written beside it.
    let dir = std::env::temp_dir().join(format!("kk-load-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("report.json");
    let svg = report.write(&path)?;
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    for key in ["latency_us", "baseline_latency_us"] {
        for p in ["p50", "p90", "p99", "p999", "max"] {
            assert!(json[key][p].is_u64(), "{key}.{p} in {json}");
        }
    }
    for p in ["p50", "p99"] {
        assert!(json["setup_ms"][p].is_number(), "setup_ms.{p}");
    }
    for k in ["sent", "received", "dropped"] {
        assert!(json["frames"][k].is_u64(), "frames.{k}");
    }
    for k in ["sent", "delivered"] {
        assert!(json["reliable_bytes"][k].is_u64(), "reliable_bytes.{k}");
    }
    for k in ["sessions", "duration_s", "throughput_mbps"] {
        assert!(json[k].is_number(), "{k}");
    }
    assert!(json["relay_added_us"]["p99"].is_i64());
    let plot = std::fs::read_to_string(&svg).context("plot written")?;
    assert!(plot.contains("<svg"));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wan_profile_runs_both_paths_through_the_proxy() -> Result<()> {
    let mut cfg = tiny();
    cfg.sessions = 1;
    cfg.baseline_sessions = 1;
    cfg.wan = Some((
        "broadband".into(),
        kakehashi_loadtest::proxy::Impairment::profile("broadband").context("profile")?,
    ));
    let report = load::run(&cfg).await?;
    assert_eq!(report.sessions_up, 1, "errors: {:?}", report.errors);
    assert_eq!(
        report.baseline_sessions_up, 1,
        "errors: {:?}",
        report.errors
    );
    assert!(report.frames.received > 0 && report.baseline_frames.received > 0);
    // Reliable bytes survive the profile's loss.
    assert!(report.drained, "{}", report.table());
    assert_eq!(report.reliable_bytes.sent, report.reliable_bytes.delivered);
    // Two proxied hops of 10 ms ± 2 ms lie under every relayed frame (host → relay →
    // viewer) and every direct one (two proxies in a row): a lower bound set by the
    // proxy's own delay, not a performance assertion.
    assert!(report.latency_us.p50 >= 16_000, "{}", report.table());
    assert!(
        report.baseline_latency_us.p50 >= 16_000,
        "{}",
        report.table()
    );
    assert_eq!(
        report.config.wan.as_ref().map(|w| w.profile.as_str()),
        Some("broadband")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_coordinator_is_driven_by_url() -> Result<()> {
    // A cluster the run does not own, reached only through its coordinator's URL.
    let cluster = kakehashi_loadtest::LocalCluster::builder().start().await?;
    let mut cfg = tiny();
    cfg.sessions = 2;
    cfg.baseline_sessions = 1;
    cfg.coordinator = Some(cluster.coordinator_url());
    let report = load::run(&cfg).await?;
    assert_eq!(report.sessions_up, 2, "errors: {:?}", report.errors);
    assert!(report.frames.received > 0);
    assert_eq!(report.config.cluster, cluster.coordinator_url());
    // Without --relay-pid there is no relay process to read CPU time from.
    assert!(report.cpu.relay_cpu_s.is_none());
    cluster.shutdown().await;
    Ok(())
}
