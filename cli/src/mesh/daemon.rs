//! The local mesh daemon: owns the nodes, pods, ztunnels and node agents, and brings them in
//! line with the manifests after every change.
//!
//! A change goes through the same steps every time (`reconcile`): pods that are gone are stopped
//! and their namespaces removed; new pods get a namespace and an address; services get VIPs; the
//! ztunnel state is rewritten; pods whose enrollment changed are enrolled (rules, then ZDS) or
//! released, with their processes untouched; new pods' processes start last, so an ambient pod's
//! first packet is already captured. Each waypoint's L7 configuration (the HTTPRoutes and
//! AuthorizationPolicies it enforces, as the user wrote them) is rewritten on every change; the
//! waypoint reloads it when it changes, as ztunnels do the state file.
//!
//! Between requests the daemon [supervises](supervise) every process it started: exits are
//! reaped and restarted per `restartPolicy` with kubelet's backoff; each container's
//! [probes](probe) decide whether its pod is ready (only ready pods are Service endpoints: the
//! others are `Unhealthy` workloads in ztunnel's state) and kill containers whose liveness fails.
//! Requests are [admitted](admit) first, and a change that fails to reconcile is rolled back.
//!
//! The daemon also plays cluster DNS ([`dns`]: kube-dns' address on every node, its zone rebuilt
//! with the ztunnel state) and kubelet's part in making pods look like pods ([`pods`]: hostname,
//! `/etc/hosts`, `/etc/resolv.conf`, environment).

mod admit;
mod dns;
pub(super) mod pods;
mod probe;
mod supervise;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_cni::agent::{self, EnrolledPod, NodeAgent, PodMeta};
use ambit_cni::rules::{Backend, RuleOptions};
use ambit_local::control::{ClusterState, Route, RunningPod, WaypointRef, WAYPOINT_GATEWAY_CLASS};
use ambit_local::dns::ZoneSource;
use ambit_local::manifest::{
    self, ClusterIp, Kind, ObjectRef, Pod, Probe, ProbeAction, Probes, RestartPolicy, TargetPort,
};
use ambit_local::services;
use ambit_local::topology::{self, PodNet, Topology};
use ambit_mesh::file;
use ambit_mesh::identity::CertificateAuthority;
use ambit_mesh::state::local::LocalConfig;
use ambit_waypoint::l7::EMPTY_CONFIG;
use ambit_ztunnel::app::Ztunnel;
use ambit_ztunnel::config::Config;
use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixListener;

use super::api::{
    NodeStatus, PodStatus, Request, Response, ServiceStatus, ServiceWaypoint, Status,
};
use probe::ContainerProbes;
use supervise::{Container, Launch};

const TRUST_DOMAIN: &str = "cluster.local";
/// First two octets of pod addresses (kind's default pod CIDR, 10.244.0.0/16).
const POD_RANGE: (u8, u8) = (10, 244);
/// Service VIPs come from 10.96.0.0/16, Kubernetes' default service CIDR.
const SERVICE_RANGE: (u8, u8) = (10, 96);
/// Where a waypoint serves its metrics in its pod (Istio's port; the waypoint's default).
const WAYPOINT_STATS_PORT: u16 = 15020;
/// Where a waypoint answers `/healthz/ready` (Istio's port; the waypoint's default).
const WAYPOINT_READINESS_PORT: u16 = 15021;
/// How often exited processes are looked for: a crashed waypoint is restarted this soon.
const SUPERVISE_EVERY: Duration = Duration::from_millis(100);

pub struct Options {
    pub state_dir: PathBuf,
    pub prefix: String,
    pub nodes: u8,
    /// How the node agents install the in-pod rules.
    pub rules: Backend,
}

struct NodeRuntime {
    name: String,
    ztunnel: Ztunnel,
    agent: Arc<NodeAgent>,
}

struct PodRuntime {
    net: PodNet,
    node: usize,
    uid: String,
    identity: String,
    enrolled: bool,
    reason: Option<String>,
    containers: Vec<Container>,
    /// Each container's probes, in the same order.
    probes: Vec<ContainerProbes>,
    /// Ready as the ztunnel state last said.
    ready: bool,
    /// A waypoint (an `istio-waypoint` Gateway's pod) rather than a manifest's pod.
    waypoint: bool,
}

impl PodRuntime {
    /// kubelet's Ready condition: every container running and ready.
    fn is_ready(&self) -> bool {
        !self.containers.is_empty()
            && self
                .containers
                .iter()
                .zip(&self.probes)
                .all(|(c, p)| p.ready(c.pid().is_some()))
    }
}

struct Mesh {
    options: Options,
    topology: Topology,
    nodes: Vec<NodeRuntime>,
    cluster: ClusterState,
    pods: BTreeMap<(String, String), PodRuntime>,
    vips: BTreeMap<(String, String), IpAddr>,
    state_path: PathBuf,
    next_node: usize,
    /// The HTTPRoute and AuthorizationPolicy documents as applied (namespace filled in), for the
    /// waypoints' L7 configuration files.
    l7_documents: BTreeMap<ObjectRef, serde_yaml::Value>,
    /// kubelet's first restart delay, or its override.
    initial_backoff: Duration,
    dns: dns::DnsServer,
    /// This host's resolv.conf search domains, which kubelet appends to the cluster's.
    host_search: Vec<String>,
}

/// Removes what a previous mesh with this state dir and prefix left: its processes, namespaces,
/// per-pod `/etc/netns` files and state directory. Returns how many namespaces were removed.
pub fn clean_leftovers(state_dir: &Path, prefix: &str) -> usize {
    if let Ok(pids) = std::fs::read_to_string(state_dir.join("pids")) {
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
    let removed = topology::remove_leftovers(prefix);
    if let Ok(entries) = std::fs::read_dir("/etc/netns") {
        let start = format!("{prefix}-");
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&start) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir_all(state_dir);
    removed.len()
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let mut mesh = Mesh::start(options).await?;
    let socket = mesh.options.state_dir.join("daemon.sock");
    let _ = std::fs::remove_file(&socket);
    let listener =
        UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "local mesh ready");
    let mut supervise = tokio::time::interval(SUPERVISE_EVERY);
    supervise.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (requests_tx, mut requests) = tokio::sync::mpsc::channel(16);
    let accepting = tokio::spawn(read_requests(listener, requests_tx));
    loop {
        let (request, write): (Result<Request, String>, OwnedWriteHalf) = tokio::select! {
            Some(request) = requests.recv() => request,
            _ = supervise.tick() => {
                if let Err(err) = mesh.supervise() {
                    tracing::error!(error = %format!("{err:#}"), "supervising the mesh's processes");
                }
                continue;
            }
        };
        let (response, stop) = match request {
            Ok(Request::Down) => (mesh.respond(Ok("mesh stopping".into())), true),
            Ok(request) => {
                let result = mesh.handle(request).await;
                let mut response = mesh.respond(result);
                if let Response::Ok { status, .. } = &mut response {
                    mesh.waypoint_plugins(status).await;
                }
                (response, false)
            }
            Err(message) => (Response::Error { message }, false),
        };
        let mut text = serde_json::to_string(&response)?;
        text.push('\n');
        let answer = answer(write, text);
        if stop {
            answer.await;
            accepting.abort();
            mesh.shutdown();
            let _ = std::fs::remove_file(&socket);
            return Ok(());
        }
        // A client that does not read its answer holds up only its own task.
        tokio::spawn(answer);
    }
}

/// How long a client has to send its request line, and to take its answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest request line (manifests included).
const MAX_REQUEST: u64 = 64 << 20;

/// Accepts clients and reads each one's request on a task of its own, so a client that connects
/// and sends nothing (or sends slowly) never holds up the daemon's loop or other clients.
async fn read_requests(
    listener: UnixListener,
    requests: tokio::sync::mpsc::Sender<(Result<Request, String>, OwnedWriteHalf)>,
) {
    use tokio::io::AsyncReadExt;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "accepting a client of the daemon's socket");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            let (read, write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(read.take(MAX_REQUEST));
            let request =
                match tokio::time::timeout(CLIENT_TIMEOUT, reader.read_line(&mut line)).await {
                    Err(_) => Err(format!(
                        "bad request: no request line within {} s",
                        CLIENT_TIMEOUT.as_secs()
                    )),
                    Ok(Err(err)) => Err(format!("bad request: {err}")),
                    Ok(Ok(_)) if !line.ends_with('\n') => Err(format!(
                        "bad request: not one line of at most {} MiB",
                        MAX_REQUEST >> 20
                    )),
                    Ok(Ok(_)) => {
                        serde_json::from_str(&line).map_err(|err| format!("bad request: {err}"))
                    }
                };
            if let Err(message) = &request {
                tracing::debug!(%message, "a client of the daemon's socket");
                let response = serde_json::to_string(&Response::Error {
                    message: message.clone(),
                })
                .unwrap_or_default();
                answer(write, response + "\n").await;
                return;
            }
            let _ = requests.send((request, write)).await;
        });
    }
}

/// Writes `text` to a client, giving up after [`CLIENT_TIMEOUT`].
async fn answer(mut write: OwnedWriteHalf, text: String) {
    let _ = tokio::time::timeout(CLIENT_TIMEOUT, write.write_all(text.as_bytes())).await;
}

impl Mesh {
    async fn start(options: Options) -> anyhow::Result<Mesh> {
        let initial_backoff = supervise::initial_backoff()?;
        let dir = &options.state_dir;
        std::fs::create_dir_all(dir.join("logs/pods"))?;
        std::fs::create_dir_all(dir.join("zds"))?;
        CertificateAuthority::generate(TRUST_DOMAIN)?.save(&dir.join("cacerts"))?;
        let state_path = dir.join("ztunnel-state.yaml");
        // An explicit empty state: an empty file would be taken as one not yet written.
        LocalConfig::default().write(&state_path)?;
        let mut topology = Topology::create(&options.prefix, POD_RANGE)?;
        // Before any ztunnel: its DNS proxies forward to the cluster DNS from their first pod.
        let mut dns = dns::DnsServer::start().await?;
        ambit_ztunnel::dns::set_upstream(vec![dns.loopback]).map_err(|current| {
            anyhow::anyhow!("ztunnel's DNS upstream is already {current:?}, not the cluster DNS")
        })?;
        let mut nodes = Vec::new();
        for index in 1..=options.nodes.max(1) {
            let name = format!("node{index}");
            let node = topology.add_node(&name)?;
            topology.add_node_address(&node, dns::CLUSTER_DNS)?;
            dns.serve_node(&format!("/var/run/netns/{}", node.netns))
                .await?;
            let socket = dir.join(format!("zds/{name}.sock"));
            let agent = NodeAgent::start(
                &socket,
                options.rules,
                RuleOptions {
                    dns_capture: true,
                    ipv6: false,
                    ..Default::default()
                },
            )?;
            let any: SocketAddr = "127.0.0.1:0".parse().expect("static address");
            let config = Config {
                local_xds_path: Some(state_path.clone()),
                inpod_uds: socket,
                ca_dir: Some(dir.join("cacerts")),
                xds_address: String::new(),
                ca_address: String::new(),
                cluster_id: "Kubernetes".into(),
                network: String::new(),
                node_name: name.clone(),
                admin_address: any,
                stats_address: any,
                readiness_address: any,
                secret_ttl_seconds: 86400,
                enforce_waypoint: true,
            };
            let ztunnel = Ztunnel::start(config, Default::default()).await?;
            agent.wait_for_ztunnel(Duration::from_secs(10)).await?;
            tracing::info!(node = %name, metrics = %ztunnel.stats_address, "node ready");
            nodes.push(NodeRuntime {
                name,
                ztunnel,
                agent,
            });
        }
        Ok(Mesh {
            options,
            topology,
            nodes,
            cluster: ClusterState::new(),
            pods: BTreeMap::new(),
            vips: BTreeMap::new(),
            state_path,
            next_node: 0,
            l7_documents: BTreeMap::new(),
            initial_backoff,
            dns,
            host_search: pods::host_search_domains(),
        })
    }

    fn respond(&self, result: anyhow::Result<String>) -> Response {
        match result {
            Ok(message) => Response::Ok {
                message,
                status: self.status(),
            },
            Err(err) => Response::Error {
                message: format!("{err:#}"),
            },
        }
    }

    /// Carries out one change as a transaction: admitted first, and if reconciling it fails
    /// anyway, the cluster state is put back as it was (and reconciled) before the error is
    /// returned, so a failed change never blocks the next one.
    async fn handle(&mut self, request: Request) -> anyhow::Result<String> {
        if matches!(request, Request::Status) {
            // The readiness it reports is the one in force in the ztunnel state.
            self.follow_probes()?;
            return Ok(String::new());
        }
        let before = (self.cluster.clone(), self.l7_documents.clone());
        let message = self.change(request)?;
        if let Err(err) = self.reconcile().await {
            tracing::warn!(error = %format!("{err:#}"), "rolling back a change that failed to reconcile");
            (self.cluster, self.l7_documents) = before;
            return Err(match self.reconcile().await {
                Ok(()) => err.context("the change was rolled back"),
                Err(again) => err.context(format!(
                    "the change was rolled back, but restoring the previous state failed too: {again:#}"
                )),
            });
        }
        Ok(message)
    }

    /// Applies a request to the cluster state (admitted, atomic); the caller reconciles.
    fn change(&mut self, request: Request) -> anyhow::Result<String> {
        let message = match request {
            Request::Status => String::new(),
            Request::Apply { manifests } => {
                let objects = parse(&manifests)?;
                let nodes: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
                admit::check(&objects, &nodes)?;
                let changes = self.cluster.apply(&objects)?.to_string();
                for (source, text) in &manifests {
                    self.l7_documents
                        .extend(l7_documents(text).with_context(|| source.clone())?);
                }
                changes
            }
            Request::Delete { manifests } => {
                let objects = parse(&manifests)?;
                self.cluster.delete_objects(&objects)?.to_string()
            }
            Request::Label {
                kind,
                namespace,
                name,
                key,
                value,
            } => {
                let kind: Kind = kind.parse().map_err(anyhow::Error::msg)?;
                self.cluster
                    .label(kind, &namespace, &name, &key, value.as_deref())?
                    .to_string()
            }
            Request::Down => unreachable!("handled by the caller"),
        };
        Ok(message)
    }

    /// Brings namespaces, processes, ztunnel state and enrollment in line with the manifests.
    async fn reconcile(&mut self) -> anyhow::Result<()> {
        let desired: Vec<Pod> = self.cluster.pods().cloned().collect();
        let wanted: Vec<(String, String)> = desired.iter().map(key_of).collect();

        // Pods that are gone.
        let waypoints: Vec<(String, String)> = self
            .cluster
            .gateways()
            .filter(|g| g.spec.gateway_class_name == WAYPOINT_GATEWAY_CLASS)
            .map(|g| (g.metadata.namespace.clone(), g.metadata.name.clone()))
            .collect();
        let gone: Vec<_> = self
            .pods
            .iter()
            .filter(|(key, pod)| {
                if pod.waypoint {
                    !waypoints.contains(key)
                } else {
                    !wanted.contains(key)
                }
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            let mut pod = self.pods.remove(&key).expect("listed above");
            for container in &mut pod.containers {
                container.stop();
            }
            if pod.enrolled {
                self.nodes[pod.node].agent.unenroll(&pod.uid).await?;
            }
            self.topology.remove_pod(&pod.net)?;
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", pod.net.netns));
        }

        // New pods get a namespace on a node.
        let mut started = Vec::new();
        for pod in &desired {
            let key = key_of(pod);
            if self.pods.contains_key(&key) {
                continue;
            }
            let (namespace, name) = &key;
            // Admission checked the node; this is the runner's own guard.
            let node = match &pod.spec.node_name {
                Some(node) => Some(self.nodes.iter().position(|n| &n.name == node).with_context(
                    || format!("pod {namespace}/{name}: spec.nodeName {node} is not a node of this mesh"),
                )?),
                None => None,
            };
            self.add_pod_net(&key, node, &pod.spec.service_account_name, false)?;
            started.push(key);
        }

        // Each waypoint Gateway runs as a pod named after it, with its own identity (service
        // account = the Gateway's name, as Istio deploys waypoints); never enrolled.
        let mut started_waypoints = Vec::new();
        for key in waypoints {
            if self.pods.contains_key(&key) {
                continue;
            }
            let service_account = key.1.clone();
            self.add_pod_net(&key, None, &service_account, true)?;
            started_waypoints.push(key);
        }

        // Service VIPs.
        let services: BTreeMap<(String, String), ClusterIp> = self
            .cluster
            .services()
            .map(|s| {
                let key = (s.metadata.namespace.clone(), s.metadata.name.clone());
                (key, s.spec.cluster_ip)
            })
            .collect();
        self.vips.retain(|key, _| services.contains_key(key));
        for (key, cluster_ip) in services {
            match cluster_ip {
                // Headless: DNS answers with the endpoints, ztunnel has no VIP to capture.
                ClusterIp::Headless => {
                    self.vips.remove(&key);
                }
                _ if self.vips.contains_key(&key) => {}
                ClusterIp::Fixed(ip) if self.vip_is_free(ip) => {
                    self.vips.insert(key, ip);
                }
                _ => {
                    let vip = self.free_vip();
                    self.vips.insert(key, vip);
                }
            }
        }

        // Who should be in the mesh now.
        let mut decisions = BTreeMap::new();
        for pod in &desired {
            let meta = PodMeta {
                namespace: pod.metadata.namespace.clone(),
                name: pod.metadata.name.clone(),
                labels: pod.metadata.labels.clone(),
                annotations: pod.metadata.annotations.clone(),
                host_network: pod.spec.host_network,
            };
            let namespace_labels = self
                .cluster
                .namespace_labels(&pod.metadata.namespace)
                .cloned()
                .unwrap_or_default();
            decisions.insert(key_of(pod), agent::enrollment(&meta, &namespace_labels));
        }

        // Releases first, so the state never claims HBONE for a pod ztunnel no longer serves.
        for (key, decision) in &decisions {
            let pod = self.pods.get_mut(key).expect("created above");
            if pod.enrolled && !decision.is_enrolled() {
                self.nodes[pod.node].agent.unenroll(&pod.uid).await?;
                pod.enrolled = false;
                self.cluster.annotate(
                    Kind::Pod,
                    &key.0,
                    &key.1,
                    agent::REDIRECTION_ANNOTATION,
                    None,
                )?;
            }
        }
        self.write_state(Some(&decisions))?;
        for pod in &desired {
            let key = key_of(pod);
            let decision = decisions[&key];
            let runtime = self.pods.get_mut(&key).expect("created above");
            runtime.reason = match decision {
                agent::Enrollment::Enrolled => None,
                agent::Enrollment::NotEnrolled(reason) => Some(reason.to_string()),
            };
            if decision.is_enrolled() && !runtime.enrolled {
                self.nodes[runtime.node]
                    .agent
                    .enroll(EnrolledPod {
                        uid: runtime.uid.clone(),
                        namespace: key.0.clone(),
                        name: key.1.clone(),
                        service_account: pod.spec.service_account_name.clone(),
                        netns: PathBuf::from(runtime.net.netns_path()),
                    })
                    .await?;
                runtime.enrolled = true;
                // As the node agent does on a cluster: the pod is marked once ztunnel has it.
                self.cluster.annotate(
                    Kind::Pod,
                    &key.0,
                    &key.1,
                    agent::REDIRECTION_ANNOTATION,
                    Some(agent::REDIRECTION_ENABLED),
                )?;
            }
        }
        self.write_resolver_files()?;
        self.write_waypoint_configs()?;

        // Processes of new pods start last: an ambient pod's first connection is captured.
        for key in started {
            let pod = desired.iter().find(|p| key_of(p) == key).expect("desired");
            let (containers, probes) = self.start_processes(pod)?;
            let runtime = self.pods.get_mut(&key).expect("created");
            runtime.containers = containers;
            runtime.probes = probes;
        }
        for key in started_waypoints {
            let (container, probes) = self.start_waypoint(&key)?;
            let runtime = self.pods.get_mut(&key).expect("created");
            runtime.containers = vec![container];
            runtime.probes = vec![probes];
        }
        self.record_pids()?;
        // Pods without readiness probes are ready now that they run: endpoints at once.
        self.follow_probes()?;
        Ok(())
    }

    /// Gives a new pod (or waypoint) its namespace and address on `node`, or on the next node in
    /// turn, and records it, not yet running and not enrolled.
    fn add_pod_net(
        &mut self,
        key: &(String, String),
        node: Option<usize>,
        service_account: &str,
        waypoint: bool,
    ) -> anyhow::Result<()> {
        let (namespace, name) = key;
        let node = node.unwrap_or_else(|| {
            self.next_node = (self.next_node + 1) % self.nodes.len();
            self.next_node
        });
        let net = self
            .topology
            .add_pod(node, &format!("{namespace}-{name}"))?;
        self.pods.insert(
            key.clone(),
            PodRuntime {
                net,
                node,
                // What Kubernetes gives a pod, and istio-cni sends as the ZDS uid.
                uid: pod_uid()?,
                identity: format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"),
                enrolled: false,
                reason: waypoint.then(|| "a waypoint: it terminates HBONE itself".to_owned()),
                containers: Vec::new(),
                probes: Vec::new(),
                ready: false,
                waypoint,
            },
        );
        Ok(())
    }

    fn free_vip(&self) -> IpAddr {
        let (a, b) = SERVICE_RANGE;
        (11u16..u16::MAX)
            .map(|n| IpAddr::V4(Ipv4Addr::new(a, b, (n >> 8) as u8, n as u8)))
            .find(|ip| self.vip_is_free(*ip))
            .expect("65k VIPs")
    }

    /// Whether `ip` may become a Service's VIP: no other Service's, not the cluster DNS's.
    fn vip_is_free(&self, ip: IpAddr) -> bool {
        ip != IpAddr::V4(dns::CLUSTER_DNS) && !self.vips.values().any(|v| *v == ip)
    }

    /// Writes the ztunnel state; `decisions` say who is in the mesh (`None`: as it stands).
    fn write_state(
        &self,
        decisions: Option<&BTreeMap<(String, String), agent::Enrollment>>,
    ) -> anyhow::Result<()> {
        let running: Vec<RunningPod> = self
            .pods
            .iter()
            .map(|((namespace, name), pod)| RunningPod {
                namespace: namespace.clone(),
                name: name.clone(),
                ip: IpAddr::V4(pod.net.ip),
                node: self.nodes[pod.node].name.clone(),
                enrolled: match decisions {
                    Some(decisions) => decisions
                        .get(&(namespace.clone(), name.clone()))
                        .is_some_and(|d| d.is_enrolled()),
                    None => pod.enrolled,
                },
                ready: pod.ready,
            })
            .collect();
        let config =
            ambit_local::control::ztunnel_config(&self.cluster, &running, &self.vips, TRUST_DOMAIN);
        // The file is what an operator inspects; the stores are set directly so the change is
        // in force before the next step, not at the next poll of the file.
        config.write(&self.state_path)?;
        for node in &self.nodes {
            let snapshot = config.clone().into_snapshot(&self.state_path)?;
            node.ztunnel.state.replace(snapshot);
        }
        self.dns.update(&ZoneSource {
            cluster: &self.cluster,
            pods: &running,
            vips: &self.vips,
            reverse_ranges: &[POD_RANGE, SERVICE_RANGE],
        });
        self.write_service_rules(&config)
    }

    /// Where waypoint `namespace/name` reads its HTTPRoutes and AuthorizationPolicies.
    fn waypoint_config_path(&self, (namespace, name): &(String, String)) -> PathBuf {
        self.options
            .state_dir
            .join(format!("waypoints/{namespace}_{name}.yaml"))
    }

    /// istiod's part for waypoints: each one's L7 configuration file holds the routes and
    /// policies that apply to it now (documents of deleted objects are dropped). Files are
    /// replaced by rename, so a waypoint never reads half a file; a waypoint with nothing to
    /// enforce gets the explicit empty configuration, as an empty file would not be taken.
    fn write_waypoint_configs(&mut self) -> anyhow::Result<()> {
        let cluster = &self.cluster;
        self.l7_documents.retain(|r, _| cluster.get(r).is_some());
        std::fs::create_dir_all(self.options.state_dir.join("waypoints"))?;
        let waypoints: Vec<(String, String)> = self
            .pods
            .iter()
            .filter(|(_, pod)| pod.waypoint)
            .map(|(key, _)| key.clone())
            .collect();
        for key in waypoints {
            let mut text = String::new();
            for object in self.cluster.waypoint_l7_objects(&key.0, &key.1) {
                if let Some(document) = self.l7_documents.get(&object) {
                    text.push_str("---\n");
                    text.push_str(&serde_yaml::to_string(document)?);
                }
            }
            if text.is_empty() {
                text.push_str(EMPTY_CONFIG);
            }
            let path = self.waypoint_config_path(&key);
            if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
                continue;
            }
            file::replace(&path, text.as_bytes(), 0o644)?;
        }
        Ok(())
    }

    /// kube-proxy's part: VIPs reachable from pods outside the mesh, DNATed on their node.
    fn write_service_rules(&self, config: &LocalConfig) -> anyhow::Result<()> {
        let rules = services::nat_ruleset(config);
        for node in &self.topology.nodes {
            run_in(
                &node.netns,
                "iptables-restore",
                &["--noflush", "--wait"],
                Some(&rules),
            )?;
            let jump = ["-t", "nat", "-C", "PREROUTING", "-j", services::CHAIN];
            if run_in(&node.netns, "iptables", &jump, None).is_err() {
                let add = ["-t", "nat", "-A", "PREROUTING", "-j", services::CHAIN];
                run_in(&node.netns, "iptables", &add, None)?;
            }
        }
        Ok(())
    }

    /// Each pod's `/etc/resolv.conf` and `/etc/hosts` as kubelet writes them (mounted over /etc
    /// by `ip netns exec`): every pod, in the mesh or not, asks the cluster DNS.
    fn write_resolver_files(&self) -> anyhow::Result<()> {
        for ((namespace, name), pod) in &self.pods {
            let spec = self.cluster.pod(namespace, name);
            let hostname = pods::hostname(spec, name);
            let domain = pods::domain(spec, namespace);
            let hosts = pods::hosts_file(pod.net.ip, &hostname, domain.as_deref());
            let resolv = pods::resolv_conf(namespace, dns::CLUSTER_DNS, &self.host_search);
            let dir = PathBuf::from(format!("/etc/netns/{}", pod.net.netns));
            std::fs::create_dir_all(&dir)?;
            // Written in place, the one exception to replacing files atomically: running
            // processes have these very inodes bind-mounted over /etc, so a renamed file would
            // never reach them. Rewritten only when they change, so a lookup racing the write
            // (which may see a short file) is as rare as the change itself.
            for (file, text) in [("hosts", hosts), ("resolv.conf", resolv)] {
                let path = dir.join(file);
                if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                    std::fs::write(path, text)?;
                }
            }
        }
        Ok(())
    }

    /// kubelet's environment for `pod`'s containers: `HOSTNAME` and its namespace's Services.
    fn pod_environment(&self, pod: &Pod) -> Vec<(String, String)> {
        let namespace = &pod.metadata.namespace;
        let hostname = pods::hostname(Some(pod), &pod.metadata.name);
        let services = self
            .cluster
            .services()
            .filter(|s| s.metadata.namespace == *namespace)
            .filter_map(|s| {
                let key = (namespace.clone(), s.metadata.name.clone());
                Some((s, *self.vips.get(&key)?))
            });
        pods::environment(&hostname, services)
    }

    fn start_processes(&self, pod: &Pod) -> anyhow::Result<(Vec<Container>, Vec<ContainerProbes>)> {
        let (namespace, name) = key_of(pod);
        let runtime = &self.pods[&(namespace.clone(), name.clone())];
        let log_path = self
            .options
            .state_dir
            .join(format!("logs/pods/{namespace}_{name}.log"));
        let node = &self.topology.nodes[runtime.node];
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        let mut probes = Vec::new();
        for container in &pod.spec.containers {
            let argv: Vec<String> = if container.image == "ambit/echo" {
                let mut argv = vec![
                    exe.display().to_string(),
                    "mesh".into(),
                    "echo-server".into(),
                    "--name".into(),
                    name.clone(),
                ];
                let mut ports: Vec<u16> =
                    container.ports.iter().map(|p| p.container_port).collect();
                if ports.is_empty() {
                    ports.push(8080);
                }
                for port in ports {
                    argv.push("--port".into());
                    argv.push(port.to_string());
                }
                argv
            } else {
                let argv: Vec<String> = container
                    .command
                    .iter()
                    .chain(container.args.iter())
                    .cloned()
                    .collect();
                // Refused at admission; a stray one fails to start, as a missing program does.
                argv
            };
            // The container's own variables come last: they win.
            let mut env = self.pod_environment(pod);
            env.extend(pod.container_env(
                container,
                IpAddr::V4(runtime.net.ip),
                IpAddr::V4(node.address),
                &node.name,
                &runtime.uid,
            ));
            probes.push(ContainerProbes::new(
                container.probes.clone(),
                self.probe_target(runtime, env.clone()),
            ));
            let launch = Launch {
                netns: runtime.net.netns.clone(),
                hostname: pods::hostname(Some(pod), &name),
                argv,
                env,
                log: log_path.clone(),
            };
            children.push(Container::start(
                &container.name,
                launch,
                pod.spec.restart_policy,
                self.initial_backoff,
            ));
        }
        Ok((children, probes))
    }

    fn probe_target(&self, runtime: &PodRuntime, env: Vec<(String, String)>) -> probe::Target {
        probe::Target {
            netns: runtime.net.netns.clone(),
            netns_path: runtime.net.netns_path(),
            pod_ip: IpAddr::V4(runtime.net.ip),
            env,
        }
    }

    /// Runs `ambit mesh waypoint` inside the waypoint's pod, reading the same state file as the
    /// ztunnels, its own L7 configuration file, and certificates from the mesh's CA.
    /// The process is supervised like a Deployment's pod: restarted whenever it exits.
    fn start_waypoint(
        &self,
        key: &(String, String),
    ) -> anyhow::Result<(Container, ContainerProbes)> {
        let (namespace, name) = key;
        let runtime = &self.pods[key];
        let dir = &self.options.state_dir;
        let path = |p: &Path| p.display().to_string();
        let launch = Launch {
            netns: runtime.net.netns.clone(),
            hostname: pods::hostname(None, name),
            argv: vec![
                path(&std::env::current_exe()?),
                "mesh".into(),
                "waypoint".into(),
            ],
            env: vec![
                ("LOCAL_XDS_PATH".into(), path(&self.state_path)),
                (
                    "AMBIT_WAYPOINT_CONFIG".into(),
                    path(&self.waypoint_config_path(key)),
                ),
                ("AMBIT_GATEWAY_NAME".into(), name.clone()),
                ("AMBIT_CA_DIR".into(), path(&dir.join("cacerts"))),
                ("POD_NAMESPACE".into(), namespace.clone()),
                ("SERVICE_ACCOUNT".into(), name.clone()),
                ("TRUST_DOMAIN".into(), TRUST_DOMAIN.into()),
            ],
            log: dir.join(format!("logs/pods/{namespace}_{name}.log")),
        };
        let probes = ContainerProbes::new(
            waypoint_probes(),
            self.probe_target(runtime, launch.env.clone()),
        );
        // Istio's waypoint container.
        let container = Container::start(
            "istio-proxy",
            launch,
            RestartPolicy::Always,
            self.initial_backoff,
        );
        Ok((container, probes))
    }

    /// Each running waypoint's WasmPlugin states, read from its metrics inside its pod; a
    /// waypoint that does not answer soon is left without.
    async fn waypoint_plugins(&self, status: &mut Status) {
        for pod in &mut status.pods {
            let key = (pod.namespace.clone(), pod.name.clone());
            let Some(runtime) = self.pods.get(&key).filter(|p| p.waypoint) else {
                continue;
            };
            if pod.pids.is_empty() {
                continue;
            }
            let read = read_metrics(runtime.net.netns_path());
            match tokio::time::timeout(Duration::from_secs(2), read).await {
                Ok(Ok(text)) => {
                    pod.plugins = Some(ambit_waypoint::wasm::parse_status(&text));
                }
                Ok(Err(err)) => {
                    tracing::debug!(waypoint = ?key, error = %err, "cannot read the waypoint's metrics")
                }
                Err(_) => tracing::debug!(waypoint = ?key, "the waypoint's metrics did not answer"),
            }
        }
    }

    /// Reaps processes that exited and restarts those whose time has come; the pids file follows.
    fn supervise(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let mut changed = false;
        for pod in self.pods.values_mut() {
            for container in &mut pod.containers {
                changed |= container.supervise(now);
            }
        }
        if changed {
            self.record_pids()?;
        }
        self.follow_probes()
    }

    /// Keeps every container's probes on its current process, kills containers whose liveness
    /// or startup probe gave up, and rewrites the ztunnel state when a pod's readiness changed
    /// (so ztunnels and waypoints add or drop it as an endpoint).
    fn follow_probes(&mut self) -> anyhow::Result<()> {
        let mut changed = false;
        for ((namespace, name), pod) in &mut self.pods {
            for (container, probes) in pod.containers.iter_mut().zip(&mut pod.probes) {
                if let Some(reason) = probes.follow(container.pid()) {
                    container.kill(reason);
                }
            }
            let ready = pod.is_ready();
            if ready != pod.ready {
                tracing::info!(pod = %format!("{namespace}/{name}"), ready, "pod readiness changed");
                pod.ready = ready;
                changed = true;
            }
        }
        if changed {
            self.write_state(None)?;
        }
        Ok(())
    }

    fn record_pids(&self) -> anyhow::Result<()> {
        let pids: String = self
            .pods
            .values()
            .flat_map(|p| p.containers.iter().filter_map(Container::pid))
            .map(|pid| format!("{pid}\n"))
            .collect();
        // Read by `mesh down` and the next `mesh up` to kill what this daemon started.
        file::replace(&self.options.state_dir.join("pids"), pids.as_bytes(), 0o644)?;
        Ok(())
    }

    fn status(&self) -> Status {
        let running = |w: &WaypointRef| self.waypoint_running(w);
        let nodes = self
            .topology
            .nodes
            .iter()
            .zip(&self.nodes)
            .map(|(node, runtime)| NodeStatus {
                name: node.name.clone(),
                netns: node.netns.clone(),
                address: node.address.to_string(),
                metrics: runtime.ztunnel.stats_address.to_string(),
            })
            .collect();
        let pods = self
            .pods
            .iter()
            .map(|((namespace, name), pod)| {
                let annotations = self
                    .cluster
                    .pod(namespace, name)
                    .map(|p| p.metadata.annotations.clone())
                    .unwrap_or_default();
                let mut status = PodStatus {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    hostname: pods::hostname(self.cluster.pod(namespace, name), name),
                    node: self.nodes[pod.node].name.clone(),
                    netns: pod.net.netns.clone(),
                    ip: pod.net.ip.to_string(),
                    identity: pod.identity.clone(),
                    enrolled: pod.enrolled,
                    reason: pod.reason.clone(),
                    annotations,
                    pids: pod.containers.iter().filter_map(Container::pid).collect(),
                    restarts: pod.containers.iter().map(|c| c.status().restarts).sum(),
                    ready: String::new(),
                    phase: String::new(),
                    status: String::new(),
                    containers: pod
                        .containers
                        .iter()
                        .zip(&pod.probes)
                        .map(|(c, p)| {
                            let mut status = c.status();
                            status.ready = p.ready(c.pid().is_some());
                            status.probe = p.failure();
                            status
                        })
                        .collect(),
                    plugins: None,
                };
                supervise::describe_pod(&mut status);
                status
            })
            .collect();
        let services = self
            .cluster
            .services()
            .map(|s| {
                let (namespace, name) = (&s.metadata.namespace, &s.metadata.name);
                ServiceStatus {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    hostname: format!("{name}.{namespace}.svc.cluster.local"),
                    vip: self
                        .vips
                        .get(&(namespace.clone(), name.clone()))
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    ports: s
                        .spec
                        .ports
                        .iter()
                        .map(|p| match &p.target_port {
                            TargetPort::Number(target) => format!("{}->{target}", p.port),
                            TargetPort::Name(target) => format!("{}->{target}", p.port),
                        })
                        .collect(),
                    waypoint: self.cluster.service_binding(s).map(|binding| {
                        service_waypoint(self.cluster.route(&binding, Some(s), &running))
                    }),
                }
            })
            .collect();
        Status {
            state_dir: self.options.state_dir.display().to_string(),
            nodes,
            pods,
            services,
            policies: self.cluster.policy_names(),
            waypoints: self.cluster.waypoint_names(),
            warnings: self.cluster.waypoint_warnings(&running),
        }
    }

    /// Whether waypoint `w`'s pod is up.
    fn waypoint_running(&self, w: &WaypointRef) -> bool {
        self.pods
            .get(&(w.namespace.clone(), w.name.clone()))
            .is_some_and(|pod| pod.waypoint && pod.containers.iter().any(|c| c.pid().is_some()))
    }

    fn shutdown(&mut self) {
        for pod in self.pods.values_mut() {
            for container in &mut pod.containers {
                container.stop();
            }
        }
        self.nodes.clear();
        clean_leftovers(&self.options.state_dir, &self.options.prefix);
    }
}

/// The HTTPRoute, AuthorizationPolicy and WasmPlugin documents of a manifest (which has parsed already), by
/// object, with `metadata.namespace` filled in as `kubectl apply` would (`default`), so a
/// waypoint reading them alone puts them in the same namespace.
fn l7_documents(text: &str) -> anyhow::Result<Vec<(ObjectRef, serde_yaml::Value)>> {
    use serde::Deserialize;
    use serde_yaml::Value;
    fn collect(value: Value, out: &mut Vec<(ObjectRef, Value)>) {
        let kind = match value.get("kind").and_then(Value::as_str) {
            Some("List") => {
                if let Some(Value::Sequence(items)) = value.get("items") {
                    for item in items.clone() {
                        collect(item, out);
                    }
                }
                return;
            }
            Some("HTTPRoute") => Kind::HttpRoute,
            Some("GRPCRoute") => Kind::GrpcRoute,
            Some("AuthorizationPolicy") => Kind::AuthorizationPolicy,
            Some("WasmPlugin") => Kind::WasmPlugin,
            Some("TrafficExtension") => Kind::TrafficExtension,
            _ => return,
        };
        let mut value = value;
        let Some(Value::Mapping(meta)) = value.get_mut("metadata") else {
            return;
        };
        let namespace = match meta.get("namespace").and_then(Value::as_str) {
            Some(ns) if !ns.is_empty() => ns.to_owned(),
            _ => manifest::DEFAULT_NAMESPACE.to_owned(),
        };
        meta.insert("namespace".into(), Value::String(namespace.clone()));
        let Some(name) = meta.get("name").and_then(Value::as_str).map(str::to_owned) else {
            return;
        };
        out.push((ObjectRef::new(kind, &namespace, &name), value));
    }
    let mut out = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        collect(Value::deserialize(document)?, &mut out);
    }
    Ok(out)
}

/// A Service's waypoint route as `status` shows it.
fn service_waypoint(route: Route) -> ServiceWaypoint {
    let (waypoint, traffic, reason) = match route {
        Route::Waypoint(w) => (w, "waypoint", None),
        Route::Refused {
            waypoint, reason, ..
        } => (waypoint, "refused", Some(reason)),
        Route::Direct { waypoint, reason } => (waypoint, "direct", Some(reason)),
    };
    ServiceWaypoint {
        name: waypoint.to_string(),
        traffic: traffic.to_owned(),
        reason,
    }
}

fn parse(manifests: &[(String, String)]) -> anyhow::Result<Vec<manifest::Object>> {
    let mut objects = Vec::new();
    for (source, text) in manifests {
        objects.extend(manifest::parse(text).with_context(|| source.clone())?);
    }
    Ok(objects)
}

/// Runs `program` inside the namespace `netns`, feeding `stdin`.
fn run_in(netns: &str, program: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", netns, program])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program} in {netns}"))?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!(
            "{program} {} in {netns}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A waypoint's `/stats/prometheus`, from inside its pod's network namespace (its port 15020 is
/// reachable nowhere else).
async fn read_metrics(netns: String) -> std::io::Result<String> {
    use tokio::io::AsyncReadExt;
    let fd: std::os::fd::OwnedFd = std::fs::File::open(&netns)?.into();
    let pod = ambit_ztunnel::netns::PodNetns::new(fd).map_err(std::io::Error::other)?;
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, WAYPOINT_STATS_PORT));
    let mut stream = pod.connect(address).await?;
    stream
        .write_all(b"GET /stats/prometheus HTTP/1.0\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text)
}

/// The probes of Istio's waypoint Deployment: ready once `/healthz/ready` on 15021 answers,
/// checked every second while it starts.
fn waypoint_probes() -> Probes {
    let ready = ProbeAction::HttpGet {
        host: None,
        port: WAYPOINT_READINESS_PORT,
        path: "/healthz/ready".into(),
        headers: Vec::new(),
    };
    Probes {
        startup: Some(Probe {
            action: ready.clone(),
            initial_delay_seconds: 0,
            period_seconds: 1,
            timeout_seconds: 1,
            success_threshold: 1,
            failure_threshold: 30,
        }),
        readiness: Some(Probe {
            action: ready,
            initial_delay_seconds: 0,
            period_seconds: 15,
            timeout_seconds: 1,
            success_threshold: 1,
            failure_threshold: 4,
        }),
        liveness: None,
    }
}

fn key_of(pod: &Pod) -> (String, String) {
    (pod.metadata.namespace.clone(), pod.metadata.name.clone())
}

/// A fresh Kubernetes-style pod UID (a random v4 UUID, from the kernel).
fn pod_uid() -> anyhow::Result<String> {
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .context("reading a pod UID from /proc/sys/kernel/random/uuid")?;
    Ok(uuid.trim().to_owned())
}
