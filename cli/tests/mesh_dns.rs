//! Cluster DNS and pods that look like pods, through the real `ambit` binary: a Python
//! `http.server` pod (which looks its own hostname up at start) answering right after `mesh up`,
//! lookups of Service names, pod names, PTR, SRV and unknown cluster names from pods outside the
//! mesh (answered by the cluster DNS on 10.96.0.10) and inside it (ztunnel's DNS proxy in front,
//! forwarding what it does not answer itself), each under 100 ms; the zone following applies and
//! deletes; a pod's hostname, `/etc/hosts`, `/etc/resolv.conf` and environment as kubelet gives
//! them. Needs root, iproute2, iptables and python3.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "support/mesh.rs"]
mod support;
use support::{pod, Mesh};

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Namespace
metadata:
  name: amb
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: plain, labels: {app: web}}
spec:
  nodeName: node2
  containers:
  - name: http
    image: python
    command: [python3, -m, http.server, "8000"]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: plain}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8000}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: plain, labels: {app: db}}
spec:
  hostname: primary
  subdomain: db
  containers: [{name: sleep, image: busybox, command: [sleep, "3600"]}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: plain}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: pg, port: 5432}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: plain}
spec:
  nodeName: node1
  containers: [{name: sleep, image: busybox, command: [sleep, "3600"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: amb}
spec:
  nodeName: node1
  containers: [{name: sleep, image: busybox, command: [sleep, "3600"]}]
"#;

/// Looks names up the way applications do (glibc through Python's socket module: `/etc/hosts`,
/// then DNS with the search list) and SRV with a raw query to the resolv.conf nameserver; prints
/// `{check: [result, best milliseconds of 3]}`. Checks: `a:NAME`, `ptr:ADDRESS`, `srv:NAME`,
/// and `junk:` (a malformed datagram and a 64 KiB TCP message to the nameserver first).
const LOOKUP: &str = r#"
import json, socket, struct, sys, time

nameserver = [l.split()[1] for l in open('/etc/resolv.conf') if l.startswith('nameserver')][0]

def srv(name):
    msg = struct.pack('>HHHHHH', 0x4242, 0x0100, 1, 0, 0, 0)
    for label in name.split('.'):
        msg += bytes([len(label)]) + label.encode()
    msg += b'\0' + struct.pack('>HH', 33, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(msg, (nameserver, 53))
    data = s.recv(4096)
    count = struct.unpack('>H', data[6:8])[0]
    off, ports = len(msg), []
    for _ in range(count):
        while data[off] and data[off] & 0xc0 != 0xc0:
            off += data[off] + 1
        off += 2 if data[off] else 1
        rtype, _, _, rdlen = struct.unpack('>HHIH', data[off:off + 10])
        off += 10
        if rtype == 33:
            ports.append(struct.unpack('>H', data[off + 4:off + 6])[0])
        off += rdlen
    return 'rcode=%d answers=%d ports=%s' % (data[3] & 15, count, ports)

def junk():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b'\x12\x34\x00\x00\x00\x01' + b'\xff' * 40, (nameserver, 53))
    t = socket.create_connection((nameserver, 53), timeout=3)
    t.sendall(struct.pack('>H', 65535) + b'\x5a' * 65535)
    t.settimeout(3)
    try:
        return 'tcp answered %d bytes' % len(t.recv(65537))
    except OSError as e:
        return 'tcp closed (%s)' % e.__class__.__name__

results = {}
for check in sys.argv[1:]:
    kind, name = check.split(':', 1)
    run = {'a': lambda: socket.gethostbyname(name),
           'ptr': lambda: socket.gethostbyaddr(name)[0],
           'srv': lambda: srv(name),
           'junk': junk}[kind]
    best = None
    for _ in range(3):
        start = time.monotonic()
        try:
            value = run()
        except OSError as e:
            value = 'error: ' + e.__class__.__name__
        ms = (time.monotonic() - start) * 1000
        best = ms if best is None else min(best, ms)
    results[check] = [value, best]
print(json.dumps(results))
"#;

/// Runs [`LOOKUP`] in pod `namespace/name`.
fn lookups(
    mesh: &Mesh,
    namespace: &str,
    name: &str,
    checks: &[String],
) -> BTreeMap<String, (String, f64)> {
    let mut args = vec!["exec", name, "-n", namespace, "--", "python3", "-c", LOOKUP];
    args.extend(checks.iter().map(String::as_str));
    let out = mesh.ok(&args);
    let parsed: BTreeMap<String, (String, f64)> =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    parsed
}

fn dashed(ip: &str) -> String {
    ip.replace('.', "-")
}

fn service_vip(status: &Value, namespace: &str, name: &str) -> String {
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["namespace"] == namespace && s["name"] == name)
        .unwrap_or_else(|| panic!("no service {namespace}/{name} in {status:#}"))["vip"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn cluster_dns_answers_every_pod_and_pods_look_like_pods() {
    let mesh = Mesh::new("dns");
    let manifests = mesh.write("m.yaml", MANIFESTS);
    mesh.ok(&["up", "-f", manifests.to_str().unwrap()]);

    // Python's http.server looks its own name up before it listens: with a hostname in /etc/hosts
    // it serves at once, not after a 10 s DNS timeout.
    let up = Instant::now();
    let url = "http://web.plain.svc.cluster.local/";
    let served = loop {
        let out = mesh.fetch("client", "plain", url);
        if out.status.success() {
            break up.elapsed();
        }
        assert!(
            up.elapsed() < Duration::from_secs(10),
            "http.server never answered: {out:?}\n{}",
            std::fs::read_to_string(mesh.dir.join("logs/pods/plain_web.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("http.server answered {served:?} after `mesh up` returned");
    assert!(
        served < Duration::from_secs(2),
        "http.server answered after {served:?}"
    );

    let status = mesh.status();
    let web_ip = pod(&status, "plain", "web")["ip"]
        .as_str()
        .unwrap()
        .to_owned();
    let db_ip = pod(&status, "plain", "db-0")["ip"]
        .as_str()
        .unwrap()
        .to_owned();
    let vip = service_vip(&status, "plain", "web");
    assert_eq!(pod(&status, "amb", "client")["enrolled"], true);
    assert_eq!(pod(&status, "plain", "client")["enrolled"], false);
    // A headless Service has no VIP.
    assert_eq!(service_vip(&status, "plain", "db"), "");

    let checks: Vec<String> = [
        "a:web".to_owned(),
        "a:web.plain".to_owned(),
        "a:web.plain.svc.cluster.local".to_owned(),
        format!("a:{}.plain.pod.cluster.local", dashed(&web_ip)),
        "a:primary.db.plain.svc.cluster.local".to_owned(),
        "a:db.plain.svc.cluster.local".to_owned(),
        format!("ptr:{vip}"),
        format!("ptr:{web_ip}"),
        format!("ptr:{db_ip}"),
        "a:nope.plain.svc.cluster.local".to_owned(),
        "a:nope.cluster.local".to_owned(),
        "srv:_http._tcp.web.plain.svc.cluster.local".to_owned(),
        "srv:_pg._tcp.db.plain.svc.cluster.local".to_owned(),
    ]
    .into();
    let expected: BTreeMap<&str, String> = BTreeMap::from([
        ("a:web", vip.clone()),
        ("a:web.plain", vip.clone()),
        ("a:web.plain.svc.cluster.local", vip.clone()),
        (checks[3].as_str(), web_ip.clone()),
        ("a:primary.db.plain.svc.cluster.local", db_ip.clone()),
        ("a:db.plain.svc.cluster.local", db_ip.clone()),
        (checks[6].as_str(), "web.plain.svc.cluster.local".to_owned()),
        (
            checks[7].as_str(),
            format!("{}.plain.pod.cluster.local", dashed(&web_ip)),
        ),
        (
            checks[8].as_str(),
            "primary.db.plain.svc.cluster.local".to_owned(),
        ),
        (
            "a:nope.plain.svc.cluster.local",
            "error: gaierror".to_owned(),
        ),
        ("a:nope.cluster.local", "error: gaierror".to_owned()),
        (
            "srv:_http._tcp.web.plain.svc.cluster.local",
            "rcode=0 answers=1 ports=[80]".to_owned(),
        ),
        (
            "srv:_pg._tcp.db.plain.svc.cluster.local",
            "rcode=0 answers=1 ports=[5432]".to_owned(),
        ),
    ]);
    // Outside the mesh (the cluster DNS itself), and inside it (ztunnel's proxy in front).
    for (namespace, mut checks) in [("plain", checks.clone()), ("amb", checks.clone())] {
        checks.insert(0, "junk:".to_owned());
        let results = lookups(&mesh, namespace, "client", &checks);
        for (check, (got, ms)) in &results {
            println!("{namespace:>5} {check:<50} {ms:6.1} ms  {got}");
        }
        let junk = &results["junk:"].0;
        assert!(junk.starts_with("tcp "), "{namespace}: {junk}");
        for (check, want) in &expected {
            // A short name is the asking pod's namespace's.
            if *check == "a:web" && namespace != "plain" {
                continue;
            }
            let (got, ms) = &results[*check];
            assert_eq!(got, want, "{namespace}: {check}");
            assert!(*ms < 100.0, "{namespace}: {check} took {ms:.1} ms");
        }
    }
    // The enrolled client's queries went through ztunnel's proxy, which sent what it does not
    // answer (PTR, SRV, pod names) on to the cluster DNS.
    let node1 = status["nodes"][0]["metrics"].as_str().unwrap();
    let metrics = mesh.ok(&["fetch", &format!("http://{node1}/metrics")]);
    for query_type in ["ptr", "srv", "a"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("istio_dns_upstream_requests_total")
                    && l.contains(&format!("request_query_type=\"{query_type}\""))),
            "no forwarded {query_type} query in ztunnel's metrics:\n{metrics}"
        );
    }

    // Pods look like pods: hostname (the process's own and `exec`'s), hosts, resolv.conf, env.
    assert_eq!(
        mesh.ok(&["exec", "client", "-n", "plain", "--", "hostname"]),
        "client\n"
    );
    assert_eq!(
        mesh.ok(&["exec", "db-0", "-n", "plain", "--", "hostname"]),
        "primary\n"
    );
    let web_pid = pod(&status, "plain", "web")["pids"][0].as_u64().unwrap();
    let uts = std::process::Command::new("nsenter")
        .args(["-t", &web_pid.to_string(), "-u", "hostname"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&uts.stdout), "web\n");
    let environ = std::fs::read(format!("/proc/{web_pid}/environ")).unwrap();
    let environ: Vec<String> = environ
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    for variable in [
        "HOSTNAME=web".to_owned(),
        format!("WEB_SERVICE_HOST={vip}"),
        "WEB_SERVICE_PORT=80".to_owned(),
        format!("WEB_PORT=tcp://{vip}:80"),
    ] {
        assert!(environ.contains(&variable), "{variable} not in {environ:?}");
    }
    let hosts = mesh.ok(&["exec", "db-0", "-n", "plain", "--", "cat", "/etc/hosts"]);
    assert!(
        hosts.starts_with("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n"),
        "{hosts}"
    );
    assert!(
        hosts.ends_with(&format!(
            "\n{db_ip}\tprimary.db.plain.svc.cluster.local\tprimary\n"
        )),
        "{hosts}"
    );
    let hosts = mesh.ok(&["exec", "web", "-n", "plain", "--", "cat", "/etc/hosts"]);
    assert!(hosts.ends_with(&format!("\n{web_ip}\tweb\n")), "{hosts}");
    let resolv = mesh.ok(&[
        "exec",
        "web",
        "-n",
        "plain",
        "--",
        "cat",
        "/etc/resolv.conf",
    ]);
    assert!(
        resolv.starts_with("search plain.svc.cluster.local svc.cluster.local cluster.local"),
        "{resolv}"
    );
    assert!(
        resolv.contains("\nnameserver 10.96.0.10\noptions ndots:5\n"),
        "{resolv}"
    );

    // The zone follows applies and deletes.
    let late = mesh.write(
        "late.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: late, namespace: plain}\n\
         spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8000}]}\n",
    );
    mesh.ok(&["apply", "-f", late.to_str().unwrap()]);
    let late_vip = service_vip(&mesh.status(), "plain", "late");
    let check = vec!["a:late.plain.svc.cluster.local".to_owned()];
    assert_eq!(
        lookups(&mesh, "plain", "client", &check)[&check[0]].0,
        late_vip
    );
    mesh.ok(&["delete", "-f", late.to_str().unwrap()]);
    assert_eq!(
        lookups(&mesh, "plain", "client", &check)[&check[0]].0,
        "error: gaierror"
    );
}
