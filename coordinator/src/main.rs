//! `kakehashi-coordinator`: runs one coordinator replica (flags and behaviour in
//! `kakehashi_coordinator::cli`). Logs go to stderr; traces also go over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set.

use anyhow::Result;
use clap::Parser;
use kakehashi_coordinator::telemetry::otel;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[tokio::main]
async fn main() -> Result<()> {
    let provider = otel::endpoint_from_env()
        .map(|endpoint| otel::install(&endpoint, "kakehashi-coordinator"))
        .transpose()?;
    tracing_subscriber::registry()
        .with(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with(tracing_subscriber::fmt::layer())
        .with(provider.as_ref().map(otel::layer))
        .init();
    let result = kakehashi_coordinator::cli::run(kakehashi_coordinator::cli::Args::parse()).await;
    if let Some(provider) = provider
        && let Err(e) = provider.shutdown()
    {
        eprintln!("flushing traces failed: {e}");
    }
    result
}
