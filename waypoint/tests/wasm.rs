//! WasmPlugins in a real waypoint: filters built from this workspace (`cargo build --target
//! wasm32-wasip1`), loaded from `file://` URLs of WasmPlugin objects in the waypoint's
//! configuration, on real HBONE requests. Fixture: `support/l7mesh.rs`.

#[path = "support/l7mesh.rs"]
mod l7mesh;

use std::time::Duration;

use ambit_wasm_host::testing::build_filter;
use ambit_waypoint::proxy::ProxySettings;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use l7mesh::{eventually, write_config, L7Mesh, ECHO_HOST, ECHO_VIP};

/// A WasmPlugin targeting the waypoint's Gateway.
fn plugin(name: &str, package: &str, extra: &str, config: &str) -> String {
    let path = build_filter(package);
    format!(
        r#"apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: {name}, namespace: default}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
  url: file://{}
{extra}  pluginConfig: {config}
"#,
        path.display()
    )
}

fn sha256(package: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(std::fs::read(build_filter(package)).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn header_filter_rewrites_requests_and_responses_and_reloads_without_restart() {
    let headers = |value: &str| {
        plugin(
            "headers",
            "ambit-filter-headers",
            &format!("  sha256: {}\n", sha256("ambit-filter-headers")),
            &format!(
                r#"{{"request": {{"set": {{"x-test": "{value}"}}}}, "response": {{"set": {{"x-frame-options": "DENY"}}, "remove": ["x-seen-host"]}}}}"#
            ),
        )
    };
    let mesh = L7Mesh::start(30, &headers("from-wasm"), ProxySettings::default()).await;
    let (status, response, _) = mesh.get("/", &[("x-test", "from-client")]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        response["x-seen-test"], "from-wasm",
        "the upstream saw the filter's header"
    );
    assert_eq!(response["x-frame-options"], "DENY");
    assert!(
        !response.contains_key("x-seen-host"),
        "response header removed"
    );

    write_config(&mesh.config_path, &headers("reloaded"));
    eventually(|| async {
        let (_, response, _) = mesh.get("/", &[]).await;
        response["x-seen-test"] == "reloaded"
    })
    .await;
}

#[tokio::test]
async fn jwt_filter_answers_401_with_its_own_headers_and_body() {
    // RFC 7517 A.1's example P-256 key: any valid key will do, no token is presented.
    let config = r#"{"issuers": ["https://issuer.example"], "jwks": {"keys": [{"kty": "EC", "crv": "P-256", "kid": "1", "x": "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4", "y": "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"}]}}"#;
    let mesh = L7Mesh::start(
        31,
        &plugin("jwt", "ambit-filter-jwt-auth", "  phase: AUTHN\n", config),
        ProxySettings::default(),
    )
    .await;
    let (status, headers, body) = mesh.get("/orders", &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(
        headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer"),
        "{headers:?}"
    );
    assert!(mesh.pod("echo-a").paths.lock().unwrap().is_empty());
    assert!(mesh.pod("echo-b").paths.lock().unwrap().is_empty());
}

#[tokio::test]
async fn ext_authz_filter_asks_another_mesh_service_and_obeys_it() {
    let config =
        r#"{"upstream": "outbound|80||shadow.default.svc.cluster.local", "timeout_ms": 2000}"#;
    let mesh = L7Mesh::start(
        32,
        &plugin("authz", "ambit-filter-ext-authz", "", config),
        ProxySettings::default(),
    )
    .await;
    // The shadow service answers 200 to anything but /fail.
    let (status, _, body) = mesh.get("/allowed", &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.starts_with("echo-"), "served by echo: {body}");
    let (status, _, body) = mesh.get("/fail", &[]).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the authz service's answer"
    );
    assert_eq!(body, "shadow-a", "with its body");
    let asked: Vec<String> = mesh.pod("shadow-a").paths.lock().unwrap().clone();
    assert_eq!(
        asked,
        ["/allowed", "/fail"],
        "each request was checked once"
    );
}

/// Sends a POST with a JSON body through a fresh tunnel.
async fn post(
    mesh: &L7Mesh,
    path: &str,
    body: &'static str,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let io = TokioIo::new(mesh.tunnel_as("sleep", ECHO_VIP).await);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(connection);
    let request = Request::post(path)
        .header("host", ECHO_HOST)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

#[tokio::test]
async fn body_filter_pauses_until_the_end_and_rewrites_both_bodies() {
    let config = r#"{"request": {"redact": ["password"]}, "response": {"redact": ["ssn"]}}"#;
    let mesh = L7Mesh::start(
        33,
        &plugin("redact", "ambit-filter-body-transform", "", config),
        ProxySettings::default(),
    )
    .await;
    let (status, headers, _) = post(&mesh, "/", r#"{"user":"u","password":"hunter2"}"#).await;
    assert_eq!(status, StatusCode::OK);
    let expected = r#"{"password":"[REDACTED]","user":"u"}"#.len();
    assert_eq!(headers["x-seen-body-length"], expected.to_string().as_str());
    let (status, _, body) = post(&mesh, "/json", "{}").await;
    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["ssn"], "[REDACTED]", "{json}");
    assert_eq!(json["name"], "echo");
}

#[tokio::test]
async fn filter_metrics_are_on_the_waypoints_metrics_endpoint() {
    let config = r#"{"routes": [{"name": "orders", "prefix": "/orders"}]}"#;
    let mesh = L7Mesh::start(
        34,
        &plugin(
            "metrics",
            "ambit-filter-metrics",
            "  phase: STATS\n",
            config,
        ),
        ProxySettings::default(),
    )
    .await;
    for _ in 0..3 {
        let (status, _, _) = mesh.get("/orders/1", &[]).await;
        assert_eq!(status, StatusCode::OK);
    }
    let mut text = String::new();
    for _ in 0..50 {
        text = mesh.metrics().await;
        if text.contains("ambit_filter_requests_total{") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = text
        .lines()
        .find(|l| l.starts_with("ambit_filter_requests_total{") && l.contains("route=\"orders\""))
        .unwrap_or_else(|| panic!("no orders counter in:\n{text}"));
    assert!(line.contains("method=\"GET\""), "{line}");
    assert!(line.ends_with(" 3"), "{line}");
}

#[tokio::test]
async fn a_failing_filter_fails_its_requests_per_fail_strategy_and_the_waypoint_serves_on() {
    let hostile = |strategy: &str| {
        plugin(
            "hostile",
            "test-hostile",
            &format!("  failStrategy: {strategy}\n"),
            r#"{"mode": "trap"}"#,
        )
    };
    let mesh = L7Mesh::start(35, &hostile("FAIL_CLOSE"), ProxySettings::default()).await;
    for _ in 0..2 {
        let (status, _, _) = mesh.get("/", &[]).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    write_config(&mesh.config_path, &hostile("FAIL_OPEN"));
    eventually(|| async { mesh.get("/", &[]).await.0 == StatusCode::OK }).await;

    // A fail-closed plugin whose module does not match its sha256 never runs: its requests are
    // refused, not let through unfiltered.
    let wrong_digest = plugin(
        "headers",
        "ambit-filter-headers",
        &format!("  sha256: {}\n", "0".repeat(64)),
        "{}",
    );
    write_config(&mesh.config_path, &wrong_digest);
    eventually(|| async { mesh.get("/", &[]).await.0 == StatusCode::INTERNAL_SERVER_ERROR }).await;
    let (_, _, body) = mesh.get("/", &[]).await;
    assert_eq!(body, "WasmPlugin default.headers is not running");
}

#[tokio::test]
async fn rate_limit_filter_limits_each_client_identity_across_the_waypoints_vms() {
    // The default key is the client's SPIFFE identity (the HBONE peer certificate's URI SAN).
    let config = r#"{"max_tokens": 3, "tokens_per_fill": 3, "fill_interval_ms": 60000}"#;
    let mesh = L7Mesh::start(
        36,
        &plugin("limit", "ambit-filter-rate-limit", "", config),
        ProxySettings::default(),
    )
    .await;
    // Each request is a new tunnel and connection: requests land on different VMs of the
    // plugin, which share the bucket through shared data.
    for n in 0..3 {
        let (status, _, body) = mesh.get("/", &[]).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "request {n} within the burst: {body}"
        );
    }
    let (status, headers, _) = mesh.get("/", &[]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    // Another identity has its own bucket.
    let (status, _, _) = mesh.request_as("other", "GET", "/", &[]).await;
    assert_eq!(status, StatusCode::OK);
}

/// A TrafficExtension (Istio 1.30) in its Wasm form runs as the same WasmPlugin would.
#[tokio::test]
async fn a_traffic_extension_runs_its_wasm_like_a_wasm_plugin() {
    let config = format!(
        r#"apiVersion: extensions.istio.io/v1alpha1
kind: TrafficExtension
metadata: {{name: headers, namespace: default}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
  phase: EXECUTION_PHASE_STATS
  wasm:
    url: file://{}
    sha256: {}
    pluginConfig: {{"request": {{"set": {{"x-test": "from-extension"}}}}}}
"#,
        build_filter("ambit-filter-headers").display(),
        sha256("ambit-filter-headers")
    );
    let mesh = L7Mesh::start(231, &config, ProxySettings::default()).await;
    let (status, response, _) = mesh.get("/", &[("x-test", "from-client")]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(response["x-seen-test"], "from-extension");
}
