//! The Kubernetes node agent end to end: the controller (`ambit_cni::kubernetes`) watching a fake
//! API server (`ambit_cni::testing`), real pod network namespaces with real iptables rules, and a
//! real in-process ztunnel taking the pods over ZDS; and the `ambit-cni` binary run as a CNI
//! plugin (env + stdin, as a container runtime runs it) against that agent. Needs root, iproute2
//! and iptables.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_cni::agent::{NodeAgent, REDIRECTION_ANNOTATION};
use ambit_cni::kubernetes::{Controller, ControllerConfig, Stats};
use ambit_cni::locate::NetnsLocator;
use ambit_cni::plugin::event;
use ambit_cni::rules::{probes, Backend, RuleOptions};
use ambit_cni::testing::{FakeApiServer, FakePod, Kind};
use ambit_mesh::identity::CertificateAuthority;
use ambit_ztunnel::app::Ztunnel;
use ambit_ztunnel::testing::{config, netns_exec, PodNet, Topology};
use serde_json::{json, Value};

const NODE: &str = "node-1";
const NS: &str = "demo";
const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");

struct Harness {
    api: FakeApiServer,
    dir: PathBuf,
    state_path: PathBuf,
    zds_socket: PathBuf,
    plugin_socket: PathBuf,
    /// The namespaces the agent can find (symlinks), standing in for the node's /var/run/netns:
    /// other tests' pods, with the same addresses, live in the real one.
    netns_dir: PathBuf,
    agent: Arc<NodeAgent>,
    stats: Arc<Stats>,
    ztunnel: Option<Ztunnel>,
    controller: tokio::task::JoinHandle<()>,
    pods: Vec<PodNet>,
    /// The node's namespace, where the agent SNATs the kubelet's probes.
    node_netns: String,
    /// Last, so the namespaces go after everything running in them.
    _topology: Topology,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.controller.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn uid(name: &str) -> String {
    ambit_cni::testing::pod_uid(NS, name)
}

impl Harness {
    /// One node with pods `names` (running, in namespace `demo`, unlabeled), all findable by the
    /// agent except those in `hidden`; the agent and a ztunnel running.
    async fn start(names: &[&str], hidden: &[&str]) -> Harness {
        Self::start_inner(names, hidden, true).await
    }

    /// Like [`start`](Self::start), the pods' sandboxes only: the API does not know them.
    async fn start_unregistered(names: &[&str]) -> Harness {
        Self::start_inner(names, names, false).await
    }

    async fn start_inner(names: &[&str], hidden: &[&str], register: bool) -> Harness {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let mut topology = Topology::new();
        let node = topology.add_node();
        let pods: Vec<PodNet> = names.iter().map(|n| topology.add_pod(node, n)).collect();

        let dir = std::env::temp_dir().join(format!("ambit-cni-k8s-{}", topology.network));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        CertificateAuthority::generate("cluster.local")
            .unwrap()
            .save(&dir.join("cacerts"))
            .unwrap();
        let mut state = String::from("workloads:\n");
        for pod in &pods {
            state.push_str(&format!(
                "- uid: cluster1//v1/Pod/{NS}/{name}\n  name: {name}\n  namespace: {NS}\n  \
                 serviceAccount: {name}\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  \
                 node: {NODE}\n  services: {{}}\n",
                name = pod.name,
                ip = pod.ip
            ));
        }
        let state_path = dir.join("state.yaml");
        std::fs::write(&state_path, state).unwrap();
        let netns_dir = dir.join("netns");
        std::fs::create_dir_all(&netns_dir).unwrap();
        for pod in pods.iter().filter(|p| !hidden.contains(&p.name.as_str())) {
            reveal(&netns_dir, pod);
        }

        let api = FakeApiServer::start().await;
        api.set_namespace(NS, &[]);
        api.set_namespace("kube-system", &[]);
        for pod in pods.iter().filter(|_| register) {
            api.add_pod(&FakePod::new(NS, &pod.name, NODE, Some(IpAddr::V4(pod.ip))));
        }
        // Another node's pod: the field selector keeps it away from this agent.
        api.add_pod(
            &FakePod::new(NS, "elsewhere", "node-2", Some("10.0.9.9".parse().unwrap()))
                .label(AMBIENT.0, AMBIENT.1),
        );

        let zds_socket = dir.join("zds.sock");
        let plugin_socket = dir.join("pluginevent.sock");
        let mut controller_config = ControllerConfig::new(NODE);
        controller_config.zds_socket = zds_socket.clone();
        controller_config.backend = Backend::Iptables;
        controller_config.rule_options = RuleOptions {
            dns_capture: false,
            ipv6: false,
            ..Default::default()
        };
        controller_config.ztunnel_timeout = Duration::from_secs(5);
        controller_config.locator = NetnsLocator {
            proc_dir: None,
            netns_dirs: vec![netns_dir.clone()],
        };
        let node_netns = topology.nodes[node].netns.clone();
        controller_config.probe_netns = Some(format!("/var/run/netns/{node_netns}").into());
        controller_config.retry_initial = Duration::from_millis(50);
        controller_config.retry_max = Duration::from_millis(400);
        let controller = Controller::new(api.client(), controller_config);
        let stats = controller.stats();
        let mut agent = controller.agent();
        tokio::spawn(event::serve(
            event::bind(&plugin_socket).unwrap(),
            controller.plugin_requests(),
            Default::default(),
        ));
        let controller = tokio::spawn(async move {
            if let Err(error) = controller.run().await {
                panic!("controller stopped: {error}");
            }
        });
        let agent = tokio::time::timeout(Duration::from_secs(10), agent.wait_for(Option::is_some))
            .await
            .expect("the controller syncs and starts the agent")
            .unwrap()
            .clone()
            .unwrap();
        let ztunnel = start_ztunnel(&dir, &state_path, &zds_socket).await;
        agent
            .wait_for_ztunnel(Duration::from_secs(5))
            .await
            .unwrap();
        Harness {
            api,
            dir,
            state_path,
            zds_socket,
            plugin_socket,
            netns_dir,
            agent,
            stats,
            ztunnel: Some(ztunnel),
            controller,
            pods,
            node_netns,
            _topology: topology,
        }
    }

    fn pod(&self, name: &str) -> &PodNet {
        self.pods.iter().find(|p| p.name == name).unwrap()
    }

    fn ztunnel_pods(&self) -> Vec<String> {
        let mut pods: Vec<String> = self
            .ztunnel
            .as_ref()
            .unwrap()
            .inpod
            .pods()
            .into_iter()
            .map(|p| p.uid)
            .collect();
        pods.sort();
        pods
    }

    fn annotation(&self, name: &str) -> Option<String> {
        self.api.pod_annotation(NS, name, REDIRECTION_ANNOTATION)
    }

    /// Fully enrolled: rules in the netns, ztunnel serving it, the annotation set, the node
    /// SNATing probes to it.
    fn enrolled(&self, name: &str) -> bool {
        has_rules(self.pod(name))
            && self.ztunnel_pods().contains(&uid(name))
            && self.annotation(name).as_deref() == Some("enabled")
            && self.probe_snat(name)
    }

    /// Fully out: no rules, not in ztunnel, no annotation, no probe SNAT.
    fn out(&self, name: &str) -> bool {
        no_rules(self.pod(name))
            && !self.ztunnel_pods().contains(&uid(name))
            && self.annotation(name).is_none()
            && !self.probe_snat(name)
    }

    /// The node SNATs the kubelet's probes to this pod.
    fn probe_snat(&self, name: &str) -> bool {
        let node = std::fs::File::open(format!("/var/run/netns/{}", self.node_netns)).unwrap();
        probes::pods(node)
            .unwrap()
            .contains(&IpAddr::V4(self.pod(name).ip))
    }

    fn patches_for(&self, name: &str) -> usize {
        self.api.patches().iter().filter(|p| p.name == name).count()
    }
}

fn reveal(netns_dir: &Path, pod: &PodNet) {
    std::os::unix::fs::symlink(
        format!("/var/run/netns/{}", pod.netns),
        netns_dir.join(&pod.name),
    )
    .unwrap();
}

async fn start_ztunnel(dir: &Path, state: &Path, socket: &Path) -> Ztunnel {
    Ztunnel::start(config(dir, state, socket), Default::default())
        .await
        .unwrap()
}

/// Our rules, as the pod's iptables and routing show them: true if all there, false if none
/// is; `None` in between (being installed or removed at this very moment).
fn rules(pod: &PodNet) -> Option<bool> {
    let iptables = netns_exec(&pod.netns, &["iptables-save"]);
    let ip_rules = netns_exec(&pod.netns, &["ip", "rule"]);
    let chains = iptables.contains("ISTIO_OUTPUT") || iptables.contains("ISTIO_PRERT");
    (chains == ip_rules.contains("0x111")).then_some(chains)
}

fn has_rules(pod: &PodNet) -> bool {
    rules(pod) == Some(true)
}

fn no_rules(pod: &PodNet) -> bool {
    rules(pod) == Some(false)
}

async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labeling_a_namespace_enrolls_its_running_pods_and_unlabeling_reverses_it() {
    let h = Harness::start(&["web", "db", "optout"], &[]).await;
    h.api
        .label_pod(NS, "optout", "istio.io/dataplane-mode", Some("none"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(h.api.patches().is_empty(), "nothing is labeled yet");

    h.api.set_namespace(NS, &[AMBIENT]);
    wait_for("web and db enrolled", || {
        h.enrolled("web") && h.enrolled("db")
    })
    .await;
    assert!(h.out("optout"), "istio.io/dataplane-mode=none opts out");
    assert_eq!(h.ztunnel_pods(), vec![uid("db"), uid("web")]);
    let patches = h.api.patches();
    assert_eq!(patches.len(), 2, "{patches:?}");
    for patch in &patches {
        assert_eq!(patch.subresource, "status");
        assert_eq!(patch.content_type, "application/merge-patch+json");
        assert_eq!(
            patch.body,
            json!({"metadata": {"annotations": {REDIRECTION_ANNOTATION: "enabled"}}})
        );
    }
    assert_eq!(h.agent.enrolled(), vec![uid("db"), uid("web")]);

    h.api.set_namespace(NS, &[]);
    wait_for("web and db out", || h.out("web") && h.out("db")).await;
    assert!(h.ztunnel_pods().is_empty());
    assert!(h.agent.enrolled().is_empty());
    let removal = h.api.patches().last().cloned().unwrap();
    assert_eq!(
        removal.body,
        json!({"metadata": {"annotations": {REDIRECTION_ANNOTATION: null}}})
    );
    assert_eq!(h.stats.enrollments.load(Ordering::Relaxed), 2);
    assert_eq!(h.stats.unenrollments.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_label_enrolls_and_pod_delete_reverses_it() {
    let h = Harness::start(&["web", "db"], &[]).await;
    // The pod's own label is enough, in an unlabeled namespace.
    h.api.label_pod(NS, "web", AMBIENT.0, Some(AMBIENT.1));
    wait_for("web enrolled", || h.enrolled("web")).await;
    assert!(h.out("db"));

    h.api.delete_pod(NS, "web");
    wait_for("web's rules and ztunnel pod gone", || {
        no_rules(h.pod("web")) && h.ztunnel_pods().is_empty()
    })
    .await;
    assert!(h.agent.enrolled().is_empty());
    assert_eq!(h.patches_for("web"), 1, "a deleted pod is not patched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_ztunnel_gets_the_enrolled_pods_in_its_snapshot() {
    let mut h = Harness::start(&["web", "db"], &[]).await;
    h.api.set_namespace(NS, &[AMBIENT]);
    wait_for("both enrolled", || h.enrolled("web") && h.enrolled("db")).await;

    drop(h.ztunnel.take());
    let restarted = start_ztunnel(&h.dir, &h.state_path, &h.zds_socket).await;
    h.ztunnel = Some(restarted);
    wait_for(
        "the restarted ztunnel has both pods from the snapshot",
        || {
            h.ztunnel.as_ref().unwrap().inpod.is_ready()
                && h.ztunnel_pods() == [uid("db"), uid("web")]
        },
    )
    .await;
    assert_eq!(
        h.stats.enrollments.load(Ordering::Relaxed),
        2,
        "no re-enrollment needed"
    );
    assert_eq!(h.patches_for("web") + h.patches_for("db"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_cut_mid_event_relists_without_duplicate_enrollments() {
    let h = Harness::start(&["web", "db"], &[]).await;
    h.api.label_pod(NS, "web", AMBIENT.0, Some(AMBIENT.1));
    wait_for("web enrolled", || h.enrolled("web")).await;
    h.api.bookmark();
    let (pod_lists, namespace_lists) = (h.api.lists(Kind::Pod), h.api.lists(Kind::Namespace));

    // The namespace label reaches the agent half-written, every watch breaks, and the resource
    // versions it knows have expired: only a relist brings the label in.
    h.api.cut_next_event(true);
    h.api.set_namespace(NS, &[AMBIENT]);
    wait_for("db enrolled after the relist", || h.enrolled("db")).await;
    wait_for("both watches relisted", || {
        h.api.lists(Kind::Pod) > pod_lists && h.api.lists(Kind::Namespace) > namespace_lists
    })
    .await;
    // Let the relisted pods settle, then check nothing was done twice.
    wait_for("watches open again", || h.api.open_watches() >= 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(h.enrolled("web"));
    assert_eq!(h.stats.enrollments.load(Ordering::Relaxed), 2);
    assert_eq!(h.stats.unenrollments.load(Ordering::Relaxed), 0);
    assert_eq!((h.patches_for("web"), h.patches_for("db")), (1, 1));
    let nat = netns_exec(&h.pod("web").netns, &["iptables-save", "-t", "nat"]);
    assert_eq!(
        nat.lines()
            .filter(|l| l.contains("-j ISTIO_OUTPUT"))
            .count(),
        1,
        "one jump into our chain:\n{nat}"
    );

    // And the watches work again: a change after the recovery is seen.
    h.api.set_namespace(NS, &[]);
    wait_for("web out after unlabel", || h.out("db")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_without_a_netns_is_retried_and_never_half_enrolled() {
    let h = Harness::start(&["late"], &["late"]).await;
    h.api.label_pod(NS, "late", AMBIENT.0, Some(AMBIENT.1));
    // Several retries happen meanwhile (50 ms, doubling to 400 ms).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(h.out("late"), "nothing done before the namespace is found");
    assert!(h.api.patches().is_empty());
    assert_eq!(h.stats.enrollments.load(Ordering::Relaxed), 0);

    reveal(&h.netns_dir, h.pod("late"));
    wait_for("late enrolled once its netns shows up", || {
        h.enrolled("late")
    })
    .await;
    assert_eq!(h.patches_for("late"), 1);
}

/// Runs the `ambit-cni` binary as a runtime would.
fn run_plugin(command: &str, env: &[(&str, &str)], stdin: &Value) -> (i32, Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ambit-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    };
    eprintln!(
        "plugin {command}: exit {:?}, stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cni_plugin_binary_enrolls_ambient_pods_and_passes_others_through() {
    // web and plain exist as sandboxes only: the API knows them as Pending, without IPs, so only
    // the plugin's call can tell the agent where they are.
    let h = Harness::start_unregistered(&["web", "plain"]).await;
    let (web, plain) = (h.pod("web").clone(), h.pod("plain").clone());
    h.api.set_namespace(NS, &[AMBIENT]);
    h.api.set_namespace("other", &[]);
    h.api.add_pod(&FakePod::new(NS, "web", NODE, None));
    h.api.add_pod(&FakePod::new("other", "plain", NODE, None));
    h.api.add_pod(&FakePod::new(NS, "ghost", NODE, None));

    let socket = h.plugin_socket.to_str().unwrap().to_owned();
    let conf = |ip: &str| {
        json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "ambit-cni",
            "agent_socket": socket,
            "agent_timeout_seconds": 20,
            "exclude_namespaces": ["kube-system"],
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
                "ips": [{"address": format!("{ip}/24"), "interface": 0}],
            },
        })
    };
    let args = |ns: &str, name: &str| {
        format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=abc")
    };
    let netns = |pod: &PodNet| format!("/var/run/netns/{}", pod.netns);

    let (code, out) = run_plugin("VERSION", &[], &json!({"cniVersion": "1.0.0"}));
    assert_eq!(code, 0);
    assert!(out["supportedVersions"]
        .as_array()
        .unwrap()
        .contains(&json!("1.0.0")));

    // ADD for an ambient pod: enrolled before the call returns, prevResult passed through.
    let web_conf = conf(&web.ip.to_string());
    let (web_netns, web_args) = (netns(&web), args(NS, "web"));
    let web_env = [
        ("CNI_CONTAINERID", "abc"),
        ("CNI_NETNS", web_netns.as_str()),
        ("CNI_ARGS", web_args.as_str()),
    ];
    let (code, out) = tokio::task::spawn_blocking({
        let (env, conf) = (web_env.map(|(k, v)| (k, v.to_owned())), web_conf.clone());
        move || {
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            run_plugin("ADD", &env, &conf)
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, web_conf["prevResult"]);
    assert!(has_rules(&web), "rules are in before ADD returns");
    assert!(h.ztunnel_pods().contains(&uid("web")));
    wait_for("web annotated", || {
        h.annotation("web").as_deref() == Some("enabled")
    })
    .await;

    let check = |env: Vec<(&'static str, String)>, conf: Value| {
        tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            run_plugin("CHECK", &env, &conf)
        })
    };
    let owned = |env: &[(&'static str, &str)]| -> Vec<(&'static str, String)> {
        env.iter().map(|(k, v)| (*k, v.to_string())).collect()
    };
    let (code, _) = check(owned(&web_env), web_conf.clone()).await.unwrap();
    assert_eq!(code, 0, "CHECK of an enrolled pod passes");

    // ADD for a pod outside the mesh: passed through, untouched.
    let (plain_netns, plain_args) = (netns(&plain), args("other", "plain"));
    let plain_conf = conf(&plain.ip.to_string());
    let plain_env = owned(&[
        ("CNI_CONTAINERID", "def"),
        ("CNI_NETNS", plain_netns.as_str()),
        ("CNI_ARGS", plain_args.as_str()),
    ]);
    let (code, out) = tokio::task::spawn_blocking({
        let (env, conf) = (plain_env.clone(), plain_conf.clone());
        move || {
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            run_plugin("ADD", &env, &conf)
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 0);
    assert_eq!(out, plain_conf["prevResult"]);
    assert!(no_rules(&plain));
    assert!(h
        .api
        .pod_annotation("other", "plain", REDIRECTION_ANNOTATION)
        .is_none());

    // ADD for an ambient pod that cannot be enrolled (its netns is gone): the call fails.
    let ghost_args = args(NS, "ghost");
    let ghost_env = owned(&[
        ("CNI_CONTAINERID", "ghi"),
        ("CNI_NETNS", "/var/run/netns/does-not-exist"),
        ("CNI_ARGS", ghost_args.as_str()),
    ]);
    let (code, out) = tokio::task::spawn_blocking({
        let (env, conf) = (ghost_env.clone(), conf("10.0.77.7"));
        move || {
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            run_plugin("ADD", &env, &conf)
        }
    })
    .await
    .unwrap();
    assert_ne!(code, 0);
    assert_eq!(out["code"], 100, "{out}");
    assert_eq!(out["cniVersion"], "1.0.0");
    assert!(out["msg"].as_str().unwrap().contains("demo/ghost"), "{out}");
    let (code, out) = check(ghost_env, conf("10.0.77.7")).await.unwrap();
    assert_ne!(
        code, 0,
        "CHECK of an ambient pod that is not enrolled fails: {out}"
    );
    assert!(h
        .api
        .pod_annotation(NS, "ghost", REDIRECTION_ANNOTATION)
        .is_none());

    // DEL: nothing to undo, and idempotent.
    for _ in 0..2 {
        let (code, out) = tokio::task::spawn_blocking({
            let (env, conf) = (owned(&web_env), web_conf.clone());
            move || {
                let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
                run_plugin("DEL", &env, &conf)
            }
        })
        .await
        .unwrap();
        assert_eq!((code, out), (0, Value::Null));
    }
}

/// `GET path` with a real HTTP/1.1 client: the status and body, or `None` if nothing listens.
async fn probe(address: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header("host", "kubelet")
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.ok()?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A child process killed when the test ends, however it ends.
struct Killed(std::process::Child);

impl std::ops::Deref for Killed {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Killed {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ambit-cni agent`, the real binary, as the kubelet probes it: alive at once; not ready while
/// the API server does not answer its watches (nor while the plugin is not chained); ready once
/// both watches listed, the ZDS socket listens and the plugin is chained; not ready from the
/// moment SIGTERM starts the drain until it exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_is_ready_once_synced_and_listening_and_not_ready_while_draining() {
    let dir = std::env::temp_dir().join(format!("ambit-cni-node-health-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let conf_dir = dir.join("net.d");
    let bin_dir = dir.join("bin");
    for d in [&conf_dir, &bin_dir, &dir.join("netns")] {
        std::fs::create_dir_all(d).unwrap();
    }
    let kubeconfig = |name: &str, server: &str| {
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n\
                 contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n\
                 current-context: c\nusers:\n- name: u\n  user: {{}}\n"
            ),
        )
        .unwrap();
        path
    };
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let readiness = free.local_addr().unwrap();
    drop(free);
    let zds = dir.join("zds.sock");
    let plugin = dir.join("pluginevent.sock");
    let spawn = |kubeconfig: &Path, log: &str| {
        let log = std::fs::File::create(dir.join(log)).unwrap();
        Command::new(env!("CARGO_BIN_EXE_ambit-cni"))
            .arg("agent")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KUBECONFIG", kubeconfig)
            .env("NODE_NAME", NODE)
            .env("AMBIT_ZDS_SOCKET", &zds)
            .env("AMBIT_PLUGIN_SOCKET", &plugin)
            .env("AMBIT_READINESS_ADDRESS", readiness.to_string())
            .env("AMBIT_PROBE_SNAT", "false")
            .env("AMBIT_PROC_DIR", "/proc")
            .env("AMBIT_NETNS_DIRS", dir.join("netns"))
            .env("AMBIT_CNI_BIN_DIR", &bin_dir)
            .env("AMBIT_CNI_CONF_DIR", &conf_dir)
            .env("TERMINATION_GRACE_PERIOD_SECONDS", "3")
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map(Killed)
            .unwrap()
    };
    let wait_alive = async || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while probe(readiness, "/healthz").await.is_none() {
            assert!(Instant::now() < deadline, "/healthz never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let exit = async |child: &mut std::process::Child| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the agent did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let sigterm = |child: &std::process::Child| {
        // The shell's builtin: no procps needed.
        let kill = format!("kill -TERM {}", child.id());
        assert!(Command::new("sh")
            .args(["-c", &kill])
            .status()
            .unwrap()
            .success());
    };

    // An API server that takes connections and never answers: the watches never list.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let mut child = spawn(&kubeconfig("silent", &silent_url), "silent.log");
    wait_alive().await;
    assert_eq!(probe(readiness, "/healthz").await.unwrap().0, 200);
    for _ in 0..10 {
        let (status, body) = probe(readiness, "/readyz").await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(
            body.contains("Kubernetes watches to sync") && body.contains("plugin to be chained"),
            "{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!zds.exists(), "ZDS listens before the first sync");
    sigterm(&child);
    assert_eq!(exit(&mut child).await.code(), Some(0));
    held.abort();

    // A real (fake) API server and a node whose primary network plugin is installed.
    let api = FakeApiServer::start().await;
    api.set_namespace(NS, &[]);
    api.set_namespace("kube-system", &[]);
    std::fs::write(
        conf_dir.join("10-bridge.conflist"),
        r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"}]}"#,
    )
    .unwrap();
    let mut child = spawn(&kubeconfig("fake", &api.url()), "fake.log");
    wait_alive().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = probe(readiness, "/readyz").await.unwrap();
        if status == 200 {
            assert_eq!(body, "ready\n");
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ZDS is a SOCK_SEQPACKET socket: connect as ztunnel would.
    let ztunnel = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    nix::sys::socket::connect(
        std::os::fd::AsRawFd::as_raw_fd(&ztunnel),
        &nix::sys::socket::UnixAddr::new(&zds).unwrap(),
    )
    .expect("ready, so ZDS listens");
    drop(ztunnel);
    let conflist = std::fs::read_to_string(conf_dir.join("10-bridge.conflist")).unwrap();
    assert!(
        conflist.contains("ambit-cni"),
        "ready, so chained: {conflist}"
    );

    // An idle plugin connection keeps the drain going until its deadline (2 s).
    let _plugin_connection = tokio::net::UnixStream::connect(&plugin).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    sigterm(&child);
    let signalled = Instant::now();
    let (status, body) = loop {
        let answer = probe(readiness, "/readyz")
            .await
            .expect("serving while draining");
        if answer.0 != 200 || signalled.elapsed() > Duration::from_secs(1) {
            break answer;
        }
    };
    assert!(
        signalled.elapsed() < Duration::from_millis(100),
        "not ready only {:?} after SIGTERM",
        signalled.elapsed()
    );
    assert_eq!((status, body.as_str()), (503, "not ready: shutting down\n"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(probe(readiness, "/readyz").await.unwrap().0, 503);
    assert_eq!(probe(readiness, "/healthz").await.unwrap().0, 200);
    let status = exit(&mut child).await;
    let log = std::fs::read_to_string(dir.join("fake.log")).unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        signalled.elapsed() >= Duration::from_millis(1500),
        "the drain did not wait for the open plugin connection:\n{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
