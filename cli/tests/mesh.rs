//! `ambit mesh` end to end through the real binary: up, mTLS on the wire, enrollment of running
//! pods by namespace label (same PIDs), policy applied with `apply`, bad manifests refused with
//! the running mesh untouched, a waypoint with a WasmPlugin, L7 policy failing closed while its
//! waypoint is gone, gRPC through a waypoint (Python grpcio), supervision of crashed waypoints
//! and pods, and `down` leaving nothing behind. Needs root, iproute2, iptables, tcpdump, python3
//! with grpcio.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "support/mesh.rs"]
mod support;
use support::{pod, Mesh};

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: web
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: server, namespace: web}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata:
  name: server
  namespace: web
  labels: {app: server}
spec:
  serviceAccountName: server
  nodeName: node2
  containers:
  - name: echo
    image: ambit/echo
    ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: web}
spec:
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: shop
  labels: {app: client}
spec:
  serviceAccountName: client
  nodeName: node1
  containers:
  - name: echo
    image: ambit/echo
    ports: [{containerPort: 8080}]
"#;

const DENY_CLIENT: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-shop, namespace: web}
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/client"]
"#;

fn netns_left(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{prefix}-")))
                .collect()
        })
        .unwrap_or_default()
}

fn process_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// tcpdump on node1's link, armed before returning.
fn capture(netns: &str, file: &Path) -> Child {
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{netns}"))
        .args([
            "tcpdump",
            "--immediate-mode",
            "-i",
            "eth0",
            "-U",
            "-n",
            "-w",
        ])
        .arg(file)
        .arg("tcp")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    assert!(line.contains("listening"), "{line}");
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    child
}

fn stop_capture(mut child: Child, file: &Path) -> (usize, usize, Vec<u8>) {
    std::thread::sleep(Duration::from_millis(300));
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let count = |filter: &str| {
        let out = Command::new("tcpdump")
            .args(["-n", "-r"])
            .arg(file)
            .arg(filter)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    (
        count("tcp port 15008"),
        count("tcp and not port 15008"),
        std::fs::read(file).unwrap(),
    )
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn the_local_mesh_end_to_end() {
    let mesh = Mesh::new("e");
    let manifests = mesh.write("m.yaml", MANIFESTS);
    mesh.ok(&["up", "-f", manifests.to_str().unwrap()]);

    let status = mesh.status();
    assert_eq!(status["nodes"].as_array().unwrap().len(), 2);
    let server = pod(&status, "web", "server");
    let client = pod(&status, "shop", "client");
    assert_eq!(server["enrolled"], true);
    assert_eq!(
        server["annotations"]["ambient.istio.io/redirection"],
        "enabled"
    );
    assert_eq!(client["enrolled"], false);
    assert_eq!(server["node"], "node2");
    assert_eq!(client["node"], "node1");
    let client_pids = client["pids"].clone();
    let server_ip = server["ip"].as_str().unwrap().to_owned();
    let node1 = status["nodes"][0]["netns"].as_str().unwrap().to_owned();

    // Not enrolled: the client's call to the server pod is plain TCP on the wire.
    let pcap = mesh.dir.with_extension("plain.pcap");
    let tap = capture(&node1, &pcap);
    let out = mesh.fetch(
        "client",
        "shop",
        &format!("http://{server_ip}:8080/plain-path-marker"),
    );
    let (hbone, plain, wire) = stop_capture(tap, &pcap);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("hostname=server"));
    assert!(plain > 0 && hbone == 0, "plain {plain} hbone {hbone}");
    assert!(contains(&wire, b"plain-path-marker"));
    // Outside the mesh the service name still works: the node DNATs the VIP, as kube-proxy would.
    let out = mesh.fetch("client", "shop", "http://server.web.svc.cluster.local/");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hostname=server"),
        "{out:?}"
    );

    // Label the client's namespace: the running client joins, same process.
    mesh.ok(&[
        "label",
        "namespace",
        "shop",
        "istio.io/dataplane-mode=ambient",
    ]);
    let status = mesh.status();
    let client = pod(&status, "shop", "client");
    assert_eq!(client["enrolled"], true);
    assert_eq!(
        client["pids"], client_pids,
        "enrollment does not restart the pod"
    );
    for pid in client_pids.as_array().unwrap() {
        assert!(process_alive(pid.as_u64().unwrap()));
    }
    let pcap = mesh.dir.with_extension("mtls.pcap");
    let tap = capture(&node1, &pcap);
    let out = mesh.fetch(
        "client",
        "shop",
        "http://server.web.svc.cluster.local/secret-path-marker",
    );
    let (hbone, plain, wire) = stop_capture(tap, &pcap);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && text.contains("hostname=server"),
        "{out:?}"
    );
    assert!(
        text.contains(&format!("peer={}", client["ip"].as_str().unwrap())),
        "the server sees the client pod: {text}"
    );
    assert!(hbone > 0 && plain == 0, "plain {plain} hbone {hbone}");
    assert!(
        !contains(&wire, b"secret-path-marker"),
        "the payload never appears on the wire"
    );
    // In the mesh the name was resolved by ztunnel's DNS proxy (the hosts file lists no services).
    let metrics_address = status["nodes"][0]["metrics"].as_str().unwrap().to_owned();
    let metrics = mesh.ok(&["fetch", &format!("http://{metrics_address}/metrics")]);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_dns_requests_total")
                && l.contains("request_query_type=\"a\"")),
        "{metrics}"
    );

    // Unlabel: plain again, still the same process.
    mesh.ok(&["label", "namespace", "shop", "istio.io/dataplane-mode-"]);
    let status = mesh.status();
    assert_eq!(pod(&status, "shop", "client")["enrolled"], false);
    assert_eq!(pod(&status, "shop", "client")["pids"], client_pids);
    let pcap = mesh.dir.with_extension("plain2.pcap");
    let tap = capture(&node1, &pcap);
    let out = mesh.fetch(
        "client",
        "shop",
        &format!("http://{server_ip}:8080/again-marker"),
    );
    let (hbone, _, wire) = stop_capture(tap, &pcap);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(hbone, 0);
    assert!(contains(&wire, b"again-marker"));

    // A DENY policy applied to the running mesh blocks the (re-enrolled) caller.
    mesh.ok(&[
        "label",
        "namespace",
        "shop",
        "istio.io/dataplane-mode=ambient",
    ]);
    let url = "http://server.web.svc.cluster.local/";
    assert!(mesh.fetch("client", "shop", url).status.success());
    let deny = mesh.write("deny.yaml", DENY_CLIENT);
    mesh.ok(&["apply", "-f", deny.to_str().unwrap()]);
    assert!(mesh.status()["policies"]
        .to_string()
        .contains("web/deny-shop"));
    let out = mesh.fetch("client", "shop", url);
    assert!(
        !out.status.success(),
        "the policy blocks the caller: {out:?}"
    );

    // Bad manifests are refused naming the object; the mesh is untouched.
    let before = mesh.status();
    for (bad, expected) in [
        ("apiVersion: v1\nkind: Frobnicator\nmetadata: {name: x}\n", "Frobnicator"),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: nosel, namespace: web}\nspec:\n  ports: [{port: 80}]\n", "nosel"),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: big, namespace: web}\nspec:\n  selector: {app: x}\n  ports: [{port: 70000}]\n", "big"),
        ("apiVersion: v1\nkind: Namespace\nmetadata: {name: dup}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: dup}\n", "dup"),
    ] {
        let file = mesh.write("bad.yaml", bad);
        let out = mesh.run(&["apply", "-f", file.to_str().unwrap()]);
        assert!(!out.status.success(), "{bad} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "the error names the object ({expected}): {err}");
    }
    let after = mesh.status();
    assert_eq!(before["pods"], after["pods"]);
    assert_eq!(before["services"], after["services"]);
    assert_eq!(before["policies"], after["policies"]);

    // Down leaves no namespace, no process, no state; twice is fine.
    let pids: Vec<u64> = after["pods"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["pids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
        })
        .collect();
    mesh.ok(&["down"]);
    mesh.ok(&["down"]);
    assert!(
        netns_left(&mesh.prefix).is_empty(),
        "{:?}",
        netns_left(&mesh.prefix)
    );
    std::thread::sleep(Duration::from_millis(300));
    for pid in pids {
        assert!(!process_alive(pid), "process {pid} survived down");
    }
    assert!(!mesh.dir.exists());
}

const WAYPOINT_MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: app
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: app, labels: {app: server}}
spec:
  nodeName: node2
  containers: [{name: echo, image: ambit/echo, ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: app}
spec:
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app}
spec:
  nodeName: node1
  containers: [{name: echo, image: ambit/echo}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: app}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - {name: mesh, port: 15008, protocol: HBONE}
"#;

const SERVER_USES_WAYPOINT: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: server
  namespace: app
  labels: {istio.io/use-waypoint: waypoint}
spec:
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

#[test]
fn a_waypoint_gateway_carries_the_traffic_of_services_that_use_it() {
    let mesh = Mesh::new("w");
    let manifests = mesh.write("w.yaml", WAYPOINT_MESH);
    mesh.ok(&["up", "-f", manifests.to_str().unwrap()]);
    let status = mesh.status();
    let waypoint = pod(&status, "app", "waypoint");
    assert_eq!(
        waypoint["identity"],
        "spiffe://cluster.local/ns/app/sa/waypoint"
    );
    assert_eq!(waypoint["enrolled"], false);
    assert_eq!(status["waypoints"][0], "app/waypoint");
    let waypoint_ip = waypoint["ip"].as_str().unwrap().to_owned();
    let client_ip = pod(&status, "app", "client")["ip"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = "http://server.app.svc.cluster.local/";

    // Not labelled yet: ztunnel to ztunnel, the server sees the client.
    let out = mesh.fetch("client", "app", url);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains(&format!("peer={client_ip}:")), "{out:?}");

    // Labelled: the request goes through the waypoint, which calls the server itself.
    let labelled = mesh.write("use-waypoint.yaml", SERVER_USES_WAYPOINT);
    mesh.ok(&["apply", "-f", labelled.to_str().unwrap()]);
    let mut through_waypoint = false;
    for _ in 0..30 {
        let out = mesh.fetch("client", "app", url);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && text.contains(&format!("peer={waypoint_ip}:")) {
            through_waypoint = true;
            break;
        }
        // The waypoint picks the state change up on its next look at the state file.
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        through_waypoint,
        "the request never came through the waypoint"
    );

    // A WasmPlugin applied like any manifest runs in the waypoint: the example headers filter
    // rewrites the path the server sees.
    let module = ambit_wasm_host::testing::build_filter("ambit-filter-headers");
    let plugin = mesh.write(
        "plugin.yaml",
        &format!(
            r#"apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: rewrite, namespace: app}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
  url: file://{}
  pluginConfig: {{request: {{set: {{":path": /rewritten-by-wasm}}}}}}
"#,
            module.display()
        ),
    );
    mesh.ok(&["apply", "-f", plugin.to_str().unwrap()]);
    let mut rewritten = String::new();
    for _ in 0..50 {
        let out = mesh.fetch("client", "app", url);
        rewritten = String::from_utf8_lossy(&out.stdout).into_owned();
        if rewritten.contains("request=GET /rewritten-by-wasm") {
            break;
        }
        // The waypoint reads its configuration file on its next poll.
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        rewritten.contains("request=GET /rewritten-by-wasm"),
        "the WasmPlugin never took effect: {rewritten}"
    );
    mesh.ok(&["down"]);
    assert!(netns_left(&mesh.prefix).is_empty());
}

#[test]
fn the_nftables_rules_backend_carries_the_mesh_too() {
    let mesh = Mesh::new("n");
    let manifests = mesh.write("n.yaml", WAYPOINT_MESH);
    mesh.ok(&[
        "up",
        "--rules",
        "nftables",
        "-f",
        manifests.to_str().unwrap(),
    ]);
    let status = mesh.status();
    let client = pod(&status, "app", "client");
    let client_ip = client["ip"].as_str().unwrap().to_owned();
    let ruleset = Command::new("ip")
        .args([
            "netns",
            "exec",
            client["netns"].as_str().unwrap(),
            "nft",
            "list",
            "ruleset",
        ])
        .output()
        .unwrap();
    let ruleset = String::from_utf8_lossy(&ruleset.stdout);
    assert!(ruleset.contains("istio-ambient-nat"), "{ruleset}");
    let out = mesh.fetch("client", "app", "http://server.app.svc.cluster.local/");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && text.contains(&format!("peer={client_ip}:")),
        "{out:?}"
    );
    let metrics_address = status["nodes"][0]["metrics"].as_str().unwrap().to_owned();
    let metrics = mesh.ok(&["fetch", &format!("http://{metrics_address}/metrics")]);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("connection_security_policy=\"mutual_tls\"")),
        "{metrics}"
    );
    mesh.ok(&["down"]);
}

/// Polls until a request from the client to the server comes through the waypoint at
/// `waypoint_ip`, for at most `limit`; returns how long it took.
fn wait_through_waypoint(mesh: &Mesh, waypoint_ip: &str, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let out = mesh.fetch("client", "app", "http://server.app.svc.cluster.local/");
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && text.contains(&format!("peer={waypoint_ip}:")) {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn a_killed_waypoint_is_restarted_and_serves_again_by_itself() {
    let mesh = Mesh::new("k");
    let manifests = mesh.write("k.yaml", WAYPOINT_MESH);
    mesh.ok(&["up", "-f", manifests.to_str().unwrap()]);
    let labelled = mesh.write("k-use-waypoint.yaml", SERVER_USES_WAYPOINT);
    mesh.ok(&["apply", "-f", labelled.to_str().unwrap()]);
    let status = mesh.status();
    let waypoint = pod(&status, "app", "waypoint");
    let waypoint_ip = waypoint["ip"].as_str().unwrap().to_owned();
    assert!(
        wait_through_waypoint(&mesh, &waypoint_ip, Duration::from_secs(10)).is_some(),
        "the request never came through the waypoint"
    );
    let old_pid = waypoint["pids"][0].as_u64().unwrap();
    assert_eq!(waypoint["restarts"], 0);

    // A WasmPlugin whose module server is not up: `status` shows it retrying, and why.
    let plugin = mesh.write(
        "k-plugin.yaml",
        r#"apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: unreachable, namespace: app}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  url: http://127.0.0.1:1/filter.wasm
  failStrategy: FAIL_OPEN
"#,
    );
    mesh.ok(&["apply", "-f", plugin.to_str().unwrap()]);
    let retrying = |status: &Value| {
        let plugins = &pod(status, "app", "waypoint")["plugins"];
        plugins[0]["name"] == "app.unreachable"
            && plugins[0]["state"] == "retrying"
            && plugins[0]["failures"].as_u64().unwrap_or(0) >= 1
            && plugins[0]["lastError"]
                .as_str()
                .is_some_and(|e| e.contains("Connection refused"))
    };
    let mut status = mesh.status();
    for _ in 0..50 {
        if retrying(&status) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        status = mesh.status();
    }
    assert!(retrying(&status), "{:#}", pod(&status, "app", "waypoint"));
    let text = mesh.ok(&["status"]);
    assert!(
        text.contains("WASMPLUGINS")
            && text.contains("app.unreachable")
            && text.contains("retrying"),
        "{text}"
    );

    let killed = Command::new("kill")
        .args(["-KILL", &old_pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // No command to the mesh: the daemon notices and starts the waypoint again.
    let back = wait_through_waypoint(&mesh, &waypoint_ip, Duration::from_secs(10));
    assert!(
        back.is_some_and(|took| took < Duration::from_secs(3)),
        "served through the waypoint again after {back:?}"
    );

    let status = mesh.status();
    let waypoint = pod(&status, "app", "waypoint");
    let pids = waypoint["pids"].as_array().unwrap();
    assert_eq!(pids.len(), 1, "{waypoint:#}");
    assert_ne!(pids[0].as_u64().unwrap(), old_pid);
    assert!(process_alive(pids[0].as_u64().unwrap()));
    assert!(
        !Path::new(&format!("/proc/{old_pid}")).exists(),
        "the killed waypoint was reaped, not left <defunct>"
    );
    assert_eq!(waypoint["restarts"], 1);
    let container = &waypoint["containers"][0];
    assert_eq!(container["state"], "running");
    assert_eq!(container["lastExit"]["reason"], "Error");
    assert_eq!(container["lastExit"]["exitCode"], 137);
    assert_eq!(container["lastExit"]["signal"], "SIGKILL");
    let text = mesh.ok(&["status"]);
    assert!(text.contains("SIGKILL"), "{text}");
    // The new process reports its own plugins.
    assert!(
        pod(&status, "app", "waypoint")["plugins"][0]["name"] == "app.unreachable",
        "{status:#}"
    );
    mesh.ok(&["down"]);
}

const RESTART_POLICIES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: rp}
---
apiVersion: v1
kind: Pod
metadata: {name: always, namespace: rp}
spec:
  containers: [{name: echo, image: ambit/echo}]
---
apiVersion: v1
kind: Pod
metadata: {name: crashes, namespace: rp}
spec:
  restartPolicy: OnFailure
  containers:
  - name: crash
    image: busybox
    command: [sh, -c, "date +%s.%N; sleep 0.3; exit 3"]
---
apiVersion: v1
kind: Pod
metadata: {name: completes, namespace: rp}
spec:
  restartPolicy: OnFailure
  containers: [{name: job, image: busybox, command: [sh, -c, "exit 0"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: never, namespace: rp}
spec:
  restartPolicy: Never
  containers: [{name: job, image: busybox, command: [sh, -c, "exit 1"]}]
"#;

#[test]
fn pod_processes_restart_per_their_restart_policy_with_kubelets_backoff() {
    let mesh = Mesh::new("r");
    let manifests = mesh.write("r.yaml", RESTART_POLICIES);
    // A short first delay (kubelet's is 10 s), doubling as kubelet's does.
    let out = mesh
        .command(&["up", "-f", manifests.to_str().unwrap()])
        .env("AMBIT_MESH_RESTART_BACKOFF_MS", "400")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let always = pod(&mesh.status(), "rp", "always")["pids"][0]
        .as_u64()
        .unwrap();
    Command::new("kill")
        .args(["-KILL", &always.to_string()])
        .status()
        .unwrap();

    // The crashing pod starts at once after its first exit, then 0.4 s, 0.8 s, 1.6 s after
    // each previous start.
    let log = mesh.dir.join("logs/pods/rp_crashes.log");
    let mut starts: Vec<f64> = Vec::new();
    let begin = Instant::now();
    while starts.len() < 5 && begin.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
        starts = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
    }
    assert_eq!(starts.len(), 5, "{starts:?}");
    let gaps: Vec<f64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    // Each run takes 0.3 s; the restart waits for the backoff (less a little for scheduling).
    for (gap, least) in gaps.iter().zip([0.3, 0.4, 0.8, 1.6]) {
        assert!(*gap >= least - 0.1, "gaps {gaps:?}");
    }
    assert!(gaps[3] > 1.4 * gaps[1], "the delay grows: {gaps:?}");

    let status = mesh.status();
    let crashes = pod(&status, "rp", "crashes");
    assert!(crashes["restarts"].as_u64().unwrap() >= 4, "{crashes:#}");
    let crash = &crashes["containers"][0];
    assert_eq!(crash["lastExit"]["reason"], "Error");
    assert_eq!(crash["lastExit"]["exitCode"], 3);

    // Always: the killed echo server runs again, reaped and replaced.
    let restarted = pod(&status, "rp", "always");
    assert_eq!(restarted["restarts"], 1, "{restarted:#}");
    let pid = restarted["pids"][0].as_u64().unwrap();
    assert_ne!(pid, always);
    assert!(process_alive(pid));
    assert!(!Path::new(&format!("/proc/{always}")).exists());
    assert_eq!(restarted["containers"][0]["lastExit"]["signal"], "SIGKILL");
    let out = mesh.run(&[
        "exec",
        "always",
        "-n",
        "rp",
        "--",
        env!("CARGO_BIN_EXE_ambit"),
        "mesh",
        "fetch",
        "http://127.0.0.1:8080/",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hostname=always"),
        "{out:?}"
    );

    // OnFailure after a success, and Never: left terminated, no pid reported.
    for (name, reason, code) in [("completes", "Completed", 0), ("never", "Error", 1)] {
        let done = pod(&status, "rp", name);
        assert_eq!(done["restarts"], 0, "{done:#}");
        assert_eq!(done["pids"].as_array().unwrap().len(), 0, "{done:#}");
        let container = &done["containers"][0];
        assert_eq!(container["state"], "terminated", "{done:#}");
        assert_eq!(container["lastExit"]["reason"], reason);
        assert_eq!(container["lastExit"]["exitCode"], code);
    }
    mesh.ok(&["down"]);
}

const DENY_ADMIN: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: app}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
"#;

/// Fetches `url` from the client pod until `done` holds for the outcome (success, first line),
/// for up to ~10 s; returns the last outcome.
fn fetch_until(mesh: &Mesh, url: &str, done: impl Fn(bool, &str) -> bool) -> (bool, String) {
    let mut last = (false, String::new());
    for _ in 0..50 {
        let out = mesh.fetch("client", "app", url);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let first = text.lines().next().unwrap_or_default().to_owned();
        last = (out.status.success(), first);
        if done(last.0, &last.1) {
            break;
        }
        // ztunnels and the waypoint pick changes up on their next look at their files.
        std::thread::sleep(Duration::from_millis(200));
    }
    last
}

#[test]
fn l7_policy_fails_closed_while_its_waypoint_is_gone() {
    let mesh = Mesh::new("f");
    let manifests = mesh.write("f.yaml", WAYPOINT_MESH);
    let labelled = mesh.write("f-use-waypoint.yaml", SERVER_USES_WAYPOINT);
    mesh.ok(&["up", "-f", manifests.to_str().unwrap()]);
    mesh.ok(&["apply", "-f", labelled.to_str().unwrap()]);
    let policy = mesh.write("f-policy.yaml", DENY_ADMIN);
    let applied = mesh.ok(&["apply", "-f", policy.to_str().unwrap()]);
    // No STRICT PeerAuthentication: plaintext clients reach the server around the waypoint.
    assert!(
        applied.contains("Warning: Service app/server: L7 policy at waypoint app/waypoint")
            && applied.contains("still accept plaintext (app/server on 8080)"),
        "{applied}"
    );
    let admin = "http://server.app.svc.cluster.local/admin";
    let public = "http://server.app.svc.cluster.local/";
    let denied = |ok: bool, first: &str| ok && first.contains(" 403 ");
    assert_eq!(
        fetch_until(&mesh, admin, denied).1,
        "HTTP/1.1 403 Forbidden"
    );

    // The Gateway goes: the policy's traffic is refused, never answered by the server.
    // The Gateway is WAYPOINT_MESH's last document.
    let gateway_yaml = WAYPOINT_MESH.rsplit("---").next().unwrap();
    assert!(gateway_yaml.contains("kind: Gateway"));
    let gateway = mesh.write("f-gateway.yaml", gateway_yaml);
    let deleted = mesh.ok(&["delete", "-f", gateway.to_str().unwrap()]);
    assert!(
        deleted.contains(
            "Warning: Service app/server uses waypoint app/waypoint, which does not exist"
        ) && deleted.contains("its traffic is refused"),
        "{deleted}"
    );
    let refused = |ok: bool, _: &str| !ok;
    let (ok, first) = fetch_until(&mesh, admin, refused);
    assert!(!ok, "/admin answered {first} with its waypoint gone");
    let (ok, first) = fetch_until(&mesh, public, refused);
    assert!(!ok, "/ answered {first} with its waypoint gone");
    let status = mesh.status();
    let server = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "server")
        .unwrap();
    assert_eq!(server["waypoint"]["name"], "app/waypoint");
    assert_eq!(server["waypoint"]["traffic"], "refused");
    assert!(
        status["warnings"].as_array().unwrap().iter().any(|w| w
            .as_str()
            .unwrap()
            .contains("AuthorizationPolicy app/deny-admin")),
        "{status}"
    );
    // The client's ztunnel counts the refusals with Envoy's "no healthy upstream" flag.
    let node1 = status["nodes"][0]["metrics"].as_str().unwrap().to_owned();
    let metrics = mesh.ok(&["fetch", &format!("http://{node1}/metrics")]);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_closed_total")
                && l.contains("response_flags=\"UH\"")
                && l.contains("destination_service=\"server.app.svc.cluster.local\"")),
        "{metrics}"
    );

    // The Gateway is back: served through it again, policy in force.
    mesh.ok(&["apply", "-f", gateway.to_str().unwrap()]);
    let served = |ok: bool, first: &str| ok && first.contains(" 200 ");
    assert_eq!(fetch_until(&mesh, public, served).1, "HTTP/1.1 200 OK");
    assert_eq!(
        fetch_until(&mesh, admin, denied).1,
        "HTTP/1.1 403 Forbidden"
    );
    mesh.ok(&["down"]);
}

/// A Python `grpcio` server behind a Service whose port is named `grpc`, used through the
/// namespace's waypoint from the start.
fn grpc_mesh(peer: &Path) -> String {
    let peer = peer.display();
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata:
  name: rpc
  labels: {{istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {{name: greeter, namespace: rpc, labels: {{app: greeter}}}}
spec:
  nodeName: node2
  containers:
  - {{name: grpc, image: python, command: [python3, "{peer}", server, "0.0.0.0:50051", greeter]}}
---
apiVersion: v1
kind: Service
metadata:
  name: greeter
  namespace: rpc
  labels: {{istio.io/use-waypoint: waypoint}}
spec:
  selector: {{app: greeter}}
  ports: [{{name: grpc, port: 50051, targetPort: 50051}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: rpc}}
spec:
  nodeName: node1
  containers: [{{name: echo, image: ambit/echo}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: rpc}}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - {{name: mesh, port: 15008, protocol: HBONE}}
"#
    )
}

#[test]
fn grpc_calls_and_streams_pass_through_a_waypoint() {
    let peer = Path::new(env!("CARGO_MANIFEST_DIR")).join("../waypoint/tests/support/grpc_peer.py");
    let mesh = Mesh::new("g");
    let manifests = mesh.write("g.yaml", &grpc_mesh(&peer));
    mesh.ok(&["up", "-f", manifests.to_str().unwrap()]);
    let status = mesh.status();
    let vip = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "greeter")
        .expect("the greeter service")["vip"]
        .as_str()
        .unwrap()
        .to_owned();
    let target = format!("{vip}:50051");
    let client = |args: &[&str]| -> Value {
        let mut argv = vec!["exec", "client", "-n", "rpc", "--", "python3"];
        let peer = peer.to_str().unwrap();
        argv.extend([peer, "client", &target]);
        argv.extend(args);
        // The server may still be starting: its first calls are retried.
        let mut last = String::new();
        for _ in 0..20 {
            let out = mesh.run(&argv);
            if out.status.success() {
                return serde_json::from_slice(&out.stdout).expect("the client prints JSON");
            }
            last = format!("{out:?}");
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("the gRPC client never succeeded: {last}");
    };
    // Wait until the server listens (before that, calls fail UNAVAILABLE: connect refused).
    let mut ready = Value::Null;
    for _ in 0..40 {
        ready = client(&["call", "Unary"]);
        if ready["code"] == "OK" {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(ready["code"], "OK", "{ready}");
    let unary = client(&["unary", "500"]);
    assert_eq!(unary["ok"], 500, "{unary}");
    let stream = client(&["stream"]);
    let (first, end) = (
        stream["first_at"].as_f64().unwrap(),
        stream["end_at"].as_f64().unwrap(),
    );
    assert!(end - first > 1.0, "first message at {first}, end at {end}");
    let bidi = client(&["bidi", "1000"]);
    assert_eq!(bidi["echoed"], 1000, "{bidi}");
    assert_eq!(bidi["in_order"], true, "{bidi}");
    eprintln!("through the waypoint in ambit mesh: {unary} {stream} {bidi}");
    mesh.ok(&["down"]);
    assert!(netns_left(&mesh.prefix).is_empty());
}
