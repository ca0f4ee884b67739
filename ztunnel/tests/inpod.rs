//! ztunnel end to end in real network namespaces: two nodes, pods behind veth pairs, Istio's
//! in-pod rules installed with iptables, pods handed over ZDS, traffic from real sockets.
//! Needs root, iproute2, iptables and tcpdump.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ambit_ztunnel::testing::{
    app_call, app_connect, app_server, http_get, metric_sum, uid, workload_uid, Cluster, Topology,
    VIP,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
        dump.contains(&format!(
            "\"workload\": \"{}\"",
            workload_uid(&cluster.echo)
        )) && dump.contains(&format!("\"uid\": \"{}\"", uid(&cluster.echo)))
            && dump.contains("\"state\": \"running\""),
        "{dump}"
    );
    let ready = http_get(cluster.ztunnels[1].readiness_address, "/healthz/ready").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
}

/// Received and sent bytes as both ztunnels count them: `[(received, sent); 2]`, and the
/// connections they counted closed.
async fn byte_counters(cluster: &Cluster) -> ([(u64, u64); 2], u64) {
    let mut counters = [(0, 0); 2];
    let mut closed = 0;
    for (i, ztunnel) in cluster.ztunnels.iter().enumerate() {
        let metrics = http_get(ztunnel.stats_address, "/metrics").await;
        counters[i] = (
            metric_sum(&metrics, "istio_tcp_received_bytes_total"),
            metric_sum(&metrics, "istio_tcp_sent_bytes_total"),
        );
        closed += metric_sum(&metrics, "istio_tcp_connections_closed_total");
    }
    (counters, closed)
}

/// Polls until both ztunnels count `received` and `sent` bytes, or fails after 5 s.
async fn wait_for_bytes(cluster: &Cluster, received: u64, sent: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (counters, closed) = byte_counters(cluster).await;
        assert_eq!(closed, 0, "the connection is still open");
        if counters == [(received, sent); 2] {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "byte counters {counters:?}, expected ({received}, {sent}) on both ztunnels"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn byte_counters_grow_while_a_connection_is_open() {
    let cluster = Cluster::start().await;
    app_server(&cluster.echo, 8080).await;
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let mut stream = app_connect(&cluster.sleep, vip).await.unwrap();
    let greeting = format!("peer={}\n", cluster.sleep.ip).len() as u64;
    let mut echoed = vec![0; greeting as usize];
    stream.read_exact(&mut echoed).await.unwrap();
    let mut total = 0;
    for round in 1..=3u64 {
        let message = vec![b'x'; 4096 * round as usize];
        stream.write_all(&message).await.unwrap();
        let mut back = vec![0; message.len()];
        stream.read_exact(&mut back).await.unwrap();
        total += message.len() as u64;
        // Source and destination count the same bytes, before the connection ends.
        wait_for_bytes(&cluster, total, greeting + total).await;
    }
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (counters, closed) = byte_counters(&cluster).await;
        if closed == 2 {
            assert_eq!(
                counters,
                [(total, greeting + total); 2],
                "nothing counted twice"
            );
            break;
        }
        assert!(Instant::now() < deadline, "both ztunnels count the close");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    // A connection that stays open across the policy change.
    let mut live = app_connect(&cluster.sleep, vip).await.unwrap();
    live.write_all(b"before").await.unwrap();
    let mut greeting = [0u8; 64];
    assert!(live.read(&mut greeting).await.unwrap() > 0);

    cluster.set_policies(
        "policies:\n- name: deny-sleep\n  namespace: default\n  scope: Namespace\n  action: Deny\n  rules:\n  - - - principals: [!Exact \"cluster.local/ns/default/sa/sleep\"]\n",
    );
    cluster.wait_for_policies(1).await;
    // The live connection is closed by the destination ztunnel: reads end (EOF or reset).
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 1024];
        loop {
            match live.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the DENY policy closed the live connection");
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
    let accept = cluster.servers[1].accept();
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
