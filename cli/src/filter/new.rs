//! `ambit filter new NAME`: a filter crate that builds, tests and deploys as it is.
//!
//! The crate depends on `ambit-sdk` and `ambit-filter-test` by path: inside an Ambit checkout,
//! the checkout's; elsewhere, the copies inside this binary ([`super::sdk`]), unpacked into the
//! user's cache or, with `--vendor`, into the crate. Its `Cargo.lock` starts as the checkout's
//! (or the one Ambit was built with), so it resolves to versions Ambit is tested with and, with
//! a warm cargo cache, builds without fetching anything.

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
    /// Copy the SDK into the crate (`vendor/`) instead of the shared cache, so the crate builds
    /// on machines without this `ambit`.
    #[arg(long)]
    vendor: bool,
    /// What the filter starts as.
    #[arg(long, value_enum, default_value = "headers")]
    template: Template,
}

const README: &str = include_str!("template/README.md.tmpl");

/// A starting point, one per phase a filter works in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Template {
    /// Request headers (and response headers): set a configured header.
    Headers,
    /// Request body: hold the chunks, rewrite the whole body.
    Body,
    /// Response: headers, and the body of error responses.
    Response,
    /// A local reply: answer the client without the upstream.
    LocalReply,
    /// An HTTP callout: pause the request, ask a service, resume or deny.
    Callout,
}

impl Template {
    /// (src/lib.rs, tests/filter.rs, what it does, an example configuration)
    fn files(self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self {
            Template::Headers => (
                include_str!("template/headers/lib.rs.tmpl"),
                include_str!("template/headers/filter.rs.tmpl"),
                "it sets a configured header on requests and responses.",
                r#"{"header": "x-hello", "value": "world"}"#,
            ),
            Template::Body => (
                include_str!("template/body/lib.rs.tmpl"),
                include_str!("template/body/filter.rs.tmpl"),
                "it masks configured words in request bodies, holding the chunks until the last.",
                r#"{"words": ["secret"], "mask": "***"}"#,
            ),
            Template::Response => (
                include_str!("template/response/lib.rs.tmpl"),
                include_str!("template/response/filter.rs.tmpl"),
                "it sets response headers, drops `server` and hides the bodies of 5xx responses.",
                r#"{"set": {"x-frame-options": "DENY"}, "hide_errors": true}"#,
            ),
            Template::LocalReply => (
                include_str!("template/local-reply/lib.rs.tmpl"),
                include_str!("template/local-reply/filter.rs.tmpl"),
                "it answers 401 itself to requests without a known API key.",
                r#"{"header": "x-api-key", "keys": ["k-123"]}"#,
            ),
            Template::Callout => (
                include_str!("template/callout/lib.rs.tmpl"),
                include_str!("template/callout/filter.rs.tmpl"),
                "it asks a policy service (an HTTP callout) before letting each request through.",
                r#"{"upstream": "policy.default.svc.cluster.local:8080", "path": "/allow"}"#,
            ),
        }
    }
}

/// Where the crate's `ambit-sdk` and `ambit-filter-test` come from.
enum Sdk {
    /// An Ambit checkout's `sdk/` and `sdk/testkit/`.
    Checkout(PathBuf),
    /// Unpacked into the user's cache (this directory holds both crates).
    Cache(PathBuf),
    /// Unpacked into the crate's `vendor/`.
    Vendored,
}

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
    let sdk = match ambit_checkout(&parent) {
        Some(root) if !args.vendor => Sdk::Checkout(root),
        _ if args.vendor => Sdk::Vendored,
        _ => Sdk::Cache(super::sdk::unpack_cached()?),
    };
    let crate_name = name.replace('-', "_");
    let (lib_rs, test_rs, about, config) = args.template.files();
    let template = clap::ValueEnum::to_possible_value(&args.template)
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default();
    let fill = |text: &str| {
        text.replace("{{name}}", &name)
            .replace("{{crate}}", &crate_name)
            .replace("{{template}}", &template)
            .replace("{{about}}", about)
            .replace("{{config}}", config)
    };
    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::create_dir_all(dir.join("tests"))?;
    let (sdk_path, test_path, lock, note) = match &sdk {
        Sdk::Checkout(root) => (
            root.join("sdk"),
            root.join("sdk/testkit"),
            std::fs::read_to_string(root.join("Cargo.lock"))
                .context("reading the checkout's Cargo.lock")?,
            format!(
                "`ambit-sdk` and `ambit-filter-test` come from the Ambit checkout at `{}`.",
                root.display()
            ),
        ),
        Sdk::Cache(cache) => (
            cache.join("ambit-sdk"),
            cache.join("ambit-filter-test"),
            super::sdk::CARGO_LOCK.to_owned(),
            format!(
                "`ambit-sdk` and `ambit-filter-test` are the copies inside `ambit` {}, unpacked \
                 into `{}` (`ambit filter build` unpacks them again if that directory goes); \
                 `ambit filter new --vendor` puts them in the crate instead.",
                env!("CARGO_PKG_VERSION"),
                cache.display()
            ),
        ),
        Sdk::Vendored => {
            super::sdk::unpack(&dir.join("vendor"))?;
            (
                PathBuf::from("vendor/ambit-sdk"),
                PathBuf::from("vendor/ambit-filter-test"),
                super::sdk::CARGO_LOCK.to_owned(),
                format!(
                    "`ambit-sdk` and `ambit-filter-test` are in `vendor/`, as `ambit` {} \
                     carried them.",
                    env!("CARGO_PKG_VERSION")
                ),
            )
        }
    };
    write(
        &dir.join("Cargo.toml"),
        &cargo_toml(&name, &sdk_path, &test_path),
    )?;
    write(&dir.join("src/lib.rs"), &fill(lib_rs))?;
    write(&dir.join("tests/filter.rs"), &fill(test_rs))?;
    write(
        &dir.join("README.md"),
        &fill(README).replace("{{deps_note}}", &format!("\n{note}\n")),
    )?;
    write(&dir.join(".gitignore"), "/target\n")?;
    write(&dir.join("Cargo.lock"), &lock)?;
    println!("created {}", dir.display());
    println!("next: cd {} && ambit filter test", dir.display());
    Ok(())
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The Ambit checkout `dir` is inside, if any: the nearest ancestor with `sdk/testkit`.
fn ambit_checkout(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .find(|a| {
            a.join("sdk/testkit/Cargo.toml").is_file()
                && a.join("Cargo.lock").is_file()
                && std::fs::read_to_string(a.join("sdk/Cargo.toml"))
                    .is_ok_and(|t| t.contains("name = \"ambit-sdk\""))
        })
        .map(Path::to_owned)
}

fn cargo_toml(name: &str, sdk: &Path, test: &Path) -> String {
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
ambit-sdk = {{ path = "{sdk}" }}
proxy-wasm = "0.2.5"
serde = {{ version = "1", features = ["derive"] }}

[dev-dependencies]
# Runs the built .wasm in Ambit's Wasm host (the waypoint's, inside `ambit filter serve`), not
# a mock; compiles in seconds (the host is not linked into the tests).
ambit-filter-test = {{ path = "{test}" }}

# A workspace of its own, even when created inside another crate's tree.
[workspace]

# `ambit filter build` passes the size settings (opt-level "s", lto, strip, panic = "abort")
# itself.
"#,
        sdk = sdk.display(),
        test = test.display(),
    )
}
