//! Getting a filter's `.wasm`: a package of the workspace the test runs in, or any filter crate
//! directory, built the way `ambit filter build` builds it; once per process per crate.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

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

/// Set by `ambit filter test` for the tests it runs: the crate it built (`AMBIT_FILTER_CRATE`)
/// and that build's module (`AMBIT_FILTER_WASM`), so [`build_crate`] need not ask cargo again.
const BUILT_CRATE: &str = "AMBIT_FILTER_CRATE";
const BUILT_WASM: &str = "AMBIT_FILTER_WASM";

/// Builds the package `package` of the workspace the test runs in (`cargo build --profile wasm
/// --target wasm32-wasip1`, into `<target>/wasm`), once per process.
pub fn workspace_package(package: &str) -> Result<PathBuf, HarnessError> {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get_or_insert_with(HashMap::new).get(package) {
        return Ok(path.clone());
    }
    // Cargo runs tests in their package's directory.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let target = target_dir(&dir)?.join("wasm");
    check_target(&dir)?;
    let mut command = cargo();
    command
        .current_dir(&dir)
        .args([
            "build",
            "--profile",
            "wasm",
            "--target",
            WASM_TARGET,
            "-p",
            package,
        ])
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    run_build(&dir, command)?;
    let path = target
        .join(WASM_TARGET)
        .join("wasm")
        .join(format!("{}.wasm", package.replace('-', "_")));
    if !path.is_file() {
        return Err(build_error(
            &dir,
            format!("cargo built {package} but {} is missing", path.display()),
        ));
    }
    built
        .get_or_insert_with(HashMap::new)
        .insert(package.to_owned(), path.clone());
    Ok(path)
}

/// Module bytes written to a file of their own (the server loads files).
pub fn temporary(bytes: &[u8]) -> Result<PathBuf, HarnessError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "ambit-filter-test-{}-{}.wasm",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, bytes).map_err(|source| HarnessError::Read {
        path: path.clone(),
        source,
    })?;
    Ok(path)
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
    if let (Some(built), Some(wasm)) = (std::env::var_os(BUILT_CRATE), std::env::var_os(BUILT_WASM))
    {
        let wasm = PathBuf::from(wasm);
        if Path::new(&built).canonicalize().ok().as_ref() == Some(&dir) {
            if let Ok(meta) = std::fs::metadata(&wasm) {
                return Ok(BuiltModule {
                    path: wasm,
                    size: meta.len(),
                });
            }
        }
    }
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
    check_target(dir)?;
    let stdout = run_build(dir, build_command(dir, &target))?;
    let path = wasm_artifact(&stdout).ok_or_else(|| {
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

/// The environment variables that tell [`build_crate`] in the tests `ambit filter test` runs
/// that `module` is `dir`'s fresh build.
pub fn built_env(dir: &Path, module: &Path) -> [(&'static str, PathBuf); 2] {
    [
        (BUILT_CRATE, dir.to_owned()),
        (BUILT_WASM, module.to_owned()),
    ]
}

/// Fails with the fix when the toolchain lacks the wasm32-wasip1 standard library (the error
/// cargo gives then is hard to read), and only then.
fn check_target(dir: &Path) -> Result<(), HarnessError> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(output) = Command::new(rustc)
        .current_dir(dir)
        .args(["--print", "sysroot"])
        .output()
    else {
        return Ok(()); // cargo will say what is wrong with rustc
    };
    let sysroot = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if output.status.success() && !sysroot.join("lib/rustlib").join(WASM_TARGET).is_dir() {
        return Err(build_error(
            dir,
            format!(
                "the Rust toolchain at {} has no {WASM_TARGET} target: `rustup target add \
                 {WASM_TARGET}`",
                sysroot.display()
            ),
        ));
    }
    Ok(())
}

/// Runs a cargo build, its stderr passed through as it comes; returns its stdout, or the
/// errors it reported.
fn run_build(dir: &Path, mut command: Command) -> Result<Vec<u8>, HarnessError> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| build_error(dir, format!("running cargo: {e}")))?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let errors = std::thread::spawn(move || {
        let mut errors = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if line.starts_with("error") {
                errors.push(line);
            }
        }
        errors
    });
    let mut stdout = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = std::io::Read::read_to_end(&mut out, &mut stdout);
    }
    let status = child
        .wait()
        .map_err(|e| build_error(dir, format!("running cargo: {e}")))?;
    let errors = errors.join().unwrap_or_default();
    if !status.success() {
        let reason = match errors.first() {
            Some(_) => errors.join("\n"),
            None => format!("cargo build failed ({status})"),
        };
        return Err(build_error(dir, reason));
    }
    Ok(stdout)
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
