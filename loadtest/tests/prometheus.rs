//! A real Prometheus (Debian's `prometheus` binary) scrapes a real process cluster
//! (etcd, one coordinator, two relays) while the load generator runs sessions through it,
//! with the alert and recording rules of `ops/rules/` loaded; then every dashboard
//! panel's query (`ops/dashboards/*.json`) and every rule's expression is evaluated
//! through the HTTP API, and the test fails if any returns no series.
//!
//! Besides the load, the test makes a few things happen that a healthy cluster does
//! every day: wrong codes (and the guess limiter answering them), and one relay
//! draining, so sessions resume elsewhere and the leader sees a relay leave.
//!
//! Two kinds of expressions are allowed to come back empty, each listed below with the
//! reason:
//! - alert expressions whose threshold is not crossed on a healthy cluster: the
//!   expression is evaluated again without its final comparison (its underlying
//!   series), which must then return something;
//! - expressions that read a counter that exists only after a fault this test does not
//!   cause ([`FAULT_ONLY`]; the `metrics` crate exports a labelled counter on its first
//!   increment), directly or through a recording rule. For those the query must still
//!   be accepted by Prometheus; the test prints every one it let pass.
//!
//! Finds Prometheus through `KAKEHASHI_TEST_PROMETHEUS` or `PATH`; without it the test
//! skips, except under `CI=true`, where it fails.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kakehashi_loadtest::load::{self, LoadConfig};
use kakehashi_loadtest::procs::{Launcher, ProcClusterBuilder};
use kakehashi_loadtest::services;
use kakehashi_proto::pb;
use kakehashi_proto::pb::agent_service_client::AgentServiceClient;

/// Counters (and the one gauge) that appear only after an event this test does not
/// cause, with the event.
const FAULT_ONLY: &[(&str, &str)] = &[
    ("relay_sessions_failed_total", "a session actor panicked"),
    (
        "relay_protocol_errors_total",
        "a participant broke the protocol",
    ),
    (
        "relay_attach_refused_total",
        "a forged, expired or misdirected token",
    ),
    (
        "relay_frames_denied_total",
        "a participant sent what consent does not allow",
    ),
    (
        "relay_screen_frames_dropped_total",
        "a viewer too slow for its screen stream",
    ),
    ("relay_registration_errors_total", "an etcd outage"),
    ("coordinator_reaper_errors_total", "a backend outage"),
    (
        "coordinator_relay_end_failures_total",
        "a relay not answering RelayAdmin.EndSession",
    ),
    ("coordinator_relay_directory_errors_total", "an etcd outage"),
    (
        "coordinator_orphaned_sessions_ended_total",
        "a relay gone longer than the resume window",
    ),
];

/// Alerts whose stripped expression is still empty on a healthy cluster because it
/// selects one error kind that only a fault produces.
const ALERTS_ON_FAULT_KINDS: &[(&str, &str)] = &[
    (
        "KakehashiNoRelayForPlacement",
        "coordinator_rpc_errors_total{kind=\"no_relays\"}: no relay has room",
    ),
    (
        "KakehashiBackendErrors",
        "coordinator_rpc_errors_total{kind=\"backend\"}: Redis or etcd failing",
    ),
];

fn prometheus_binary() -> Result<Option<PathBuf>> {
    if let Ok(p) = std::env::var("KAKEHASHI_TEST_PROMETHEUS") {
        return Ok(Some(PathBuf::from(p)));
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("prometheus"))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Ok(Some(p)),
        None if services::in_ci() => {
            bail!("prometheus is not installed (ops/install-deps.sh installs it); CI=true")
        }
        None => {
            eprintln!("SKIPPING: no prometheus binary (set KAKEHASHI_TEST_PROMETHEUS)");
            Ok(None)
        }
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// A Prometheus server that is killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempdir::Dir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

mod tempdir {
    /// A private directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);

    impl Dir {
        pub fn new() -> anyhow::Result<Self> {
            let mut r = [0u8; 8];
            getrandom::fill(&mut r)?;
            let path = std::env::temp_dir().join(format!("kk-prom-{}", hex::encode(r)));
            std::fs::create_dir_all(&path)?;
            Ok(Self(path))
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_prometheus(bin: &Path, coordinators: &[String], relays: &[String]) -> Result<Prometheus> {
    let dir = tempdir::Dir::new()?;
    // The rule files as shipped, except that each group is evaluated every second: a
    // group's own `interval:` (30 s for the recording rules) outlives this test's load
    // window, and a recorded series would depend on where its first evaluation fell.
    let mut rules = Vec::new();
    for entry in std::fs::read_dir(repo_root().join("ops/rules"))? {
        let path = entry?.path();
        if path.extension().is_none_or(|x| x != "yml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let fast: String = text
            .lines()
            .map(|l| match l.trim_start().strip_prefix("interval:") {
                Some(_) => format!("{}interval: 1s\n", &l[..l.len() - l.trim_start().len()]),
                None => format!("{l}\n"),
            })
            .collect();
        let name = path.file_name().context("a rule file name")?;
        let copy = dir.0.join(name);
        std::fs::write(&copy, fast)?;
        rules.push(format!("  - {:?}", copy.display().to_string()));
    }
    let targets = |list: &[String]| {
        list.iter()
            .map(|t| format!("{t:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // The chart's ServiceMonitor/PodMonitor add `component`; the rules rely on it.
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n  scrape_timeout: 900ms\n\
         rule_files:\n{}\n\
         scrape_configs:\n\
         \x20 - job_name: coordinator\n    static_configs:\n      - targets: [{}]\n        labels: {{component: coordinator}}\n\
         \x20 - job_name: relay\n    static_configs:\n      - targets: [{}]\n        labels: {{component: relay}}\n",
        rules.join("\n"),
        targets(coordinators),
        targets(relays),
    );
    let config_path = dir.0.join("prometheus.yml");
    std::fs::write(&config_path, config)?;
    let port = free_port()?;
    let log = std::fs::File::create(dir.0.join("prometheus.log"))?;
    let child = Command::new(bin)
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.0.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    Ok(Prometheus {
        child,
        url: format!("127.0.0.1:{port}"),
        _dir: dir,
    })
}

/// `GET path` against Prometheus; the body of a 200 answer.
async fn http_get(addr: &str, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, anyhow::Error>(String::from_utf8_lossy(&answer).into_owned())
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("GET {path} timed out"))??;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP head in {answer:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {head} {body}");
    }
    // Prometheus answers small bodies with a length and larger ones chunked.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(body));
    }
    Ok(body.to_owned())
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Evaluates `expr`; the number of series it returns. An empty answer to an expression
/// over recorded series is asked again for a few rule-evaluation intervals, so a
/// recording rule that has not run since the last scrape does not count as empty.
async fn series(prom: &str, expr: &str) -> Result<usize> {
    if !expr.contains("kakehashi:") {
        return series_now(prom, expr).await;
    }
    for _ in 0..3 {
        let n = series_now(prom, expr).await?;
        if n > 0 {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    series_now(prom, expr).await
}

async fn series_now(prom: &str, expr: &str) -> Result<usize> {
    let body = http_get(prom, &format!("/api/v1/query?query={}", urlencode(expr))).await?;
    let v: serde_json::Value = serde_json::from_str(&body)?;
    if v["status"] != "success" {
        bail!("query {expr:?} failed: {body}");
    }
    Ok(match &v["data"]["result"] {
        serde_json::Value::Array(a) => a.len(),
        // Scalars and strings are one value.
        _ => 1,
    })
}

/// Dashboard queries with Grafana's variables replaced by what they stand for here.
fn dashboard_queries() -> Result<Vec<(String, String)>> {
    fn walk(panels: &serde_json::Value, file: &str, out: &mut Vec<(String, String)>) {
        let Some(panels) = panels.as_array() else {
            return;
        };
        for p in panels {
            walk(&p["panels"], file, out);
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    let expr = expr
                        .replace("$__rate_interval", "15s")
                        .replace("$__range", "2m")
                        .replace("$instance", ".*");
                    out.push((format!("{file} / {title}"), expr));
                }
            }
        }
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo_root().join("ops/dashboards"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|x| x == "json") {
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
            let file = path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            walk(&v["panels"], &file, &mut out);
        }
    }
    Ok(out)
}

/// Every rule's name and expression: `(alert or record, expr, is_alert)`.
fn rule_exprs() -> Result<Vec<(String, String, bool)>> {
    // The rule files are YAML; their expressions are plain or `|` blocks, read here
    // without a YAML library.
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo_root().join("ops/rules"))? {
        let path = entry?.path();
        if path.extension().is_none_or(|x| x != "yml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let lines: Vec<&str> = text.lines().collect();
        let mut name: Option<(String, bool)> = None;
        let mut i = 0;
        while i < lines.len() {
            let line = lines[i].trim_start();
            if let Some(n) = line.strip_prefix("- alert:") {
                name = Some((n.trim().to_owned(), true));
            } else if let Some(n) = line.strip_prefix("- record:") {
                name = Some((n.trim().to_owned(), false));
            } else if let Some(e) = line.strip_prefix("expr:") {
                let indent = lines[i].len() - line.len();
                let mut expr = e.trim().to_owned();
                if expr == "|" || expr == ">" {
                    expr.clear();
                    while i + 1 < lines.len()
                        && (lines[i + 1].trim().is_empty()
                            || lines[i + 1].len() - lines[i + 1].trim_start().len() > indent)
                    {
                        i += 1;
                        expr.push(' ');
                        expr.push_str(lines[i].trim());
                    }
                }
                let (n, alert) = name.clone().context("expr before alert/record")?;
                out.push((n, expr.trim().to_owned(), alert));
            }
            i += 1;
        }
    }
    Ok(out)
}

/// The expression without a final comparison against a number, if it ends in one.
fn strip_threshold(expr: &str) -> Option<String> {
    for op in ["==", "!=", ">=", "<=", ">", "<"] {
        if let Some(i) = expr.rfind(op) {
            let (left, right) = (&expr[..i], &expr[i + op.len()..]);
            if right.trim().parse::<f64>().is_ok() && !left.trim().is_empty() {
                return Some(left.trim().to_owned());
            }
        }
    }
    None
}

/// Our metric names an expression reads, looking through recording rules (`recorded`
/// maps a recorded name to its expression).
fn metric_names(
    expr: &str,
    recorded: &std::collections::BTreeMap<String, String>,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for w in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
        if w.starts_with("relay_") || w.starts_with("coordinator_") {
            out.insert(w.to_owned());
        } else if let Some(inner) = recorded.get(w) {
            out.extend(metric_names(inner, &std::collections::BTreeMap::new()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_and_rule_returns_series_from_a_loaded_cluster() -> Result<()> {
    let Some(prometheus_bin) = prometheus_binary()? else {
        return Ok(());
    };
    let Some(etcd) = services::etcd()? else {
        return Ok(());
    };
    let mut cluster =
        ProcClusterBuilder::new(Launcher::loadtest(env!("CARGO_BIN_EXE_kakehashi-loadtest")))
            .etcd([etcd.url.clone()])
            .coordinators(1)
            .relays(2)
            .relay_args(["--drain-grace-secs", "5"])
            .metrics()
            .start()?;
    let addrs = |v: Vec<Option<std::net::SocketAddr>>| -> Result<Vec<String>> {
        v.into_iter()
            .map(|a| {
                a.map(|a| a.to_string())
                    .context("a process without metrics")
            })
            .collect()
    };
    let coordinator_targets = addrs(
        cluster
            .coordinators
            .iter()
            .map(|c| c.metrics_addr)
            .collect(),
    )?;
    let relay_targets = addrs(cluster.relays.iter().map(|r| r.metrics_addr).collect())?;
    let url = cluster.coordinator_urls()[0].clone();
    let prom = start_prometheus(&prometheus_bin, &coordinator_targets, &relay_targets)?;
    let p = prom.url.clone();

    // Prometheus is ready and has scraped every target once.
    let targets = coordinator_targets.len() + relay_targets.len();
    wait_for(&p, "every target up", |n| n >= targets, "sum(up)").await?;

    // Load: sessions through the relays, from the real generator.
    let load = tokio::spawn(async move {
        load::run(&LoadConfig {
            sessions: 6,
            baseline_sessions: 0,
            arrival_rate: 20.0,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(8),
            drain: Duration::from_secs(2),
            coordinator: Some(url.clone()),
            progress: false,
            ..LoadConfig::default()
        })
        .await
        .map(|_| url)
    });

    // One relay drains while sessions run on both: its sessions resume on the other.
    let mut load = load;
    let both = wait_for(
        &p,
        "sessions on both relays",
        |n| n >= 2,
        "sum(clamp_max(relay_sessions_active, 1))",
    );
    tokio::select! {
        r = both => r?,
        r = &mut load => bail!("the load run ended before sessions reached both relays: {r:?}"),
    }
    // Wrong codes from this address (after the load's customers have joined from it):
    // guess failures, then the limiter.
    let mut agents = AgentServiceClient::connect(cluster.coordinator_urls()[0].clone()).await?;
    for _ in 0..8 {
        let wrong = agents
            .join_by_code(pb::JoinByCodeRequest {
                // Well formed (its Damm check digit holds), never issued to anyone.
                code: "0000000".into(),
                public_key: vec![1; 32],
            })
            .await;
        if wrong.is_ok() {
            bail!("a made-up code joined a session");
        }
    }

    let draining = cluster.relays[1].id.clone();
    cluster
        .relay(&draining)
        .context("the second relay")?
        .proc
        .terminate()?;
    wait_for(
        &p,
        "a resume",
        |n| n >= 1,
        "sum(coordinator_resume_calls_total{result=\"ok\"}) > 0",
    )
    .await?;
    let _url = tokio::time::timeout(Duration::from_secs(60), load)
        .await
        .context("the load run did not finish")???;
    // Rules evaluate every second; give the rates two more scrapes after the load.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut failures = Vec::new();
    let rules = rule_exprs()?;
    let recorded: std::collections::BTreeMap<String, String> = rules
        .iter()
        .filter(|(_, _, alert)| !alert)
        .map(|(n, e, _)| (n.clone(), e.clone()))
        .collect();
    let fault_only: BTreeSet<&str> = FAULT_ONLY.iter().map(|(m, _)| *m).collect();
    let exempt = |expr: &str| {
        let names = metric_names(expr, &recorded);
        // A ratio with a fault-only numerator (screen drops over all screen frames) is
        // empty with its numerator.
        names.iter().any(|n| fault_only.contains(n.as_str()))
    };
    let mut exempted = Vec::new();
    let queries = dashboard_queries()?;
    assert!(
        queries.len() > 40,
        "dashboards hold {} queries",
        queries.len()
    );
    for (panel, expr) in &queries {
        let n = series(&p, expr).await?;
        if n == 0 {
            if exempt(expr) {
                exempted.push(format!("panel {panel}: {expr}"));
            } else {
                failures.push(format!("panel {panel}: {expr}"));
            }
        }
    }
    assert!(rules.len() > 15, "rule files hold {} rules", rules.len());
    for (name, expr, alert) in &rules {
        if series(&p, expr).await? > 0 {
            continue;
        }
        let underlying = if *alert { strip_threshold(expr) } else { None };
        if let Some(u) = &underlying
            && series(&p, u).await? > 0
        {
            continue;
        }
        if exempt(expr) || ALERTS_ON_FAULT_KINDS.iter().any(|(a, _)| a == name) {
            exempted.push(format!("rule {name}: {expr}"));
            continue;
        }
        let raw: Vec<String> = {
            let mut v = Vec::new();
            for m in metric_names(expr, &recorded) {
                v.push(format!("{m}: {} series", series_now(&p, &m).await?));
            }
            v
        };
        failures.push(format!(
            "rule {name}: {expr} (underlying: {}; {})",
            underlying.as_deref().unwrap_or("-"),
            raw.join(", ")
        ));
    }
    eprintln!(
        "evaluated {} dashboard queries and {} rules; {} empty by design (fault-only):\n  {}",
        queries.len(),
        rules.len(),
        exempted.len(),
        exempted.join("\n  ")
    );
    cluster.stop();
    drop(prom);
    if !failures.is_empty() {
        bail!(
            "{} queries returned no series:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

/// Polls an instant query until `ok(number of series, or the scalar's value)` holds.
async fn wait_for(prom: &str, what: &str, ok: impl Fn(usize) -> bool, expr: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let value = match http_get(prom, &format!("/api/v1/query?query={}", urlencode(expr))).await
        {
            Ok(body) => {
                let v: serde_json::Value = serde_json::from_str(&body)?;
                let result = &v["data"]["result"];
                match result.as_array() {
                    // `sum(...)` style: the value of the first series; otherwise a count.
                    Some(a) if a.len() == 1 && expr.starts_with("sum(") => a[0]["value"][1]
                        .as_str()
                        .and_then(|s| s.parse::<f64>().ok())
                        .map_or(0, |f| f as usize),
                    Some(a) => a.len(),
                    None => 0,
                }
            }
            // Not up yet.
            Err(_) => 0,
        };
        if ok(value) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            let up = http_get(prom, "/api/v1/query?query=up")
                .await
                .unwrap_or_default();
            let live = http_get(prom, "/api/v1/query?query=relay_sessions_active")
                .await
                .unwrap_or_default();
            bail!("timed out waiting for {what} ({expr} = {value}); up: {up}; sessions: {live}");
        }
        // Scrapes and rule evaluations run every second; there is no event to await.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
