//! `ambit-ztunnel`: runs the per-node tunnel until interrupted.

use ambit_ztunnel::app::Ztunnel;
use ambit_ztunnel::config::Config;
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let config = Config::parse();
    let _ztunnel = Ztunnel::start(config, Default::default()).await?;
    tokio::signal::ctrl_c().await?;
    tracing::info!("interrupted; stopping");
    Ok(())
}
