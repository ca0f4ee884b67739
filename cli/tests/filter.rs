//! `ambit filter` through the real binary, as a filter author outside any checkout uses it: `new`
//! (the SDK out of the binary), `build`, `test` (against the binary's host), `run`, and what the
//! author sees when something fails.

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

/// A fresh directory outside the workspace, as a filter author has: only the `ambit` binary, a
/// toolchain and the registry.
fn outside(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ambit-filter-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `ambit filter ...` in a crate outside the workspace: its SDK unpacked into a cache of its
/// own, builds in one target directory shared by every run of these tests (the registry crates
/// compile once).
fn author(dir: &Path, cache: &Path, args: &[&str]) -> Command {
    let mut command = ambit(args);
    command
        .current_dir(dir)
        .env("XDG_CACHE_HOME", cache)
        .env(
            "CARGO_TARGET_DIR",
            workspace().join("target").join("filter-cli"),
        )
        .env("CARGO_INCREMENTAL", "0")
        .env_remove("AMBIT_BIN")
        .env_remove("RUSTFLAGS")
        // What an author sees: no backtraces under errors.
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    command
}

#[test]
fn new_build_test_run_outside_a_checkout() {
    let home = outside("new");
    let cache = home.join("cache");
    let out = check(
        author(&home, &cache, &["filter", "new", "hello-filter"])
            .output()
            .unwrap(),
        "filter new",
    );
    let dir = home.join("hello-filter");
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
    // The SDK came out of the binary, into the cache, by path: no URL, no checkout.
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    assert!(!manifest.contains("git ="), "{manifest}");
    assert!(
        !manifest.contains(&workspace().display().to_string()),
        "{manifest}"
    );
    assert!(
        manifest.contains(&cache.join("ambit/sdk").display().to_string()),
        "{manifest}"
    );
    // A second `new` into the same place is refused.
    let again = author(&home, &cache, &["filter", "new", "hello-filter"])
        .output()
        .unwrap();
    assert!(!again.status.success());

    let out = check(
        author(&dir, &cache, &["filter", "build"]).output().unwrap(),
        "filter build",
    );
    assert!(out.contains("hello_filter.wasm"), "{out}");
    let sha = out
        .lines()
        .find_map(|l| l.strip_prefix("sha256 "))
        .expect("a sha256 line");
    assert_eq!(sha.len(), 64, "{out}");
    assert!(out.contains("size   "), "{out}");

    // The generated tests pass against this binary's host; the crate never compiles wasmtime.
    let test = author(&dir, &cache, &["filter", "test"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&test.stderr).into_owned();
    let stdout = check(test, "filter test");
    assert!(stdout.contains("test result: ok. 2 passed"), "{stdout}");
    assert!(!stderr.contains("Compiling wasmtime"), "{stderr}");

    let wasm = out.lines().next().unwrap().to_owned();
    let out = check(
        author(
            &dir,
            &cache,
            &[
                "filter",
                "run",
                &wasm,
                "--config",
                r#"{"header": "x-hello", "value": "world"}"#,
                "/",
            ],
        )
        .output()
        .unwrap(),
        "filter run",
    );
    assert!(out.contains("> x-hello: world"), "{out}");
    assert!(out.contains("< x-hello: world"), "{out}");

    // A failing assertion says what differed, with the request and the filter's logs.
    let tests = std::fs::read_to_string(dir.join("tests/filter.rs")).unwrap();
    std::fs::write(
        dir.join("tests/filter.rs"),
        tests.replace(
            r#"assert_eq!(outcome.upstream_header("x-hello"), Some("world"));"#,
            r#"outcome.assert_upstream_header("x-hello", Some("mars"));"#,
        ),
    )
    .unwrap();
    let failed = author(&dir, &cache, &["filter", "test"]).output().unwrap();
    assert!(!failed.status.success());
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&failed.stdout),
        String::from_utf8_lossy(&failed.stderr)
    );
    assert!(
        out.contains(r#"upstream header "x-hello": expected Some("mars"), got Some("world")"#),
        "{out}"
    );
    assert!(out.contains("} :path: /orders"), "{out}");
    assert!(out.contains("> x-hello: world"), "{out}");
    let _ = std::fs::remove_dir_all(&home);
}

/// Each phase's template passes its own tests (the `headers` one is the default, above).
#[test]
fn every_template_passes_its_tests() {
    let home = outside("templates");
    let cache = home.join("cache");
    for template in ["body", "response", "local-reply", "callout"] {
        let name = format!("t-{template}");
        check(
            author(
                &home,
                &cache,
                &["filter", "new", &name, "--template", template],
            )
            .output()
            .unwrap(),
            "filter new --template",
        );
        let dir = home.join(&name);
        let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
        assert!(
            readme.contains(&format!("--template {template}")),
            "{readme}"
        );
        let out = check(
            author(&dir, &cache, &["filter", "test"]).output().unwrap(),
            &format!("filter test ({template})"),
        );
        // The unit test and at least two tests in the host.
        let passed: usize = out
            .lines()
            .filter_map(|l| l.strip_prefix("test result: ok. "))
            .filter_map(|l| l.split(' ').next()?.parse::<usize>().ok())
            .sum();
        assert!(passed >= 3, "{template}: {out}");
    }
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
fn vendored_sdk_and_misleading_errors() {
    let home = outside("vendor");
    let cache = home.join("cache");
    check(
        author(&home, &cache, &["filter", "new", "v-filter", "--vendor"])
            .output()
            .unwrap(),
        "filter new --vendor",
    );
    let dir = home.join("v-filter");
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains(r#"path = "vendor/ambit-sdk""#),
        "{manifest}"
    );
    assert!(dir
        .join("vendor/ambit-filter-test/src/protocol.rs")
        .is_file());
    assert!(!cache.exists(), "--vendor must not touch the cache");

    // A compile error is reported as such, not as a missing wasm32-wasip1 target.
    std::fs::write(dir.join("src/lib.rs"), "fn broken( {}\n").unwrap();
    let failed = author(&dir, &cache, &["filter", "build"]).output().unwrap();
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!stderr.contains("rustup target add"), "{stderr}");
    let (_, error) = stderr
        .split_once("Error: building the filter crate")
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(error.contains("error"), "{stderr}");

    // Not a Wasm file: one line saying so.
    let bogus = dir.join("Cargo.toml");
    let failed = author(&dir, &cache, &["filter", "run"])
        .arg(&bogus)
        .arg("/")
        .output()
        .unwrap();
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("is not a Wasm module"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
fn run_prints_what_the_upstream_and_client_saw() {
    let wasm = ambit_wasm_host::testing::build_filter("ambit-filter-headers");
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
