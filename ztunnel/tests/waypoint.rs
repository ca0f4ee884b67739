//! ztunnel with a waypoint, in real network namespaces: the `echo` service names a waypoint pod
//! on node 2 (never enrolled, like Istio's waypoints), where an in-process `ambit-waypoint` runs
//! with its sockets inside that pod's namespace. Checks that service traffic goes through the
//! waypoint, and that the destination ztunnel refuses tunnels that skip it unless enforcement
//! is off. Needs root, iproute2 and iptables.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_mesh::hbone::client::{Client, Connector, TunnelRequest};
use ambit_mesh::hbone::{ConnectHeaders, Settings, HBONE_PORT};
use ambit_mesh::identity::{
    BoxFuture, CertificateAuthority, CertificateManager, Identity, ManagerSettings,
};
use ambit_waypoint::app::Waypoint;
use ambit_waypoint::metrics::Metrics;
use ambit_ztunnel::netns::PodNetns;
use ambit_ztunnel::testing::{app_connect, app_listener, http_get, Cluster, PodNet, VIP};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const HOST: &str = "echo.default.svc.cluster.local";

/// The waypoint running on its own thread, which has entered the waypoint pod's namespace: its
/// single-threaded runtime creates every socket (the HBONE listener and its connections to
/// endpoints) there, as a waypoint pod's would be.
struct WaypointPod {
    metrics: Arc<Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WaypointPod {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn start_waypoint(cluster: &Cluster) -> WaypointPod {
    let pod = cluster.waypoint.clone().expect("cluster with a waypoint");
    let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let config = ambit_waypoint::config::Config {
        local_xds_path: Some(cluster.state_path.clone()),
        waypoint_config: None,
        gateway_name: None,
        ca_dir: Some(cluster.dir.join("cacerts")),
        namespace: "default".into(),
        service_account: "waypoint".into(),
        trust_domain: "cluster.local".into(),
        network: String::new(),
        hbone_address: SocketAddr::from(([0, 0, 0, 0], HBONE_PORT)),
        stats_address: local(0),
        readiness_address: local(0),
        request_timeout_ms: 0,
        retries: 2,
        protocol_detection_timeout_ms: 1000,
        num_trusted_proxies: 0,
        secret_ttl_seconds: 3600,
        max_concurrent_streams: 100,
    };
    let (ready, started) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        nix::sched::setns(pod.open(), nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("enter the waypoint pod's namespace");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let waypoint = Waypoint::start(config, Settings::default())
                .await
                .expect("start the waypoint");
            ready.send(waypoint.metrics.clone()).unwrap();
            let _ = stopped.await;
        });
    });
    let metrics = started
        .recv_timeout(Duration::from_secs(10))
        .expect("the waypoint starts");
    WaypointPod {
        metrics,
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// A minimal HTTP/1.1 server inside `pod` (the waypoint speaks HTTP to endpoints): answers every
/// request with `peer=<source ip> host=<host header>`, keeping connections alive; records the
/// source address of each request.
async fn http_server(pod: &PodNet, port: u16) -> Arc<Mutex<Vec<IpAddr>>> {
    let (listener, netns) = app_listener(pod, port).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        let _netns = netns;
        while let Ok((socket, peer)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut socket = BufReader::new(socket);
                loop {
                    let mut host = String::new();
                    let mut close = false;
                    let mut line = String::new();
                    // Request line and headers; requests here have no body.
                    loop {
                        line.clear();
                        match socket.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(value) = lower.strip_prefix("host:") {
                            host = value.trim().to_owned();
                        }
                        if lower.starts_with("connection:") && lower.contains("close") {
                            close = true;
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    record.lock().unwrap().push(peer.ip());
                    let body = format!("peer={} host={host}", peer.ip());
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if socket
                        .get_mut()
                        .write_all(response.as_bytes())
                        .await
                        .is_err()
                        || close
                    {
                        return;
                    }
                }
            });
        }
    });
    seen
}

/// One HTTP/1.1 request from inside `pod` to `target`, as its app would (captured by ztunnel);
/// returns the whole response.
async fn app_get(pod: &PodNet, target: SocketAddr) -> String {
    let mut stream = app_connect(pod, target).await.expect("connect");
    let request = format!("GET /hello HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("response in time")
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

/// `istio_requests_total` samples with all of `labels`, summed (recorded when a response ends,
/// so waited for).
async fn waypoint_requests(metrics: &Metrics, labels: &[&str], want: u64) -> u64 {
    let mut seen = 0;
    for _ in 0..100 {
        seen = metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        if seen >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

/// HBONE connections opened from inside a pod (marked, so its in-pod rules let them out).
struct PodConnector(PodNetns);

impl Connector for PodConnector {
    fn connect(
        &self,
        address: SocketAddr,
    ) -> BoxFuture<'_, std::io::Result<tokio::net::TcpStream>> {
        Box::pin(self.0.connect(address))
    }
}

/// An HBONE tunnel straight to echo's 15008 with sleep's certificate, addressed at the service
/// (`forwarded: host`) when `service_addressed`, from inside sleep's namespace: what a client
/// skipping the waypoint would send.
async fn direct_tunnel(
    cluster: &Cluster,
    service_addressed: bool,
) -> Result<ambit_mesh::hbone::client::Tunnel, ambit_mesh::hbone::client::ClientError> {
    direct_tunnel_to(cluster, service_addressed, 8080).await
}

/// [`direct_tunnel`] to any port of echo.
async fn direct_tunnel_to(
    cluster: &Cluster,
    service_addressed: bool,
    port: u16,
) -> Result<ambit_mesh::hbone::client::Tunnel, ambit_mesh::hbone::client::ClientError> {
    let ca = CertificateAuthority::load(&cluster.dir.join("cacerts")).unwrap();
    let certificates = Arc::new(CertificateManager::new(
        Arc::new(ca),
        ManagerSettings::default(),
    ));
    let netns = PodNetns::new(cluster.sleep.open().into()).unwrap();
    let client = Client::with_connector(
        certificates,
        Settings::default(),
        Arc::new(PodConnector(netns)),
    );
    let echo = IpAddr::V4(cluster.echo.ip);
    let request = TunnelRequest {
        source: Identity::new("cluster.local", "default", "sleep").unwrap(),
        destination_identities: vec![Identity::new("cluster.local", "default", "echo").unwrap()],
        hbone_address: SocketAddr::new(echo, HBONE_PORT),
        target: SocketAddr::new(echo, port),
        headers: ConnectHeaders {
            forwarded_for: Some(SocketAddr::new(IpAddr::V4(cluster.sleep.ip), 40000)),
            forwarded_host: service_addressed.then(|| HOST.to_owned()),
            ..Default::default()
        },
    };
    client.connect(&request).await
}

/// Sends one request over an established tunnel and returns the response.
async fn get_over(mut tunnel: ambit_mesh::hbone::client::Tunnel) -> String {
    let request = format!("GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n");
    tunnel.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_end(&mut response))
        .await
        .expect("response in time")
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn service_traffic_goes_through_the_waypoint() {
    let cluster = Cluster::start_with_waypoint(true).await;
    let seen = http_server(&cluster.echo, 8080).await;
    let waypoint = start_waypoint(&cluster);
    let waypoint_ip = cluster.waypoint.as_ref().unwrap().ip;

    let response = app_get(&cluster.sleep, format!("{VIP}:80").parse().unwrap()).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    // Echo's ztunnel connects to the app with the HBONE peer's address as source: the waypoint.
    assert!(
        response.contains(&format!("peer={waypoint_ip} host={HOST}")),
        "{response}"
    );
    assert_eq!(*seen.lock().unwrap(), vec![IpAddr::V4(waypoint_ip)]);
    let counted = waypoint_requests(
        &waypoint.metrics,
        &[
            "reporter=\"waypoint\"",
            "response_code=\"200\"",
            "source_workload=\"sleep\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
            "destination_workload=\"echo\"",
            "destination_service=\"echo.default.svc.cluster.local\"",
        ],
        1,
    )
    .await;
    assert_eq!(counted, 1, "{}", waypoint.metrics.render());

    // Sleep's ztunnel reports the waypoint as the peer it talked to, for the echo service.
    let source_metrics = http_get(cluster.ztunnels[0].stats_address, "/metrics").await;
    assert!(
        source_metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("destination_workload=\"waypoint\"")
                && l.contains("destination_service=\"echo.default.svc.cluster.local\"")),
        "{source_metrics}"
    );

    // Traffic addressed to the pod itself skips the service's waypoint (Istio: the original
    // addressing decides), and is allowed: echo has no workload waypoint.
    let response = app_get(
        &cluster.sleep,
        SocketAddr::new(IpAddr::V4(cluster.echo.ip), 8080),
    )
    .await;
    assert!(
        response.contains(&format!("peer={} ", cluster.sleep.ip)),
        "{response}"
    );
}

#[tokio::test]
async fn a_tunnel_skipping_the_waypoint_is_refused_when_enforced() {
    let cluster = Cluster::start_with_waypoint(true).await;
    let _seen = http_server(&cluster.echo, 8080).await;
    let err = match direct_tunnel(&cluster, true).await {
        Ok(_) => panic!("a service-addressed tunnel that skipped the waypoint was accepted"),
        Err(err) => err,
    };
    assert_eq!(err.status(), Some(hyper::StatusCode::UNAUTHORIZED), "{err}");
    // Addressed to the pod (no `forwarded: host`): echo has no workload waypoint, so allowed.
    let tunnel = direct_tunnel(&cluster, false)
        .await
        .expect("pod-addressed tunnel");
    let response = get_over(tunnel).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

#[tokio::test]
async fn a_tunnel_skipping_the_waypoint_is_allowed_when_not_enforced() {
    let cluster = Cluster::start_with_waypoint(false).await;
    let _seen = http_server(&cluster.echo, 8080).await;
    let tunnel = direct_tunnel(&cluster, true)
        .await
        .expect("enforcement off: Istio's behaviour, the tunnel is accepted");
    let response = get_over(tunnel).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains(&format!("peer={} ", cluster.sleep.ip)),
        "{response}"
    );
}

#[tokio::test]
async fn a_tunnel_to_ztunnels_own_ports_is_refused() {
    // A CONNECT to the pod's 15001 would come back through the pod's own outbound listener and
    // loop: ztunnel's ports are never destinations.
    let cluster = Cluster::start_with_waypoint(false).await;
    http_server(&cluster.echo, 8080).await;
    for port in [15001, 15006, 15008, 15053] {
        let err = direct_tunnel_to(&cluster, false, port).await.err();
        let status = err.as_ref().and_then(|e| e.status());
        assert_eq!(
            status,
            Some(hyper::StatusCode::BAD_REQUEST),
            "CONNECT to echo:{port}: {err:?}"
        );
    }
    let tunnel = direct_tunnel_to(&cluster, false, 8080).await.unwrap();
    assert!(get_over(tunnel).await.starts_with("HTTP/1.1 200"));
}
