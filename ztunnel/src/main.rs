//! `ambit-ztunnel`: runs the per-node tunnel until SIGTERM, SIGINT or `/quitquitquit`, then drains
//! (see [`ambit_mesh::lifecycle`]) and exits 0.

use ambit_mesh::lifecycle;
use ambit_ztunnel::app::Ztunnel;
use ambit_ztunnel::config::Config;
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ambit_ztunnel::logging::init();
    lifecycle::raise_open_files_limit();
    let config = Config::parse();
    let deadline = lifecycle::termination_deadline()?;
    let ztunnel = Ztunnel::start(config, Default::default()).await?;
    ztunnel.drain.run_until_stopped("ztunnel", deadline).await;
    // Not a return from main: dropping the runtime waits for blocking tasks still in flight; the
    // drain is over and what it cut is logged.
    std::process::exit(0)
}
