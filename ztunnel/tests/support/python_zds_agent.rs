//! `tests/interop/zds_agent.py`, an independent Python implementation of istio-cni's side of
//! ZDS, driven from a test: it listens on a ztunnel's ZDS socket path, hands over one pod, and
//! reports each step as a JSON line on stdout.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ambit_ztunnel::testing::{uid, PodNet};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

/// How long the agent may take for any one step.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(20);

/// A file of `tests/interop/`.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/interop")
        .join(name)
}

/// One running `zds_agent.py`, listening at a socket and handing over one pod.
pub struct PythonAgent {
    pub node: usize,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
    /// Its stdin stays open while the agent should hold the ZDS connection.
    child: Child,
    /// The line it printed once listening.
    pub listening: Value,
}

impl PythonAgent {
    pub async fn start(node: usize, socket: &Path, pod: &PodNet, service_account: &str) -> Self {
        let spec = format!(
            "uid={},name={},namespace=default,sa={service_account},netns=/var/run/netns/{}",
            uid(pod),
            pod.name,
            pod.netns
        );
        let mut child = Command::new("python3")
            .arg(script("zds_agent.py"))
            .arg("--socket")
            .arg(socket)
            .arg("--pod")
            .arg(spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("python ZDS agent (node {node}): python3 runs: {e}"));
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut agent = PythonAgent {
            node,
            lines,
            child,
            listening: Value::Null,
        };
        agent.listening = agent.next_json("listening on its socket").await;
        agent
    }

    /// The agent's next JSON line, named `what` in failures.
    pub async fn next_json(&mut self, what: &str) -> Value {
        let node = self.node;
        let line = tokio::time::timeout(PEER_TIMEOUT, self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("python ZDS agent (node {node}): {what}: nothing in 20 s"))
            .unwrap()
            .unwrap_or_else(|| panic!("python ZDS agent (node {node}): {what}: exited early"));
        eprintln!("python ZDS agent (node {node}): {line}");
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("python ZDS agent (node {node}): {what}: {line:?}: {e}"))
    }

    /// Closes the agent's stdin, which ends it (and its ZDS connection).
    pub async fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}
