//! HTTPRoute through a real waypoint: weighted backends, header matches, redirects, rewrites,
//! header modifiers, mirrors, retries, timeouts, no-match answers, configuration reloads,
//! upstream keep-alive and protocol upgrades. Fixture: `support/l7mesh.rs`.

#[path = "support/l7mesh.rs"]
mod l7mesh;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ambit_waypoint::l7::EMPTY_CONFIG;
use ambit_waypoint::proxy::ProxySettings;
use hyper::StatusCode;
use l7mesh::{echo_route, write_config, L7Mesh, ECHO_HOST, ECHO_VIP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn weighted_backends_split_traffic_80_20() {
    let config = echo_route(
        "split",
        "  - backendRefs:\n    - {name: echo, port: 80, weight: 80}\n    - {name: echo-v2, port: 80, weight: 20}\n",
    );
    let mesh = L7Mesh::start(1, &config, ProxySettings::default()).await;
    let total = 250;
    let mut v2 = 0;
    for _ in 0..total {
        let (status, _, body) = mesh.get("/", &[]).await;
        assert_eq!(status, StatusCode::OK);
        if body == "echo-c" {
            v2 += 1;
        } else {
            assert!(body == "echo-a" || body == "echo-b", "{body}");
        }
    }
    let share = f64::from(v2) / f64::from(total);
    assert!(
        (0.12..=0.28).contains(&share),
        "echo-v2 got {v2} of {total}"
    );
}

#[tokio::test]
async fn header_match_routes_to_another_service_and_unmatched_is_404() {
    let config = echo_route(
        "by-header",
        r#"  - matches: [{headers: [{name: x-version, value: v2}], path: {type: PathPrefix, value: /app}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /app}}]
    backendRefs: [{name: echo, port: 80}]
"#,
    );
    let mesh = L7Mesh::start(2, &config, ProxySettings::default()).await;
    let (status, _, body) = mesh.get("/app/x", &[("x-version", "v2")]).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "echo-c"));
    let (status, _, body) = mesh.get("/app/x", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == "echo-a" || body == "echo-b", "{body}");
    // Routes exist for the service and none matches: Envoy's 404 with flag NR.
    let (status, _, _) = mesh.get("/other", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        mesh.wait_requests_total(&["response_code=\"404\"", "response_flags=\"NR\""], 1)
            .await,
        1
    );
    assert_eq!(
        mesh.wait_requests_total(&["response_code=\"200\"", "reporter=\"waypoint\""], 2)
            .await,
        2
    );
}

#[tokio::test]
async fn redirects_answer_with_status_and_location() {
    let config = echo_route(
        "redirects",
        r#"  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {hostname: new.example, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
  - matches: [{path: {type: Exact, value: /secure}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https}
"#,
    );
    let mesh = L7Mesh::start(3, &config, ProxySettings::default()).await;
    let (status, headers, _) = mesh.get("/old/page?x=1", &[]).await;
    assert_eq!(status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(headers["location"], "http://new.example/new/page?x=1");
    let (status, headers, _) = mesh.get("/secure", &[]).await;
    assert_eq!(status, StatusCode::FOUND);
    assert_eq!(headers["location"], format!("https://{ECHO_HOST}/secure"));
    // Nothing reached a pod.
    assert!(mesh.pods.iter().all(|p| p.paths.lock().unwrap().is_empty()));
}

#[tokio::test]
async fn rewrite_and_header_modifiers_reach_the_backend() {
    let config = echo_route(
        "rewrite",
        r#"  - matches: [{path: {type: PathPrefix, value: /api/v1}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-test, value: set-by-route}], remove: [x-drop]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-route, value: rewrite}], remove: [x-seen-body-length]}
"#,
    );
    let mesh = L7Mesh::start(4, &config, ProxySettings::default()).await;
    let (status, headers, _) = mesh
        .get(
            "/api/v1/items?id=3",
            &[("x-test", "from-client"), ("x-drop", "1")],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-seen-path"], "/v2/items?id=3");
    assert_eq!(headers["x-seen-host"], "rewritten.example");
    assert_eq!(headers["x-seen-test"], "set-by-route");
    assert_eq!(headers["x-route"], "rewrite");
    assert!(!headers.contains_key("x-seen-body-length"));
}

#[tokio::test]
async fn configured_retry_on_503_succeeds_and_default_policy_does_not_retry_503() {
    let config = echo_route(
        "retry",
        r#"  - matches: [{path: {type: Exact, value: /flaky}, queryParams: [{name: retry, value: "yes"}]}]
    retry: {codes: [503], attempts: 2, backoff: 10ms}
  - matches: [{path: {type: PathPrefix, value: /}}]
"#,
    );
    let mesh = L7Mesh::start(5, &config, ProxySettings::default()).await;
    mesh.failures.store(2, Ordering::SeqCst);
    let (status, _, _) = mesh.get("/flaky?retry=yes", &[]).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "two 503s, then success on the third attempt"
    );
    assert_eq!(mesh.failures.load(Ordering::SeqCst), 0);
    // Three attempts reached the pods: both endpoints were tried.
    let attempts: usize = mesh
        .pods
        .iter()
        .map(|p| {
            p.paths
                .lock()
                .unwrap()
                .iter()
                .filter(|x| x.starts_with("/flaky"))
                .count()
        })
        .sum();
    assert_eq!(attempts, 3);
    // Istio's default policy does not retry a 503 (since 1.24).
    mesh.failures.store(1, Ordering::SeqCst);
    let (status, _, _) = mesh.get("/flaky", &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // More failures than attempts: the last 503 is the answer, flagged URX.
    mesh.failures.store(5, Ordering::SeqCst);
    let (status, _, _) = mesh.get("/flaky?retry=yes", &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        mesh.wait_requests_total(&["response_code=\"503\"", "response_flags=\"URX\""], 1)
            .await,
        1
    );
}

#[tokio::test]
async fn hanging_backend_hits_per_try_and_request_timeouts() {
    let config = echo_route(
        "timeouts",
        r#"  - matches: [{path: {type: Exact, value: /slow}, headers: [{name: x-case, value: per-try}]}]
    timeouts: {backendRequest: 200ms}
  - matches: [{path: {type: Exact, value: /slow}, headers: [{name: x-case, value: retried}]}]
    timeouts: {request: 900ms, backendRequest: 150ms}
    retry: {codes: [504], attempts: 2, backoff: 5ms}
  - matches: [{path: {type: Exact, value: /slow}}]
    timeouts: {request: 300ms}
"#,
    );
    let mesh = L7Mesh::start(6, &config, ProxySettings::default()).await;
    let started = Instant::now();
    let (status, _, body) = mesh.get("/slow", &[("x-case", "per-try")]).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body, "upstream request timeout");
    assert!(started.elapsed() < Duration::from_millis(1500));
    let (status, _, _) = mesh.get("/slow", &[]).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    // Per-try timeouts are retried under a configured policy: three attempts of 150 ms.
    let started = Instant::now();
    let (status, _, _) = mesh.get("/slow", &[("x-case", "retried")]).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() >= Duration::from_millis(440));
    let attempts: usize = mesh
        .pods
        .iter()
        .map(|p| p.paths.lock().unwrap().len())
        .sum();
    assert_eq!(attempts, 5, "1 + 1 + 3 attempts");
    let count = mesh
        .wait_requests_total(&["response_code=\"504\"", "response_flags=\"UT"], 3)
        .await;
    assert_eq!(count, 3);
}

#[tokio::test]
async fn mirror_sends_a_copy_to_another_service() {
    let config = echo_route(
        "mirror",
        r#"  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 80}}
"#,
    );
    let mesh = L7Mesh::start(7, &config, ProxySettings::default()).await;
    let (status, _, body) = mesh.get("/mirrored?q=1", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == "echo-a" || body == "echo-b", "{body}");
    let shadow = mesh.pod("shadow-a");
    for _ in 0..100 {
        if !shadow.paths.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        *shadow.paths.lock().unwrap(),
        vec!["/mirrored?q=1".to_owned()]
    );
}

#[tokio::test]
async fn config_reload_applies_new_routes_and_a_broken_file_keeps_the_old_ones() {
    let mesh = L7Mesh::start(8, EMPTY_CONFIG, ProxySettings::default()).await;
    let (status, _, body) = mesh.get("/", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(body, "echo-c");
    // A route to echo-v2, picked up without a restart.
    let to_v2 = echo_route("to-v2", "  - backendRefs: [{name: echo-v2, port: 80}]\n");
    write_config(&mesh.config_path, &to_v2);
    let mut routed = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if mesh.get("/", &[]).await.2 == "echo-c" {
            routed = true;
            break;
        }
    }
    assert!(routed, "the new route was never applied");
    // A misspelt field: refused, the previous routes stay.
    let broken = to_v2.replace("backendRefs", "backendRefz");
    write_config(&mesh.config_path, &broken);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for _ in 0..5 {
        assert_eq!(mesh.get("/", &[]).await.2, "echo-c");
    }
    // Routes removed: the service itself again.
    write_config(&mesh.config_path, EMPTY_CONFIG);
    let mut back = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if mesh.get("/", &[]).await.2 != "echo-c" {
            back = true;
            break;
        }
    }
    assert!(back, "removing the route had no effect");
}

#[tokio::test]
async fn upstream_connections_are_kept_alive() {
    let mesh = L7Mesh::start(9, EMPTY_CONFIG, ProxySettings::default()).await;
    let requests = 8;
    for _ in 0..requests {
        assert_eq!(mesh.get("/", &[]).await.0, StatusCode::OK);
        // Let the finished connection go back to the pool.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tunnels: usize = mesh
        .pods
        .iter()
        .map(|p| p.forwarder.seen.lock().unwrap().len())
        .sum();
    assert_eq!(tunnels, 2, "one kept-alive connection per endpoint");
}

#[tokio::test]
async fn websocket_style_upgrade_is_passed_through() {
    let mesh = L7Mesh::start(10, EMPTY_CONFIG, ProxySettings::default()).await;
    let mut tunnel = mesh.tunnel_as("sleep", ECHO_VIP).await;
    tunnel
        .write_all(
            format!(
                "GET /ws HTTP/1.1\r\nhost: {ECHO_HOST}\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(5), tunnel.read_exact(&mut byte))
            .await
            .expect("101 in time")
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    tunnel.write_all(b"ping over the upgrade").await.unwrap();
    let mut echoed = [0u8; 21];
    tokio::time::timeout(Duration::from_secs(5), tunnel.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&echoed, b"ping over the upgrade");
}
