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
use l7mesh::{write_config, L7Mesh, ECHO_HOST, ECHO_VIP};

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

/// Waits for the watcher to apply a configuration: until `check` holds (or 5 s pass).
async fn eventually<F, Fut>(mut check: F)
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

/// Load on one service: `conns` keep-alive connections, each in its own tunnel, sending GETs
/// one after another (closed loop), or one per `pace` at most, until `stop`; returns each
/// request's status and latency.
async fn load(
    mesh: &L7Mesh,
    vip: &str,
    host: &'static str,
    conns: usize,
    pace: Option<Duration>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinSet<Vec<(StatusCode, Duration)>> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let io = TokioIo::new(mesh.tunnel_as("sleep", vip).await);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(connection);
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut samples = Vec::new();
            let mut ticks = pace.map(|pace| {
                let mut ticks = tokio::time::interval(pace);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticks
            });
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(ticks) = ticks.as_mut() {
                    ticks.tick().await;
                }
                let request = Request::get("/")
                    .header("host", host)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let started = std::time::Instant::now();
                let Ok(response) = sender.send_request(request).await else {
                    break;
                };
                let status = response.status();
                let _ = response.into_body().collect().await;
                samples.push((status, started.elapsed()));
            }
            samples
        });
    }
    tasks
}

/// `web`'s requests/s and p99 over `seconds` (closed loop), with `other` under load beside it;
/// and the statuses `other` got. `other`'s load is paced, so that both runs offer it the same
/// requests: closed-loop, fast failures would mean more requests, not a noisier neighbour.
async fn web_beside_loaded_other(mesh: &L7Mesh, seconds: u64) -> (f64, Duration, Vec<StatusCode>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop_other = std::sync::Arc::new(AtomicBool::new(false));
    // 8 connections at up to 50 requests/s each.
    let pace = Some(Duration::from_millis(20));
    let mut other = load(mesh, OTHER_VIP, OTHER_HOST, 8, pace, stop_other.clone()).await;
    // Let the other service's load settle (and a looping plugin's circuit open) first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stop_web = std::sync::Arc::new(AtomicBool::new(false));
    let mut web = load(mesh, ECHO_VIP, ECHO_HOST, 4, None, stop_web.clone()).await;
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop_web.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let mut latencies = Vec::new();
    while let Some(samples) = web.join_next().await {
        for (status, latency) in samples.unwrap() {
            assert_eq!(status, StatusCode::OK, "web must be served throughout");
            latencies.push(latency);
        }
    }
    stop_other.store(true, Ordering::Relaxed);
    let mut statuses = Vec::new();
    while let Some(samples) = other.join_next().await {
        statuses.extend(samples.unwrap().into_iter().map(|(status, _)| status));
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    (
        latencies.len() as f64 / elapsed.as_secs_f64(),
        p99,
        statuses,
    )
}

/// One GET on a fresh tunnel to `vip`.
async fn one_status(mesh: &L7Mesh, vip: &str, host: &str) -> StatusCode {
    let io = TokioIo::new(mesh.tunnel_as("sleep", vip).await);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(connection);
    let request = Request::get("/")
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    sender.send_request(request).await.unwrap().status()
}

const OTHER_VIP: &str = "10.96.1.11:80";
const OTHER_HOST: &str = "echo-v2.default.svc.cluster.local";

/// Issue 21's noisy neighbour: a WasmPlugin looping in `proxy_on_request_headers` on service
/// `other` (echo-v2), under load, beside the same run without it. The loop may cost `other`'s
/// requests (500 per failStrategy, fast once its circuit opens) but not `web`'s rate or p99.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_filter_on_one_service_leaves_another_services_rate_and_p99_alone() {
    let looping = format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: looping, \
         namespace: default}}\nspec:\n  targetRefs: [{{kind: Service, group: \"\", name: \
         echo-v2}}]\n  url: file://{}\n  failStrategy: FAIL_CLOSE\n  pluginConfig: {{\"mode\": \
         \"loop\"}}\n",
        build_filter("test-hostile").display()
    );
    let mesh = L7Mesh::start(173, "", ProxySettings::default()).await;
    let seconds = 3;
    let (clean_rate, clean_p99, statuses) = web_beside_loaded_other(&mesh, seconds).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK));

    write_config(&mesh.config_path, &looping);
    eventually(|| async {
        one_status(&mesh, OTHER_VIP, OTHER_HOST).await == StatusCode::INTERNAL_SERVER_ERROR
    })
    .await;
    let (rate, p99, statuses) = web_beside_loaded_other(&mesh, seconds).await;
    assert!(statuses
        .iter()
        .all(|s| *s == StatusCode::INTERNAL_SERVER_ERROR));

    let opened = mesh
        .counter("ambit_wasm_plugin_circuit_opened_total", &["looping"])
        .await;
    assert!(opened >= 1, "the looping plugin's circuit never opened");

    // Clean again: the two clean runs bracket the looping one, so the machine's drift (other
    // tests, other builds) is in the baseline, not in the ratio.
    write_config(&mesh.config_path, "");
    eventually(|| async { one_status(&mesh, OTHER_VIP, OTHER_HOST).await == StatusCode::OK }).await;
    let (again_rate, again_p99, _) = web_beside_loaded_other(&mesh, seconds).await;
    println!(
        "web beside a loaded other: clean {clean_rate:.0} req/s p99 {clean_p99:?}; with a \
         looping filter on other {rate:.0} req/s p99 {p99:?} ({} answers to other); clean \
         again {again_rate:.0} req/s p99 {again_p99:?}",
        statuses.len()
    );
    let clean_rate = clean_rate.min(again_rate);
    let clean_p99 = clean_p99.max(again_p99);
    assert!(
        rate >= clean_rate * 0.8,
        "web's rate fell from {clean_rate:.0} to {rate:.0} req/s"
    );
    assert!(
        p99.as_secs_f64() <= clean_p99.as_secs_f64() * 1.2,
        "web's p99 rose from {clean_p99:?} to {p99:?}"
    );
}
