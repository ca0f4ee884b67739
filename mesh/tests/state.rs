//! The state model and its local YAML source: Istio's file format, lookups, load spreading,
//! validation errors, and reloads that never replace good state with bad.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ambit_mesh::state::local::{self, LocalConfig, LocalError};
use ambit_mesh::state::{Destination, Protocol, StateStore};

/// Istio ztunnel's own example shape (examples/localhost.yaml), extended with a second endpoint,
/// an unhealthy one, and a plain-TCP workload.
const MESH: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/echo-1
  name: echo-1
  namespace: default
  serviceAccount: echo
  workloadIps: ["10.0.1.10"]
  protocol: HBONE
  node: node-1
  network: ""
  services:
    "default/echo.default.svc.cluster.local": {80: 8080}
- uid: cluster1//v1/Pod/default/echo-2
  name: echo-2
  namespace: default
  serviceAccount: echo
  workloadIps: ["10.0.2.10"]
  protocol: HBONE
  node: node-2
  services:
    "default/echo.default.svc.cluster.local": {80: 8080}
- uid: cluster1//v1/Pod/default/echo-3
  name: echo-3
  namespace: default
  serviceAccount: echo
  workloadIps: ["10.0.2.11"]
  protocol: HBONE
  status: Unhealthy
  services:
    "default/echo.default.svc.cluster.local": {80: 8080}
- uid: cluster1//v1/Pod/legacy/db-0
  name: db-0
  namespace: legacy
  workloadIps: ["10.0.3.10"]
  protocol: TCP
  services: {}
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/10.96.0.10"]
  ports: {80: 8080}
  subjectAltNames: ["spiffe://cluster.local/ns/default/sa/echo"]
policies:
- name: deny-9999
  namespace: default
  scope: Namespace
  action: Deny
  rules:
  - - - destinationPorts: [9999]
"#;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn istio_format_loads_and_resolves() {
    let snapshot = LocalConfig::parse(MESH, Path::new("mesh.yaml"))
        .unwrap()
        .into_snapshot(Path::new("mesh.yaml"))
        .unwrap();
    let echo1 = snapshot
        .workload("cluster1//v1/Pod/default/echo-1")
        .unwrap();
    assert_eq!(echo1.protocol, Protocol::Hbone);
    assert_eq!(
        echo1.identity().unwrap().to_string(),
        "spiffe://cluster.local/ns/default/sa/echo"
    );
    let db = snapshot
        .workload_by_ip("", "10.0.3.10".parse().unwrap())
        .unwrap();
    assert_eq!(db.protocol, Protocol::Tcp);
    assert_eq!(
        db.service_account, "default",
        "Istio's default service account"
    );

    // A VIP spreads over healthy endpoints only, mapping the service port to the target port.
    let mut picked = std::collections::BTreeSet::new();
    for pick in 0..10 {
        match snapshot.resolve("", addr("10.96.0.10:80"), pick) {
            Destination::Service {
                endpoint,
                target_port,
                service,
            } => {
                assert_eq!(target_port, 8080);
                assert_eq!(service.hostname, "echo.default.svc.cluster.local");
                picked.insert(endpoint.name.clone());
            }
            other => panic!("expected a service endpoint, got {other:?}"),
        }
    }
    assert_eq!(
        picked.into_iter().collect::<Vec<_>>(),
        vec!["echo-1", "echo-2"],
        "both healthy endpoints are used and the unhealthy one never is"
    );
    // A port the service does not expose has no endpoint.
    assert!(matches!(
        snapshot.resolve("", addr("10.96.0.10:81"), 0),
        Destination::NoEndpoint { .. }
    ));
    assert!(matches!(
        snapshot.resolve("", addr("10.0.2.10:8080"), 0),
        Destination::Workload { port: 8080, .. }
    ));
    assert!(matches!(
        snapshot.resolve("", addr("1.1.1.1:443"), 0),
        Destination::Passthrough
    ));
    // Another network does not see these addresses.
    assert!(matches!(
        snapshot.resolve("other-net", addr("10.0.1.10:8080"), 0),
        Destination::Passthrough
    ));
}

#[test]
fn unknown_fields_are_refused_with_their_name_and_line() {
    let text =
        "workloads:\n- uid: a\n  name: a\n  namespace: default\n  workloadIPs: [\"10.0.0.1\"]\n";
    let err = LocalConfig::parse(text, Path::new("/etc/ambit/state.yaml")).unwrap_err();
    let message = err.to_string();
    assert!(message.starts_with("/etc/ambit/state.yaml:"), "{message}");
    assert!(message.contains("workloadIPs"), "{message}");
    assert!(
        matches!(
            err,
            LocalError::Parse { line: 2, .. } | LocalError::Parse { line: 5, .. }
        ),
        "{err:?}"
    );

    let err = LocalConfig::parse("workload: []\n", Path::new("f.yaml")).unwrap_err();
    assert!(
        err.to_string().contains("unknown field `workload`"),
        "{err}"
    );
}

#[test]
fn invalid_meshes_are_refused_naming_the_object() {
    let cases = [
        (
            MESH.replace("10.0.2.10", "10.0.1.10"),
            "address /10.0.1.10 belongs to both workload",
        ),
        (
            MESH.replace("serviceAccount: echo\n  workloadIps: [\"10.0.1.10\"]", "serviceAccount: Echo\n  workloadIps: [\"10.0.1.10\"]"),
            "cluster1//v1/Pod/default/echo-1",
        ),
        (
            MESH.replace("echo-2\n  name", "echo-1\n  name"),
            "appears twice",
        ),
        (
            MESH.replace("\"default/echo.default.svc.cluster.local\": {80: 8080}\n- uid: cluster1//v1/Pod/default/echo-2", "\"echo\": {80: 8080}\n- uid: cluster1//v1/Pod/default/echo-2"),
            "must be \"<namespace>/<hostname>\"",
        ),
    ];
    for (text, expected) in cases {
        let parsed = LocalConfig::parse(&text, Path::new("m.yaml")).unwrap();
        let err = parsed.into_snapshot(Path::new("m.yaml")).err().unwrap();
        assert!(
            err.to_string().contains(expected),
            "{err} should contain {expected}"
        );
    }
    let err = LocalConfig::parse(
        &MESH.replace("10.96.0.10", "10.96.0.999"),
        Path::new("m.yaml"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("10.96.0.999"), "{err}");
}

#[tokio::test]
async fn reload_swaps_valid_files_and_keeps_state_on_corrupt_ones() {
    let dir = std::env::temp_dir().join(format!("ambit-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.yaml");
    std::fs::write(&path, MESH).unwrap();
    let store = Arc::new(StateStore::new(LocalConfig::load(&path).unwrap()));
    let watcher = tokio::spawn(local::watch(
        path.clone(),
        store.clone(),
        Duration::from_millis(50),
    ));
    let count = |store: &StateStore| store.load().workloads().count();
    assert_eq!(count(&store), 4);

    // A corrupt file: the previous state stays.
    std::fs::write(&path, "workloads: [ {uid: broken\n").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&store), 4);

    // A valid file with one workload fewer replaces it.
    let fewer = without_db_0();
    std::fs::write(&path, fewer).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while count(&store) != 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the reload never happened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A snapshot taken before the swap stays consistent for whoever holds it.
    let held = store.load();
    std::fs::write(&path, MESH).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(held.workloads().count(), 3);
    assert_eq!(count(&store), 4);
    watcher.abort();
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn empty_missing_and_truncated_files_never_replace_the_state() {
    let dir = std::env::temp_dir().join(format!("ambit-state-safety-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.yaml");
    std::fs::write(&path, MESH).unwrap();
    let store = Arc::new(StateStore::new(LocalConfig::load(&path).unwrap()));
    let interval = Duration::from_millis(100);
    let watcher = tokio::spawn(local::watch(path.clone(), store.clone(), interval));
    let count = |store: &StateStore| store.load().workloads().count();

    // No document at all is refused, at start as on reload, with a message saying what to write.
    for text in ["", "\n  \n", "# nothing yet\n", "null\n", "~\n", "---\n"] {
        let err = LocalConfig::parse(text, &path).unwrap_err();
        assert!(matches!(err, LocalError::Empty { .. }), "{text:?}: {err}");
        assert!(err.to_string().contains("workloads: []"), "{err}");
        std::fs::write(&path, text).unwrap();
        tokio::time::sleep(interval * 4).await;
        assert_eq!(count(&store), 4, "{text:?} replaced the state");
    }
    // Cut mid-workload, as a writer that died half-way leaves it. (A cut that leaves valid YAML,
    // say after `node: n`, cannot be told from a real file by any reader: that is why writers
    // replace files atomically and readers wait for a file to settle.)
    let cut = MESH.find("10.0.2.10").unwrap() + 5;
    std::fs::write(&path, &MESH[..cut]).unwrap();
    tokio::time::sleep(interval * 4).await;
    assert_eq!(count(&store), 4);
    std::fs::remove_file(&path).unwrap();
    tokio::time::sleep(interval * 4).await;
    assert_eq!(count(&store), 4, "a deleted file replaced the state");

    // A slow writer whose first half is a valid state with a single workload: never taken while
    // the rest follows within a poll interval.
    let half = MESH.find("- uid: cluster1//v1/Pod/default/echo-2").unwrap();
    assert_eq!(
        LocalConfig::parse(&MESH[..half], &path)
            .unwrap()
            .workloads
            .len(),
        1
    );
    let mut file = std::fs::File::create(&path).unwrap();
    std::io::Write::write_all(&mut file, &MESH.as_bytes()[..half]).unwrap();
    let sampler = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut least = usize::MAX;
            for _ in 0..100 {
                least = least.min(count(&store));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            least
        })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    std::io::Write::write_all(&mut file, &MESH.as_bytes()[half..]).unwrap();
    assert_eq!(sampler.await.unwrap(), 4, "half a file was served");

    // Empty on purpose: a document that says so.
    for (text, expected) in [("workloads: []\n", 0), (MESH, 4), ("{}\n", 0)] {
        std::fs::write(&path, text).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while count(&store) != expected {
            assert!(
                std::time::Instant::now() < deadline,
                "{text:?} was not taken"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // What the local mesh writes for an empty state is that explicit form.
    LocalConfig::default().write(&path).unwrap();
    let written = std::fs::read_to_string(&path).unwrap();
    assert!(written.contains("workloads: []"), "{written}");
    assert_eq!(LocalConfig::load(&path).unwrap().workloads().count(), 0);
    watcher.abort();
    std::fs::remove_dir_all(dir).unwrap();
}

/// The mesh without the `db-0` workload: three workloads instead of four.
fn without_db_0() -> String {
    MESH.replace("- uid: cluster1//v1/Pod/legacy/db-0\n  name: db-0\n  namespace: legacy\n  workloadIps: [\"10.0.3.10\"]\n  protocol: TCP\n  services: {}\n", "")
}

#[tokio::test]
async fn a_version_written_before_the_watcher_starts_is_read() {
    let dir = std::env::temp_dir().join(format!("ambit-state-late-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.yaml");
    std::fs::write(&path, MESH).unwrap();
    let store = Arc::new(StateStore::new(LocalConfig::load(&path).unwrap()));
    // Rewritten after the load, before the watcher looks (a process starting while its state
    // changes): the watcher must still bring it in.
    let fewer = without_db_0();
    std::fs::write(&path, fewer).unwrap();
    let watcher = tokio::spawn(local::watch(
        path.clone(),
        store.clone(),
        Duration::from_millis(50),
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while store.load().workloads().count() != 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the version written before the watcher started was never read"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watcher.abort();
    std::fs::remove_dir_all(dir).unwrap();
}

/// Waypoint identities: by address, by service hostname (endpoints and SANs), none for a
/// waypoint the state does not know; and which peers are some waypoint in use.
#[test]
fn waypoint_identities_follow_the_gateway_address() {
    let yaml = r#"
workloads:
- uid: c//Pod/default/waypoint
  name: waypoint
  namespace: default
  serviceAccount: waypoint
  workloadIps: ["10.0.9.1"]
  protocol: HBONE
  services: {"default/wp.default.svc.cluster.local": {15008: 15008}}
- uid: c//Pod/default/app
  name: app
  namespace: default
  serviceAccount: app
  workloadIps: ["10.0.1.1"]
  protocol: HBONE
  waypoint: {destination: "/10.0.9.1", hboneMtlsPort: 15008}
services:
- name: wp
  namespace: default
  hostname: wp.default.svc.cluster.local
  subjectAltNames: ["spiffe://cluster.local/ns/default/sa/wp-extra"]
- name: app
  namespace: default
  hostname: app.default.svc.cluster.local
  vips: ["/10.96.0.20"]
  waypoint:
    destination: {namespace: default, hostname: wp.default.svc.cluster.local}
- name: gone
  namespace: default
  hostname: gone.default.svc.cluster.local
  vips: ["/10.96.0.21"]
  waypoint:
    destination: {namespace: default, hostname: missing.default.waypoint.invalid}
"#;
    let path = Path::new("waypoints.yaml");
    let snapshot = LocalConfig::parse(yaml, path)
        .unwrap()
        .into_snapshot(path)
        .unwrap();
    let id = |sa: &str| {
        format!("spiffe://cluster.local/ns/default/sa/{sa}")
            .parse()
            .unwrap()
    };
    let of = |service: &str| {
        let key = format!("default/{service}.default.svc.cluster.local");
        snapshot.waypoint_identities(snapshot.service(&key).unwrap().waypoint.as_ref().unwrap())
    };
    assert_eq!(of("app"), vec![id("waypoint"), id("wp-extra")]);
    assert!(of("gone").is_empty());
    let by_address = snapshot
        .workload("c//Pod/default/app")
        .unwrap()
        .waypoint
        .clone();
    assert_eq!(
        snapshot.waypoint_identities(&by_address.unwrap()),
        vec![id("waypoint")]
    );
    assert!(snapshot.is_waypoint_identity(&id("waypoint")));
    assert!(snapshot.is_waypoint_identity(&id("wp-extra")));
    assert!(!snapshot.is_waypoint_identity(&id("app")));
}
