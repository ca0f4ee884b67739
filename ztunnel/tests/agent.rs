//! The node agent library (`ambit_cni::agent::NodeAgent`) driving real in-process ztunnels: two
//! nodes in network namespaces, one agent and one ztunnel per node, pods whose apps were already
//! serving before they were enrolled. Proves enrollment, unenrollment, the snapshot replay after a
//! ztunnel restart, and the rollback of failed enrollments. Needs root, iproute2 and iptables.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_cni::agent::{AgentError, EnrolledPod, NodeAgent, Rollback};
use ambit_cni::rules::{Backend, RuleOptions};
use ambit_mesh::identity::CertificateAuthority;
use ambit_mesh::zds::ZdsError;
use ambit_ztunnel::app::Ztunnel;
use ambit_ztunnel::netns::PodNetns;
use ambit_ztunnel::testing::{
    app_call, app_server, config, http_get, netns_exec, uid, workload_uid, PodNet, Topology,
};

/// Two nodes, `sleep` on node 1 and `echo` on node 2, each node with its agent and ztunnel.
/// Nothing is enrolled at the start.
struct Mesh {
    dir: PathBuf,
    state_path: PathBuf,
    agents: Vec<Arc<NodeAgent>>,
    ztunnels: Vec<Ztunnel>,
    sleep: PodNet,
    echo: PodNet,
    /// Last, so the namespaces go after everything running in them.
    _topology: Topology,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn state_yaml(pods: &[(&PodNet, &str)]) -> String {
    let mut yaml = String::from("workloads:\n");
    for (pod, node) in pods {
        yaml.push_str(&format!(
            "- uid: {uid}\n  name: {name}\n  namespace: default\n  serviceAccount: {name}\n  \
             workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: {node}\n  canonicalName: {name}\n  \
             services: {{}}\n",
            uid = workload_uid(pod),
            name = pod.name,
            ip = pod.ip,
        ));
    }
    yaml
}

/// Iptables without DNS capture or IPv6, as the ztunnel in-pod tests use (no DNS proxy here).
fn rule_options() -> RuleOptions {
    RuleOptions {
        dns_capture: false,
        ipv6: false,
        ..Default::default()
    }
}

/// A fresh directory with a CA and a state file naming `pods`.
fn workdir(topology: &Topology, pods: &[(&PodNet, &str)]) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("ambit-agent-{}", topology.network));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    CertificateAuthority::generate("cluster.local")
        .unwrap()
        .save(&dir.join("cacerts"))
        .unwrap();
    let state_path = dir.join("state.yaml");
    std::fs::write(&state_path, state_yaml(pods)).unwrap();
    (dir, state_path)
}

fn socket(dir: &Path, node: usize) -> PathBuf {
    dir.join(format!("node{node}.sock"))
}

async fn start_ztunnel(dir: &Path, state_path: &Path, node: usize) -> Ztunnel {
    Ztunnel::start(
        config(dir, state_path, &socket(dir, node)),
        Default::default(),
    )
    .await
    .unwrap()
}

impl Mesh {
    async fn start() -> Mesh {
        let mut topology = Topology::new();
        let n1 = topology.add_node();
        let n2 = topology.add_node();
        let sleep = topology.add_pod(n1, "sleep");
        let echo = topology.add_pod(n2, "echo");
        let (dir, state_path) = workdir(&topology, &[(&sleep, "node-1"), (&echo, "node-2")]);
        let mut agents = Vec::new();
        let mut ztunnels = Vec::new();
        for node in 0..2 {
            let agent =
                NodeAgent::start(&socket(&dir, node), Backend::Iptables, rule_options()).unwrap();
            ztunnels.push(start_ztunnel(&dir, &state_path, node).await);
            agent
                .wait_for_ztunnel(Duration::from_secs(5))
                .await
                .unwrap();
            agents.push(agent);
        }
        Mesh {
            _topology: topology,
            dir,
            state_path,
            agents,
            ztunnels,
            sleep,
            echo,
        }
    }

    fn echo_address(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.echo.ip), 8080)
    }

    async fn enroll(&self, pod: &PodNet) -> Result<(), AgentError> {
        self.agents[pod.node].enroll(enrolled_pod(pod)).await
    }
}

fn enrolled_pod(pod: &PodNet) -> EnrolledPod {
    EnrolledPod {
        uid: uid(pod),
        namespace: "default".into(),
        name: pod.name.clone(),
        service_account: pod.name.clone(),
        netns: format!("/var/run/netns/{}", pod.netns).into(),
    }
}

/// One request from sleep to echo; checks the answer and that echo saw sleep's own address.
async fn call(mesh: &Mesh, payload: &str) {
    let reply = app_call(&mesh.sleep, mesh.echo_address(), payload.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("call {payload}: {e}"));
    let expected = format!("peer={}\n{payload}", mesh.sleep.ip);
    assert_eq!(String::from_utf8_lossy(&reply), expected);
}

/// Sum of `istio_tcp_connections_opened_total` over mTLS connections `reporter` counted.
async fn mtls_opened(ztunnel: &Ztunnel, reporter: &str) -> u64 {
    let metrics = http_get(ztunnel.stats_address, "/metrics").await;
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("istio_tcp_connections_opened_total")
                && l.contains(&format!("reporter=\"{reporter}\""))
                && l.contains("connection_security_policy=\"mutual_tls\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Waits for the metric to reach `expected` (it is recorded as the tunnel opens, a moment after
/// the app sees its connection), then checks it stays there.
async fn assert_mtls_opened(ztunnel: &Ztunnel, reporter: &str, expected: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = mtls_opened(ztunnel, reporter).await;
        if seen == expected {
            break;
        }
        assert!(
            seen < expected && Instant::now() < deadline,
            "{reporter} mTLS connections opened: {seen}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(mtls_opened(ztunnel, reporter).await, expected);
}

/// Our rules as the pod's iptables and routing show them.
fn has_rules(pod: &PodNet) -> bool {
    let iptables = netns_exec(&pod.netns, &["iptables-save"]);
    let ip_rules = netns_exec(&pod.netns, &["ip", "rule"]);
    let chains = iptables.contains("ISTIO_OUTPUT") || iptables.contains("ISTIO_PRERT");
    let routing = ip_rules.contains("0x111");
    assert_eq!(
        chains, routing,
        "rules and routing go together:\n{iptables}\n{ip_rules}"
    );
    chains
}

fn ztunnel_pods(ztunnel: &Ztunnel) -> Vec<String> {
    ztunnel.inpod.pods().into_iter().map(|p| p.uid).collect()
}

#[tokio::test]
async fn running_pods_join_leave_and_survive_a_ztunnel_restart() {
    let mut mesh = Mesh::start().await;
    // The app is serving before anything is enrolled. (Connections open at enrollment do not
    // survive it, as in Istio: the pod netns had no conntrack until the rules arrived, so the
    // next packet of such a connection looks new to the nat table and is redirected to ztunnel,
    // which knows no such connection and resets it. Only new connections are meshed.)
    let accepted = app_server(&mesh.echo, 8080).await;
    let mut calls = 0;
    call(&mesh, "plain-before").await;
    calls += 1;
    assert!(!has_rules(&mesh.sleep) && !has_rules(&mesh.echo));

    // Enroll both pods at once, one per node agent.
    let (sleep, echo) = tokio::join!(mesh.enroll(&mesh.sleep), mesh.enroll(&mesh.echo));
    sleep.unwrap();
    echo.unwrap();
    assert_eq!(mesh.agents[0].enrolled(), vec![uid(&mesh.sleep)]);
    assert_eq!(mesh.agents[1].enrolled(), vec![uid(&mesh.echo)]);
    assert!(has_rules(&mesh.sleep) && has_rules(&mesh.echo));
    assert_eq!(ztunnel_pods(&mesh.ztunnels[0]), vec![uid(&mesh.sleep)]);
    assert_eq!(ztunnel_pods(&mesh.ztunnels[1]), vec![uid(&mesh.echo)]);

    // New connections go through both ztunnels, over mTLS; the app still sees the client.
    call(&mesh, "meshed").await;
    calls += 1;
    assert_mtls_opened(&mesh.ztunnels[0], "source", 1).await;
    assert_mtls_opened(&mesh.ztunnels[1], "destination", 1).await;

    // Enrolling again changes nothing (and sends nothing ztunnel would act on).
    mesh.enroll(&mesh.echo).await.unwrap();
    assert_eq!(mesh.agents[1].enrolled(), vec![uid(&mesh.echo)]);
    assert_eq!(ztunnel_pods(&mesh.ztunnels[1]), vec![uid(&mesh.echo)]);

    // ztunnel on echo's node restarts: the agent replays its snapshot to the new one.
    let old = mesh.ztunnels.remove(1);
    drop(old);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let restarted = start_ztunnel(&mesh.dir, &mesh.state_path, 1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(restarted.inpod.is_ready() && ztunnel_pods(&restarted) == vec![uid(&mesh.echo)]) {
        assert!(
            Instant::now() < deadline,
            "the restarted ztunnel never got echo from the snapshot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mesh.ztunnels.insert(1, restarted);
    call(&mesh, "after-restart").await;
    calls += 1;
    assert_mtls_opened(&mesh.ztunnels[0], "source", 2).await;
    assert_mtls_opened(&mesh.ztunnels[1], "destination", 1).await;

    // Unenroll: rules gone, ztunnels told, traffic plain again and not counted by ztunnel.
    mesh.agents[0].unenroll(&uid(&mesh.sleep)).await.unwrap();
    mesh.agents[1].unenroll(&uid(&mesh.echo)).await.unwrap();
    // Unknown (or already unenrolled) uids are a no-op.
    mesh.agents[1].unenroll(&uid(&mesh.echo)).await.unwrap();
    assert!(mesh.agents.iter().all(|a| a.enrolled().is_empty()));
    assert!(!has_rules(&mesh.sleep) && !has_rules(&mesh.echo));
    assert!(mesh.ztunnels.iter().all(|z| ztunnel_pods(z).is_empty()));
    call(&mesh, "plain-after").await;
    calls += 1;
    assert_mtls_opened(&mesh.ztunnels[0], "source", 2).await;
    assert_mtls_opened(&mesh.ztunnels[1], "destination", 1).await;

    // One listening socket, bound before enrollment, accepted every connection of every phase.
    assert_eq!(accepted.load(Ordering::SeqCst), calls);

    // And it can all happen again.
    mesh.enroll(&mesh.sleep).await.unwrap();
    mesh.enroll(&mesh.echo).await.unwrap();
    call(&mesh, "meshed-again").await;
    assert_mtls_opened(&mesh.ztunnels[1], "destination", 2).await;
}

/// One node with an agent and a ztunnel, and one pod `app` on it.
struct SingleNode {
    dir: PathBuf,
    state_path: PathBuf,
    agent: Arc<NodeAgent>,
    pod: PodNet,
    _topology: Topology,
}

impl Drop for SingleNode {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl SingleNode {
    fn new() -> SingleNode {
        let mut topology = Topology::new();
        let node = topology.add_node();
        let pod = topology.add_pod(node, "app");
        let (dir, state_path) = workdir(&topology, &[(&pod, "node-1")]);
        let agent = NodeAgent::start(&socket(&dir, 0), Backend::Iptables, rule_options()).unwrap();
        SingleNode {
            _topology: topology,
            dir,
            state_path,
            agent,
            pod,
        }
    }

    async fn ztunnel(&self) -> Ztunnel {
        let ztunnel = start_ztunnel(&self.dir, &self.state_path, 0).await;
        self.agent
            .wait_for_ztunnel(Duration::from_secs(5))
            .await
            .unwrap();
        ztunnel
    }
}

#[tokio::test]
async fn a_netns_that_cannot_be_used_gives_a_clear_error_and_records_nothing() {
    let node = SingleNode::new();
    let ztunnel = node.ztunnel().await;

    let missing = EnrolledPod {
        netns: "/var/run/netns/ambit-no-such-netns".into(),
        ..enrolled_pod(&node.pod)
    };
    let err = node.agent.enroll(missing).await.unwrap_err();
    assert!(matches!(err, AgentError::OpenNetns { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("default/app") && message.contains("ambit-no-such-netns"),
        "{message}"
    );

    // An existing path that is no network namespace is caught before any rule program runs.
    let not_netns = EnrolledPod {
        netns: node.state_path.clone(),
        ..enrolled_pod(&node.pod)
    };
    let err = node.agent.enroll(not_netns).await.unwrap_err();
    assert!(matches!(err, AgentError::NotANetns { .. }), "{err:?}");
    assert!(
        err.to_string().contains("is not a network namespace"),
        "{err}"
    );

    assert!(node.agent.enrolled().is_empty());
    assert!(ztunnel_pods(&ztunnel).is_empty());
    assert!(!has_rules(&node.pod));
}

#[tokio::test]
async fn a_pod_ztunnel_refuses_is_rolled_back() {
    let node = SingleNode::new();
    let ztunnel = node.ztunnel().await;
    // Something in the pod already holds ztunnel's HBONE port without SO_REUSEPORT, so the pod
    // proxy cannot start and ztunnel nacks the Add.
    let netns = PodNetns::new(node.pod.open().into()).unwrap();
    let _squatter = netns
        .run(|| std::net::TcpListener::bind(("0.0.0.0", 15008)).unwrap())
        .await
        .unwrap();

    let err = node
        .agent
        .enroll(enrolled_pod(&node.pod))
        .await
        .unwrap_err();
    match &err {
        AgentError::Ztunnel {
            source: ZdsError::Nack { .. },
            rollback: Rollback::Clean,
            ..
        } => {}
        other => panic!("expected a nack with a clean rollback, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("default/app") && message.contains("rules were removed again"),
        "{message}"
    );
    assert!(node.agent.enrolled().is_empty());
    assert!(!has_rules(&node.pod), "no half-enrolled pod");
    // ztunnel was told to forget the pod it could not start, rather than retrying it forever.
    assert!(ztunnel_pods(&ztunnel).is_empty());
}

#[tokio::test]
async fn without_ztunnel_enrollment_times_out_and_leaves_the_pod_alone() {
    let node = SingleNode::new();
    node.agent.set_ztunnel_timeout(Duration::from_millis(300));
    let accepted = app_server(&node.pod, 8080).await;

    let err = node
        .agent
        .enroll(enrolled_pod(&node.pod))
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::NoZtunnel { .. }), "{err:?}");
    assert!(err.to_string().contains("no ztunnel connected"), "{err}");
    assert!(node.agent.enrolled().is_empty());
    assert!(
        !has_rules(&node.pod),
        "the pod's traffic was never redirected"
    );
    assert!(node
        .agent
        .wait_for_ztunnel(Duration::from_millis(100))
        .await
        .is_err());

    // Once ztunnel is there, the same pod enrolls, and its app, started before, keeps serving
    // (a call to the pod's own address leaves on `lo`, which Istio's rules leave alone).
    let ztunnel = node.ztunnel().await;
    node.agent.enroll(enrolled_pod(&node.pod)).await.unwrap();
    assert_eq!(ztunnel_pods(&ztunnel), vec![uid(&node.pod)]);
    assert!(has_rules(&node.pod));
    let own = SocketAddr::new(IpAddr::V4(node.pod.ip), 8080);
    let reply = app_call(&node.pod, own, b"hello").await.unwrap();
    assert!(reply.ends_with(b"hello"), "{reply:?}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}
