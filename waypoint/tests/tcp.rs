//! Non-HTTP traffic through the waypoint: a port declared TCP is proxied at L4 byte for byte
//! (HTTP-looking bytes included), an undeclared port is sniffed (a binary client-first protocol
//! at once, a server-first one after the detection timeout), HTTP on an undeclared port is still
//! served at L7, and AuthorizationPolicy applies Istio's TCP rule. Real HBONE, TLS and sockets
//! throughout (fixture: `support/l7mesh.rs`, nets 127.78.{11,12,13,37,38,39}.x). Least-request
//! balancing is checked here too, with an L4 connection as the long request.

#[path = "support/l7mesh.rs"]
mod l7mesh;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ambit_waypoint::l7::EMPTY_CONFIG;
use ambit_waypoint::proxy::ProxySettings;
use l7mesh::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DETECTION_TIMEOUT: Duration = Duration::from_millis(300);

fn settings() -> ProxySettings {
    ProxySettings {
        protocol_detection_timeout: DETECTION_TIMEOUT,
        ..Default::default()
    }
}

/// Reads exactly `n` bytes, or fails the test after five seconds.
async fn read_n(io: &mut (impl AsyncReadExt + Unpin), n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut buf))
        .await
        .expect("read timed out")
        .expect("read");
    buf
}

fn tcp_connections(mesh: &L7Mesh, pods: &[&str]) -> u32 {
    pods.iter()
        .map(|p| mesh.pod(p).tcp_connections.load(Ordering::SeqCst))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_tcp_port_is_proxied_byte_for_byte_and_counted() {
    let mesh = L7Mesh::start(37, EMPTY_CONFIG, settings()).await;
    // Bytes that look like HTTP are not HTTP on a TCP port: no route, no 400, just an echo.
    let payloads: [&[u8]; 3] = [
        b"\x00\x01\x02binary\xff\xfe",
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
        b"not http at all\n",
    ];
    let started = Instant::now();
    for payload in payloads {
        let mut tunnel = mesh.tunnel_as("sleep", ECHO_TCP_VIP).await;
        tunnel.write_all(payload).await.unwrap();
        assert_eq!(read_n(&mut tunnel, payload.len()).await, payload);
        // Larger than the pipe buffers: the copy keeps going both ways.
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (mut read, mut write) = tokio::io::split(tunnel);
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            write.write_all(&sent).await.unwrap();
            write.shutdown().await.unwrap();
        });
        let mut echoed = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut echoed))
            .await
            .expect("echo timed out")
            .unwrap();
        writer.await.unwrap();
        assert_eq!(echoed.len(), big.len());
        assert!(echoed == big, "the bytes came back changed");
    }
    assert!(
        started.elapsed() < DETECTION_TIMEOUT * 3,
        "a declared port is never sniffed (took {:?})",
        started.elapsed()
    );
    assert_eq!(
        tcp_connections(&mesh, &["echo-a", "echo-b"]),
        3,
        "one upstream connection per tunnel"
    );
    assert!(
        mesh.pod("echo-a").tcp_connections.load(Ordering::SeqCst) > 0
            && mesh.pod("echo-b").tcp_connections.load(Ordering::SeqCst) > 0,
        "balanced over both endpoints"
    );
    assert!(
        mesh.requests_total(&[]).await == 0,
        "nothing was counted as an HTTP request"
    );
    let labels = [
        "reporter=\"waypoint\"",
        "destination_service=\"echo.default.svc.cluster.local\"",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
        "request_protocol=\"tcp\"",
        "response_flags=\"-\"",
    ];
    let mut closed = 0;
    for _ in 0..100 {
        closed = mesh
            .counter("istio_tcp_connections_closed_total", &labels)
            .await;
        if closed == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(closed, 3);
    assert_eq!(
        mesh.counter("istio_tcp_connections_opened_total", &labels)
            .await,
        3
    );
    let expected: u64 = payloads.iter().map(|p| p.len() as u64 + 300_000).sum();
    assert_eq!(
        mesh.counter("istio_tcp_received_bytes_total", &labels)
            .await,
        expected
    );
    assert_eq!(
        mesh.counter("istio_tcp_sent_bytes_total", &labels).await,
        expected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_ports_are_sniffed() {
    let mesh = L7Mesh::start(38, EMPTY_CONFIG, settings()).await;

    // A server-first protocol: the client waits for the greeting, which comes once the
    // detection timeout has passed and the waypoint has connected at L4.
    let started = Instant::now();
    let mut tunnel = mesh.tunnel_as("sleep", ECHO_GREETER_VIP).await;
    let greeting = read_n(&mut tunnel, "hello from echo-a\n".len()).await;
    let waited = started.elapsed();
    let greeting = String::from_utf8(greeting).unwrap();
    assert!(greeting.starts_with("hello from echo-"), "{greeting}");
    assert!(
        waited >= DETECTION_TIMEOUT,
        "the greeting came before detection gave up ({waited:?})"
    );
    tunnel.write_all(b"ping\n").await.unwrap();
    assert_eq!(read_n(&mut tunnel, 5).await, b"ping\n");
    drop(tunnel);

    // A binary client-first protocol (a TLS ClientHello's first bytes) is TCP at once.
    let started = Instant::now();
    let mut tunnel = mesh.tunnel_as("sleep", ECHO_GREETER_VIP).await;
    let hello = b"\x16\x03\x01\x00\x05hello";
    tunnel.write_all(hello).await.unwrap();
    let _greeting = read_n(&mut tunnel, "hello from echo-a\n".len()).await;
    assert_eq!(read_n(&mut tunnel, hello.len()).await, hello);
    assert!(
        started.elapsed() < DETECTION_TIMEOUT,
        "a binary first byte decides at once (took {:?})",
        started.elapsed()
    );
    drop(tunnel);

    // HTTP on the undeclared port 80 is recognized and served at L7 (routing, metrics).
    let (status, headers, body) = mesh.get("/sniffed", &[]).await;
    assert_eq!(status, 200);
    assert!(body.starts_with("echo-"), "{body}");
    assert_eq!(headers["x-seen-path"], "/sniffed");
    assert_eq!(
        mesh.wait_requests_total(&["response_code=\"200\""], 1)
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_applies_istios_tcp_rule() {
    // An ALLOW rule naming a method never matches a TCP connection; one naming only the port
    // does. The HTTP port keeps working for the method rule.
    let config = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-allow, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
    to: [{operation: {methods: ["GET"]}}]
  - from: [{source: {principals: ["cluster.local/ns/default/sa/db-client"]}}]
    to: [{operation: {ports: ["5432"]}}]
"#;
    let mesh = L7Mesh::start(39, config, settings()).await;
    let (status, _, _) = mesh.get("/", &[]).await;
    assert_eq!(status, 200, "GET over HTTP is allowed for sleep");

    // sleep over TCP: its rule names a method, so it cannot allow a connection.
    let mut tunnel = mesh.tunnel_as("sleep", ECHO_TCP_VIP).await;
    let _ = tunnel.write_all(b"data").await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut buf))
        .await
        .expect("the denied tunnel is closed");
    assert!(
        read.is_err() || buf.is_empty(),
        "nothing reached the client"
    );
    assert_eq!(
        tcp_connections(&mesh, &["echo-a", "echo-b"]),
        0,
        "a denied connection never reaches an endpoint"
    );
    assert_eq!(
        mesh.counter(
            "istio_tcp_connections_closed_total",
            &["response_flags=\"RBAC\"", "sa/sleep"]
        )
        .await,
        1
    );

    // db-client on the port its rule names: allowed.
    let mut tunnel = mesh.tunnel_as("db-client", ECHO_TCP_VIP).await;
    tunnel.write_all(b"select 1").await.unwrap();
    assert_eq!(read_n(&mut tunnel, 8).await, b"select 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_keeps_new_requests_off_a_busy_endpoint() {
    let mesh = L7Mesh::start(11, EMPTY_CONFIG, settings()).await;
    // A long-lived L4 connection keeps one endpoint busy.
    let mut held = mesh.tunnel_as("sleep", ECHO_TCP_VIP).await;
    held.write_all(b"hold").await.unwrap();
    assert_eq!(read_n(&mut held, 4).await, b"hold");
    let busy = if mesh.pod("echo-a").tcp_connections.load(Ordering::SeqCst) == 1 {
        "echo-a"
    } else {
        "echo-b"
    };
    // Round robin would alternate; least request sends every short request to the idle one.
    for i in 0..6 {
        let (status, _, body) = mesh.get(&format!("/short-{i}"), &[]).await;
        assert_eq!(status, 200);
        assert_ne!(
            body, busy,
            "request {i} went to the endpoint with a connection in flight"
        );
    }
    drop(held);
    // Once the connection is gone, both take requests again.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..50 {
        seen.insert(mesh.get("/after", &[]).await.2);
        if seen.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

/// A WasmPlugin on the echo service running the example headers filter in `phase`.
fn headers_plugin(phase: &str) -> String {
    let module = ambit_wasm_host::testing::build_filter("ambit-filter-headers");
    format!(
        r#"apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: headers, namespace: default}}
spec:
  targetRefs: [{{kind: Service, group: "", name: echo}}]
  url: file://{}
  phase: {phase}
  pluginConfig: {{request: {{set: {{x-env: prod}}}}}}
"#,
        module.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authn_wasm_plugin_closes_the_l4_path_and_a_stats_one_does_not() {
    // An HTTP filter that authenticates cannot check raw TCP: such connections are refused
    // rather than let past it.
    let mesh = L7Mesh::start(12, &headers_plugin("AUTHN"), settings()).await;
    let mut tunnel = mesh.tunnel_as("sleep", ECHO_TCP_VIP).await;
    let _ = tunnel.write_all(b"data").await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut buf))
        .await
        .expect("the refused tunnel is closed");
    assert!(read.is_err() || buf.is_empty(), "nothing came back");
    assert_eq!(tcp_connections(&mesh, &["echo-a", "echo-b"]), 0);
    let (status, _, _) = mesh.get("/", &[]).await;
    assert_eq!(status, 200, "HTTP still passes through the filter");
    drop(mesh);

    // A STATS plugin promises nothing about access: TCP passes, as in Istio.
    let mesh = L7Mesh::start(13, &headers_plugin("STATS"), settings()).await;
    let mut tunnel = mesh.tunnel_as("sleep", ECHO_TCP_VIP).await;
    tunnel.write_all(b"data").await.unwrap();
    assert_eq!(read_n(&mut tunnel, 4).await, b"data");
}
