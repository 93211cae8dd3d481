//! `kakehashi-relay`: runs one relay node (flags and behaviour in `kakehashi_relay::cli`).

use anyhow::Result;
use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    kakehashi_relay::cli::run(kakehashi_relay::cli::Args::parse()).await
}
