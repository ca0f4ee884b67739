//! Test helpers (feature `testing`): a cluster in network namespaces.
//!
//! [`Topology`] is the local mesh's network (nodes and pods as namespaces, pods `10.0.<node>.<n>`)
//! with names unique per test, deleted on drop.
//!
//! [`Cluster`] puts in-process ztunnels on two such nodes, with Istio's in-pod rules installed in
//! the enrolled pods and the pods handed over ZDS, as a node agent would.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_cni::rules::{self, Backend, RuleOptions};
use ambit_mesh::identity::CertificateAuthority;
use ambit_mesh::zds::{WorkloadInfo, ZdsConnection, ZdsServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::app::Ztunnel;
use crate::config::Config;
use crate::netns::PodNetns;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A node namespace.
#[derive(Clone, Debug)]
pub struct Node {
    pub netns: String,
    /// The node's address on the inter-node bridge.
    pub address: Ipv4Addr,
}

/// A pod namespace.
#[derive(Clone, Debug)]
pub struct PodNet {
    pub name: String,
    /// Its Kubernetes pod UID (a random UUID), the key a node agent hands it over ZDS with.
    pub uid: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub node: usize,
}

impl PodNet {
    /// The pod's namespace, as ZDS hands it over.
    pub fn open(&self) -> File {
        File::open(format!("/var/run/netns/{}", self.netns)).expect("open pod netns")
    }
}

/// The local mesh's topology ([`ambit_local::topology`]) with names unique per test, panicking on
/// failure (a broken fixture is a test bug), and deleted on drop.
pub struct Topology {
    inner: Option<ambit_local::topology::Topology>,
    /// The namespace holding the inter-node bridge `br0`.
    pub network: String,
    pub nodes: Vec<Node>,
    pub pods: Vec<PodNet>,
}

/// Runs a command inside a namespace and returns its stdout.
pub fn netns_exec(netns: &str, command: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(command)
        .output()
        .expect("ip netns exec");
    assert!(
        out.status.success(),
        "{command:?} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Topology {
    pub fn new() -> Self {
        let prefix = format!(
            "amb{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let inner = ambit_local::topology::Topology::create(&prefix, (10, 0))
            .expect("create the test network (root and iproute2 needed)");
        Topology {
            network: inner.network.clone(),
            inner: Some(inner),
            nodes: Vec::new(),
            pods: Vec::new(),
        }
    }

    fn inner(&mut self) -> &mut ambit_local::topology::Topology {
        self.inner.as_mut().expect("alive until dropped")
    }

    /// Adds a node (`10.0.<n>.0/24` for its pods); returns its index.
    pub fn add_node(&mut self) -> usize {
        let name = format!("n{}", self.nodes.len() + 1);
        let node = self.inner().add_node(&name).expect("add node");
        self.nodes.push(Node {
            netns: node.netns,
            address: node.address,
        });
        self.nodes.len() - 1
    }

    /// Adds a pod on `node`; returns it.
    pub fn add_pod(&mut self, node: usize, name: &str) -> PodNet {
        let net = self.inner().add_pod(node, name).expect("add pod");
        let pod = PodNet {
            name: name.to_owned(),
            uid: pod_uid(),
            netns: net.netns,
            ip: net.ip,
            node,
        };
        self.pods.push(pod.clone());
        pod
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.destroy();
        }
    }
}

// --- A two-node cluster running in-process ztunnels, for end-to-end tests and benchmarks. ---

/// The `echo` service's VIP.
pub const VIP: &str = "10.96.0.10";

/// Two nodes; `sleep` (client) on node 1, `echo` (server, behind a service VIP) and `plain`
/// (never enrolled) on node 2.
pub struct Cluster {
    pub topology: Topology,
    pub dir: PathBuf,
    pub state_path: PathBuf,
    /// In-process ztunnels; without node 2's when it runs as [`Cluster::process`].
    pub ztunnels: Vec<Ztunnel>,
    /// Node 2's ztunnel, with [`ClusterOptions::process`].
    pub process: Option<ZtunnelProcess>,
    pub agents: Vec<ZdsConnection>,
    /// Kept so their sockets stay bound while ztunnel reconnects.
    pub servers: Vec<ZdsServer>,
    pub sleep: PodNet,
    pub echo: PodNet,
    pub plain: PodNet,
    /// With [`Cluster::start_with_waypoint`]: a never-enrolled pod on node 2 named in the state
    /// as workload `waypoint` (identity `default/waypoint`) and as the `echo` service's waypoint.
    /// Nothing runs in it: the test starts the waypoint there.
    pub waypoint: Option<PodNet>,
}

fn state_yaml(
    sleep: &PodNet,
    echo: &PodNet,
    plain: &PodNet,
    waypoint: Option<&PodNet>,
    extra_workloads: &str,
    policies: &str,
) -> String {
    let (waypoint_workload, service_waypoint) = match waypoint {
        Some(pod) => (
            format!(
                r#"
- uid: Kubernetes//Pod/default/waypoint
  name: waypoint
  namespace: default
  serviceAccount: waypoint
  workloadIps: ["{ip}"]
  protocol: HBONE
  node: node-2
  canonicalName: waypoint
  services: {{}}"#,
                ip = pod.ip
            ),
            format!(
                r#"
  waypoint:
    destination: "/{ip}"
    hboneMtlsPort: 15008"#,
                ip = pod.ip
            ),
        ),
        None => Default::default(),
    };
    format!(
        r#"
workloads:
- uid: Kubernetes//Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: ["{sleep}"]
  protocol: HBONE
  node: node-1
  canonicalName: sleep
  services: {{}}
- uid: Kubernetes//Pod/default/echo
  name: echo
  namespace: default
  serviceAccount: echo
  workloadIps: ["{echo}"]
  protocol: HBONE
  node: node-2
  canonicalName: echo
  canonicalRevision: v1
  services:
    "default/echo.default.svc.cluster.local": {{80: 8080}}
- uid: Kubernetes//Pod/default/plain
  name: plain
  namespace: default
  workloadIps: ["{plain}"]
  protocol: TCP
  node: node-2
  services: {{}}{waypoint_workload}
{extra_workloads}
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/{VIP}"]
  ports: {{80: 8080}}{service_waypoint}
{policies}"#,
        sleep = sleep.ip,
        echo = echo.ip,
        plain = plain.ip,
    )
}

fn info(pod: &PodNet, service_account: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: pod.name.clone(),
        namespace: "default".into(),
        service_account: service_account.into(),
    }
}

/// How [`Cluster::start_with`] differs from [`Cluster::start`].
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Install the in-pod rules with DNS capture (UDP/TCP 53 → the DNS proxy on 15053).
    pub dns_capture: bool,
    /// Run node 2's ztunnel as a real process ([`Cluster::process`]) instead of in process.
    pub process: Option<ProcessOptions>,
}

/// How to run a ztunnel as its own process.
#[derive(Clone, Debug)]
pub struct ProcessOptions {
    /// The `ambit-ztunnel` binary (`env!("CARGO_BIN_EXE_ambit-ztunnel")` in the crate's tests).
    pub binary: PathBuf,
    /// Added to its environment.
    pub env: Vec<(String, String)>,
    /// Its open-files soft limit at exec (as `ulimit -Sn` would set it).
    pub open_files_soft_limit: Option<u64>,
}

/// A ztunnel running as a process inside a node's namespace, its endpoints on the node's address
/// and its output in a file. Killed on drop if still running.
pub struct ZtunnelProcess {
    child: std::process::Child,
    node: PodNetns,
    pub readiness_address: SocketAddr,
    pub stats_address: SocketAddr,
    pub admin_address: SocketAddr,
    pub log: PathBuf,
}

impl ZtunnelProcess {
    fn spawn(
        options: &ProcessOptions,
        node: &Node,
        dir: &Path,
        state: &Path,
        socket: &Path,
    ) -> Self {
        let at = |port| SocketAddr::new(node.address.into(), port);
        let (admin_address, stats_address, readiness_address) = (at(15000), at(15020), at(15021));
        let log = dir.join(format!("ztunnel-{}.log", node.netns));
        let output = File::create(&log).unwrap();
        // `ip netns exec` and `sh -c exec` both exec: the child's pid is ztunnel's.
        let limit = options
            .open_files_soft_limit
            .map(|n| format!("ulimit -Sn {n} && "))
            .unwrap_or_default();
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &node.netns, "sh", "-c"])
            .arg(format!("{limit}exec \"$0\" \"$@\""))
            .arg(&options.binary)
            .env("LOCAL_XDS_PATH", state)
            .env("AMBIT_CA_DIR", dir.join("cacerts"))
            .env("INPOD_UDS", socket)
            .env("AMBIT_ADMIN_ADDRESS", admin_address.to_string())
            .env("AMBIT_STATS_ADDRESS", stats_address.to_string())
            .env("AMBIT_READINESS_ADDRESS", readiness_address.to_string())
            .env("RUST_LOG", "info")
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .stdout(output.try_clone().unwrap())
            .stderr(output);
        let child = command.spawn().expect("spawn ambit-ztunnel");
        let node = PodNetns::new(
            File::open(format!("/var/run/netns/{}", node.netns))
                .unwrap()
                .into(),
        )
        .unwrap();
        ZtunnelProcess {
            child,
            node,
            readiness_address,
            stats_address,
            admin_address,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `GET path` on one of its endpoints (the whole response, or the connect error).
    pub async fn get(&self, address: SocketAddr, path: &str) -> std::io::Result<String> {
        self.request(address, "GET", path).await
    }

    /// `method path` on one of its endpoints (the whole response, or the connect error).
    pub async fn request(
        &self,
        address: SocketAddr,
        method: &str,
        path: &str,
    ) -> std::io::Result<String> {
        let stream = self.node.connect(address).await?;
        Ok(http_request_on(stream, method, path).await)
    }

    /// Sends `signal` (`TERM`, `INT`, ...).
    pub fn signal(&self, signal: &str) {
        // The shell's builtin: no procps needed.
        let status = Command::new("sh")
            .args(["-c", &format!("kill -{signal} {}", self.pid())])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// Its exit status, once it exits within `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ZtunnelProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Cluster {
    pub async fn start() -> Cluster {
        Self::start_inner(None, &ClusterOptions::default(), None).await
    }

    /// Like [`start`](Self::start), with `options`.
    pub async fn start_with(options: ClusterOptions) -> Cluster {
        Self::start_inner(None, &options, None).await
    }

    /// Like [`start`](Self::start), plus a pod `waypoint` on node 2 that the state names as the
    /// `echo` service's waypoint (see [`Cluster::waypoint`]); both ztunnels run with
    /// `enforce_waypoint` as given.
    pub async fn start_with_waypoint(enforce_waypoint: bool) -> Cluster {
        Self::start_inner(None, &ClusterOptions::default(), Some(enforce_waypoint)).await
    }

    /// Like [`start`](Self::start), except that node `node`'s ztunnel connects to `socket`, where
    /// the caller already listens and plays the node agent itself (to send what a
    /// [`ZdsConnection`] never would). That node's pods are not handed over, and `agents` and
    /// `servers` hold only the other node's.
    pub async fn start_with_agent_at(node: usize, socket: &Path) -> Cluster {
        Self::start_inner(Some((node, socket)), &ClusterOptions::default(), None).await
    }

    async fn start_inner(
        custom_agent: Option<(usize, &Path)>,
        cluster_options: &ClusterOptions,
        waypoint_enforcement: Option<bool>,
    ) -> Cluster {
        let mut topology = Topology::new();
        let n1 = topology.add_node();
        let n2 = topology.add_node();
        let sleep = topology.add_pod(n1, "sleep");
        let echo = topology.add_pod(n2, "echo");
        let plain = topology.add_pod(n2, "plain");
        let waypoint = waypoint_enforcement.map(|_| topology.add_pod(n2, "waypoint"));
        let config = |dir: &Path, state: &Path, socket: &Path| {
            let mut config = config(dir, state, socket);
            config.enforce_waypoint = waypoint_enforcement.unwrap_or(config.enforce_waypoint);
            config
        };

        let dir = std::env::temp_dir().join(format!("ambit-inpod-{}", topology.network));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        CertificateAuthority::generate("cluster.local")
            .unwrap()
            .save(&dir.join("cacerts"))
            .unwrap();
        let state_path = dir.join("state.yaml");
        std::fs::write(
            &state_path,
            state_yaml(&sleep, &echo, &plain, waypoint.as_ref(), "", ""),
        )
        .unwrap();

        for pod in [&sleep, &echo] {
            let options = RuleOptions {
                dns_capture: cluster_options.dns_capture,
                ipv6: false,
                ..Default::default()
            };
            rules::install(pod.open(), Backend::Iptables, &options).unwrap();
        }

        let mut ztunnels = Vec::new();
        let mut process = None;
        let mut agents = Vec::new();
        let mut servers = Vec::new();
        let enrolled: [Vec<(&PodNet, &str)>; 2] = [vec![(&sleep, "sleep")], vec![(&echo, "echo")]];
        for (node, pods) in enrolled.iter().enumerate() {
            let config = |dir: &Path, state: &Path, socket: &Path| Config {
                node_name: format!("node-{}", node + 1),
                ..config(dir, state, socket)
            };
            if let Some((_, socket)) = custom_agent.filter(|(custom, _)| *custom == node) {
                let config = config(&dir, &state_path, socket);
                ztunnels.push(Ztunnel::start(config, Default::default()).await.unwrap());
                continue;
            }
            let socket = dir.join(format!("node{node}.sock"));
            let server = ZdsServer::bind(&socket).unwrap();
            let spawn = cluster_options.process.as_ref().filter(|_| node == 1);
            let ztunnel = match spawn {
                Some(options) => {
                    let node = &topology.nodes[node];
                    process = Some(ZtunnelProcess::spawn(
                        options,
                        node,
                        &dir,
                        &state_path,
                        &socket,
                    ));
                    None
                }
                None => Some(
                    Ztunnel::start(config(&dir, &state_path, &socket), Default::default())
                        .await
                        .unwrap(),
                ),
            };
            let mut agent = tokio::time::timeout(Duration::from_secs(10), server.accept())
                .await
                .expect("ztunnel connects to the node agent")
                .unwrap();
            for (pod, service_account) in pods {
                agent
                    .add(&uid(pod), info(pod, service_account), pod.open().as_fd())
                    .await
                    .unwrap();
            }
            agent.snapshot_sent().await.unwrap();
            match ztunnel {
                Some(ztunnel) => {
                    assert!(ztunnel.inpod.is_ready());
                    ztunnels.push(ztunnel);
                }
                None => {
                    let process = process.as_ref().expect("spawned above");
                    // Its endpoints are bound a moment after it connects to the agent.
                    let deadline = Instant::now() + Duration::from_secs(10);
                    loop {
                        let ready = process
                            .get(process.readiness_address, "/healthz/ready")
                            .await;
                        let ready = ready.as_deref().unwrap_or_default();
                        if ready.starts_with("HTTP/1.1 200") {
                            break;
                        }
                        assert!(
                            Instant::now() < deadline,
                            "ztunnel process not ready: {ready:?}\n{}",
                            process.output()
                        );
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            agents.push(agent);
            servers.push(server);
        }
        Cluster {
            topology,
            dir,
            state_path,
            ztunnels,
            process,
            agents,
            servers,
            sleep,
            echo,
            plain,
            waypoint,
        }
    }

    pub fn set_policies(&self, policies: &str) {
        self.write_state(&self.state_text("", policies));
    }

    /// The cluster's state file: its workloads (uids in istiod's format, see [`workload_uid`])
    /// plus `extra_workloads` (YAML list items), its services, then `policies` (top-level YAML).
    pub fn state_text(&self, extra_workloads: &str, policies: &str) -> String {
        state_yaml(
            &self.sleep,
            &self.echo,
            &self.plain,
            self.waypoint.as_ref(),
            extra_workloads,
            policies,
        )
    }

    /// Replaces the state file in one step, as a ConfigMap update would, so the watcher reads
    /// exactly `text` (never a half-written file, unless that is the point).
    pub fn write_state(&self, text: &str) {
        let temp = self.dir.join("state.yaml.tmp");
        std::fs::write(&temp, text).unwrap();
        std::fs::rename(temp, &self.state_path).unwrap();
    }

    pub async fn wait_for_policies(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self
            .ztunnels
            .iter()
            .any(|z| z.state.load().policies().len() != count)
        {
            assert!(Instant::now() < deadline, "policy update never loaded");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The key a node agent hands `pod` over ZDS with: its Kubernetes pod UID, as istio-cni sends.
pub fn uid(pod: &PodNet) -> String {
    pod.uid.clone()
}

/// The uid of `pod`'s workload in the state, in istiod's format for a pod of namespace `default`.
pub fn workload_uid(pod: &PodNet) -> String {
    format!("Kubernetes//Pod/default/{}", pod.name)
}

/// A fresh random (v4) UUID, the shape of a Kubernetes `metadata.uid`.
pub fn pod_uid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("the kernel's UUID source")
        .trim()
        .to_owned()
}

/// A ztunnel configuration for tests: state from the local file `state`, the CA saved in
/// `dir/cacerts`, the node agent at `socket`, every endpoint on an ephemeral localhost port.
pub fn config(dir: &Path, state: &Path, socket: &Path) -> Config {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Config {
        local_xds_path: Some(state.to_owned()),
        inpod_uds: socket.to_owned(),
        ca_dir: Some(dir.join("cacerts")),
        xds_address: String::new(),
        ca_address: String::new(),
        cluster_id: "Kubernetes".into(),
        network: String::new(),
        node_name: String::new(),
        admin_address: any,
        stats_address: any,
        readiness_address: any,
        secret_ttl_seconds: 3600,
        enforce_waypoint: true,
    }
}

/// A listening socket bound inside `pod` as its app's would be (unmarked), with the namespace
/// handle to keep while it serves.
pub async fn app_listener(pod: &PodNet, port: u16) -> (tokio::net::TcpListener, PodNetns) {
    let netns = PodNetns::new(pod.open().into()).unwrap();
    let listener = netns
        .run(move || {
            let listener = std::net::TcpListener::bind(("0.0.0.0", port)).unwrap();
            listener.set_nonblocking(true).unwrap();
            listener
        })
        .await
        .unwrap();
    (tokio::net::TcpListener::from_std(listener).unwrap(), netns)
}

/// An app server inside `pod`: answers each connection with the peer address it sees, then
/// echoes until the client half-closes. Returns how many connections its one listening socket
/// has accepted (the same socket throughout: the app is never restarted).
pub async fn app_server(pod: &PodNet, port: u16) -> Arc<AtomicUsize> {
    let (listener, netns) = app_listener(pod, port).await;
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let _netns = netns;
        while let Ok((mut socket, peer)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = socket
                    .write_all(format!("peer={}\n", peer.ip()).as_bytes())
                    .await;
                let (mut read, mut write) = socket.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    accepted
}

/// Connects from inside `pod` as its app would (an unmarked socket).
pub async fn app_connect(
    pod: &PodNet,
    target: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let netns = PodNetns::new(pod.open().into()).unwrap();
    let stream = netns
        .run(move || -> std::io::Result<std::net::TcpStream> {
            let stream = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
            stream.set_nonblocking(true)?;
            Ok(stream)
        })
        .await
        .unwrap()?;
    tokio::net::TcpStream::from_std(stream)
}

/// [`app_connect`], then sends `payload`, half-closes and returns everything received.
pub async fn app_call(
    pod: &PodNet,
    target: SocketAddr,
    payload: &[u8],
) -> std::io::Result<Vec<u8>> {
    let mut stream = app_connect(pod, target).await?;
    let exchange = async {
        stream.write_all(payload).await?;
        stream.shutdown().await?;
        let mut received = Vec::new();
        stream.read_to_end(&mut received).await?;
        Ok(received)
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| std::io::Error::other("call timed out"))?
}

pub async fn http_get(address: SocketAddr, path: &str) -> String {
    http_get_on(tokio::net::TcpStream::connect(address).await.unwrap(), path).await
}

/// `GET path` over a connected `stream`; the whole response.
pub async fn http_get_on(stream: tokio::net::TcpStream, path: &str) -> String {
    http_request_on(stream, "GET", path).await
}

/// `method path` (no body) over a connected `stream`; the whole response.
pub async fn http_request_on(
    mut stream: tokio::net::TcpStream,
    method: &str,
    path: &str,
) -> String {
    stream
        .write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// The sum of every series of counter `name` in a Prometheus text exposition.
pub fn metric_sum(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
