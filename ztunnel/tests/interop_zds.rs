//! ZDS interop against a node agent Ambit did not write: `tests/interop/zds_agent.py`, a Python
//! stdlib script that encodes the `istio.workload.zds` protobufs by hand from their field numbers
//! and passes each pod's netns fd with `SCM_RIGHTS` over `SOCK_SEQPACKET`.
//!
//! The agent behaves as istio-cni does: each pod's uid is a Kubernetes pod UID (a random UUID)
//! with `WorkloadInfo` filled, while the state names workloads as istiod does
//! (`Kubernetes//Pod/<ns>/<name>`), so ztunnel must match them by name, namespace, service
//! account and node (`NODE_NAME`), never by uid.
//!
//! Two nodes (network namespaces from the [`Topology`] fixture), one in-process ambit-ztunnel and
//! one Python agent per node, Istio's in-pod rules installed in both pods with
//! [`ambit_cni::rules::install`]. The agents get a `ZdsHello` (V1) and an ack for every message;
//! each ztunnel lists its pod as running with the identity from the agent's `WorkloadInfo` and
//! matched to its workload; calls from `sleep` to `echo`'s service VIP and from `echo` to
//! `sleep`'s then cross as HBONE and both ztunnels count them as `mutual_tls`.
//! A second test checks the agent's hand-written encoding against prost's, message by message.
//!
//! Needs root, iproute2, iptables and `python3`, like `tests/inpod.rs`.

#[path = "support/python_zds_agent.rs"]
mod python_zds_agent;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ambit_cni::rules::{self, Backend, RuleOptions};
use ambit_mesh::identity::CertificateAuthority;
use ambit_ztunnel::app::Ztunnel;
use ambit_ztunnel::config::Config;
use ambit_ztunnel::testing::{
    app_call, app_server, config, http_get, uid, workload_uid, PodNet, Topology,
};
use python_zds_agent::{script, PythonAgent};
use serde_json::Value;

const ECHO_VIP: &str = "10.96.0.10";
const SLEEP_VIP: &str = "10.96.0.11";

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
  services:
    "default/sleep.default.svc.cluster.local": {{80: 8080}}
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
  vips: ["/{ECHO_VIP}"]
  ports: {{80: 8080}}
- name: sleep
  namespace: default
  hostname: sleep.default.svc.cluster.local
  vips: ["/{SLEEP_VIP}"]
  ports: {{80: 8080}}
"#,
        sleep_uid = workload_uid(sleep),
        sleep_ip = sleep.ip,
        echo_uid = workload_uid(echo),
        echo_ip = echo.ip,
    )
}

#[tokio::test]
async fn python_zds_agent_enrolls_pods_and_traffic_is_mutual_tls() {
    // Fails, never skips, without python3.
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

    let dir = std::env::temp_dir().join(format!("ambit-interop-zds-{}", topology.network));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveOnDrop(dir.clone());
    CertificateAuthority::generate("cluster.local")
        .unwrap()
        .save(&dir.join("cacerts"))
        .unwrap();
    let state_path = dir.join("state.yaml");
    std::fs::write(&state_path, state_yaml(&sleep, &echo)).unwrap();
    let options = RuleOptions {
        dns_capture: false,
        ipv6: false,
        ..Default::default()
    };
    for pod in [&sleep, &echo] {
        rules::install(pod.open(), Backend::Iptables, &options)
            .unwrap_or_else(|e| panic!("installing Istio's in-pod rules in {}: {e}", pod.name));
    }

    // Per node: the Python agent listens first, then ztunnel starts and connects to it.
    let pods = [(&sleep, "sleep"), (&echo, "echo")];
    let mut agents = Vec::new();
    let mut ztunnels: Vec<Ztunnel> = Vec::new();
    for (node, (pod, service_account)) in pods.iter().enumerate() {
        let socket = dir.join(format!("node{node}.sock"));
        let agent = PythonAgent::start(node, &socket, pod, service_account).await;
        assert_eq!(
            agent.listening["listening"].as_str(),
            socket.to_str(),
            "python ZDS agent (node {node}): listening line"
        );
        let config = Config {
            node_name: format!("node-{}", node + 1),
            ..config(&dir, &state_path, &socket)
        };
        let ztunnel = Ztunnel::start(config, Default::default())
            .await
            .unwrap_or_else(|e| panic!("ambit-ztunnel (node {node}) starts: {e:#}"));
        agents.push(agent);
        ztunnels.push(ztunnel);
    }

    // Each agent: hello V1, then an ack for its AddWorkload and for SnapshotSent.
    for (agent, (pod, _)) in agents.iter_mut().zip(pods) {
        let node = agent.node;
        let record = agent.next_json("handshake record").await;
        assert!(
            record["error"].is_null(),
            "python ZDS agent (node {node}) → ambit-ztunnel: the exchange failed: {}",
            record["error"]
        );
        assert_eq!(
            record["hello_version"].as_u64(),
            Some(1),
            "python ZDS agent (node {node}) ← ambit-ztunnel: ZdsHello.version expected V1 (1)"
        );
        let messages = record["messages"].as_array().cloned().unwrap_or_default();
        let sent: Vec<&str> = messages.iter().filter_map(|m| m["sent"].as_str()).collect();
        assert_eq!(
            sent,
            [format!("add {}", uid(pod)).as_str(), "snapshot_sent"],
            "python ZDS agent (node {node}): messages answered"
        );
        for message in &messages {
            assert_eq!(
                message["ack"].as_bool(),
                Some(true),
                "python ZDS agent (node {node}) → ambit-ztunnel: {} expected an ack, got nack {:?}",
                message["sent"],
                message["error"]
            );
        }
    }

    // Each ztunnel enrolled the pod with the identity from the hand-encoded WorkloadInfo.
    for (node, (ztunnel, (pod, service_account))) in ztunnels.iter().zip(pods).enumerate() {
        let step = format!(
            "python ZDS agent (node {node}) → ambit-ztunnel: AddWorkload {}",
            uid(pod)
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let listed = ztunnel.inpod.pods();
            let found = listed.iter().find(|p| p.uid == uid(pod));
            if found.is_some_and(|p| p.state == "running") && ztunnel.inpod.is_ready() {
                let found = found.unwrap();
                assert_eq!(found.name, pod.name, "{step}: pod name");
                assert_eq!(found.namespace, "default", "{step}: pod namespace");
                assert_eq!(
                    found.workload.as_deref(),
                    Some(workload_uid(pod).as_str()),
                    "{step}: the workload the pod matched ({:?})",
                    found.workload_error
                );
                assert_eq!(
                    found.identity,
                    format!("spiffe://cluster.local/ns/default/sa/{service_account}"),
                    "{step}: pod identity"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{step}: expected the pod running and ztunnel ready, got pods {listed:?} (ready: {})",
                ztunnel.inpod.is_ready()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Traffic between the two enrolled pods, each way through the other's service VIP, goes
    // through both ztunnels as HBONE.
    app_server(&echo, 8080).await;
    app_server(&sleep, 8080).await;
    for (client, server, vip) in [(&sleep, &echo, ECHO_VIP), (&echo, &sleep, SLEEP_VIP)] {
        let target = SocketAddr::new(vip.parse().unwrap(), 80);
        let step = format!("{} → {} VIP {target}", client.name, server.name);
        let payload = b"interop: pods enrolled by a python ZDS agent".repeat(50);
        let reply = app_call(client, target, &payload)
            .await
            .unwrap_or_else(|e| panic!("{step} after python ZDS enrollment: {e}"));
        let expected = [
            format!("peer={}\n", client.ip).into_bytes(),
            payload.clone(),
        ]
        .concat();
        assert_eq!(
            String::from_utf8_lossy(&reply),
            String::from_utf8_lossy(&expected),
            "{step} after python ZDS enrollment: reply"
        );
    }

    tokio::time::sleep(Duration::from_millis(200)).await;
    for (node, reporter) in [(1, "destination"), (0, "source")] {
        let metrics = http_get(ztunnels[node].stats_address, "/metrics").await;
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("istio_tcp_connections_opened_total")
                    && l.contains(&format!("reporter=\"{reporter}\""))
            })
            .unwrap_or_else(|| {
                panic!("ambit-ztunnel (node {node}): no {reporter} connection metric after sleep → echo:\n{metrics}")
            });
        for label in [
            "connection_security_policy=\"mutual_tls\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
            "destination_principal=\"spiffe://cluster.local/ns/default/sa/echo\"",
            // From the workloads each ztunnel matched its own pod to.
            "source_canonical_service=\"sleep\"",
            "destination_canonical_service=\"echo\"",
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

/// The agent's hand-written encoder and decoder agree with prost's reading of the same field
/// numbers, message by message (the end-to-end test above only shows ztunnel accepted them).
#[test]
fn python_zds_encoding_matches_prost() {
    use ambit_mesh::zds::proto::{
        workload_request::Payload, workload_response, Ack, AddWorkload, SnapshotSent,
        WorkloadRequest, WorkloadResponse,
    };
    use ambit_mesh::zds::WorkloadInfo;
    use prost::Message;

    let nack = WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack {
            error: "no such netns".into(),
        })),
    }
    .encode_to_vec();
    let ack = WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack::default())),
    }
    .encode_to_vec();
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let program = format!(
        "import sys, json; sys.dont_write_bytecode = True; sys.path.insert(0, {dir:?}); import zds_agent as z; \
         print(json.dumps({{'add': z.add_workload('cluster1//v1/Pod/default/p', 'p', 'default', 'sa').hex(), \
         'snapshot': z.snapshot_sent().hex(), \
         'nack': z.decode_ack(bytes.fromhex({nack:?})), 'ack': z.decode_ack(bytes.fromhex({ack:?}))}}))",
        dir = script("").to_str().unwrap(),
        nack = hex(&nack),
        ack = hex(&ack),
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &program])
        .output()
        .expect("python ZDS agent encoder: python3 runs");
    assert!(
        out.status.success(),
        "python ZDS agent encoder: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    let unhex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    let add = WorkloadRequest::decode(&unhex(result["add"].as_str().unwrap())[..])
        .expect("python ZDS agent: AddWorkload decodes with prost");
    assert_eq!(
        add.payload,
        Some(Payload::Add(AddWorkload {
            uid: "cluster1//v1/Pod/default/p".into(),
            workload_info: Some(WorkloadInfo {
                name: "p".into(),
                namespace: "default".into(),
                service_account: "sa".into(),
            }),
        })),
        "python ZDS agent: AddWorkload as prost reads it"
    );
    let snapshot = WorkloadRequest::decode(&unhex(result["snapshot"].as_str().unwrap())[..])
        .expect("python ZDS agent: SnapshotSent decodes with prost");
    assert_eq!(
        snapshot.payload,
        Some(Payload::SnapshotSent(SnapshotSent {})),
        "python ZDS agent: SnapshotSent as prost reads it"
    );
    assert_eq!(
        result["nack"],
        serde_json::json!([false, "no such netns"]),
        "python ZDS agent: a prost-encoded nack as the agent reads it"
    );
    assert_eq!(
        result["ack"],
        serde_json::json!([true, ""]),
        "python ZDS agent: a prost-encoded ack as the agent reads it"
    );
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
