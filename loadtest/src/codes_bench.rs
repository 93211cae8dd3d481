//! `codes-bench`: allocations + redemptions per second through the coordinator's Redis
//! code store, beside `redis-benchmark -t set` against the same Redis in the same run,
//! and their ratio. A benchmark, not a test: it reports numbers and asserts nothing
//! about them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kakehashi_coordinator::backend::codes::CodeStore;
use kakehashi_coordinator::backend::redis::{self, RedisCodeStore, RedisConfig, RedisTarget};
use kakehashi_loadtest::services;
use kakehashi_proto::SessionId;

/// Flags of `kakehashi-loadtest codes-bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Redis to measure against; without it one is started on a free loopback port.
    #[arg(long, env = "KAKEHASHI_BENCH_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Allocate+redeem pairs per run.
    #[arg(long, default_value_t = 100_000)]
    pub pairs: u64,
    /// Concurrent callers sharing the coordinator's one multiplexed connection.
    #[arg(long, default_value_t = 64)]
    pub concurrency: u64,
    /// Runs of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Requests per `redis-benchmark` run.
    #[arg(long, default_value_t = 200_000)]
    pub baseline_requests: u64,
    /// Minimum code length asked for (the store lengthens codes as they crowd).
    #[arg(long, default_value_t = 6)]
    pub digits: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One run: `pairs` allocate+redeem pairs from `concurrency` tasks; returns Redis-backed
/// store operations (allocations + redemptions) per second.
async fn store_run(store: Arc<RedisCodeStore>, opts: &Options) -> Result<f64> {
    let per_task = opts.pairs / opts.concurrency.max(1);
    ensure!(per_task > 0, "--pairs must be at least --concurrency");
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..opts.concurrency {
        let store = store.clone();
        let digits = opts.digits;
        tasks.spawn(async move {
            for i in 0..per_task {
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&t.to_be_bytes());
                b[8..].copy_from_slice(&i.to_be_bytes());
                let id = SessionId::from_bytes(b);
                let code = store.allocate(id, digits, Duration::from_secs(600)).await?;
                let got = store.redeem(&code).await?;
                ensure!(got == Some(id), "code {code} redeemed to {got:?}, not {id}");
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.context("a benchmark task panicked")??;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok((2 * per_task * opts.concurrency) as f64 / secs)
}

/// `redis-benchmark -t set` against `host:port` (50 clients, `pipeline` requests in
/// flight per client); returns SET requests per second.
fn baseline_run(host: &str, port: u16, requests: u64, pipeline: u32) -> Result<f64> {
    let out = std::process::Command::new("redis-benchmark")
        .args(["-h", host, "-p", &port.to_string()])
        .args(["-t", "set", "-n", &requests.to_string(), "-q"])
        .args(["-P", &pipeline.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .context("cannot run redis-benchmark (apt-get install redis-tools)")?;
    if !out.status.success() {
        bail!(
            "redis-benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // `-q` prints lines like "SET: 123456.79 requests per second, p50=0.199 msec"; the
    // progress output before it is separated by carriage returns.
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("SET: "))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|n| n.parse::<f64>().ok())
        .next_back()
        .with_context(|| format!("no SET figure in redis-benchmark output: {text:?}"))
}

fn host_port(url: &str) -> Result<(String, u16)> {
    let rest = url
        .strip_prefix("redis://")
        .with_context(|| format!("{url} is not a redis:// URL"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let (host, port) = authority
        .rsplit_once(':')
        .with_context(|| format!("{url} has no port"))?;
    Ok((host.to_owned(), port.parse().context("bad port")?))
}

pub async fn run(opts: Options) -> Result<()> {
    let (_guard, url) = match &opts.redis_url {
        Some(url) => (None, url.clone()),
        None => {
            let service = services::redis()?.context("redis-server is not installed")?;
            let url = service.url.clone();
            (Some(service), url)
        }
    };
    let (host, port) = host_port(&url)?;
    let mut config = RedisConfig::new(RedisTarget::Single(url.clone()));
    let mut rand = [0u8; 6];
    getrandom::fill(&mut rand).context("no randomness")?;
    config.namespace = format!("bench-{}", hex::encode(rand));
    let shared = redis::connect(&config).await?;
    let store = Arc::new(RedisCodeStore::new(shared, config.code_density));

    println!(
        "codes-bench against {url}: {} allocate+redeem pairs x {} runs, {} concurrent callers on one multiplexed connection",
        opts.pairs, opts.runs, opts.concurrency
    );
    // Two baselines: redis-benchmark's default (50 clients, one request in flight each)
    // and with 16 pipelined requests per client, near what the server itself can do.
    // The coordinator's callers share one multiplexed connection, which pipelines too.
    let mut store_rates = Vec::new();
    let mut plain_rates = Vec::new();
    let mut piped_rates = Vec::new();
    for run in 1..=opts.runs.max(1) {
        let s = store_run(store.clone(), &opts).await?;
        let b = baseline_run(&host, port, opts.baseline_requests, 1)?;
        let p = baseline_run(&host, port, opts.baseline_requests, 16)?;
        println!(
            "  run {run}: code store {s:>8.0} ops/s   redis-benchmark SET {b:>8.0} req/s (ratio {:.2}), with -P 16 {p:>8.0} req/s (ratio {:.2})",
            s / b,
            s / p
        );
        store_rates.push(s);
        plain_rates.push(b);
        piped_rates.push(p);
    }
    let (s, b, p) = (
        median(store_rates),
        median(plain_rates),
        median(piped_rates),
    );
    println!(
        "median of {} runs: code store {s:.0} ops/s (allocations + redemptions; {:.0} allocate+redeem pairs/s)",
        opts.runs.max(1),
        s / 2.0
    );
    println!(
        "  vs redis-benchmark -t set:       {b:.0} req/s, ratio {:.2}",
        s / b
    );
    println!(
        "  vs redis-benchmark -t set -P 16: {p:.0} req/s, ratio {:.2}",
        s / p
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_split_into_host_and_port() {
        assert_eq!(
            super::host_port("redis://127.0.0.1:6379/0").expect("valid"),
            ("127.0.0.1".to_owned(), 6379)
        );
        assert!(super::host_port("http://x:1").is_err());
    }
}
