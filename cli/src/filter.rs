//! `ambit filter`: Wasm filter tooling: `new` (a ready filter crate, the SDK carried inside this
//! binary), `build` (the `.wasm`, size optimized, with its sha256 for a WasmPlugin), `test`
//! (build, then `cargo test` against this binary's host), `run` (one request through a `.wasm`
//! in the host the waypoint runs, against an echo upstream) and `serve` (that host for test
//! processes, over JSON lines).

mod host;
mod new;
mod run;
mod sdk;
mod serve;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use sha2::{Digest, Sha256};

#[derive(Args)]
pub struct FilterArgs {
    #[command(subcommand)]
    command: FilterCommand,
}

#[derive(Subcommand)]
enum FilterCommand {
    /// Create a filter crate: Cargo.toml, src/lib.rs (a header-adding filter), tests/filter.rs
    /// (a test in Ambit's Wasm host) and a README.
    New(new::NewArgs),
    /// Build the filter crate to .wasm (wasm32-wasip1, size-optimized release) and print the
    /// module's path, size and sha256.
    Build(PathArgs),
    /// Build the filter crate, then run its tests (`cargo test`, in this binary's Wasm host).
    Test(TestArgs),
    /// Send one request through a .wasm in Ambit's Wasm host, with an echo upstream; print what
    /// the upstream received and what the client got.
    Run(run::RunArgs),
    /// The Wasm host for a test process: JSON lines on stdin and stdout (what
    /// `ambit-filter-test` starts; not for people).
    Serve,
}

#[derive(Args)]
struct PathArgs {
    /// The filter crate's directory.
    #[arg(long, default_value = ".")]
    path: PathBuf,
}

#[derive(Args)]
struct TestArgs {
    #[command(flatten)]
    path: PathArgs,
    /// Arguments for `cargo test` (after `--`), e.g. a test name filter.
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

pub fn run(args: FilterArgs) -> anyhow::Result<()> {
    match args.command {
        FilterCommand::New(args) => new::run(args),
        FilterCommand::Build(args) => build(&args.path).map(|_| ()),
        FilterCommand::Test(args) => test(&args.path.path, &args.cargo_args),
        FilterCommand::Run(args) => run::run(args),
        FilterCommand::Serve => serve::run(),
    }
}

/// Builds the crate at `dir` and prints where the module is, its size and its sha256.
fn build(dir: &Path) -> anyhow::Result<PathBuf> {
    check_crate(dir)?;
    let started = std::time::Instant::now();
    let module = ambit_filter_test::module::build_uncached(dir)?;
    let bytes = std::fs::read(&module.path)
        .with_context(|| format!("reading {}", module.path.display()))?;
    let sha256: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    println!("{}", module.path.display());
    println!(
        "size   {} bytes ({:.0} KB)",
        module.size,
        module.size as f64 / 1024.0
    );
    println!("sha256 {sha256}");
    println!("built in {:.1} s", started.elapsed().as_secs_f64());
    Ok(module.path)
}

/// `build`, then `cargo test` in the crate, its tests pointed at this binary's host and at the
/// module just built. The tests compile while the module builds: the module's LTO runs on one
/// core, so the two builds share the machine instead of waiting on each other.
fn test(dir: &Path, cargo_args: &[String]) -> anyhow::Result<()> {
    check_crate(dir)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let dir = dir.canonicalize()?;
    // Quiet: if the tests do not compile, the `cargo test` below says why.
    let mut tests = Command::new(&cargo)
        .current_dir(&dir)
        .args(["test", "--no-run", "--quiet"])
        .args(cargo_args.iter().take_while(|a| *a != "--"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("running cargo test")?;
    let module = build(&dir);
    if module.is_err() {
        let _ = tests.kill();
    }
    let _ = tests.wait();
    let module = module?;
    let status = Command::new(cargo)
        .current_dir(&dir)
        .arg("test")
        .args(cargo_args)
        .env(
            "AMBIT_BIN",
            std::env::current_exe().context("finding this ambit binary")?,
        )
        .envs(ambit_filter_test::module::built_env(&dir, &module))
        .status()
        .context("running cargo test")?;
    if !status.success() {
        bail!("the filter's tests failed ({status})");
    }
    Ok(())
}

/// The crate must exist; the SDK copy it was made with is unpacked again if the cache lost it.
fn check_crate(dir: &Path) -> anyhow::Result<()> {
    let Ok(manifest) = std::fs::read_to_string(dir.join("Cargo.toml")) else {
        bail!(
            "{} has no Cargo.toml: pass the filter crate's directory with --path",
            dir.display()
        );
    };
    if let Ok(cache) = sdk::cache_dir() {
        if manifest.contains(&*cache.to_string_lossy()) {
            sdk::unpack_cached()?;
        }
    }
    Ok(())
}
