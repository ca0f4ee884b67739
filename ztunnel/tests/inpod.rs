//! ztunnel end to end in real network namespaces: two nodes, pods behind veth pairs, Istio's
//! in-pod rules installed with iptables, pods handed over ZDS, traffic from real sockets.
//! Needs root, iproute2, iptables and tcpdump.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ambit_cni::rules::{self, Backend, RuleOptions};
use ambit_mesh::identity::CertificateAuthority;
use ambit_mesh::zds::{WorkloadInfo, ZdsConnection, ZdsServer};
use ambit_ztunnel::app::Ztunnel;
use ambit_ztunnel::config::Config;
use ambit_ztunnel::netns::PodNetns;
use ambit_ztunnel::testing::{PodNet, Topology};
use std::os::fd::AsFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VIP: &str = "10.96.0.10";

/// Two nodes; `sleep` (client) on node 1, `echo` (server, behind a service VIP) and `plain`
/// (never enrolled) on node 2.
struct Cluster {
    topology: Topology,
    dir: PathBuf,
    state_path: PathBuf,
    ztunnels: Vec<Ztunnel>,
    agents: Vec<ZdsConnection>,
    /// Kept so their sockets stay bound while ztunnel reconnects.
    _servers: Vec<ZdsServer>,
    sleep: PodNet,
    echo: PodNet,
    plain: PodNet,
}

fn state_yaml(sleep: &PodNet, echo: &PodNet, plain: &PodNet, policies: &str) -> String {
    format!(
        r#"
workloads:
- uid: cluster1//v1/Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: ["{sleep}"]
  protocol: HBONE
  node: node-1
  canonicalName: sleep
  services: {{}}
- uid: cluster1//v1/Pod/default/echo
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
- uid: cluster1//v1/Pod/default/plain
  name: plain
  namespace: default
  workloadIps: ["{plain}"]
  protocol: TCP
  node: node-2
  services: {{}}
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/{VIP}"]
  ports: {{80: 8080}}
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

impl Cluster {
    async fn start() -> Cluster {
        let mut topology = Topology::new();
        let n1 = topology.add_node();
        let n2 = topology.add_node();
        let sleep = topology.add_pod(n1, "sleep");
        let echo = topology.add_pod(n2, "echo");
        let plain = topology.add_pod(n2, "plain");

        let dir = std::env::temp_dir().join(format!("ambit-inpod-{}", topology.network));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        CertificateAuthority::generate("cluster.local")
            .unwrap()
            .save(&dir.join("cacerts"))
            .unwrap();
        let state_path = dir.join("state.yaml");
        std::fs::write(&state_path, state_yaml(&sleep, &echo, &plain, "")).unwrap();

        for pod in [&sleep, &echo] {
            let options = RuleOptions {
                dns_capture: false,
                ipv6: false,
                ..Default::default()
            };
            rules::install(pod.open(), Backend::Iptables, &options).unwrap();
        }

        let mut ztunnels = Vec::new();
        let mut agents = Vec::new();
        let mut servers = Vec::new();
        let enrolled: [Vec<(&PodNet, &str)>; 2] = [vec![(&sleep, "sleep")], vec![(&echo, "echo")]];
        for (node, pods) in enrolled.iter().enumerate() {
            let socket = dir.join(format!("node{node}.sock"));
            let server = ZdsServer::bind(&socket).unwrap();
            let ztunnel = Ztunnel::start(config(&dir, &state_path, &socket), Default::default())
                .await
                .unwrap();
            let mut agent = tokio::time::timeout(Duration::from_secs(5), server.accept())
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
            assert!(ztunnel.inpod.is_ready());
            ztunnels.push(ztunnel);
            agents.push(agent);
            servers.push(server);
        }
        Cluster {
            topology,
            dir,
            state_path,
            ztunnels,
            agents,
            _servers: servers,
            sleep,
            echo,
            plain,
        }
    }

    fn set_policies(&self, policies: &str) {
        let text = state_yaml(&self.sleep, &self.echo, &self.plain, policies);
        let temp = self.dir.join("state.yaml.tmp");
        std::fs::write(&temp, text).unwrap();
        std::fs::rename(temp, &self.state_path).unwrap();
    }

    async fn wait_for_policies(&self, count: usize) {
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

fn uid(pod: &PodNet) -> String {
    format!("cluster1//v1/Pod/default/{}", pod.name)
}

fn config(dir: &Path, state: &Path, socket: &Path) -> Config {
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
    }
}

/// An app server inside `pod`: answers each connection with the peer address it sees, then
/// echoes until the client half-closes.
async fn app_server(pod: &PodNet, port: u16) {
    let netns = PodNetns::new(pod.open().into()).unwrap();
    let listener = netns
        .run(move || {
            let listener = std::net::TcpListener::bind(("0.0.0.0", port)).unwrap();
            listener.set_nonblocking(true).unwrap();
            listener
        })
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        let _netns = netns;
        while let Ok((mut socket, peer)) = listener.accept().await {
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
}

/// Connects from inside `pod` as its app would (an unmarked socket), sends `payload`, half-closes
/// and returns everything received.
async fn app_call(pod: &PodNet, target: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let netns = PodNetns::new(pod.open().into()).unwrap();
    let stream = netns
        .run(move || -> std::io::Result<std::net::TcpStream> {
            let stream = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
            stream.set_nonblocking(true)?;
            Ok(stream)
        })
        .await
        .unwrap()?;
    let mut stream = tokio::net::TcpStream::from_std(stream)?;
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

async fn http_get(address: SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// Captures TCP on node 1's link to the other nodes into a pcap until stopped. (On the bridge
/// itself only flooded frames would show once MAC learning settles.)
struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    fn start(topology: &Topology, file: PathBuf) -> Capture {
        // nsenter execs tcpdump itself, so the signal below reaches tcpdump. Immediate mode: libpcap
        // otherwise holds packets in its ring for up to a second, and they are lost at the stop.
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", topology.nodes[0].netns))
            .args([
                "tcpdump",
                "--immediate-mode",
                "-i",
                "eth0",
                "-U",
                "-n",
                "-w",
            ])
            .arg(&file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump is installed (CI installs it)");
        // tcpdump says "listening on br0" once the capture is armed; packets before that are lost.
        let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        assert!(line.contains("listening on"), "tcpdump: {line}");
        // Keep reading so tcpdump's exit summary never meets a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        Capture { child, file }
    }

    /// Stops the capture and returns (packets to port 15008, packets to other ports, raw bytes).
    fn stop(mut self) -> (usize, usize, Vec<u8>) {
        std::thread::sleep(Duration::from_millis(300));
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let count = |filter: &str| {
            let out = Command::new("tcpdump")
                .args(["-n", "-r"])
                .arg(&self.file)
                .arg(filter)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).lines().count()
        };
        let hbone = count("tcp port 15008");
        let other = count("tcp and not port 15008");
        (hbone, other, std::fs::read(&self.file).unwrap())
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn service_traffic_is_mtls_on_the_wire_and_the_server_sees_the_client() {
    let cluster = Cluster::start().await;
    app_server(&cluster.echo, 8080).await;
    let capture = Capture::start(&cluster.topology, cluster.dir.join("wire.pcap"));
    let secret = b"TOP-SECRET-PAYLOAD-0123456789".repeat(200);
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let reply = app_call(&cluster.sleep, vip, &secret).await.unwrap();
    let (hbone_packets, other_packets, wire) = capture.stop();

    let expected_peer = format!("peer={}\n", cluster.sleep.ip);
    assert!(
        reply.starts_with(expected_peer.as_bytes()),
        "the server sees the client pod's address: {:?}",
        String::from_utf8_lossy(&reply[..reply.len().min(40)])
    );
    assert_eq!(&reply[expected_peer.len()..], &secret[..]);
    assert!(hbone_packets > 0, "traffic crossed the wire on 15008");
    assert_eq!(other_packets, 0, "nothing but HBONE crossed the wire");
    assert!(
        !contains(&wire, b"TOP-SECRET-PAYLOAD"),
        "the payload never appears on the wire"
    );

    // Both sides counted the connection with Istio's labels.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let metrics = http_get(cluster.ztunnels[1].stats_address, "/metrics").await;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_received_bytes_total")
                && l.contains("reporter=\"destination\"")
        })
        .unwrap_or_else(|| panic!("no destination bytes metric in:\n{metrics}"));
    for label in [
        "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
        "destination_principal=\"spiffe://cluster.local/ns/default/sa/echo\"",
        "source_workload=\"sleep\"",
        "destination_workload=\"echo\"",
        "destination_service=\"echo.default.svc.cluster.local\"",
        "connection_security_policy=\"mutual_tls\"",
        "request_protocol=\"tcp\"",
    ] {
        assert!(line.contains(label), "{label} missing from {line}");
    }
    let value: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(
        value,
        secret.len() as u64,
        "received bytes = what the client sent"
    );
    let source_metrics = http_get(cluster.ztunnels[0].stats_address, "/metrics").await;
    assert!(source_metrics
        .lines()
        .any(|l| l.starts_with("istio_tcp_connections_opened_total")
            && l.contains("reporter=\"source\"")
            && l.contains("destination_principal=\"spiffe://cluster.local/ns/default/sa/echo\"")));

    // The admin endpoints show the pods and their certificates.
    let dump = http_get(cluster.ztunnels[1].admin_address, "/config_dump").await;
    assert!(
        dump.contains("cluster1//v1/Pod/default/echo") && dump.contains("\"state\": \"running\""),
        "{dump}"
    );
    let ready = http_get(cluster.ztunnels[1].readiness_address, "/healthz/ready").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
}

#[tokio::test]
async fn an_unenrolled_destination_gets_plain_tcp() {
    let cluster = Cluster::start().await;
    app_server(&cluster.plain, 8080).await;
    let capture = Capture::start(&cluster.topology, cluster.dir.join("plain.pcap"));
    let target = SocketAddr::new(IpAddr::V4(cluster.plain.ip), 8080);
    let reply = app_call(&cluster.sleep, target, b"PLAIN-MARKER")
        .await
        .unwrap();
    let (hbone_packets, other_packets, wire) = capture.stop();
    assert!(reply.ends_with(b"PLAIN-MARKER"));
    assert_eq!(hbone_packets, 0);
    assert!(other_packets > 0);
    assert!(
        contains(&wire, b"PLAIN-MARKER"),
        "plain TCP carries the bytes as they are"
    );
}

#[tokio::test]
async fn deny_and_allow_policies_take_effect() {
    let cluster = Cluster::start().await;
    app_server(&cluster.echo, 8080).await;
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    assert!(app_call(&cluster.sleep, vip, b"hi")
        .await
        .unwrap()
        .ends_with(b"hi"));

    cluster.set_policies(
        "policies:\n- name: deny-sleep\n  namespace: default\n  scope: Namespace\n  action: Deny\n  rules:\n  - - - principals: [!Exact \"cluster.local/ns/default/sa/sleep\"]\n",
    );
    cluster.wait_for_policies(1).await;
    let denied = app_call(&cluster.sleep, vip, b"hi").await;
    assert!(
        !matches!(&denied, Ok(bytes) if bytes.ends_with(b"hi")),
        "a DENY policy stops the connection: {denied:?}"
    );

    // An ALLOW for another principal only: sleep is still refused.
    cluster.set_policies(
        "policies:\n- name: allow-other\n  namespace: default\n  scope: Namespace\n  action: Allow\n  rules:\n  - - - principals: [!Exact \"cluster.local/ns/default/sa/other\"]\n",
    );
    cluster.wait_for_policies(1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = app_call(&cluster.sleep, vip, b"hi").await;
    assert!(
        !matches!(&refused, Ok(bytes) if bytes.ends_with(b"hi")),
        "{refused:?}"
    );

    // An ALLOW that names sleep lets it through again.
    cluster.set_policies(
        "policies:\n- name: allow-sleep\n  namespace: default\n  scope: Namespace\n  action: Allow\n  rules:\n  - - - principals: [!Exact \"cluster.local/ns/default/sa/sleep\"]\n",
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let snapshot = cluster.ztunnels[1].state.load();
        if snapshot.policies().get("default", "allow-sleep").is_some() {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(app_call(&cluster.sleep, vip, b"hi")
        .await
        .unwrap()
        .ends_with(b"hi"));
}

#[tokio::test]
async fn a_snapshot_without_a_pod_drains_it() {
    let mut cluster = Cluster::start().await;
    app_server(&cluster.echo, 8080).await;
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    assert!(app_call(&cluster.sleep, vip, b"x")
        .await
        .unwrap()
        .ends_with(b"x"));

    // The node agent restarts and its snapshot no longer names echo.
    let old_agent = cluster.agents.remove(1);
    drop(old_agent);
    let accept = cluster._servers[1].accept();
    let mut agent = tokio::time::timeout(Duration::from_secs(20), accept)
        .await
        .expect("ztunnel reconnects")
        .unwrap();
    agent.snapshot_sent().await.unwrap();
    let status = cluster.ztunnels[1].inpod.clone();
    assert!(
        status.pods().is_empty(),
        "echo was drained: {:?}",
        status.pods()
    );
    let after = app_call(&cluster.sleep, vip, b"x").await;
    assert!(
        !matches!(&after, Ok(bytes) if bytes.ends_with(b"x")),
        "{after:?}"
    );
    cluster.agents.insert(1, agent);
}
