//! `ambit-waypoint`: runs the L7 waypoint proxy until interrupted.

use ambit_waypoint::app::Waypoint;
use ambit_waypoint::config::Config;
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let config = Config::parse();
    let _waypoint = Waypoint::start(config, Default::default()).await?;
    tokio::signal::ctrl_c().await?;
    tracing::info!("interrupted; stopping");
    Ok(())
}
