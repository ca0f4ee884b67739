//! The delta ADS client against the stand-in istiod, over real gRPC on real sockets.

use std::sync::Arc;
use std::time::Duration;

use ambit_mesh::state::local::LocalConfig;
use ambit_mesh::state::{Destination, StateStore};
use ambit_xds::proto::{to_any, workload, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use ambit_xds::testing::{address_of_workload, FakeIstiod, ServingCert};
use ambit_xds::{AdsClient, AdsSettings, ControlPlane, ControlPlaneConfig, NodeInfo};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const STATE: &str = r#"
workloads:
- uid: cluster1//v1/Pod/demo/sleep
  name: sleep
  namespace: demo
  serviceAccount: sleep
  workloadIps: ["10.0.1.2"]
  protocol: HBONE
  node: node-1
  services: {}
- uid: cluster1//v1/Pod/demo/echo
  name: echo
  namespace: demo
  serviceAccount: echo
  workloadIps: ["10.0.2.2"]
  protocol: HBONE
  node: node-2
  canonicalName: echo
  services:
    "demo/echo.demo.svc.cluster.local": {80: 8080}
services:
- name: echo
  namespace: demo
  hostname: echo.demo.svc.cluster.local
  vips: ["/10.96.0.10"]
  ports: {80: 8080}
policies:
- name: deny-9999
  namespace: demo
  scope: Namespace
  action: Deny
  rules:
  - - - destinationPorts: [9999]
"#;

fn config() -> LocalConfig {
    LocalConfig::parse(STATE, std::path::Path::new("test")).unwrap()
}

fn node() -> NodeInfo {
    NodeInfo {
        ip: "10.0.1.1".into(),
        pod_name: "ztunnel-abc".into(),
        pod_namespace: "istio-system".into(),
        node_name: "node-1".into(),
        cluster_id: "Kubernetes".into(),
    }
}

struct Client {
    store: Arc<StateStore>,
    ready: watch::Receiver<bool>,
    task: JoinHandle<()>,
    _dir: TempDir,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("ambit-xds-ads-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start_client(istiod: &FakeIstiod, root_pem: Option<&str>, settings: AdsSettings) -> Client {
    let dir = TempDir::new();
    let token = dir.0.join("istio-token");
    std::fs::write(&token, "the-token\n").unwrap();
    let root_cert = root_pem.map(|pem| {
        let path = dir.0.join("root-cert.pem");
        std::fs::write(&path, pem).unwrap();
        path
    });
    let plane = ControlPlane::new(ControlPlaneConfig {
        address: istiod.url(),
        root_cert,
        token_path: Some(token),
        cluster_id: "Kubernetes".into(),
    })
    .unwrap();
    let store = Arc::new(StateStore::default());
    let client = AdsClient::new(plane, node(), settings, store.clone());
    let ready = client.readiness();
    Client {
        store,
        ready,
        task: tokio::spawn(client.run()),
        _dir: dir,
    }
}

fn fast() -> AdsSettings {
    AdsSettings {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(400),
    }
}

async fn wait_ready(client: &mut Client) {
    tokio::time::timeout(Duration::from_secs(10), client.ready.wait_for(|r| *r))
        .await
        .expect("ADS client ready in time")
        .unwrap();
}

/// Waits until the store's current snapshot satisfies `check`.
async fn eventually(
    store: &StateStore,
    what: &str,
    check: impl Fn(&ambit_mesh::state::Snapshot) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check(&store.load()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn initial_push_over_tls_reaches_the_store_and_is_acked() {
    let serving = ServingCert::generate();
    let ca = ambit_mesh::identity::CertificateAuthority::generate("cluster.local").unwrap();
    let istiod = FakeIstiod::start_tls(ca, serving.server_config.clone()).await;
    istiod.push_config(&config());
    let mut client = start_client(&istiod, Some(&serving.root_pem), fast());

    // The subscriptions: node first, wildcard (no names), nothing known yet.
    let first = istiod.next_request().await;
    assert_eq!(first.type_url, ADDRESS_TYPE_URL);
    let node = first.node.expect("the first request carries the node");
    assert_eq!(
        node.id,
        "ztunnel~10.0.1.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
    );
    let metadata = node.metadata.unwrap();
    assert_eq!(metadata.string("NAME"), Some("ztunnel-abc"));
    assert_eq!(metadata.string("NAMESPACE"), Some("istio-system"));
    assert_eq!(metadata.string("INSTANCE_IPS"), Some("10.0.1.1"));
    assert_eq!(metadata.string("NODE_NAME"), Some("node-1"));
    assert!(first.resource_names_subscribe.is_empty());
    assert!(first.initial_resource_versions.is_empty());
    assert!(first.response_nonce.is_empty());
    let second = istiod.next_request().await;
    assert_eq!(second.type_url, AUTHORIZATION_TYPE_URL);

    wait_ready(&mut client).await;
    let snapshot = client.store.load();
    let echo = snapshot
        .workload_by_ip("", ip("10.0.2.2"))
        .expect("echo workload");
    assert_eq!(echo.uid, "cluster1//v1/Pod/demo/echo");
    assert_eq!(
        echo.identity().unwrap().to_string(),
        "spiffe://cluster.local/ns/demo/sa/echo"
    );
    assert_eq!(echo.canonical_name, "echo");
    assert_eq!(echo.cluster_id, "Kubernetes");
    assert!(snapshot.service_by_vip("", ip("10.96.0.10")).is_some());
    match snapshot.resolve("", "10.96.0.10:80".parse().unwrap(), 0) {
        Destination::Service {
            endpoint,
            target_port,
            ..
        } => {
            assert_eq!(endpoint.name, "echo");
            assert_eq!(target_port, 8080);
        }
        other => panic!("expected the echo service, got {other:?}"),
    }
    assert!(snapshot.policies().get("demo", "deny-9999").is_some());

    // Both responses ACKed: nonce, no error.
    for _ in 0..2 {
        let ack = istiod.next_request().await;
        assert!(!ack.response_nonce.is_empty());
        assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
    }
    assert_eq!(
        istiod.ads_authorization(),
        vec![Some("Bearer the-token".to_owned())]
    );
}

#[tokio::test]
async fn updates_and_removals_reach_the_store() {
    let ca = ambit_mesh::identity::CertificateAuthority::generate("cluster.local").unwrap();
    let istiod = FakeIstiod::start(ca).await;
    istiod.push_config(&config());
    let mut client = start_client(&istiod, None, fast());
    wait_ready(&mut client).await;

    let mut sleep = config().workloads[0].clone();
    sleep.workload_ips = vec![ip("10.0.1.9")];
    istiod.push_addresses(vec![address_of_workload(&sleep)]);
    eventually(&client.store, "sleep moved to 10.0.1.9", |s| {
        s.workload_by_ip("", ip("10.0.1.9")).is_some()
            && s.workload_by_ip("", ip("10.0.1.2")).is_none()
    })
    .await;

    istiod.remove(ADDRESS_TYPE_URL, &["demo/echo.demo.svc.cluster.local"]);
    eventually(&client.store, "echo service removed", |s| {
        s.service_by_vip("", ip("10.96.0.10")).is_none()
    })
    .await;
    istiod.remove(AUTHORIZATION_TYPE_URL, &["demo/deny-9999"]);
    eventually(&client.store, "policy removed", |s| s.policies().is_empty()).await;
    // Workloads are untouched by those removals.
    assert_eq!(client.store.load().workloads().count(), 2);
}

#[tokio::test]
async fn a_malformed_resource_is_nacked_with_the_reason_and_its_last_good_state_kept() {
    let ca = ambit_mesh::identity::CertificateAuthority::generate("cluster.local").unwrap();
    let istiod = FakeIstiod::start(ca).await;
    istiod.push_config(&config());
    let mut client = start_client(&istiod, None, fast());
    wait_ready(&mut client).await;
    // Past the initial subscriptions and ACKs.
    for _ in 0..4 {
        istiod.next_request().await;
    }

    // A 5-byte address for sleep, alongside a good update to echo in the same response.
    let mut bad = ambit_xds::testing::workload_proto(&config().workloads[0]);
    bad.addresses = vec![vec![10, 0, 1, 3, 7]];
    let mut echo = config().workloads[1].clone();
    echo.canonical_revision = "v2".into();
    istiod.push_addresses(vec![
        workload::Address {
            r#type: Some(workload::address::Type::Workload(bad)),
        },
        address_of_workload(&echo),
    ]);
    let nack = istiod.next_request().await;
    let detail = nack.error_detail.expect("a NACK");
    assert_eq!(detail.code, 3, "INVALID_ARGUMENT");
    assert!(
        detail.message.contains("cluster1//v1/Pod/demo/sleep")
            && detail.message.contains("addresses[0]"),
        "{}",
        detail.message
    );
    assert!(!nack.response_nonce.is_empty());
    let snapshot = client.store.load();
    assert!(
        snapshot.workload_by_ip("", ip("10.0.1.2")).is_some(),
        "sleep's last good version stays"
    );
    assert_eq!(
        snapshot
            .workload_by_ip("", ip("10.0.2.2"))
            .unwrap()
            .canonical_revision,
        "v2",
        "the good resource of the same response is applied"
    );

    // Bytes that are no protobuf at all, and a policy naming an impossible port.
    istiod.push(
        ADDRESS_TYPE_URL,
        vec![(
            "cluster1//v1/Pod/demo/echo".into(),
            ambit_xds::proto::google::Any {
                type_url: ADDRESS_TYPE_URL.into(),
                value: vec![0xff, 0xff, 0xff],
            },
        )],
        vec![],
    );
    let nack = istiod.next_request().await;
    let message = nack.error_detail.expect("a NACK").message;
    assert!(
        message.contains("cluster1//v1/Pod/demo/echo")
            && message.contains("not a valid istio.workload.Address"),
        "{message}"
    );
    let mut policy = ambit_xds::testing::authorization_proto(&config().policies[0]);
    policy.rules[0].clauses[0].matches[0].destination_ports = vec![70000];
    istiod.push(
        AUTHORIZATION_TYPE_URL,
        vec![(
            "demo/deny-9999".into(),
            to_any(AUTHORIZATION_TYPE_URL, &policy),
        )],
        vec![],
    );
    let nack = istiod.next_request().await;
    let message = nack.error_detail.expect("a NACK").message;
    assert!(
        message.contains("demo/deny-9999")
            && message.contains("destination_ports[0]")
            && message.contains("70000"),
        "{message}"
    );
    let snapshot = client.store.load();
    assert!(snapshot.workload_by_ip("", ip("10.0.2.2")).is_some());
    assert_eq!(
        snapshot.policies().get("demo", "deny-9999").unwrap().rules[0].clauses[0].matches[0]
            .destination_ports,
        vec![9999]
    );

    // A valid resource that clashes with the rest (sleep's IP) is refused whole.
    let mut clash = config().workloads[1].clone();
    clash.uid = "cluster1//v1/Pod/demo/clash".into();
    clash.workload_ips = vec![ip("10.0.1.2")];
    istiod.push_addresses(vec![address_of_workload(&clash)]);
    let nack = istiod.next_request().await;
    let message = nack.error_detail.expect("a NACK").message;
    assert!(
        message.contains("10.0.1.2") && message.contains("clash"),
        "{message}"
    );
    assert_eq!(client.store.load().workloads().count(), 2);
}

#[tokio::test]
async fn reconnects_with_backoff_resubscribes_with_known_versions_and_keeps_state_meanwhile() {
    let ca = ambit_mesh::identity::CertificateAuthority::generate("cluster.local").unwrap();
    let istiod = FakeIstiod::start(ca).await;
    istiod.push_config(&config());
    let mut client = start_client(&istiod, None, fast());
    wait_ready(&mut client).await;
    assert_eq!(istiod.streams_opened(), 1);

    // istiod goes away: the stream drops and new ones are refused for a while.
    istiod.refuse_streams(true);
    istiod.drop_streams();
    // Meanwhile the control plane's view changes: echo leaves, sleep changes.
    let mut sleep = config().workloads[0].clone();
    sleep.canonical_revision = "v7".into();
    istiod.push_addresses(vec![address_of_workload(&sleep)]);
    istiod.remove(ADDRESS_TYPE_URL, &["cluster1//v1/Pod/demo/echo"]);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The last good state keeps serving, unchanged.
    let snapshot = client.store.load();
    assert_eq!(snapshot.workloads().count(), 2);
    assert!(snapshot.workload_by_ip("", ip("10.0.2.2")).is_some());
    assert!(*client.ready.borrow(), "readiness survives a disconnection");
    assert_eq!(
        istiod.streams_opened(),
        1,
        "every attempt so far was refused"
    );

    // Capped exponential backoff: 50, 100, 200, 400, 400 ms... about five attempts in 1.2 s,
    // not a tight loop.
    let refused = istiod.streams_refused();
    assert!(
        (3..=8).contains(&refused),
        "{refused} attempts while refused"
    );

    istiod.refuse_streams(false);
    let known = istiod
        .next_request_where(|r| {
            r.response_nonce.is_empty() && !r.initial_resource_versions.is_empty()
        })
        .await;
    assert_eq!(known.type_url, ADDRESS_TYPE_URL);
    let names: Vec<&String> = known.initial_resource_versions.keys().collect();
    assert_eq!(
        names,
        [
            "cluster1//v1/Pod/demo/echo",
            "cluster1//v1/Pod/demo/sleep",
            "demo/echo.demo.svc.cluster.local"
        ]
    );

    istiod.refuse_streams(false);
    eventually(&client.store, "the reconnect's delta applied", |s| {
        s.workload_by_ip("", ip("10.0.2.2")).is_none()
            && s.workload_by_ip("", ip("10.0.1.2"))
                .is_some_and(|w| w.canonical_revision == "v7")
    })
    .await;
    assert_eq!(istiod.streams_opened(), 2);
    assert!(client
        .store
        .load()
        .policies()
        .get("demo", "deny-9999")
        .is_some());
}
