//! gRPC through the waypoint with real Python `grpcio` peers: the client's HTTP/2 goes through
//! HBONE to the waypoint, which speaks HTTP/2 to the `grpcio` server behind the pod's HBONE
//! server. Needs `python3` with `grpcio` (`pip install grpcio`); without it the tests fail.
//! Fixture: `support/l7mesh.rs`, Python peers: `support/grpc_peer.py`.

#[path = "support/l7mesh.rs"]
mod l7mesh;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_waypoint::proxy::ProxySettings;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use l7mesh::{grpc_client, L7Mesh, GRPC_SNIFFED_VIP, GRPC_VIP};

/// Test networks (`127.78.<net>.*`), one per test, apart from the other test files' nets.
async fn mesh(net: u8) -> Arc<L7Mesh> {
    mesh_with(net, "").await
}

async fn mesh_with(net: u8, config: &str) -> Arc<L7Mesh> {
    Arc::new(L7Mesh::start(net, config, ProxySettings::default()).await)
}

#[tokio::test]
async fn five_hundred_unary_calls_on_the_declared_and_the_sniffed_port() {
    let mesh = mesh(60).await;
    let _pod = mesh.start_grpc_pod(&[]).await;
    for vip in [GRPC_VIP, GRPC_SNIFFED_VIP] {
        let (entry, _task) = mesh.entry(vip).await;
        let result = grpc_client(entry, &["unary", "500"]).await;
        eprintln!("{vip}: {result}");
        assert_eq!(result["ok"], 500, "{vip}: {result}");
        assert_eq!(result["names"]["grpc-a"], 500, "{vip}: {result}");
    }
    let grpc = "request_protocol=\"grpc\"";
    let ok = "grpc_response_status=\"0\"";
    assert_eq!(
        mesh.wait_requests_total(&[grpc, ok, "response_code=\"200\""], 1000)
            .await,
        1000
    );
}

#[tokio::test]
async fn a_server_stream_delivers_its_first_message_before_it_ends() {
    let mesh = mesh(61).await;
    let _pod = mesh.start_grpc_pod(&[]).await;
    let (entry, _task) = mesh.entry(GRPC_VIP).await;
    let result = grpc_client(entry, &["stream"]).await;
    eprintln!("{result}");
    assert_eq!(result["messages"], serde_json::json!(["first", "last"]));
    let first = result["first_at"].as_f64().unwrap();
    let end = result["end_at"].as_f64().unwrap();
    // The server waits 1.5 s between its two messages: a proxy that buffered the response
    // would hand both over together.
    assert!(
        end - first > 1.0,
        "first message at {first:.3} s, stream end at {end:.3} s"
    );
}

#[tokio::test]
async fn a_bidirectional_stream_echoes_a_thousand_messages() {
    let mesh = mesh(62).await;
    let _pod = mesh.start_grpc_pod(&[]).await;
    let (entry, _task) = mesh.entry(GRPC_VIP).await;
    let result = grpc_client(entry, &["bidi", "1000"]).await;
    eprintln!("{result}");
    assert_eq!(result["sent"], 1000);
    assert_eq!(result["echoed"], 1000);
    assert_eq!(result["in_order"], true);
    // Istio's gRPC message counts, one call's worth each way.
    let bidi = "grpc_response_status=\"0\"";
    assert_eq!(mesh.wait_requests_total(&[bidi], 1).await, 1);
    for name in [
        "istio_request_messages_total",
        "istio_response_messages_total",
    ] {
        assert_eq!(mesh.counter(name, &[bidi]).await, 1000, "{name}");
    }
}

#[tokio::test]
async fn a_client_cancelling_a_stream_cancels_it_at_the_server() {
    let mesh = mesh(68).await;
    let _pod = mesh.start_grpc_pod(&[]).await;
    let (entry, _task) = mesh.entry(GRPC_VIP).await;
    let marker = std::env::temp_dir().join(format!("ambit-grpc-cancelled-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let result = grpc_client(entry, &["cancel", marker.to_str().unwrap()]).await;
    assert_eq!(result["first"], "first", "{result}");
    // The client's RST_STREAM reaches the server through the waypoint: the handler sees its
    // call end (it would otherwise wait 20 s) and leaves the marker.
    let mut seen = false;
    for _ in 0..100 {
        if marker.exists() {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_file(&marker);
    assert!(seen, "the server never saw the cancellation");
}

#[tokio::test]
async fn connections_the_server_closes_with_goaway_are_replaced_without_failing_calls() {
    let mesh = mesh(63).await;
    // The server ends every connection after 300 ms (GOAWAY, then a grace period).
    let _pod = mesh
        .start_grpc_pod(&["--max-connection-age-ms", "300"])
        .await;
    let (entry, _task) = mesh.entry(GRPC_VIP).await;
    let result = grpc_client(entry, &["unary", "500"]).await;
    eprintln!("{result}");
    assert_eq!(result["ok"], 500, "{result}");
    let seconds = result["seconds"].as_f64().unwrap();
    assert!(
        seconds > 0.6,
        "the calls took {seconds:.2} s: too quick to have seen a GOAWAY"
    );
}

const DENY_UNARY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-unary, namespace: default}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/test.Echo/Unary"]}}]
"#;

#[tokio::test]
async fn a_denied_call_gets_permission_denied_and_other_methods_pass() {
    let mesh = mesh_with(64, DENY_UNARY).await;
    let _pod = mesh.start_grpc_pod(&[]).await;
    let (entry, _task) = mesh.entry(GRPC_VIP).await;
    let denied = grpc_client(entry, &["call", "Unary"]).await;
    assert_eq!(denied["code"], "PERMISSION_DENIED", "{denied}");
    assert_eq!(denied["details"], "RBAC: access denied", "{denied}");
    let allowed = grpc_client(entry, &["call", "Slow", "-", "ok"]).await;
    assert_eq!(allowed["code"], "OK", "{allowed}");
    assert_eq!(allowed["answer"], "grpc-a:ok", "{allowed}");
    // Istio's labels: the reply is HTTP 200 (trailers-only), the status is gRPC's.
    let labels = [
        "request_protocol=\"grpc\"",
        "response_code=\"200\"",
        "grpc_response_status=\"7\"",
        "response_flags=\"RBAC\"",
    ];
    assert_eq!(mesh.wait_requests_total(&labels, 1).await, 1);
}

#[tokio::test]
async fn unavailable_once_is_retried_by_the_default_policy() {
    let mesh = mesh(65).await;
    let _pod = mesh.start_grpc_pod(&[]).await;
    let (entry, _task) = mesh.entry(GRPC_VIP).await;
    // The handler answers UNAVAILABLE while the marker file exists, removing it.
    let marker =
        std::env::temp_dir().join(format!("ambit-grpc-unavailable-{}", std::process::id()));
    std::fs::write(&marker, "").unwrap();
    let marker = marker.to_str().unwrap();
    let result = grpc_client(entry, &["call", "Unavailable", "-", marker]).await;
    assert_eq!(result["code"], "OK", "{result}");
    assert_eq!(result["answer"], format!("grpc-a:{marker}"));
    assert!(
        !std::path::Path::new(marker).exists(),
        "the first attempt never reached the server"
    );
    // Without the marker the call is answered at once: one request, no retry in the metrics.
    assert_eq!(
        mesh.wait_requests_total(&["grpc_response_status=\"0\""], 1)
            .await,
        1
    );
    assert_eq!(
        mesh.requests_total(&["grpc_response_status=\"14\""]).await,
        0
    );
}

/// A client stream that has not ended when its first attempt fails: the retry replays what
/// was sent so far and then streams the rest, and the server sees the whole stream once.
#[tokio::test]
async fn a_retry_replays_a_client_stream_that_has_not_ended() {
    let mesh = mesh(72).await;
    let _pod = mesh.start_grpc_pod(&[]).await;
    let (entry, _task) = mesh.entry(GRPC_VIP).await;
    let marker = std::env::temp_dir().join(format!("ambit-grpc-collect-{}", std::process::id()));
    std::fs::write(&marker, "").unwrap();
    // 20 messages of 100 bytes, 20 ms apart: the server fails the first attempt after the first
    // message, some 380 ms before the client's stream ends.
    let args = ["collect", "20", "100", "20", marker.to_str().unwrap()];
    let result = grpc_client(entry, &args).await;
    assert_eq!(result["code"], "OK", "{result}");
    assert_eq!(result["answer"], "20:2000", "{result}");
    assert!(
        !marker.exists(),
        "the first attempt never reached the server"
    );
    assert_eq!(
        mesh.wait_requests_total(&["grpc_response_status=\"0\""], 1)
            .await,
        1
    );
    assert_eq!(
        mesh.counter("istio_request_messages_total", &[]).await,
        20,
        "the client's messages, counted once however often they were sent"
    );
}

/// A client stream that outgrew the retry buffer (64 KiB) before its first attempt failed is
/// not retried: the client gets the server's own `UNAVAILABLE`, never a stream with a hole.
#[tokio::test]
async fn a_client_stream_past_the_retry_buffer_gets_the_servers_unavailable() {
    let mesh = mesh(73).await;
    let _pod = mesh.start_grpc_pod(&[]).await;
    let (entry, _task) = mesh.entry(GRPC_VIP).await;
    let marker = std::env::temp_dir().join(format!("ambit-grpc-overflow-{}", std::process::id()));
    std::fs::write(&marker, "").unwrap();
    // The server reads two 40 KB messages (80 KB read by then) before it fails the attempt.
    let args = [
        "collect",
        "4",
        "40000",
        "100",
        marker.to_str().unwrap(),
        "2",
    ];
    let result = grpc_client(entry, &args).await;
    assert_eq!(result["code"], "UNAVAILABLE", "{result}");
    assert_eq!(result["details"], "try again", "{result}");
    assert!(!marker.exists());
    assert_eq!(
        mesh.wait_requests_total(&["grpc_response_status=\"14\""], 1)
            .await,
        1
    );
}

/// Past `h2_max_concurrent_streams` streams on its upstream connection, a request goes on
/// another connection instead of queueing: six 2 s calls to a server that takes two streams per
/// connection at a time all run at once over three connections.
#[tokio::test]
async fn streams_past_the_per_connection_cap_go_on_another_connection() {
    let settings = ProxySettings {
        h2_max_concurrent_streams: 2,
        ..ProxySettings::default()
    };
    let mesh = Arc::new(L7Mesh::start(74, "", settings).await);
    let _pod = mesh
        .start_grpc_pod(&["--max-concurrent-streams", "2"])
        .await;
    let started = Instant::now();
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let mesh = mesh.clone();
            tokio::spawn(async move { raw_call(&mesh, GRPC_VIP, "/test.Echo/Slow", &[]).await })
        })
        .collect();
    for call in calls {
        let (status, headers, _) = call.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(headers["grpc-status"], "0", "{headers:?}");
    }
    let took = started.elapsed();
    eprintln!("six 2 s calls, two streams per upstream connection: {took:?}");
    assert!(
        took < Duration::from_millis(3500),
        "the calls queued behind the server's two streams per connection: {took:?}"
    );
}

/// One gRPC call over HTTP/2 through a tunnel to `vip`, with `headers` added: the response's
/// status, its headers, and how long it took.
async fn raw_call(
    mesh: &L7Mesh,
    vip: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (http::StatusCode, http::HeaderMap, Duration) {
    let io = TokioIo::new(mesh.tunnel_as("sleep", vip).await);
    let (mut sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(connection);
    // One length-prefixed, uncompressed message: "x".
    let message = Bytes::from_static(&[0, 0, 0, 0, 1, b'x']);
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://grpc.default.svc.cluster.local:50051{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let start = Instant::now();
    let response = sender
        .send_request(request.body(Full::new(message)).unwrap())
        .await
        .expect("a response");
    let (parts, body) = response.into_parts();
    let mut headers = parts.headers;
    if let Some(trailers) = body.collect().await.unwrap().trailers() {
        headers.extend(trailers.clone());
    }
    (parts.status, headers, start.elapsed())
}

#[tokio::test]
async fn grpc_timeout_against_a_slow_handler_is_deadline_exceeded_in_about_that_time() {
    let mesh = mesh(66).await;
    let _pod = mesh.start_grpc_pod(&[]).await;
    // The same slow call without a deadline, for scale: the handler takes 2 s.
    let (status, headers, slow) = raw_call(&mesh, GRPC_VIP, "/test.Echo/Slow", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["grpc-status"], "0");
    let (status, headers, elapsed) = raw_call(
        &mesh,
        GRPC_VIP,
        "/test.Echo/Slow",
        &[("grpc-timeout", "100m")],
    )
    .await;
    eprintln!("grpc-timeout 100m: {elapsed:?} (without: {slow:?})");
    assert_eq!(status, 200, "trailers-only, as Envoy answers gRPC");
    assert_eq!(
        headers["grpc-status"], "4",
        "DEADLINE_EXCEEDED: {headers:?}"
    );
    assert_eq!(headers["content-type"], "application/grpc");
    assert!(elapsed >= Duration::from_millis(100), "{elapsed:?}");
    assert!(
        elapsed * 4 < slow,
        "{elapsed:?} against {slow:?} without a deadline"
    );
    let labels = ["grpc_response_status=\"4\"", "response_flags=\"UT\""];
    assert_eq!(mesh.wait_requests_total(&labels, 1).await, 1);
}

#[tokio::test]
async fn grpc_timeout_ends_a_stream_already_under_way() {
    let mesh = mesh(69).await;
    let _pod = mesh.start_grpc_pod(&[]).await;
    // The stream's first message comes at once, its last after 1.5 s: the deadline falls
    // between them, after the response headers went out.
    let (status, headers, elapsed) = raw_call(
        &mesh,
        GRPC_VIP,
        "/test.Echo/Stream",
        &[("grpc-timeout", "500m")],
    )
    .await;
    eprintln!("grpc-timeout 500m on a 1.5 s stream: {elapsed:?}");
    assert_eq!(status, 200);
    assert_eq!(headers["grpc-status"], "4", "{headers:?}");
    assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(1400), "{elapsed:?}");
    let labels = ["grpc_response_status=\"4\"", "response_code=\"200\""];
    assert_eq!(mesh.wait_requests_total(&labels, 1).await, 1);
}

#[tokio::test]
async fn a_grpc_client_on_a_port_without_endpoints_gets_unavailable() {
    let mesh = mesh(67).await;
    // No gRPC pod: the endpoint refuses the connection.
    let (status, headers, _) = raw_call(&mesh, GRPC_VIP, "/test.Echo/Unary", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["grpc-status"], "14", "UNAVAILABLE: {headers:?}");
    assert!(
        headers["grpc-message"]
            .to_str()
            .unwrap()
            .starts_with("upstream connect error"),
        "{headers:?}"
    );
}

#[tokio::test]
async fn the_headers_wasm_filter_works_on_grpc_calls_and_streams() {
    let module = ambit_wasm_host::testing::build_filter("ambit-filter-headers");
    let config = format!(
        r#"apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: headers, namespace: default}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
  url: file://{}
  pluginConfig: {{request: {{set: {{x-test: from-wasm}}}}, response: {{set: {{x-wasm: seen}}}}}}
"#,
        module.display()
    );
    let mesh = mesh_with(70, &config).await;
    let _pod = mesh.start_grpc_pod(&[]).await;
    let (status, headers, _) = raw_call(&mesh, GRPC_VIP, "/test.Echo/Unary", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["grpc-status"], "0", "{headers:?}");
    assert_eq!(headers["x-wasm"], "seen", "the filter's response header");
    assert_eq!(
        headers["x-seen-test"], "from-wasm",
        "the filter's request header"
    );
    // A stream's messages pass through the filter's body callbacks both ways, framing intact.
    let (entry, _task) = mesh.entry(GRPC_VIP).await;
    let result = grpc_client(entry, &["bidi", "1000"]).await;
    assert_eq!(result["echoed"], 1000, "{result}");
    assert_eq!(result["in_order"], true, "{result}");
}

const GRPC_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: by-method, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: grpc, port: 50051}]
  rules:
  - matches: [{method: {service: test.Echo}}]
    backendRefs: [{name: grpc, port: 50051}]
  - matches: [{method: {service: test.Echo, method: Unary}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-test, value: unary-rule}]}
    backendRefs: [{name: grpc, port: 50051}]
"#;

#[tokio::test]
async fn a_grpc_route_routes_by_method_with_gateway_api_precedence() {
    let mesh = mesh_with(71, GRPC_ROUTE).await;
    let _pod = mesh.start_grpc_pod(&[]).await;
    // The exact method match wins over the service-wide one written before it.
    let (_, headers, _) = raw_call(&mesh, GRPC_VIP, "/test.Echo/Unary", &[]).await;
    assert_eq!(headers["grpc-status"], "0", "{headers:?}");
    assert_eq!(headers["x-seen-test"], "unary-rule", "{headers:?}");
    // Other methods of the service take the service-wide rule, without the filter.
    let (entry, _task) = mesh.entry(GRPC_VIP).await;
    let other = grpc_client(entry, &["call", "Slow", "-", "other"]).await;
    assert_eq!(other["code"], "OK", "{other}");
    assert_eq!(other["trailers"].get("x-seen-test"), None, "{other}");
    // No rule for another service: Envoy's 404 (NR) is gRPC's UNIMPLEMENTED.
    let (status, headers, _) = raw_call(&mesh, GRPC_VIP, "/other.Service/Call", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["grpc-status"], "12", "{headers:?}");
    let labels = ["grpc_response_status=\"12\"", "response_flags=\"NR\""];
    assert_eq!(mesh.wait_requests_total(&labels, 1).await, 1);
}
