//! ztunnel with istiod instead of local files: XDS_ADDRESS and CA_ADDRESS point at the stand-in
//! istiod (delta ADS + Istio CA over real gRPC), two nodes in network namespaces, one connection
//! proxied from a pod on node 1 to a service backed by a pod on node 2. Needs root, iproute2
//! and iptables.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use ambit_cni::rules::{self, Backend, RuleOptions};
use ambit_mesh::identity::CertificateAuthority;
use ambit_mesh::state::local::LocalConfig;
use ambit_mesh::zds::{WorkloadInfo, ZdsServer};
use ambit_xds::testing::FakeIstiod;
use ambit_ztunnel::app::Ztunnel;
use ambit_ztunnel::config::IstioEnv;
use ambit_ztunnel::testing::{
    app_call, app_server, config, uid, workload_uid, PodNet, Topology, VIP,
};

fn state(sleep: &PodNet, echo: &PodNet) -> LocalConfig {
    let yaml = format!(
        r#"
workloads:
- uid: {sleep_uid}
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: ["{sleep_ip}"]
  protocol: HBONE
  node: node-1
  services: {{}}
- uid: {echo_uid}
  name: echo
  namespace: default
  serviceAccount: echo
  workloadIps: ["{echo_ip}"]
  protocol: HBONE
  node: node-2
  services:
    "default/echo.default.svc.cluster.local": {{80: 8080}}
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/{VIP}"]
  ports: {{80: 8080}}
policies:
- name: only-sleep
  namespace: default
  scope: Namespace
  action: Allow
  rules:
  - - - principals: [!Exact "cluster.local/ns/default/sa/sleep"]
"#,
        sleep_uid = workload_uid(sleep),
        echo_uid = workload_uid(echo),
        sleep_ip = sleep.ip,
        echo_ip = echo.ip,
    );
    LocalConfig::parse(&yaml, std::path::Path::new("test")).unwrap()
}

#[tokio::test]
async fn ztunnels_fed_by_istiod_get_state_and_certificates_and_proxy_a_connection() {
    let mut topology = Topology::new();
    let n1 = topology.add_node();
    let n2 = topology.add_node();
    let sleep = topology.add_pod(n1, "sleep");
    let echo = topology.add_pod(n2, "echo");
    let dir = std::env::temp_dir().join(format!("ambit-xds-{}", topology.network));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("istio-token");
    std::fs::write(&token, "ztunnel-token").unwrap();

    let istiod = FakeIstiod::start(CertificateAuthority::generate("cluster.local").unwrap()).await;
    istiod.push_config(&state(&sleep, &echo));
    for pod in [&sleep, &echo] {
        let options = RuleOptions {
            ipv6: false,
            ..Default::default()
        };
        rules::install(pod.open(), Backend::Iptables, &options).unwrap();
    }

    let mut ztunnels = Vec::new();
    let mut agents = Vec::new();
    let mut servers = Vec::new();
    for (node, pod, service_account) in [(n1, &sleep, "sleep"), (n2, &echo, "echo")] {
        let socket = dir.join(format!("node{node}.sock"));
        let server = ZdsServer::bind(&socket).unwrap();
        let mut config = config(&dir, &dir.join("unused.yaml"), &socket);
        config.local_xds_path = None;
        config.ca_dir = None;
        config.xds_address = istiod.url();
        config.ca_address = istiod.url();
        config.node_name = format!("node-{}", node + 1);
        let istio = IstioEnv {
            xds_root_ca: dir.join("unused-root.pem"),
            ca_root_ca: dir.join("unused-root.pem"),
            auth_token: token.clone(),
            istio_meta_cluster_id: Some("cluster1".into()),
            pod_name: format!("ztunnel-{node}"),
            pod_namespace: "istio-system".into(),
            instance_ip: topology.nodes[node].address.to_string(),
        };
        let ztunnel = Ztunnel::start_with(config, istio, Default::default())
            .await
            .unwrap();
        // ztunnel takes pods over only once istiod's state is in.
        let mut agent = tokio::time::timeout(Duration::from_secs(10), server.accept())
            .await
            .expect("ztunnel connects to the node agent after its first xDS state")
            .unwrap();
        assert_eq!(ztunnel.state.load().workloads().count(), 2);
        assert_eq!(ztunnel.state.load().policies().len(), 1);
        let info = WorkloadInfo {
            name: pod.name.clone(),
            namespace: "default".into(),
            service_account: service_account.into(),
        };
        agent
            .add(&uid(pod), info, pod.open().as_fd())
            .await
            .unwrap();
        agent.snapshot_sent().await.unwrap();
        assert!(ztunnel.inpod.is_ready());
        ztunnels.push(ztunnel);
        agents.push(agent);
        servers.push(server);
    }

    app_server(&echo, 8080).await;
    let target: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let answer = app_call(&sleep, target, b"hello over istiod's state")
        .await
        .expect("the call through both ztunnels");
    assert_eq!(
        String::from_utf8_lossy(&answer),
        format!("peer={}\nhello over istiod's state", sleep.ip)
    );

    // Both pods' certificates came from the Istio CA, asked for by their node's ztunnel.
    let mut impersonated = Vec::new();
    while let Ok(call) =
        tokio::time::timeout(Duration::from_millis(200), istiod.next_ca_call()).await
    {
        assert_eq!(call.authorization.as_deref(), Some("Bearer ztunnel-token"));
        assert_eq!(call.cluster_id.as_deref(), Some("cluster1"));
        assert_eq!(call.validity_duration, 3600);
        impersonated.extend(call.impersonated_identity);
    }
    impersonated.sort();
    impersonated.dedup();
    assert_eq!(
        impersonated,
        [
            "spiffe://cluster.local/ns/default/sa/echo",
            "spiffe://cluster.local/ns/default/sa/sleep"
        ]
    );
    for (ztunnel, identity) in ztunnels.iter().zip(["sleep", "echo"]) {
        let id = format!("spiffe://cluster.local/ns/default/sa/{identity}");
        let cert = ztunnel
            .certificates
            .current(&id.parse().unwrap())
            .expect("a certificate");
        let issued_by_istiod = cert.roots() == istiod.ca().roots();
        assert!(
            issued_by_istiod,
            "{id}'s certificate chains to the stand-in's CA"
        );
    }

    // A policy change from istiod reaches the data path: nobody may connect any more.
    let mut deny = state(&sleep, &echo).policies[0].clone();
    deny.rules[0].clauses[0].matches[0].principals = vec![ambit_mesh::rbac::StringMatch::Exact(
        "cluster.local/ns/default/sa/nobody".into(),
    )];
    istiod.push_policies(vec![ambit_xds::testing::authorization_proto(&deny)]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let refused = app_call(&sleep, target, b"again")
            .await
            .map(|a| a.is_empty())
            .unwrap_or(true);
        if refused {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new policy never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(ztunnels);
    let _ = std::fs::remove_dir_all(&dir);
}
