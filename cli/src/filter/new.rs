//! `ambit filter new NAME`: a filter crate that builds, tests and deploys as it is.
//!
//! Inside an Ambit checkout the crate depends on `ambit-sdk` and `ambit-filter-test` by path and
//! starts from the checkout's `Cargo.lock`, so it builds without fetching anything from the
//! registry (every crate it needs is already locked there). Outside one, the two dependencies
//! are git placeholders to point at an Ambit repository or checkout.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Args;

#[derive(Args)]
pub struct NewArgs {
    /// The crate's name (lowercase letters, digits, `-`, `_`); also its directory's.
    name: String,
    /// Where to create the crate's directory.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
}

const LIB_RS: &str = include_str!("template/lib.rs.tmpl");
const TEST_RS: &str = include_str!("template/filter.rs.tmpl");
const README: &str = include_str!("template/README.md.tmpl");

/// Where the git placeholders point when the crate is made outside an Ambit checkout.
const AMBIT_GIT: &str = "https://github.com/ambit-mesh/ambit";

pub fn run(args: NewArgs) -> anyhow::Result<()> {
    let name = args.name;
    if name.is_empty()
        || !name.starts_with(|c: char| c.is_ascii_lowercase())
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        bail!("{name:?} is not a crate name: use lowercase letters, digits, '-' and '_', starting with a letter");
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let parent = args
        .dir
        .canonicalize()
        .with_context(|| format!("resolving {}", args.dir.display()))?;
    let dir = parent.join(&name);
    if dir.exists() && dir.read_dir()?.next().is_some() {
        bail!("{} already exists and is not empty", dir.display());
    }
    let checkout = ambit_checkout(&parent);
    let crate_name = name.replace('-', "_");
    let fill = |text: &str| {
        text.replace("{{name}}", &name)
            .replace("{{crate}}", &crate_name)
    };
    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::create_dir_all(dir.join("tests"))?;
    write(
        &dir.join("Cargo.toml"),
        &cargo_toml(&name, checkout.as_deref()),
    )?;
    write(&dir.join("src/lib.rs"), &fill(LIB_RS))?;
    write(&dir.join("tests/filter.rs"), &fill(TEST_RS))?;
    let note = match &checkout {
        Some(root) => format!(
            "\n`ambit-sdk` and `ambit-filter-test` come from the Ambit checkout at `{}`; the \
             `Cargo.lock` started as its lock file, so nothing new is fetched.\n",
            root.display()
        ),
        None => format!(
            "\n`ambit-sdk` and `ambit-filter-test` point at `{AMBIT_GIT}` (a placeholder): \
             replace with `path = \"<ambit checkout>/sdk\"` and `path = \"<ambit \
             checkout>/sdk/harness\"`, or your fork's git URL.\n"
        ),
    };
    write(
        &dir.join("README.md"),
        &fill(README).replace("{{deps_note}}", &note),
    )?;
    write(&dir.join(".gitignore"), "/target\n")?;
    if let Some(root) = &checkout {
        // Same versions as the checkout, resolved without the registry.
        std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock"))
            .context("copying the checkout's Cargo.lock")?;
    }
    println!("created {}", dir.display());
    println!("next: cd {} && ambit filter test", dir.display());
    Ok(())
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The Ambit checkout `dir` is inside, if any: the nearest ancestor with `sdk/harness`.
fn ambit_checkout(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .find(|a| {
            a.join("sdk/harness/Cargo.toml").is_file()
                && a.join("Cargo.lock").is_file()
                && std::fs::read_to_string(a.join("sdk/Cargo.toml"))
                    .is_ok_and(|t| t.contains("name = \"ambit-sdk\""))
        })
        .map(Path::to_owned)
}

fn cargo_toml(name: &str, checkout: Option<&Path>) -> String {
    let (sdk, harness) = match checkout {
        Some(root) => (
            format!("{{ path = \"{}\" }}", root.join("sdk").display()),
            format!("{{ path = \"{}\" }}", root.join("sdk/harness").display()),
        ),
        None => (
            format!("{{ git = \"{AMBIT_GIT}\" }}  # placeholder: or path = \"<ambit checkout>/sdk\""),
            format!(
                "{{ git = \"{AMBIT_GIT}\" }}  # placeholder: or path = \"<ambit checkout>/sdk/harness\""
            ),
        ),
    };
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
# cdylib: the .wasm module; rlib: unit tests run natively.
crate-type = ["cdylib", "rlib"]

[dependencies]
ambit-sdk = {sdk}
proxy-wasm = "0.2.5"
serde = {{ version = "1", features = ["derive"] }}

[dev-dependencies]
# Runs the built .wasm in Ambit's Wasm host (the waypoint's), not a mock.
ambit-filter-test = {harness}

# A workspace of its own, even when created inside another crate's tree.
[workspace]

# `ambit filter build` passes the size settings (opt-level "s", lto, strip, panic = "abort")
# itself. Tests compile the module with Cranelift on every load: optimizing the compiler keeps
# that under a second.
[profile.dev.package]
cranelift-codegen = {{ opt-level = 3 }}
cranelift-assembler-x64 = {{ opt-level = 3 }}
cranelift-frontend = {{ opt-level = 3 }}
cranelift-entity = {{ opt-level = 3 }}
cranelift-bforest = {{ opt-level = 3 }}
cranelift-bitset = {{ opt-level = 3 }}
cranelift-control = {{ opt-level = 3 }}
regalloc2 = {{ opt-level = 3 }}
wasmparser = {{ opt-level = 3 }}
wasmtime = {{ opt-level = 3 }}
wasmtime-environ = {{ opt-level = 3 }}
wasmtime-internal-cranelift = {{ opt-level = 3 }}
object = {{ opt-level = 3 }}
"#
    )
}
