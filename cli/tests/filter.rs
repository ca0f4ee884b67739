//! `ambit filter` through the real binary: `new` then `test` on the generated crate (in the
//! workspace's target directory, offline from the registry), and `run` on the headers filter.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli sits in the workspace")
        .to_owned()
}

fn ambit(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ambit"));
    command.args(args);
    command
}

fn check(output: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn new_then_test_passes() {
    let parent = workspace()
        .join("target")
        .join("tmp")
        .join(format!("filter-new-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&parent);
    let out = check(
        ambit(&["filter", "new", "hello-filter", "--dir"])
            .arg(&parent)
            .output()
            .unwrap(),
        "filter new",
    );
    let dir = parent.join("hello-filter");
    assert!(out.contains(&dir.display().to_string()), "{out}");
    for file in [
        "Cargo.toml",
        "Cargo.lock",
        "src/lib.rs",
        "tests/filter.rs",
        "README.md",
    ] {
        assert!(dir.join(file).is_file(), "{file} missing");
    }
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    assert!(manifest.contains(&format!("path = \"{}\"", workspace().join("sdk").display())));
    // A second `new` into the same place is refused.
    let again = ambit(&["filter", "new", "hello-filter", "--dir"])
        .arg(&parent)
        .output()
        .unwrap();
    assert!(!again.status.success());
    // One shared target directory for every run of this test: the harness's dependencies
    // (wasmtime) compile once. Offline: the copied Cargo.lock already has every crate.
    let out = check(
        ambit(&["filter", "test", "--path"])
            .arg(&dir)
            .env(
                "CARGO_TARGET_DIR",
                workspace().join("target").join("filter-cli"),
            )
            .env("CARGO_NET_OFFLINE", "true")
            // The generated crate is its own workspace, so the root's dev profile (no debug
            // info for dependencies) does not reach it: keep its wasmtime build small too.
            .env("CARGO_PROFILE_DEV_DEBUG", "false")
            .env("CARGO_INCREMENTAL", "0")
            .output()
            .unwrap(),
        "filter test",
    );
    assert!(out.contains("hello_filter.wasm"), "{out}");
    assert!(out.contains("sha256 "), "{out}");
    let _ = std::fs::remove_dir_all(&parent);
}

#[test]
fn run_prints_what_the_upstream_and_client_saw() {
    let wasm = ambit_filter_test::module::workspace_package("ambit-filter-headers");
    let out = check(
        ambit(&["filter", "run"])
            .arg(&wasm)
            .args([
                "--config",
                r#"{"request": {"set": {"x-env": "prod"}}, "response": {"set": {"x-frame-options": "DENY"}}}"#,
                "-X",
                "POST",
                "-H",
                "x-debug: 1",
                "-d",
                "hello",
                "http://echo.demo/orders?id=1",
            ])
            .output()
            .unwrap(),
        "filter run",
    );
    assert!(out.contains("> :method: POST"), "{out}");
    assert!(out.contains("> :authority: echo.demo"), "{out}");
    assert!(out.contains("> x-env: prod"), "{out}");
    assert!(out.contains("< HTTP/1.1 200"), "{out}");
    assert!(out.contains("< x-frame-options: DENY"), "{out}");
    // The echo upstream's body: the request it received.
    assert!(
        out.contains("POST /orders?id=1 HTTP/1.1\nx-debug: 1\nx-env: prod\n\nhello"),
        "{out}"
    );
    let refused = ambit(&["filter", "run"])
        .arg(&wasm)
        .args(["--config", r#"{"request": {"sett": {}}}"#, "/"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("on_configure"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
