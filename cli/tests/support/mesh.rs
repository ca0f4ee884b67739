//! The `ambit` binary driving one local mesh of a test's own (state directory and namespace
//! prefix unique to the test process and a tag), brought down when the test ends.
#![allow(dead_code)] // Each test binary uses its own part.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

pub struct Mesh {
    pub dir: PathBuf,
    pub prefix: String,
}

impl Mesh {
    pub fn new(tag: &str) -> Mesh {
        let prefix = format!("am{}{tag}", std::process::id() % 10_000);
        let dir = std::env::temp_dir().join(format!("ambit-mesh-test-{prefix}"));
        Mesh { dir, prefix }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ambit"));
        command
            .arg("mesh")
            .arg("--state-dir")
            .arg(&self.dir)
            .args(["--prefix", &self.prefix])
            .args(args);
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run ambit")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ambit mesh {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status is JSON")
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("{}-{name}", self.prefix));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `ambit mesh exec POD -n NS -- ambit mesh fetch URL`.
    pub fn fetch(&self, pod: &str, namespace: &str, url: &str) -> Output {
        self.run(&[
            "exec",
            pod,
            "-n",
            namespace,
            "--",
            env!("CARGO_BIN_EXE_ambit"),
            "mesh",
            "fetch",
            url,
        ])
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}

pub fn pod<'a>(status: &'a Value, namespace: &str, name: &str) -> &'a Value {
    status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["namespace"] == namespace && p["name"] == name)
        .unwrap_or_else(|| panic!("no pod {namespace}/{name} in {status:#}"))
}
