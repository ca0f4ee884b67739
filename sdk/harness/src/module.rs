//! Getting a filter's `.wasm`: read from a file (cached by path, size and modification time), a
//! package of the Ambit workspace (the host's `build_filter`), or any filter crate directory,
//! built the way `ambit filter build` builds it. Builds run once per process per crate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::HarnessError;

/// The target filters are built for (WASI preview 1, what Envoy, Istio and Ambit load).
pub const WASM_TARGET: &str = "wasm32-wasip1";

/// Size over speed, no debug info, abort on panic (a panic traps either way): the settings of
/// the workspace's `wasm` profile, passed as `--config` so they apply to any crate.
pub const RELEASE_SETTINGS: [&str; 6] = [
    "profile.release.opt-level=\"s\"",
    "profile.release.lto=true",
    "profile.release.codegen-units=1",
    "profile.release.strip=true",
    "profile.release.debug=0",
    "profile.release.panic=\"abort\"",
];

/// A module built from a crate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltModule {
    pub path: PathBuf,
    pub size: u64,
}

/// What identifies a file's contents cheaply: path, size, modification time.
type Key = (PathBuf, u64, Option<SystemTime>);
/// Path → (its key when read, its bytes).
type ModuleCache = HashMap<PathBuf, (Key, Arc<Vec<u8>>)>;

/// The bytes of a module file; reread only when the file changed.
pub fn read(path: &Path) -> Result<Arc<Vec<u8>>, HarnessError> {
    static CACHE: Mutex<Option<ModuleCache>> = Mutex::new(None);
    let error = |source| HarnessError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(error)?;
    let key = (path.to_owned(), meta.len(), meta.modified().ok());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some((cached, bytes)) = cache.get(path) {
        if *cached == key {
            return Ok(bytes.clone());
        }
    }
    let bytes = Arc::new(std::fs::read(path).map_err(error)?);
    cache.insert(path.to_owned(), (key, bytes.clone()));
    Ok(bytes)
}

/// Builds the workspace package `package` (`cargo build --profile wasm`) once per process.
/// Panics with cargo's output when the build fails (the host's test helper does).
pub fn workspace_package(package: &str) -> PathBuf {
    ambit_wasm_host::testing::build_filter(package)
}

/// Where `cargo build` puts the filter crate at `dir`'s native artifacts (`cargo metadata`),
/// honouring `CARGO_TARGET_DIR` and `.cargo/config.toml`.
pub fn target_dir(dir: &Path) -> Result<PathBuf, HarnessError> {
    let output = cargo()
        .current_dir(dir)
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .map_err(|e| build_error(dir, format!("running cargo metadata: {e}")))?;
    if !output.status.success() {
        return Err(build_error(
            dir,
            format!(
                "cargo metadata failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            ),
        ));
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| build_error(dir, format!("cargo metadata printed no JSON: {e}")))?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| build_error(dir, "cargo metadata names no target directory".into()))
}

/// The command that builds the crate at `dir` to `.wasm`: `cargo build --release --target
/// wasm32-wasip1` with [`RELEASE_SETTINGS`], into `<target>/wasm` (apart from the native target
/// directory, so a build started from a running `cargo test` never waits on that test's lock).
pub fn build_command(dir: &Path, target: &Path) -> Command {
    let mut command = cargo();
    command
        .current_dir(dir)
        .args([
            "build",
            "--lib",
            "--release",
            "--target",
            WASM_TARGET,
            "--message-format",
            "json-render-diagnostics",
        ])
        .env("CARGO_TARGET_DIR", target.join("wasm"))
        // Flags meant for the native build (e.g. from an outer `cargo test`) must not leak in.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    for setting in RELEASE_SETTINGS {
        command.args(["--config", setting]);
    }
    command
}

/// Builds the filter crate at `dir` (see [`build_command`]) and returns its module; once per
/// process per directory.
pub fn build_crate(dir: &Path) -> Result<BuiltModule, HarnessError> {
    static BUILT: Mutex<Option<HashMap<PathBuf, BuiltModule>>> = Mutex::new(None);
    let dir = dir
        .canonicalize()
        .map_err(|e| build_error(dir, format!("no such directory: {e}")))?;
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(module) = built.get_or_insert_with(HashMap::new).get(&dir) {
        return Ok(module.clone());
    }
    let module = build_uncached(&dir)?;
    built
        .get_or_insert_with(HashMap::new)
        .insert(dir, module.clone());
    Ok(module)
}

/// [`build_crate`] without the per-process cache (the CLI builds once anyway).
pub fn build_uncached(dir: &Path) -> Result<BuiltModule, HarnessError> {
    let target = target_dir(dir)?;
    let output = build_command(dir, &target)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| build_error(dir, format!("running cargo: {e}")))?;
    if !output.status.success() {
        return Err(build_error(
            dir,
            format!(
                "cargo build --target {WASM_TARGET} failed (errors above; is the target \
                 installed? `rustup target add {WASM_TARGET}`)"
            ),
        ));
    }
    let path = wasm_artifact(&output.stdout).ok_or_else(|| {
        build_error(
            dir,
            "cargo built no .wasm: the crate needs `crate-type = [\"cdylib\"]` in [lib]".into(),
        )
    })?;
    let size = std::fs::metadata(&path)
        .map_err(|e| build_error(dir, format!("reading {}: {e}", path.display())))?
        .len();
    Ok(BuiltModule { path, size })
}

/// The last `.wasm` among cargo's JSON messages (the crate's own artifact comes last).
fn wasm_artifact(stdout: &[u8]) -> Option<PathBuf> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .flat_map(|message| {
            message["filenames"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|f| f.as_str().map(PathBuf::from))
                .filter(|f| f.extension().is_some_and(|e| e == "wasm"))
                .collect::<Vec<_>>()
        })
        .last()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn build_error(dir: &Path, reason: String) -> HarnessError {
    HarnessError::Build {
        dir: dir.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_crate_artifact_in_cargo_messages() {
        let out = br#"{"reason":"compiler-artifact","filenames":["/t/libserde.rlib"]}
{"reason":"compiler-artifact","filenames":["/t/wasm32-wasip1/release/my_filter.wasm","/t/libmy_filter.rlib"]}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            wasm_artifact(out),
            Some(PathBuf::from("/t/wasm32-wasip1/release/my_filter.wasm"))
        );
        assert_eq!(wasm_artifact(b"not json"), None);
    }
}
