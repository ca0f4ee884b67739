//! A waypoint with an L7 configuration file, on loopback with real sockets, TLS, HBONE and HTTP:
//! three services (`echo` with pods echo-a and echo-b, `echo-v2` with echo-c, `shadow` with
//! shadow-a), each pod an HBONE server on its own `127.78.<net>.<n>:15008` in front of a small
//! HTTP app. Clients tunnel to the waypoint with a service VIP as `:authority`, as a source
//! ztunnel does.
//!
//! The app answers with the pod's name and reports what it saw in `x-seen-*` headers (path and
//! query, host, `x-test` header). `/slow` waits two seconds; `/flaky` answers 503 while the
//! mesh's `failures` counter is above zero (decrementing it); `/fail` always answers 503;
//! `Upgrade: echo` requests are switched (101) and echo their bytes.
//!
//! Beside HTTP on port 80 (no declared protocol: sniffed), each pod serves two TCP ports: 5432,
//! declared `tcp`, echoes what it receives; 7000, undeclared, is server-first: it greets with
//! `hello from <pod>\n`, then echoes.
//!
//! A fifth workload, `grpc-a`, backs the `grpc` service: port 50051 declared `grpc`, 50052
//! undeclared (sniffed), both to 50051 where [`L7Mesh::start_grpc_pod`] runs a Python `grpcio`
//! server (`grpc_peer.py`); [`L7Mesh::entry`] is a local TCP port whose connections are tunnelled
//! to a VIP, so a Python client reaches the waypoint as a source ztunnel would carry it.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_mesh::hbone::client::{Client, Tunnel, TunnelRequest};
use ambit_mesh::hbone::server::Server;
use ambit_mesh::hbone::{ConnectHeaders, Settings, HBONE_PORT};
use ambit_mesh::identity::{CertificateManager, Identity};
use ambit_mesh::state::local::LocalConfig;
use ambit_mesh::state::StateStore;
use ambit_mesh::testing;
use ambit_waypoint::app::{Options, Waypoint};
use ambit_waypoint::l7::{WaypointName, EMPTY_CONFIG};
use ambit_waypoint::proxy::ProxySettings;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub const ECHO_VIP: &str = "10.96.1.10:80";
/// The echo service's port declared TCP.
pub const ECHO_TCP_VIP: &str = "10.96.1.10:5432";
/// The echo service's undeclared port with a server-first protocol.
pub const ECHO_GREETER_VIP: &str = "10.96.1.10:7000";
pub const ECHO_HOST: &str = "echo.default.svc.cluster.local";
pub const CLIENT_ADDR: &str = "10.9.9.9:40000";
/// The gRPC service's port declared `grpc`.
pub const GRPC_VIP: &str = "10.96.1.13:50051";
/// The gRPC service's undeclared port.
pub const GRPC_SNIFFED_VIP: &str = "10.96.1.13:50052";
/// The gRPC pod's host byte in its `127.78.<net>.<n>` address.
pub const GRPC_POD_HOST: u8 = 5;

pub const PODS: [(&str, &str, u8); 4] = [
    ("echo-a", "echo", 1),
    ("echo-b", "echo", 2),
    ("echo-c", "echo-v2", 3),
    ("shadow-a", "shadow", 4),
];

pub struct Pod {
    pub name: &'static str,
    pub ip: IpAddr,
    pub forwarder: Arc<testing::TcpForwarder>,
    /// `path?query` of every request the app received.
    pub paths: Arc<Mutex<Vec<String>>>,
    /// Connections the TCP apps (5432 and 7000) accepted.
    pub tcp_connections: Arc<AtomicU32>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

pub struct L7Mesh {
    pub waypoint: Waypoint,
    pub client: Client,
    pub certificates: Arc<CertificateManager>,
    pub net: u8,
    pub pods: Vec<Pod>,
    /// How many more `/flaky` requests fail.
    pub failures: Arc<AtomicU32>,
    pub config_path: PathBuf,
}

impl Drop for L7Mesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config_path);
    }
}

pub fn pod_ip(net: u8, host: u8) -> IpAddr {
    IpAddr::from([127, 78, net, host])
}

fn state(net: u8) -> StateStore {
    let mut workloads = String::new();
    for (name, service, host) in PODS {
        let ip = pod_ip(net, host);
        workloads.push_str(&format!(
            r#"
- uid: cluster1//v1/Pod/default/{name}
  name: {name}
  namespace: default
  serviceAccount: {service}
  workloadIps: ["{ip}"]
  protocol: HBONE
  services:
    default/{service}.default.svc.cluster.local:
      80: 8080
      5432: 5432
      7000: 7000
"#
        ));
    }
    let grpc_ip = pod_ip(net, GRPC_POD_HOST);
    let yaml = format!(
        r#"
workloads:{workloads}
- uid: cluster1//v1/Pod/default/grpc-a
  name: grpc-a
  namespace: default
  serviceAccount: grpc
  workloadIps: ["{grpc_ip}"]
  protocol: HBONE
  services:
    default/grpc.default.svc.cluster.local: {{50051: 50051, 50052: 50051}}
- uid: cluster1//v1/Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: ["10.9.9.9"]
  protocol: HBONE
services:
- {{name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: ["/10.96.1.10"], ports: {{80: 8080, 5432: 5432, 7000: 7000}}, appProtocols: {{5432: tcp}}}}
- {{name: echo-v2, namespace: default, hostname: echo-v2.default.svc.cluster.local, vips: ["/10.96.1.11"], ports: {{80: 8080}}}}
- {{name: shadow, namespace: default, hostname: shadow.default.svc.cluster.local, vips: ["/10.96.1.12"], ports: {{80: 8080}}}}
- {{name: grpc, namespace: default, hostname: grpc.default.svc.cluster.local, vips: ["/10.96.1.13"], ports: {{50051: 50051, 50052: 50051}}, appProtocols: {{50051: grpc}}}}
"#
    );
    let path = Path::new("test.yaml");
    StateStore::new(
        LocalConfig::parse(&yaml, path)
            .unwrap()
            .into_snapshot(path)
            .unwrap(),
    )
}

async fn start_app(
    address: SocketAddr,
    name: &'static str,
    paths: Arc<Mutex<Vec<String>>>,
    failures: Arc<AtomicU32>,
) -> JoinHandle<()> {
    let listener = TcpListener::bind(address).await.expect("bind app");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (paths, failures) = (paths.clone(), failures.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let (paths, failures) = (paths.clone(), failures.clone());
                    async move { Ok::<_, Infallible>(app(name, request, paths, failures).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    })
}

async fn app(
    name: &'static str,
    mut request: Request<Incoming>,
    paths: Arc<Mutex<Vec<String>>>,
    failures: Arc<AtomicU32>,
) -> Response<Full<Bytes>> {
    let path = request
        .uri()
        .path_and_query()
        .map_or("/".to_owned(), |p| p.to_string());
    paths.lock().unwrap().push(path.clone());
    let header = |n: &str| {
        request
            .headers()
            .get(n)
            .map(|h| h.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let (host, test) = (header("host"), header("x-test"));
    if request
        .headers()
        .get("upgrade")
        .is_some_and(|u| u == "echo")
    {
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    let mut status = StatusCode::OK;
    match request.uri().path() {
        "/slow" => tokio::time::sleep(Duration::from_secs(2)).await,
        "/fail" => status = StatusCode::SERVICE_UNAVAILABLE,
        "/flaky" => {
            let failing = failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                status = StatusCode::SERVICE_UNAVAILABLE;
            }
        }
        _ => {}
    }
    let received = request.into_body().collect().await.unwrap().to_bytes();
    if path == "/json" {
        return Response::builder()
            .header("content-type", "application/json")
            .header("content-length", 41)
            .body(Full::new(Bytes::from_static(
                br#"{"name":"echo","ssn":"123-45-6789","x":1}"#,
            )))
            .unwrap();
    }
    Response::builder()
        .status(status)
        .header("x-seen-path", path)
        .header("x-seen-host", host)
        .header("x-seen-test", test)
        .header("x-seen-body-length", received.len())
        .body(Full::new(Bytes::from(name)))
        .unwrap()
}

/// The TCP apps: an echo server on 5432, and on 7000 a server-first greeter that then echoes.
async fn start_tcp_apps(
    ip: IpAddr,
    name: &'static str,
    connections: Arc<AtomicU32>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    for (port, greeting) in [(5432, None), (7000, Some(format!("hello from {name}\n")))] {
        let listener = TcpListener::bind(SocketAddr::new(ip, port))
            .await
            .expect("bind TCP app");
        let connections = connections.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                let greeting = greeting.clone();
                tokio::spawn(async move {
                    if let Some(greeting) = greeting {
                        if stream.write_all(greeting.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        }));
    }
    tasks
}

async fn start_pod_hbone(
    ip: IpAddr,
    service_account: &str,
    certificates: Arc<CertificateManager>,
    forwarder: Arc<testing::TcpForwarder>,
) -> JoinHandle<()> {
    let listener = TcpListener::bind(SocketAddr::new(ip, HBONE_PORT))
        .await
        .expect("bind pod HBONE");
    let server = Server::new(
        testing::identity("default", service_account),
        certificates,
        forwarder,
        Settings::default(),
    );
    tokio::spawn(async move {
        let _ = server.serve(listener).await;
    })
}

pub fn waypoint_identity() -> Identity {
    testing::identity("default", "waypoint")
}

/// Waits for the watcher to apply a configuration: until `check` holds (or 5 s pass).
pub async fn eventually<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the waypoint did not apply the new configuration within 5 s");
}

/// Writes the configuration so the watcher sees a new file (a rename: a new inode).
pub fn write_config(path: &Path, yaml: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

impl L7Mesh {
    /// Starts the pods and a waypoint reading `config` (written to a file first; "" for none).
    pub async fn start(net: u8, config: &str, proxy: ProxySettings) -> L7Mesh {
        let certificates = testing::manager(testing::ca(), Duration::from_secs(3600));
        let failures = Arc::new(AtomicU32::new(0));
        let mut pods = Vec::new();
        for (name, service, host) in PODS {
            let ip = pod_ip(net, host);
            let paths = Arc::new(Mutex::new(Vec::new()));
            let forwarder = Arc::new(testing::TcpForwarder::default());
            let tcp_connections = Arc::new(AtomicU32::new(0));
            let mut tasks = vec![
                start_app(
                    SocketAddr::new(ip, 8080),
                    name,
                    paths.clone(),
                    failures.clone(),
                )
                .await,
                start_pod_hbone(ip, service, certificates.clone(), forwarder.clone()).await,
            ];
            tasks.extend(start_tcp_apps(ip, name, tcp_connections.clone()).await);
            pods.push(Pod {
                name,
                ip,
                forwarder,
                paths,
                tcp_connections,
                tasks,
            });
        }
        let config_path = std::env::temp_dir().join(format!(
            "ambit-waypoint-test-{}-{net}.yaml",
            std::process::id()
        ));
        // "" reads as no configuration at all, which a waypoint refuses to start with; tests
        // that have nothing to configure mean the explicitly empty one.
        let config = if config.trim().is_empty() {
            EMPTY_CONFIG
        } else {
            config
        };
        write_config(&config_path, config);
        let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let waypoint = Waypoint::start_with(
            Options {
                identity: waypoint_identity(),
                network: String::new(),
                hbone_address: local(0),
                stats_address: local(0),
                readiness_address: local(0),
                proxy,
                hbone: Settings::default(),
                name: WaypointName {
                    namespace: "default".into(),
                    gateway: "waypoint".into(),
                },
                l7_path: Some(config_path.clone()),
            },
            certificates.clone(),
            Arc::new(state(net)),
        )
        .await
        .expect("start waypoint");
        L7Mesh {
            waypoint,
            client: Client::new(certificates.clone(), Settings::default()),
            certificates,
            net,
            pods,
            failures,
            config_path,
        }
    }

    /// Starts the `grpc-a` pod: its HBONE server and the Python gRPC server behind it (`args`
    /// are extra server options). Fails the test when `python3` or `grpcio` is missing.
    pub async fn start_grpc_pod(&self, args: &[&str]) -> GrpcPod {
        let ip = pod_ip(self.net, GRPC_POD_HOST);
        let hbone = start_pod_hbone(
            ip,
            "grpc",
            self.certificates.clone(),
            Arc::new(testing::TcpForwarder::default()),
        )
        .await;
        let mut server = tokio::process::Command::new("python3")
            .arg(grpc_peer())
            .args(["server", &format!("{ip}:50051"), "grpc-a"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs (the gRPC tests need python3 with grpcio: pip install grpcio)");
        let mut line = String::new();
        let stdout = server.stdout.take().unwrap();
        let mut stdout = tokio::io::BufReader::new(stdout);
        tokio::time::timeout(
            Duration::from_secs(20),
            tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line),
        )
        .await
        .expect("the Python gRPC server starts within 20 s")
        .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "the Python gRPC server did not start (pip install grpcio)"
        );
        GrpcPod {
            _server: server,
            hbone,
        }
    }

    /// A local TCP port whose connections are each tunnelled, as `sleep`, to the waypoint with
    /// `vip` as the target: what a source ztunnel does with a captured connection.
    pub async fn entry(self: &Arc<Self>, vip: &'static str) -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mesh = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let Some(mesh) = mesh.upgrade() else { return };
                // As ztunnel's sockets: small gRPC frames must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let mut tunnel = mesh.tunnel_as("sleep", vip).await;
                    drop(mesh);
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut tunnel).await;
                });
            }
        });
        (address, task)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap()
    }

    /// A tunnel from `default/<service_account>` to the waypoint, addressed to `vip`, claiming
    /// to be for `sleep`'s address.
    pub async fn tunnel_as(&self, service_account: &str, vip: &str) -> Tunnel {
        self.tunnel_claiming(service_account, vip, Some(CLIENT_ADDR.parse().unwrap()))
            .await
    }

    /// A tunnel from `default/<service_account>` (connecting from 127.0.0.1) to the waypoint,
    /// addressed to `vip`, with `forwarded: for=<claim>` when given.
    pub async fn tunnel_claiming(
        &self,
        service_account: &str,
        vip: &str,
        claim: Option<SocketAddr>,
    ) -> Tunnel {
        let request = TunnelRequest {
            source: testing::identity("default", service_account),
            destination_identities: vec![waypoint_identity()],
            hbone_address: self.waypoint.hbone_address,
            target: vip.parse().unwrap(),
            headers: ConnectHeaders {
                forwarded_for: claim,
                ..Default::default()
            },
        };
        self.client
            .connect(&request)
            .await
            .expect("tunnel to waypoint")
    }

    /// One HTTP/1.1 request from `sleep` to the echo service on a fresh tunnel.
    pub async fn get(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, http::HeaderMap, String) {
        self.request_as("sleep", "GET", path, headers).await
    }

    pub async fn request_as(
        &self,
        service_account: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, http::HeaderMap, String) {
        let tunnel = self.tunnel_as(service_account, ECHO_VIP).await;
        Self::request_on(tunnel, method, path, headers).await
    }

    /// One HTTP/1.1 request to the echo service on `tunnel`.
    pub async fn request_on(
        tunnel: Tunnel,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, http::HeaderMap, String) {
        let io = TokioIo::new(tunnel);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", ECHO_HOST);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = sender
            .send_request(request.body(Empty::<Bytes>::new()).unwrap())
            .await
            .expect("response");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    pub async fn metrics(&self) -> String {
        let mut stream = TcpStream::connect(self.waypoint.stats_address)
            .await
            .unwrap();
        stream
            .write_all(b"GET /stats/prometheus HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        text
    }

    /// Sum of `istio_requests_total` samples whose labels contain every one of `labels`.
    pub async fn requests_total(&self, labels: &[&str]) -> u64 {
        self.counter("istio_requests_total", labels).await
    }

    /// Sum of the samples of counter `name` whose labels contain every one of `labels`.
    pub async fn counter(&self, name: &str, labels: &[&str]) -> u64 {
        let prefix = format!("{name}{{");
        self.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    /// Waits (metrics are recorded when a response body ends) for a count to reach `want`.
    pub async fn wait_requests_total(&self, labels: &[&str], want: u64) -> u64 {
        let mut seen = 0;
        for _ in 0..100 {
            seen = self.requests_total(labels).await;
            if seen >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen
    }
}

/// The running `grpc-a` pod; dropping it stops the Python server and the HBONE server.
pub struct GrpcPod {
    _server: tokio::process::Child,
    hbone: JoinHandle<()>,
}

impl Drop for GrpcPod {
    fn drop(&mut self) {
        self.hbone.abort();
    }
}

/// The Python gRPC peer script.
pub fn grpc_peer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/grpc_peer.py")
}

/// Runs the Python gRPC client against `target` and returns the JSON line it prints.
pub async fn grpc_client(target: SocketAddr, args: &[&str]) -> serde_json::Value {
    let output = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new("python3")
            .arg(grpc_peer())
            .arg("client")
            .arg(target.to_string())
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Python gRPC client finishes within 90 s")
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the Python gRPC client {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The manifest header of an HTTPRoute on the echo service.
pub fn echo_route(name: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: echo, port: 80}}]\n  rules:\n{rules}"
    )
}
