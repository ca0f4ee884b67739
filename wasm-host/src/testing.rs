//! Test support: builds filter crates of this workspace to `.wasm` the way users build theirs
//! (`cargo build --profile wasm --target wasm32-wasip1`), once per test process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The workspace root (this crate's parent directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("wasm-host sits in the workspace")
        .to_owned()
}

/// Where filter builds go: apart from the native target directory, so a build started from a
/// running test never waits on the lock of the `cargo test` that started it.
pub fn wasm_target_dir() -> PathBuf {
    workspace_root().join("target").join("wasm")
}

/// Builds the workspace package `package` for `wasm32-wasip1` and returns its module's path.
/// Panics with cargo's output when the build fails.
pub fn build_filter(package: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get_or_insert_with(HashMap::new).get(package) {
        return path.clone();
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(workspace_root())
        .args([
            "build",
            "--profile",
            "wasm",
            "--target",
            "wasm32-wasip1",
            "-p",
            package,
        ])
        .env("CARGO_TARGET_DIR", wasm_target_dir())
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .expect("running cargo to build a filter");
    assert!(
        output.status.success(),
        "building filter {package} for wasm32-wasip1 failed (is the target installed? \
         `rustup target add wasm32-wasip1`):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let path = wasm_target_dir()
        .join("wasm32-wasip1")
        .join("wasm")
        .join(format!("{}.wasm", package.replace('-', "_")));
    assert!(
        path.exists(),
        "cargo built {package} but {} is missing",
        path.display()
    );
    built
        .get_or_insert_with(HashMap::new)
        .insert(package.to_owned(), path.clone());
    path
}
