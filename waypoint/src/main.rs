//! `ambit-waypoint`: runs the L7 waypoint proxy until SIGTERM or SIGINT, then drains (see
//! [`ambit_mesh::lifecycle`]) and exits 0.

use ambit_mesh::lifecycle;
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
    lifecycle::raise_open_files_limit();
    let config = Config::parse();
    let deadline = lifecycle::termination_deadline()?;
    let waypoint = Waypoint::start(config, Default::default()).await?;
    waypoint.drain.run_until_stopped("waypoint", deadline).await;
    // Not a return from main: dropping the runtime waits for blocking tasks still in flight
    // (Wasm module fetches and compiles); the drain is over and what it cut is logged.
    std::process::exit(0)
}
