//! L7 AuthorizationPolicy through a real waypoint: DENY on a path, ALLOW by principal, policies
//! for other Gateways ignored, denials counted with flag `RBAC`, a DENY kept through a broken or
//! missing configuration file, `ipBlocks` on an address only a peer that may claim it gets.
//! Fixture: `support/l7mesh.rs`.

#[path = "support/l7mesh.rs"]
mod l7mesh;

use std::io::Write;
use std::time::{Duration, Instant};

use ambit_waypoint::l7::EMPTY_CONFIG;
use ambit_waypoint::proxy::ProxySettings;
use hyper::StatusCode;
use l7mesh::{write_config, L7Mesh, CLIENT_ADDR, ECHO_VIP};

const DENY_ADMIN: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"], methods: ["GET", "POST"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: someone-elses, namespace: default}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: other-waypoint}]
  action: DENY
  rules: [{}]
"#;

#[tokio::test]
async fn deny_on_a_path_is_403_and_other_paths_pass() {
    let mesh = L7Mesh::start(20, DENY_ADMIN, ProxySettings::default()).await;
    let (status, headers, body) = mesh.get("/admin/users", &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body, "RBAC: access denied");
    assert_eq!(headers["content-type"], "text/plain");
    // Dot segments are resolved before matching.
    let (status, _, _) = mesh.get("/public/../admin", &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, body) = mesh.get("/public", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("echo-"), "{body}");
    // Denied requests never reached a pod.
    let reached: Vec<String> = mesh
        .pods
        .iter()
        .flat_map(|p| p.paths.lock().unwrap().clone())
        .collect();
    assert_eq!(reached, vec!["/public".to_owned()]);
    assert_eq!(
        mesh.wait_requests_total(
            &[
                "response_code=\"403\"",
                "response_flags=\"RBAC\"",
                "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
                "destination_service=\"echo.default.svc.cluster.local\"",
            ],
            2
        )
        .await,
        2
    );
    assert_eq!(
        mesh.wait_requests_total(&["response_code=\"200\""], 1)
            .await,
        1
    );
}

#[tokio::test]
async fn allow_by_principal_on_the_service() {
    let config = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-sleep, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
  - from: [{source: {namespaces: ["default"]}}]
    to: [{operation: {methods: ["HEAD"]}}]
    when: [{key: "request.headers[x-ticket]", values: ["ok-*"]}]
"#;
    let mesh = L7Mesh::start(21, config, ProxySettings::default()).await;
    assert_eq!(
        mesh.request_as("sleep", "GET", "/", &[]).await.0,
        StatusCode::OK
    );
    let (status, _, body) = mesh.request_as("intruder", "GET", "/", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::FORBIDDEN, "RBAC: access denied")
    );
    // The second rule: any workload of the namespace, HEAD only, with a ticket header.
    assert_eq!(
        mesh.request_as("intruder", "HEAD", "/", &[("x-ticket", "ok-123")])
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        mesh.request_as("intruder", "HEAD", "/", &[("x-ticket", "bad")])
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        mesh.wait_requests_total(
            &[
                "response_code=\"403\"",
                "source_principal=\"spiffe://cluster.local/ns/default/sa/intruder\""
            ],
            2
        )
        .await,
        2
    );
}

/// The configuration file is a safety boundary: whatever happens to it, a waypoint never serves
/// without the policies it last had. Emptied, cut mid-token, deleted, or caught half-written by a
/// slow writer (where the half would be a DENY with no rules, which denies nothing), the DENY
/// still answers 403. The explicit empty configuration does take effect.
#[tokio::test]
async fn deny_survives_an_emptied_deleted_or_truncated_config() {
    let mesh = L7Mesh::start(57, DENY_ADMIN, ProxySettings::default()).await;
    let still_denies = async |what: &str| {
        assert_eq!(
            mesh.get("/admin/users", &[]).await.0,
            StatusCode::FORBIDDEN,
            "after {what}"
        );
        assert_eq!(
            mesh.get("/public", &[]).await.0,
            StatusCode::OK,
            "after {what}"
        );
    };
    still_denies("start").await;
    // Two poll intervals and more: each bad file had every chance to be taken.
    let settle = Duration::from_millis(1600);
    let cut = DENY_ADMIN.find("/admin*").expect("the denied path") + 3;
    for (what, text) in [
        ("emptied", ""),
        ("comments only", "# regenerated below\n---\n"),
        ("cut mid-token", &DENY_ADMIN[..cut]),
    ] {
        // In place, as `cat >` or an editor would.
        std::fs::write(&mesh.config_path, text).unwrap();
        tokio::time::sleep(settle).await;
        still_denies(what).await;
    }
    std::fs::remove_file(&mesh.config_path).unwrap();
    tokio::time::sleep(settle).await;
    still_denies("deleted").await;

    // A slow writer: the first half (a valid DENY without its rules) stands for less than a poll
    // interval before the rest follows; requests all along are denied.
    let half = DENY_ADMIN.find("  rules:").expect("rules");
    let mut file = std::fs::File::create(&mesh.config_path).unwrap();
    file.write_all(&DENY_ADMIN.as_bytes()[..half]).unwrap();
    let writer = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        file.write_all(&DENY_ADMIN.as_bytes()[half..]).unwrap();
    };
    let requests = async {
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            still_denies("half a write").await;
        }
    };
    tokio::join!(writer, requests);

    // Nothing to enforce, on purpose: taken.
    write_config(&mesh.config_path, EMPTY_CONFIG);
    let deadline = Instant::now() + Duration::from_secs(5);
    while mesh.get("/admin/users", &[]).await.0 != StatusCode::OK {
        assert!(
            Instant::now() < deadline,
            "the explicit empty configuration was not taken"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `ipBlocks` sees the `forwarded: for` address only when the peer's identity is that of the
/// workload at the address: `sleep` (10.9.9.9) is allowed by its address, `intruder`, claiming
/// the same address with another mesh certificate, is judged by where it really connects from
/// (127.0.0.1) and refused. `sleep` without a claim is judged by its connection too.
#[tokio::test]
async fn forwarded_for_counts_only_from_a_peer_that_may_claim_it() {
    let config = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: sleep-subnet, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  action: ALLOW
  rules:
  - from: [{source: {ipBlocks: ["10.9.9.0/24"]}}]
"#;
    let mesh = L7Mesh::start(22, config, ProxySettings::default()).await;
    let claim = Some(CLIENT_ADDR.parse().unwrap());
    let request = |sa: &'static str, claim| {
        let mesh = &mesh;
        async move {
            let tunnel = mesh.tunnel_claiming(sa, ECHO_VIP, claim).await;
            L7Mesh::request_on(tunnel, "GET", "/", &[]).await
        }
    };
    let (status, _, body) = request("sleep", claim).await;
    assert_eq!(
        (status, body.starts_with("echo-")),
        (StatusCode::OK, true),
        "{body}"
    );
    let (status, _, body) = request("intruder", claim).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::FORBIDDEN, "RBAC: access denied")
    );
    assert_eq!(request("sleep", None).await.0, StatusCode::FORBIDDEN);
    // The forged claim did not reach the pod either: it saw only sleep's request.
    let reached: usize = mesh
        .pods
        .iter()
        .map(|p| p.paths.lock().unwrap().len())
        .sum();
    assert_eq!(reached, 1);
    assert_eq!(
        mesh.wait_requests_total(
            &[
                "response_code=\"403\"",
                "source_principal=\"spiffe://cluster.local/ns/default/sa/intruder\""
            ],
            1
        )
        .await,
        1
    );
}
