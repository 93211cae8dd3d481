//! `kakehashi-coordinator`: runs one coordinator replica (flags and behaviour in
//! `kakehashi_coordinator::cli`).

use anyhow::Result;
use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    kakehashi_coordinator::cli::run(kakehashi_coordinator::cli::Args::parse()).await
}
