//! `ambit`: the command users run: `mesh` (the whole mesh on one machine, from Kubernetes YAML),
//! `demo` (one HBONE tunnel end to end) and `filter` (Wasm filter tooling: new, build, test, run).

mod demo;
mod filter;
mod mesh;

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
    /// The whole mesh on this machine: nodes and pods in network namespaces, ztunnels, node
    /// agents and an embedded control plane, driven by Kubernetes/Istio YAML.
    Mesh(mesh::MeshArgs),
    /// Wasm filters: create a crate, build it to .wasm, test it, run a request through it.
    Filter(filter::FilterArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The mesh daemon's stderr is its log file: it says what it does. Commands stay quiet.
    let default_level = match &cli.command {
        Command::Mesh(args) if args.is_daemon() => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    if let Command::Mesh(args) = &cli.command {
        if !args.is_server() {
            stdout_pipe_may_close();
        }
    }
    match cli.command {
        Command::Demo(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(demo::run(args)),
        Command::Mesh(args) => mesh::run(args),
        Command::Filter(args) => filter::run(args),
    }
}

/// A command whose output goes to `head` ends quietly when `head` exits, as Unix tools do,
/// instead of panicking in `println!`: SIGPIPE back to its default (Rust ignores it). Only for
/// commands that serve nothing: a server would die on a peer's closed socket.
fn stdout_pipe_may_close() {
    // SAFETY: setting a signal's disposition to the default before any thread is started.
    unsafe {
        nix::libc::signal(nix::libc::SIGPIPE, nix::libc::SIG_DFL);
    }
}
