//! `ambit`: the command users run. Today it carries the HBONE demo; `mesh` (the local multi-node
//! mesh), `filter` (Wasm filter tooling) and debugging commands land here next.

mod demo;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ambit",
    version,
    about = "Ambit service mesh: the ambient data plane in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an HBONE tunnel end to end on this machine: a built-in CA, an HBONE server in front of
    /// a TCP echo app, and a client tunnelling to it over mTLS, printing identities and bytes.
    Demo(demo::Args),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Demo(args) => runtime.block_on(demo::run(args)),
    }
}
