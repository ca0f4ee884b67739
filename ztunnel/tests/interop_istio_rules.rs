//! ambit-ztunnel serving pods whose in-pod redirection is **istio-cni's**, not Ambit's.
//!
//! The rules are istio-cni's published golden for its `default` in-pod case (`RedirectDNS` on;
//! `cni/pkg/iptables/testdata/default.golden`, reproduced below as data): the exact
//! `iptables-restore` input istio-cni pipes to `iptables-restore --noflush` in the pod's netns,
//! applied here the same way, plus the policy routing istio-cni adds beside it
//! (`cni/pkg/iptables/iptables_linux.go`: rule fwmark 0x111/0xfff priority 32764 → table 100, and
//! a `local 0.0.0.0/0 dev lo` route in table 100). Ambit's rules library is not used.
//!
//! Two nodes (netns), `sleep` on node 1 and `echo` (behind a service VIP) on node 2, each pod
//! with those rules, each node with an in-process ambit-ztunnel enrolled by the Python ZDS node
//! agent (`tests/interop/zds_agent.py`). Then sleep → the VIP and sleep → echo's IP must cross as
//! HBONE: the echo app sees sleep's own address (ztunnel's inbound keeps it), and both ztunnels
//! count the connections as `mutual_tls` with the pods' SPIFFE identities.
//!
//! Needs root, iproute2, iptables (`iptables-restore`; the `REDIRECT`, `CONNMARK`, `CT` targets
//! of the nf_tables or legacy backend) and `python3`.

#[path = "support/python_zds_agent.rs"]
mod python_zds_agent;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ambit_mesh::identity::CertificateAuthority;
use ambit_ztunnel::app::Ztunnel;
use ambit_ztunnel::testing::{
    app_call, app_server, config, http_get, netns_exec, uid, workload_uid, PodNet, Topology,
};
use python_zds_agent::PythonAgent;

/// istio/istio `cni/pkg/iptables/testdata/default.golden` at 86c9f01fd735fb01d8192f5bcaf0d424afb7f14c
/// (last changed in fa104c4886e, #53153): the `iptables-restore` input istio-cni writes for a pod
/// with its default configuration, IPv4. The golden's first two lines, `iptables-save` and
/// `ip6tables-save`, record the state reads istio-cni makes first and are not restore input.
const ISTIO_CNI_DEFAULT_GOLDEN: &str = "\
* mangle
-N ISTIO_PRERT
-N ISTIO_OUTPUT
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
* nat
-N ISTIO_PRERT
-N ISTIO_OUTPUT
-A OUTPUT -j ISTIO_OUTPUT
-A PREROUTING -j ISTIO_PRERT
-A ISTIO_PRERT -s 169.254.7.127 -p tcp -m tcp -j ACCEPT
-A ISTIO_OUTPUT -d 169.254.7.127 -p tcp -m tcp -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-port 15053
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
COMMIT
* raw
-N ISTIO_OUTPUT
-N ISTIO_PRERT
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -p udp -m mark --mark 0x539/0xfff -m udp --dport 53 -j CT --zone 1
-A ISTIO_PRERT -p udp -m mark ! --mark 0x539/0xfff -m udp --sport 53 -j CT --zone 1
COMMIT
";

/// istio-cni's policy routing for the in-pod mode (`ip` arguments), IPv4.
const ISTIO_CNI_ROUTING: &[&[&str]] = &[
    &[
        "-4",
        "rule",
        "add",
        "fwmark",
        "0x111/0xfff",
        "pref",
        "32764",
        "lookup",
        "100",
    ],
    &[
        "-4",
        "route",
        "add",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        "100",
    ],
];

const VIP: &str = "10.96.0.10";
/// Applies istio-cni's rules and routing inside `pod`'s namespace, as istio-cni would.
fn apply_istio_cni_rules(pod: &PodNet) {
    let input = ISTIO_CNI_DEFAULT_GOLDEN;
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &pod.netns, "iptables-restore", "--noflush"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("istio-cni rules in {}: ip netns exec: {e}", pod.name));
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "istio-cni rules in {}: iptables-restore refused istio-cni's golden:\n{}\ninput:\n{input}",
        pod.name,
        String::from_utf8_lossy(&out.stderr)
    );
    for args in ISTIO_CNI_ROUTING {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &pod.netns, "ip"])
            .args(*args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "istio-cni routing in {}: ip {}: {}",
            pod.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn state_yaml(sleep: &PodNet, echo: &PodNet) -> String {
    format!(
        r#"
workloads:
- uid: {sleep_uid}
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: ["{sleep_ip}"]
  protocol: HBONE
  node: node-1
  canonicalName: sleep
  services: {{}}
- uid: {echo_uid}
  name: echo
  namespace: default
  serviceAccount: echo
  workloadIps: ["{echo_ip}"]
  protocol: HBONE
  node: node-2
  canonicalName: echo
  services:
    "default/echo.default.svc.cluster.local": {{80: 8080}}
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/{VIP}"]
  ports: {{80: 8080}}
"#,
        sleep_uid = workload_uid(sleep),
        sleep_ip = sleep.ip,
        echo_uid = workload_uid(echo),
        echo_ip = echo.ip,
    )
}

/// The `istio_tcp_connections_opened_total` line for `reporter` and `destination` (a service
/// hostname or workload name), if any.
fn metric_line(metrics: &str, reporter: &str, destination_label: &str) -> Option<String> {
    metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_connections_opened_total")
                && l.contains(&format!("reporter=\"{reporter}\""))
                && l.contains(destination_label)
        })
        .map(str::to_owned)
}

#[tokio::test]
async fn ztunnel_serves_pods_redirected_by_istio_cni_rules() {
    let python = std::process::Command::new("python3")
        .arg("--version")
        .output();
    assert!(
        python.is_ok_and(|o| o.status.success()),
        "python ZDS agent: python3 is required for the interop tests"
    );

    let mut topology = Topology::new();
    let n1 = topology.add_node();
    let n2 = topology.add_node();
    let sleep = topology.add_pod(n1, "sleep");
    let echo = topology.add_pod(n2, "echo");

    let dir = std::env::temp_dir().join(format!("ambit-interop-istio-rules-{}", topology.network));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveOnDrop(dir.clone());
    CertificateAuthority::generate("cluster.local")
        .unwrap()
        .save(&dir.join("cacerts"))
        .unwrap();
    let state_path = dir.join("state.yaml");
    std::fs::write(&state_path, state_yaml(&sleep, &echo)).unwrap();

    for pod in [&sleep, &echo] {
        apply_istio_cni_rules(pod);
        // The pod now holds exactly istio-cni's chains (nothing of Ambit's library).
        let saved = netns_exec(&pod.netns, &["iptables-save"]);
        // (iptables-save's normal form: it adds the implicit `-m tcp`, so match the tails.)
        for needle in [
            "! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006",
            "-m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
            "-m udp --dport 53 -j CT --zone 1",
        ] {
            assert!(
                saved.contains(needle),
                "istio-cni rules in {}: iptables-save lacks {needle:?}:\n{saved}",
                pod.name
            );
        }
    }

    let pods = [(&sleep, "sleep"), (&echo, "echo")];
    let mut agents = Vec::new();
    let mut ztunnels: Vec<Ztunnel> = Vec::new();
    for (node, (pod, service_account)) in pods.iter().enumerate() {
        let socket = dir.join(format!("node{node}.sock"));
        let agent = PythonAgent::start(node, &socket, pod, service_account).await;
        let ztunnel = Ztunnel::start(config(&dir, &state_path, &socket), Default::default())
            .await
            .unwrap_or_else(|e| panic!("ambit-ztunnel (node {node}) starts: {e:#}"));
        agents.push(agent);
        ztunnels.push(ztunnel);
    }
    for agent in agents.iter_mut() {
        let node = agent.node;
        let record = agent.next_json("handshake record").await;
        assert!(
            record["error"].is_null()
                && record["messages"]
                    .as_array()
                    .is_some_and(|m| m.iter().all(|m| m["ack"] == true)),
            "python ZDS agent (node {node}) → ambit-ztunnel: enrollment not acked: {record}"
        );
    }
    for (node, (ztunnel, (pod, _))) in ztunnels.iter().zip(pods).enumerate() {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let listed = ztunnel.inpod.pods();
            if listed
                .iter()
                .any(|p| p.uid == uid(pod) && p.state == "running")
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ambit-ztunnel (node {node}): pod {} not running behind istio-cni's rules: {listed:?}",
                pod.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    app_server(&echo, 8080).await;
    let expected_peer = format!("peer={}\n", sleep.ip);
    for (target, what) in [
        (SocketAddr::new(VIP.parse().unwrap(), 80), "service VIP"),
        (SocketAddr::new(echo.ip.into(), 8080), "pod IP"),
    ] {
        let payload = format!("istio-cni rules, sleep → echo by {what}").repeat(40);
        let step = format!(
            "sleep → echo {target} ({what}) through istio-cni's rules (REDIRECT 15001 → HBONE 15008)"
        );
        let reply = app_call(&sleep, target, payload.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{step}: {e}"));
        let reply = String::from_utf8_lossy(&reply);
        assert!(
            reply.starts_with(&expected_peer),
            "{step}: the echo app must see sleep's own address ({expected_peer:?}), got {:?}",
            reply.lines().next()
        );
        assert_eq!(
            &reply[expected_peer.len()..],
            payload,
            "{step}: echoed bytes"
        );
    }

    tokio::time::sleep(Duration::from_millis(200)).await;
    let checks = [
        (
            0,
            "source",
            "destination_service=\"echo.default.svc.cluster.local\"",
        ),
        (
            1,
            "destination",
            "destination_service=\"echo.default.svc.cluster.local\"",
        ),
        (0, "source", "destination_workload=\"echo\""),
        (1, "destination", "destination_workload=\"echo\""),
    ];
    for (node, reporter, destination) in checks {
        let metrics = http_get(ztunnels[node].stats_address, "/metrics").await;
        let line = metric_line(&metrics, reporter, destination).unwrap_or_else(|| {
            panic!(
                "ambit-ztunnel (node {node}): no {reporter} connection metric with {destination} \
                 after sleep → echo through istio-cni's rules:\n{metrics}"
            )
        });
        for label in [
            "connection_security_policy=\"mutual_tls\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
            "destination_principal=\"spiffe://cluster.local/ns/default/sa/echo\"",
        ] {
            assert!(
                line.contains(label),
                "ambit-ztunnel (node {node}): {label} missing from the {reporter} metric {line}"
            );
        }
    }

    for agent in agents {
        agent.stop().await;
    }
    drop(ztunnels);
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
