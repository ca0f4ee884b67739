//! `ambit mesh` behaving like a cluster, through the real binary: readiness probes decide which
//! pods are Service endpoints, `mesh wait` and `mesh up` wait for them, probes at closed ports
//! and hanging exec probes leave the daemon serving, applies are transactions (an unknown node
//! or a pod with nothing to run is refused, the next good apply works), a killed pod process
//! comes back, a missing program shows as kubelet shows it, and a crashed daemon is reported with
//! what it left behind. Needs root, iproute2 and iptables.

#[path = "support/mesh.rs"]
mod support;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{netns_left, pod, process_alive, Mesh};

/// An ambient namespace: `gated` serves `web` only once its readiness file exists; `closed`,
/// `refused` and `hangs` have probes that never pass (a closed TCP port, HTTP at a closed port,
/// an exec probe that outlives its timeout); `client` calls the service.
fn readiness_manifests(flag: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata:
  name: rdy
  labels: {{istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {{name: gated, namespace: rdy, labels: {{app: web}}}}
spec:
  containers:
  - name: web
    image: ambit/echo
    ports: [{{containerPort: 8080, name: http}}]
    readinessProbe:
      exec: {{command: [test, -e, {flag}]}}
      periodSeconds: 1
      failureThreshold: 1
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: rdy}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: closed, namespace: rdy}}
spec:
  containers:
  - name: c
    image: ambit/echo
    readinessProbe: {{tcpSocket: {{port: 9}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Pod
metadata: {{name: refused, namespace: rdy}}
spec:
  containers:
  - name: c
    image: ambit/echo
    readinessProbe: {{httpGet: {{port: 9, path: /healthz}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Pod
metadata: {{name: hangs, namespace: rdy}}
spec:
  containers:
  - name: c
    image: ambit/echo
    readinessProbe:
      exec: {{command: [sleep, "30"]}}
      periodSeconds: 1
      timeoutSeconds: 1
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: rdy}}
spec:
  containers: [{{name: c, image: ambit/echo}}]
"#
    )
}

/// The workload `name`'s `status` in ztunnel's state file (`Healthy` when not written).
fn workload_status(mesh: &Mesh, name: &str) -> String {
    let text = std::fs::read_to_string(mesh.dir.join("ztunnel-state.yaml")).unwrap();
    let state: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let workload = state["workloads"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|w| w["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no workload {name} in {text}"));
    workload["status"].as_str().unwrap_or("Healthy").to_owned()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn only_ready_pods_are_endpoints_and_wait_follows_readiness() {
    let mesh = Mesh::new("rdy");
    let flag = std::env::temp_dir().join(format!("{}-ready", mesh.prefix));
    let _ = std::fs::remove_file(&flag);
    let manifests = mesh.write("rdy.yaml", &readiness_manifests(flag.to_str().unwrap()));

    // `up` waits for readiness, then gives up on the pods that never pass, naming them.
    let begin = Instant::now();
    let out = mesh.run(&["up", "-f", manifests.to_str().unwrap(), "--timeout", "4s"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(begin.elapsed() >= Duration::from_secs(4), "{said}");
    assert!(said.contains("pods ready in"), "{said}");
    assert!(said.contains("not ready: pod rdy/gated"), "{said}");
    assert!(said.contains("Readiness probe failed"), "{said}");

    // Not ready: an unhealthy workload, no endpoint for the Service.
    let status = mesh.status();
    let gated = pod(&status, "rdy", "gated");
    assert_eq!(gated["ready"], "0/1", "{gated:#}");
    assert_eq!(gated["status"], "Running", "{gated:#}");
    assert_eq!(workload_status(&mesh, "gated"), "Unhealthy");
    assert_eq!(workload_status(&mesh, "client"), "Healthy");
    let out = mesh.fetch("client", "rdy", "http://web.rdy.svc.cluster.local/");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("hostname=gated"),
        "{out:?}"
    );

    // Probes at closed ports and hanging exec probes: failing with kubelet's words, the daemon
    // unharmed (status answers at once, again and again).
    for (name, words) in [
        ("closed", "refused"),
        ("refused", "refused"),
        ("hangs", "timed out after 1s"),
    ] {
        let p = pod(&status, "rdy", name);
        assert_eq!(p["ready"], "0/1", "{p:#}");
        let probe = p["containers"][0]["probe"].as_str().unwrap_or_default();
        assert!(
            probe.starts_with("Readiness probe failed") && probe.contains(words),
            "{name}: {p:#}"
        );
    }
    for _ in 0..5 {
        let asked = Instant::now();
        mesh.status();
        assert!(asked.elapsed() < Duration::from_secs(2));
    }
    // The timed-out `sleep 30` probes were killed, not left running.
    let sleeps = Command::new("pgrep")
        .args(["-x", "-f", "sleep 30"])
        .output()
        .unwrap();
    let sleeping = String::from_utf8_lossy(&sleeps.stdout).lines().count();
    assert!(sleeping <= 1, "{sleeping} probe processes left running");

    // A client that connects to the daemon's socket and sends nothing blocks nobody; one that
    // sends half a request is told so after 10 s.
    let idle = UnixStream::connect(mesh.dir.join("daemon.sock")).unwrap();
    let mut half = UnixStream::connect(mesh.dir.join("daemon.sock")).unwrap();
    half.write_all(b"{\"op\":").unwrap();
    let half = std::thread::spawn(move || {
        half.set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let mut answer = String::new();
        let _ = std::io::Read::read_to_string(&mut half, &mut answer);
        answer
    });
    let asked = Instant::now();
    mesh.status();
    assert!(asked.elapsed() < Duration::from_secs(2));

    // `mesh wait` times out naming the pod and why.
    let out = mesh.run(&["wait", "pod/gated", "-n", "rdy", "--timeout", "2s"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("timed out")
            && said.contains("pod/rdy/gated")
            && said.contains("Readiness probe failed"),
        "{said}"
    );

    // Once the probe passes: ready, healthy, an endpoint, and `wait` returns.
    std::fs::write(&flag, "").unwrap();
    let begin = Instant::now();
    let out = mesh.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/gated",
        "-n",
        "rdy",
        "--timeout",
        "20s",
    ]);
    assert_eq!(out.trim(), "pod/gated condition met");
    assert!(
        begin.elapsed() < Duration::from_secs(5),
        "{:?}",
        begin.elapsed()
    );
    assert_eq!(workload_status(&mesh, "gated"), "Healthy");
    let out = mesh.fetch("client", "rdy", "http://web.rdy.svc.cluster.local/");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hostname=gated"),
        "{out:?}"
    );
    assert_eq!(pod(&mesh.status(), "rdy", "gated")["ready"], "1/1");

    // Failing again: out of the endpoints again.
    std::fs::remove_file(&flag).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while workload_status(&mesh, "gated") != "Unhealthy" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(workload_status(&mesh, "gated"), "Unhealthy");
    let answer = half.join().unwrap();
    assert!(answer.contains("no request line within 10 s"), "{answer}");
    drop(idle);
    mesh.ok(&["down"]);
}

const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: tx}
---
apiVersion: v1
kind: Pod
metadata: {name: first, namespace: tx}
spec:
  nodeName: node1
  containers: [{name: echo, image: ambit/echo}]
"#;

const NODE9: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: lost, namespace: tx}
spec:
  nodeName: node9
  containers: [{name: echo, image: ambit/echo}]
"#;

const NGINX: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: tx}
spec:
  containers: [{name: nginx, image: nginx}]
"#;

const SECOND: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: second, namespace: tx}
spec:
  nodeName: node2
  containers: [{name: echo, image: ambit/echo}]
"#;

const MISSING: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: missing, namespace: tx}
spec:
  containers: [{name: app, image: x, command: [no-such-program-here, --serve]}]
"#;

const LIVENESS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: lively, namespace: tx}
spec:
  containers:
  - name: echo
    image: ambit/echo
    livenessProbe:
      exec: {command: [test, '!', -e, FLAG]}
      periodSeconds: 1
      failureThreshold: 2
"#;

/// The daemon of the mesh with state dir `dir`, found by its command line.
fn daemon_pid(mesh: &Mesh) -> u32 {
    let dir = mesh.dir.display().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "daemon") && args.contains(&dir) {
            return pid;
        }
    }
    panic!("no daemon for {dir}");
}

#[test]
fn applies_are_transactions_pods_restart_and_a_dead_daemon_is_reported() {
    let mesh = Mesh::new("tx");
    let good = mesh.write("good.yaml", GOOD);
    let out = mesh
        .command(&["up", "-f", good.to_str().unwrap()])
        .env("AMBIT_MESH_RESTART_BACKOFF_MS", "300")
        .output()
        .unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("1/1 pods ready in"), "{said}");

    // An unknown node and a pod with nothing to run are refused whole; nothing is left of them.
    for (file, words) in [
        (NODE9, "spec.nodeName \"node9\" is not a node of this mesh"),
        (NGINX, "has no command"),
    ] {
        let path = mesh.write("bad.yaml", file);
        let out = mesh.run(&["apply", "-f", path.to_str().unwrap()]);
        assert!(!out.status.success());
        assert!(text(&out).contains(words), "{}", text(&out));
    }
    let status = mesh.status();
    let names: Vec<&str> = status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["first"]);

    // A good apply right after works: the pod runs and is ready.
    let second = mesh.write("second.yaml", SECOND);
    assert!(mesh
        .ok(&["apply", "-f", second.to_str().unwrap()])
        .contains("pod/second created"));
    mesh.ok(&["wait", "pod/second", "-n", "tx", "--timeout", "10s"]);
    let started = pod(&mesh.status(), "tx", "second")["pids"][0]
        .as_u64()
        .unwrap();
    assert!(process_alive(started));

    // Killing a pod's process brings it back: restarts 1, ready again.
    Command::new("kill")
        .args(["-KILL", &started.to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut restarted = Value::Null;
    while Instant::now() < deadline {
        restarted = pod(&mesh.status(), "tx", "second").clone();
        if restarted["restarts"] == 1 && restarted["ready"] == "1/1" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(restarted["restarts"], 1, "{restarted:#}");
    assert_eq!(restarted["ready"], "1/1", "{restarted:#}");
    assert_ne!(restarted["pids"][0].as_u64().unwrap(), started);

    // A program that is not there: applied (as kubectl would), shown as kubelet shows it.
    let missing = mesh.write("missing.yaml", MISSING);
    mesh.ok(&["apply", "-f", missing.to_str().unwrap()]);
    let missing = pod(&mesh.status(), "tx", "missing").clone();
    assert_eq!(missing["status"], "CrashLoopBackOff", "{missing:#}");
    assert_eq!(missing["ready"], "0/1");
    let exit = &missing["containers"][0]["lastExit"];
    assert_eq!(exit["reason"], "StartError", "{missing:#}");
    assert!(
        exit["message"]
            .as_str()
            .unwrap()
            .contains("\"no-such-program-here\": executable file not found in $PATH"),
        "{missing:#}"
    );
    let table = mesh.ok(&["status"]);
    assert!(table.contains("CrashLoopBackOff"), "{table}");

    // A failing liveness probe kills the container, which restarts.
    let flag = std::env::temp_dir().join(format!("{}-kill", mesh.prefix));
    let _ = std::fs::remove_file(&flag);
    let lively = mesh.write(
        "lively.yaml",
        &LIVENESS.replace("FLAG", flag.to_str().unwrap()),
    );
    mesh.ok(&["apply", "-f", lively.to_str().unwrap()]);
    mesh.ok(&["wait", "pod/lively", "-n", "tx", "--timeout", "10s"]);
    std::fs::write(&flag, "").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut lively = Value::Null;
    while Instant::now() < deadline {
        lively = pod(&mesh.status(), "tx", "lively").clone();
        if lively["restarts"].as_u64() >= Some(1) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(lively["restarts"].as_u64() >= Some(1), "{lively:#}");
    let message = lively["containers"][0]["lastExit"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains("Liveness probe failed"), "{lively:#}");
    let _ = std::fs::remove_file(&flag);

    // Small cuts: `logs -n`, `fetch -i`, a closed stdout pipe.
    assert!(mesh
        .ok(&["logs", "second", "-n", "tx"])
        .contains("listening"));
    let out = mesh.ok(&[
        "exec",
        "first",
        "-n",
        "tx",
        "--",
        env!("CARGO_BIN_EXE_ambit"),
        "mesh",
        "fetch",
        "-i",
        "http://127.0.0.1:8080/",
    ]);
    assert!(out.starts_with("HTTP/1.1 200 OK\n"), "{out}");
    assert!(out.contains("\nx-ambit-echo: first\n"), "{out}");
    let piped = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} mesh --state-dir {} --prefix {} status | head -c 1",
            env!("CARGO_BIN_EXE_ambit"),
            mesh.dir.display(),
            mesh.prefix
        ))
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&piped.stderr).contains("panicked"),
        "{piped:?}"
    );

    // A killed daemon: every command says so, with what it left behind and how to recover.
    let pods = netns_left(&mesh.prefix).len();
    Command::new("kill")
        .args(["-KILL", &daemon_pid(&mesh).to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let out = mesh.run(&["status"]);
    let said = text(&out);
    assert!(!out.status.success());
    assert!(
        said.contains("not running")
            && said.contains("left behind")
            && said.contains("ambit mesh up"),
        "{said}"
    );
    assert!(
        said.contains(&format!("{pods} network namespace(s)")),
        "{said}"
    );
    let out = mesh.ok(&["down"]);
    assert!(
        out.contains(&format!("{pods} leftover network namespace(s) removed")),
        "{out}"
    );
    assert!(netns_left(&mesh.prefix).is_empty());
}
