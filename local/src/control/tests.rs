//! Cluster state semantics (atomic apply, delete, label, Deployment pods) and the translation to
//! ztunnel configuration, checked against Istio's documented behaviour and, end to end, against
//! the mesh library's own policy evaluation.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use ambit_mesh::rbac::{
    parse_cidr, Action, Authorization, Clause, ConnectionInfo, Match, Rule, Scope,
    ServiceAccountMatch, StringMatch,
};
use ambit_mesh::state::local::LocalConfig;
use ambit_mesh::state::{
    GatewayAddress, GatewayDestination, HealthStatus, NamespacedHostname, NetworkAddress, Protocol,
    Snapshot,
};

use super::*;
use crate::manifest::{parse, AuthorizationPolicy};

/// The demo manifest, ending with a document separator so more documents can follow.
fn demo_text() -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/demo.yaml"
    ))
    .unwrap();
    format!("{text}---\n")
}

fn applied(text: &str) -> ClusterState {
    let mut state = ClusterState::new();
    state
        .apply(&parse(text).unwrap())
        .unwrap_or_else(|e| panic!("{e}"));
    state
}

fn key(ns: &str, name: &str) -> PodKey {
    PodKey {
        namespace: ns.into(),
        name: name.into(),
    }
}

fn pod_names(state: &ClusterState) -> Vec<String> {
    state
        .pods()
        .map(|p| format!("{}/{}", p.metadata.namespace, p.metadata.name))
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn exact(s: &str) -> StringMatch {
    StringMatch::Exact(s.into())
}

fn rule(clauses: Vec<Vec<Match>>) -> Rule {
    Rule {
        clauses: clauses
            .into_iter()
            .map(|matches| Clause { matches })
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// apply / delete / label

#[test]
fn applying_the_demo_creates_everything() {
    let mut state = ClusterState::new();
    let changes = state.apply(&parse(&demo_text()).unwrap()).unwrap();
    assert_eq!(
        changes.to_string(),
        "namespace/demo created\n\
         serviceaccount/echo created\n\
         serviceaccount/client created\n\
         deployment.apps/echo created\n\
         service/echo created\n\
         pod/client created\n\
         authorizationpolicy.security.istio.io/echo-allow-client created\n"
    );
    assert_eq!(
        changes.pods_added,
        vec![
            key("demo", "client"),
            key("demo", "echo-0"),
            key("demo", "echo-1")
        ]
    );
    assert!(changes.pods_removed.is_empty() && changes.pods_replaced.is_empty());
    assert!(changes.warnings.is_empty(), "{:?}", changes.warnings);
    assert_eq!(
        state.namespace_labels("demo").unwrap()["istio.io/dataplane-mode"],
        "ambient"
    );
    let echo0 = state.pod("demo", "echo-0").unwrap();
    assert_eq!(echo0.owner.as_deref(), Some("echo"));
    assert_eq!(echo0.metadata.labels["app"], "echo");
    let services: Vec<&str> = state
        .services_for_pod(echo0)
        .map(|s| s.metadata.name.as_str())
        .collect();
    assert_eq!(services, vec!["echo"]);
    assert_eq!(state.deployments().count(), 1);
    assert_eq!(state.service_accounts().count(), 2);
    assert_eq!(state.authorization_policies().count(), 1);
    // Built-in namespaces exist.
    for ns in BUILTIN_NAMESPACES {
        assert!(state.namespace(ns).is_some(), "{ns}");
    }

    // Applying the same manifests again changes nothing.
    let again = state.apply(&parse(&demo_text()).unwrap()).unwrap();
    assert!(again.is_noop(), "{again:?}");
    assert!(again
        .objects
        .iter()
        .all(|(_, a)| *a == ChangeAction::Unchanged));
}

#[test]
fn a_bad_manifest_leaves_the_state_untouched() {
    let mut state = applied(&demo_text());
    let before = pod_names(&state);
    // The first object is fine, the second names a namespace that does not exist.
    let objects = parse(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: extra, namespace: demo}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: lost, namespace: nowhere}\n\
         spec: {containers: [{name: c, image: i}]}\n",
    )
    .unwrap();
    let err = state.apply(&objects).unwrap_err();
    assert_eq!(
        err,
        ManifestError::NamespaceNotFound {
            object: ObjectRef::new(Kind::Pod, "nowhere", "lost"),
            namespace: "nowhere".into()
        }
    );
    assert!(err.to_string().contains("Pod nowhere/lost"), "{err}");
    assert!(state.service_account("demo", "extra").is_none());
    assert_eq!(pod_names(&state), before);

    // A namespace created in the same apply is fine, whatever the order.
    let objects = parse(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: later}\nspec: {containers: [{name: c, image: i}]}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: later}\n",
    )
    .unwrap();
    state.apply(&objects).unwrap();
    assert!(state.pod("later", "p").is_some());
}

#[test]
fn status_listings() {
    let text = format!(
        "{}{}apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: waypoint, namespace: demo}}\n\
         spec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: ingress, namespace: demo}}\n\
         spec: {{gatewayClassName: istio, listeners: [{{name: http, port: 80, protocol: HTTP}}]}}\n",
        demo_text(),
        peer("demo", "default", "{mtls: {mode: STRICT}}")
    );
    let state = applied(&text);
    assert_eq!(
        state.policy_names(),
        vec!["demo/echo-allow-client", "demo/default"]
    );
    assert_eq!(state.waypoint_names(), vec!["demo/waypoint"]);
    let client = state.pod("demo", "echo-1").unwrap();
    let env = client.container_env(
        &client.spec.containers[0],
        ip("10.0.0.7"),
        ip("172.18.0.2"),
        "node-2",
        "5f1d0c3e-0000-4000-8000-000000000002",
    );
    assert_eq!(env, vec![("POD_NAME".to_owned(), "echo-1".to_owned())]);
}

#[test]
fn duplicates_in_one_apply_are_refused() {
    let mut state = ClusterState::new();
    let sa = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a}\n";
    let objects = parse(&format!("{sa}---\n{sa}")).unwrap();
    let err = state.apply(&objects).unwrap_err();
    assert_eq!(
        err.to_string(),
        "ServiceAccount default/a appears more than once in one apply"
    );
    assert!(state.service_account("default", "a").is_none());
}

#[test]
fn pods_need_their_service_account() {
    let mut state = ClusterState::new();
    let objects = parse(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {serviceAccountName: ghost, containers: [{name: c, image: i}]}\n",
    )
    .unwrap();
    let err = state.apply(&objects).unwrap_err().to_string();
    assert!(
        err.contains("Pod default/p: spec.serviceAccountName"),
        "{err}"
    );
    assert!(err.contains("\"ghost\" not found"), "{err}");
    let text = demo_text().replace(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: echo\n  namespace: demo\n---\n",
        "",
    );
    let err = state.apply(&parse(&text).unwrap()).unwrap_err().to_string();
    assert!(
        err.contains("Deployment demo/echo: spec.template.spec.serviceAccountName"),
        "{err}"
    );
    assert_eq!(state.pods().count(), 0);
}

#[test]
fn deployments_scale_and_roll() {
    let text = demo_text();
    let mut state = applied(&text);
    let scaled = text.replace("replicas: 2", "replicas: 3");
    let changes = state.apply(&parse(&scaled).unwrap()).unwrap();
    assert_eq!(changes.pods_added, vec![key("demo", "echo-2")]);
    assert!(changes.objects.contains(&(
        ObjectRef::new(Kind::Deployment, "demo", "echo"),
        ChangeAction::Configured
    )));

    let down = text.replace("replicas: 2", "replicas: 1");
    let changes = state.apply(&parse(&down).unwrap()).unwrap();
    assert_eq!(
        changes.pods_removed,
        vec![key("demo", "echo-1"), key("demo", "echo-2")]
    );
    assert!(changes.pods_added.is_empty() && changes.pods_replaced.is_empty());

    // A template change re-creates the pods (the runner restarts them).
    let new_image = down.replace(
        "image: ambit/echo\n          args",
        "image: ambit/echo:v2\n          args",
    );
    assert_ne!(new_image, down);
    let changes = state.apply(&parse(&new_image).unwrap()).unwrap();
    assert_eq!(changes.pods_replaced, vec![key("demo", "echo-0")]);
    assert_eq!(
        state.pod("demo", "echo-0").unwrap().spec.containers[0].image,
        "ambit/echo:v2"
    );
}

#[test]
fn pod_updates_follow_kubernetes_rules() {
    let text = demo_text();
    let mut state = applied(&text);
    // Image changes are allowed (the container restarts) ...
    let image = text.replace(
        "image: ambit/echo\n      args: [\"--client\"]",
        "image: ambit/echo:v2\n      args: [\"--client\"]",
    );
    assert_ne!(image, text);
    let changes = state.apply(&parse(&image).unwrap()).unwrap();
    assert_eq!(changes.pods_replaced, vec![key("demo", "client")]);
    // ... other spec changes are not.
    let args = image.replace(
        "args: [\"--client\"]",
        "args: [\"--client\", \"--verbose\"]",
    );
    let err = state.apply(&parse(&args).unwrap()).unwrap_err().to_string();
    assert!(
        err.starts_with("Pod demo/client: spec: pod updates may not change"),
        "{err}"
    );
    // A pod of a Deployment is the Deployment's.
    let objects = parse(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: echo-0, namespace: demo}\nspec: {containers: [{name: c, image: i}]}\n",
    )
    .unwrap();
    let err = state.apply(&objects).unwrap_err().to_string();
    assert!(err.contains("managed by Deployment demo/echo"), "{err}");
    // And a Deployment may not take over a pod it does not own.
    let bare = parse(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: client-0, namespace: demo}\nspec: {containers: [{name: c, image: i}]}\n",
    )
    .unwrap();
    state.apply(&bare).unwrap();
    let objects = parse(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: client, namespace: demo}\n\
         spec: {selector: {matchLabels: {a: b}}, template: {metadata: {labels: {a: b}}, spec: {containers: [{name: c, image: i}]}}}\n",
    )
    .unwrap();
    let err = state.apply(&objects).unwrap_err().to_string();
    assert!(err.starts_with("Deployment demo/client:"), "{err}");
    assert!(err.contains("Pod demo/client-0"), "{err}");
}

#[test]
fn labels_and_three_way_merge() {
    let text = demo_text();
    let mut state = applied(&text);
    // Labeling a namespace re-checks all its pods.
    let changes = state
        .label(Kind::Namespace, "", "demo", "istio.io/dataplane-mode", None)
        .unwrap();
    assert_eq!(changes.to_string(), "namespace/demo labeled\n");
    assert_eq!(
        changes.pods_relabeled,
        vec![
            key("demo", "client"),
            key("demo", "echo-0"),
            key("demo", "echo-1")
        ]
    );
    assert!(!state
        .namespace_labels("demo")
        .unwrap()
        .contains_key("istio.io/dataplane-mode"));
    // Removing an absent label changes nothing.
    let changes = state
        .label(Kind::Namespace, "", "demo", "istio.io/dataplane-mode", None)
        .unwrap();
    assert!(changes.is_noop());

    // A pod label set by hand survives a re-apply of the pod's manifest ...
    let changes = state
        .label(
            Kind::Pod,
            "demo",
            "client",
            "istio.io/dataplane-mode",
            Some("none"),
        )
        .unwrap();
    assert_eq!(changes.pods_relabeled, vec![key("demo", "client")]);
    let changes = state.apply(&parse(&text).unwrap()).unwrap();
    assert_eq!(
        state.pod("demo", "client").unwrap().metadata.labels["istio.io/dataplane-mode"],
        "none"
    );
    // ... while the namespace label the manifest manages comes back.
    assert_eq!(
        state.namespace_labels("demo").unwrap()["istio.io/dataplane-mode"],
        "ambient"
    );
    assert!(changes.objects.contains(&(
        ObjectRef::new(Kind::Namespace, "", "demo"),
        ChangeAction::Configured
    )));
    // Deployment pods keep hand-set labels across a re-apply of an unchanged Deployment.
    state
        .label(Kind::Pod, "demo", "echo-1", "debug", Some("true"))
        .unwrap();
    state.apply(&parse(&text).unwrap()).unwrap();
    assert_eq!(
        state.pod("demo", "echo-1").unwrap().metadata.labels["debug"],
        "true"
    );
    // A label the manifest drops is removed.
    let dropped = text.replace("  labels:\n    app: client\n", "");
    assert_ne!(dropped, text);
    state.apply(&parse(&dropped).unwrap()).unwrap();
    assert!(!state
        .pod("demo", "client")
        .unwrap()
        .metadata
        .labels
        .contains_key("app"));

    // Errors name the object and the field.
    let err = state
        .label(Kind::Pod, "demo", "nobody", "a", Some("b"))
        .unwrap_err();
    assert_eq!(err.to_string(), "Pod demo/nobody not found");
    let err = state
        .label(Kind::Pod, "demo", "client", "bad key", Some("b"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Pod demo/client: metadata.labels[bad key]"),
        "{err}"
    );
    let err = state
        .label(Kind::Pod, "demo", "client", "a", Some("-bad"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a valid label value"), "{err}");

    // Annotations work the same way.
    let changes = state
        .annotate(
            Kind::Pod,
            "demo",
            "echo-0",
            "ambient.istio.io/redirection",
            Some("enabled"),
        )
        .unwrap();
    assert_eq!(changes.to_string(), "pod/echo-0 annotated\n");
    assert_eq!(
        state.pod("demo", "echo-0").unwrap().metadata.annotations["ambient.istio.io/redirection"],
        "enabled"
    );
}

#[test]
fn delete_semantics() {
    let text = demo_text();
    let mut state = applied(&text);

    // A Deployment's pod comes back under the same name (restart).
    let changes = state
        .delete(&[ObjectRef::new(Kind::Pod, "demo", "echo-0")])
        .unwrap();
    assert_eq!(changes.pods_replaced, vec![key("demo", "echo-0")]);
    assert!(state.pod("demo", "echo-0").is_some());

    // Not found: nothing happens.
    let before = pod_names(&state);
    let err = state
        .delete(&[
            ObjectRef::new(Kind::Pod, "demo", "client"),
            ObjectRef::new(Kind::Service, "demo", "nope"),
        ])
        .unwrap_err();
    assert_eq!(err.to_string(), "Service demo/nope not found");
    assert_eq!(pod_names(&state), before);

    // Built-in namespaces stay.
    let err = state
        .delete(&[ObjectRef::new(Kind::Namespace, "", "istio-system")])
        .unwrap_err();
    assert!(matches!(err, ManifestError::Forbidden { .. }), "{err}");

    // A Deployment takes its pods along.
    let changes = state
        .delete(&[ObjectRef::new(Kind::Deployment, "demo", "echo")])
        .unwrap();
    assert_eq!(
        changes.pods_removed,
        vec![key("demo", "echo-0"), key("demo", "echo-1")]
    );

    // `kubectl delete -f demo.yaml` after re-applying: the namespace takes everything with it,
    // and the objects listed after it are not "not found".
    state.apply(&parse(&text).unwrap()).unwrap();
    let changes = state.delete_objects(&parse(&text).unwrap()).unwrap();
    assert_eq!(changes.objects.len(), 7);
    assert!(changes
        .objects
        .iter()
        .all(|(_, a)| *a == ChangeAction::Deleted));
    assert_eq!(changes.pods_removed.len(), 3);
    assert_eq!(state.pods().count(), 0);
    assert!(state.namespace("demo").is_none());
    assert_eq!(state.objects().count(), BUILTIN_NAMESPACES.len());
}

// ---------------------------------------------------------------------------------------------
// Translation to ztunnel configuration

fn running(state: &ClusterState, enrolled: bool) -> Vec<RunningPod> {
    state
        .pods()
        .enumerate()
        .map(|(i, p)| RunningPod {
            namespace: p.metadata.namespace.clone(),
            name: p.metadata.name.clone(),
            ip: ip(&format!("10.0.0.{}", i + 10)),
            node: if i % 2 == 0 { "node-1" } else { "node-2" }.into(),
            enrolled,
            ready: true,
        })
        .collect()
}

fn vips(state: &ClusterState) -> BTreeMap<(String, String), IpAddr> {
    state
        .services()
        .enumerate()
        .map(|(i, s)| {
            (
                (s.metadata.namespace.clone(), s.metadata.name.clone()),
                ip(&format!("10.96.0.{}", i + 10)),
            )
        })
        .collect()
}

#[test]
fn pods_that_are_not_ready_are_unhealthy_workloads() {
    let state = applied(&demo_text());
    let mut pods = running(&state, true);
    pods[0].ready = false;
    let cfg = ztunnel_config(&state, &pods, &vips(&state), "cluster.local");
    let status = |name: &str| {
        cfg.workloads
            .iter()
            .find(|w| w.name == name)
            .map(|w| w.status)
            .unwrap()
    };
    assert_eq!(status(&pods[0].name), HealthStatus::Unhealthy);
    assert_eq!(status(&pods[1].name), HealthStatus::Healthy);
}

fn config_for(state: &ClusterState) -> LocalConfig {
    let cfg = ztunnel_config(state, &running(state, true), &vips(state), "cluster.local");
    // Whatever comes out must be a valid ztunnel state.
    Snapshot::build(
        cfg.workloads.clone(),
        cfg.services.clone(),
        cfg.policies.clone(),
    )
    .unwrap_or_else(|e| panic!("invalid ztunnel state: {e}"));
    cfg
}

fn connection(from: Option<&str>, to: &str, port: u16) -> ConnectionInfo {
    ConnectionInfo {
        source_identity: from.map(|id| id.parse().unwrap()),
        source_ip: ip("10.0.0.250"),
        destination_ip: ip(to),
        destination_port: port,
    }
}

/// Whether ztunnel, holding `cfg`, admits `conn` to the workload at its destination IP.
fn admitted(cfg: &LocalConfig, conn: &ConnectionInfo) -> bool {
    let snapshot = Snapshot::build(
        cfg.workloads.clone(),
        cfg.services.clone(),
        cfg.policies.clone(),
    )
    .unwrap();
    let w = snapshot.workload_by_ip("", conn.destination_ip).unwrap();
    snapshot
        .policies()
        .evaluate(&w.namespace, &w.authorization_policies, conn)
        .allowed
}

#[test]
fn service_ports_declare_their_protocol_by_app_protocol_then_name() {
    let text = format!(
        "{}apiVersion: v1
kind: Service
metadata: {{name: mixed, namespace: demo}}
spec:
  selector: {{app: echo}}
  ports:
  - {{name: web, port: 81, targetPort: 8080, appProtocol: HTTP2}}
  - {{name: http-admin, port: 82, targetPort: 8080}}
  - {{name: tcp-db, port: 83, targetPort: 8080}}
  - {{name: grpc-web, port: 84, targetPort: 8080}}
  - {{name: mysql, port: 85, targetPort: 8080}}
  - {{name: https, port: 86, targetPort: 8080}}
  - {{name: other, port: 87, targetPort: 8080}}
  - {{name: http-but-declared, port: 88, targetPort: 8080, appProtocol: tcp}}
",
        demo_text()
    );
    let cfg = config_for(&applied(&text));
    let mixed = cfg.services.iter().find(|s| s.name == "mixed").unwrap();
    use ambit_mesh::state::AppProtocol::*;
    assert_eq!(
        mixed.app_protocols,
        BTreeMap::from([
            (81, Http2),
            (82, Http11),
            (83, Tcp),
            (84, Grpc),
            (85, Tcp),
            (86, Tls),
            (88, Tcp)
        ]),
        "port 87 declares nothing and is sniffed"
    );
    let echo = cfg.services.iter().find(|s| s.name == "echo").unwrap();
    assert_eq!(echo.app_protocols, BTreeMap::from([(80, Http11)]));
}

#[test]
fn the_demo_translates_to_ztunnel_config() {
    let state = applied(&demo_text());
    let cfg = config_for(&state);
    let uids: Vec<&str> = cfg.workloads.iter().map(|w| w.uid.as_str()).collect();
    assert_eq!(
        uids,
        vec![
            "Kubernetes//Pod/demo/client",
            "Kubernetes//Pod/demo/echo-0",
            "Kubernetes//Pod/demo/echo-1",
        ]
    );
    let echo0 = &cfg.workloads[1];
    assert_eq!(echo0.name, "echo-0");
    assert_eq!(echo0.namespace, "demo");
    assert_eq!(echo0.service_account, "echo");
    assert_eq!(echo0.trust_domain, "cluster.local");
    assert_eq!(echo0.workload_ips, vec![ip("10.0.0.11")]);
    assert_eq!(echo0.protocol, Protocol::Hbone);
    assert_eq!(echo0.node, "node-2");
    assert_eq!(echo0.canonical_name, "echo");
    assert_eq!(echo0.canonical_revision, "v1");
    assert_eq!(echo0.workload_name, "echo");
    assert_eq!(echo0.cluster_id, "Kubernetes");
    assert_eq!(
        echo0.services,
        BTreeMap::from([(
            "demo/echo.demo.svc.cluster.local".to_owned(),
            BTreeMap::from([(80, 8080)])
        )])
    );
    assert_eq!(echo0.authorization_policies, vec!["demo/echo-allow-client"]);
    let client = &cfg.workloads[0];
    assert_eq!(client.service_account, "client");
    assert_eq!(client.canonical_name, "client");
    assert_eq!(client.canonical_revision, "latest");
    assert!(client.services.is_empty());
    assert!(client.authorization_policies.is_empty());

    assert_eq!(cfg.services.len(), 1);
    let svc = &cfg.services[0];
    assert_eq!(svc.hostname, "echo.demo.svc.cluster.local");
    assert_eq!(svc.vips[0].to_string(), "/10.96.0.10");
    assert_eq!(svc.ports, BTreeMap::from([(80, 8080)]));

    assert_eq!(
        cfg.policies,
        vec![Authorization {
            name: "echo-allow-client".into(),
            namespace: "demo".into(),
            scope: Scope::WorkloadSelector,
            action: Action::Allow,
            rules: vec![rule(vec![
                vec![Match {
                    destination_ports: vec![8080],
                    ..Match::default()
                }],
                vec![Match {
                    principals: vec![exact("cluster.local/ns/demo/sa/client")],
                    ..Match::default()
                }],
            ])],
            dry_run: false,
        }]
    );

    // End to end through the mesh library's evaluation: only the client gets in.
    let client_id = "spiffe://cluster.local/ns/demo/sa/client";
    assert!(admitted(
        &cfg,
        &connection(Some(client_id), "10.0.0.11", 8080)
    ));
    assert!(!admitted(
        &cfg,
        &connection(Some(client_id), "10.0.0.11", 9090)
    ));
    assert!(!admitted(
        &cfg,
        &connection(
            Some("spiffe://cluster.local/ns/demo/sa/echo"),
            "10.0.0.11",
            8080
        )
    ));
    assert!(!admitted(&cfg, &connection(None, "10.0.0.12", 8080)));
    // The client itself has no policy.
    assert!(admitted(&cfg, &connection(None, "10.0.0.10", 1234)));

    // The YAML round-trips through ztunnel's local-config format.
    let yaml = serde_yaml::to_string(&cfg).unwrap();
    let back = LocalConfig::parse(&yaml, Path::new("generated.yaml")).unwrap();
    assert_eq!(back.workloads, cfg.workloads);
    assert_eq!(back.policies, cfg.policies);
}

#[test]
fn workloads_follow_running_pods_and_enrollment() {
    let state = applied(&demo_text());
    let mut pods = running(&state, false);
    pods.truncate(2);
    // A pod the state does not know is skipped; duplicates count once.
    pods.push(RunningPod {
        namespace: "demo".into(),
        name: "ghost".into(),
        ip: ip("10.0.0.99"),
        node: "node-1".into(),
        enrolled: true,
        ready: true,
    });
    pods.push(pods[0].clone());
    let cfg = ztunnel_config(&state, &pods, &BTreeMap::new(), "example.org");
    assert_eq!(cfg.workloads.len(), 2);
    assert!(cfg.workloads.iter().all(|w| w.protocol == Protocol::Tcp));
    assert!(cfg
        .workloads
        .iter()
        .all(|w| w.trust_domain == "example.org"));
    // No VIP: the service is still described, without addresses.
    assert!(cfg.services[0].vips.is_empty());

    // Host-network pods are never workloads.
    let mut state = state;
    state
        .apply(
            &parse(
                "apiVersion: v1\nkind: Pod\nmetadata: {name: host, namespace: demo}\nspec: {hostNetwork: true, containers: [{name: c, image: i}]}\n",
            )
            .unwrap(),
        )
        .unwrap();
    let cfg = ztunnel_config(
        &state,
        &running(&state, true),
        &BTreeMap::new(),
        "cluster.local",
    );
    assert!(cfg.workloads.iter().all(|w| w.name != "host"));
}

const BOOKINFO: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: bookinfo-productpage, namespace: bookinfo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: bookinfo-reviews, namespace: bookinfo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: bookinfo-ratings, namespace: bookinfo}
---
apiVersion: v1
kind: Service
metadata: {name: productpage, namespace: bookinfo, labels: {app: productpage, service: productpage}}
spec:
  selector: {app: productpage}
  ports: [{name: http, port: 9080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: productpage-v1, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: productpage, version: v1}}
  template:
    metadata: {labels: {app: productpage, version: v1}}
    spec:
      serviceAccountName: bookinfo-productpage
      containers: [{name: productpage, image: istio/examples-bookinfo-productpage-v1, ports: [{containerPort: 9080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo, labels: {app: reviews}}
spec:
  selector: {app: reviews}
  ports:
  - {name: http, port: 9080, targetPort: http-reviews}
  - {name: metrics, port: 15014, targetPort: 15014}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: reviews-v1, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews, version: v1}}
  template:
    metadata: {labels: {app: reviews, version: v1}}
    spec:
      serviceAccountName: bookinfo-reviews
      containers: [{name: reviews, image: istio/examples-bookinfo-reviews-v1, ports: [{containerPort: 9080, name: http-reviews}]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: reviews-v2, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews, version: v2}}
  template:
    metadata:
      labels:
        app: reviews
        version: v2
        service.istio.io/canonical-name: reviews-canonical
        app.kubernetes.io/version: "2.0"
    spec:
      serviceAccountName: bookinfo-reviews
      containers: [{name: reviews, image: istio/examples-bookinfo-reviews-v2, ports: [{containerPort: 9081, name: http-reviews}]}]
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: bookinfo}
spec:
  selector: {app: ratings}
  ports: [{name: http, port: 9080, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: ratings, namespace: bookinfo, labels: {app: ratings}}
spec:
  serviceAccountName: bookinfo-ratings
  containers: [{name: ratings, image: istio/examples-bookinfo-ratings-v1}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-from-productpage, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/bookinfo/sa/bookinfo-productpage"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-metrics-from-outside, namespace: bookinfo}
spec:
  action: DENY
  rules:
  - from: [{source: {notNamespaces: [bookinfo]}}]
    to: [{operation: {ports: ["15014"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-blocked, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from: [{source: {ipBlocks: ["192.0.2.0/24"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-waypoint, namespace: bookinfo}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
"#;

#[test]
fn bookinfo_translates_like_istiod() {
    let state = applied(BOOKINFO);
    let cfg = config_for(&state);
    let by_name = |name: &str| cfg.workloads.iter().find(|w| w.name == name).unwrap();

    let productpage = by_name("productpage-v1-0");
    assert_eq!(productpage.service_account, "bookinfo-productpage");
    assert_eq!(productpage.canonical_name, "productpage");
    assert_eq!(productpage.canonical_revision, "v1");
    assert_eq!(productpage.workload_name, "productpage-v1");
    assert_eq!(
        productpage.services,
        BTreeMap::from([(
            "bookinfo/productpage.bookinfo.svc.cluster.local".to_owned(),
            BTreeMap::from([(9080, 9080)])
        )])
    );
    assert!(productpage.authorization_policies.is_empty());

    // Named target ports resolve per pod.
    let reviews_key = "bookinfo/reviews.bookinfo.svc.cluster.local";
    let v1 = by_name("reviews-v1-0");
    assert_eq!(
        v1.services[reviews_key],
        BTreeMap::from([(9080, 9080), (15014, 15014)])
    );
    assert_eq!(
        v1.authorization_policies,
        vec!["bookinfo/reviews-from-productpage"]
    );
    let v2 = by_name("reviews-v2-0");
    assert_eq!(
        v2.services[reviews_key],
        BTreeMap::from([(9080, 9081), (15014, 15014)])
    );
    assert_eq!(v2.canonical_name, "reviews-canonical");
    assert_eq!(v2.canonical_revision, "2.0");
    // A pod without the named port does not serve that service port.
    let ratings = by_name("ratings");
    assert_eq!(
        ratings.services["bookinfo/ratings.bookinfo.svc.cluster.local"],
        BTreeMap::new()
    );
    assert_eq!(ratings.workload_name, "ratings");

    let reviews = cfg.services.iter().find(|s| s.name == "reviews").unwrap();
    // The named port is left to the workloads (see `ztunnel_config`).
    assert_eq!(reviews.ports, BTreeMap::from([(15014, 15014)]));

    // Policies: the waypoint one (targetRefs) is not for ztunnel.
    let keys: Vec<String> = cfg.policies.iter().map(Authorization::key).collect();
    assert_eq!(
        keys,
        vec![
            "bookinfo/no-metrics-from-outside",
            "bookinfo/reviews-from-productpage",
            "istio-system/deny-blocked",
        ]
    );
    let deny_metrics = &cfg.policies[0];
    assert_eq!(deny_metrics.scope, Scope::Namespace);
    assert_eq!(deny_metrics.action, Action::Deny);
    assert_eq!(
        deny_metrics.rules,
        vec![rule(vec![
            vec![Match {
                destination_ports: vec![15014],
                ..Match::default()
            }],
            vec![Match {
                not_namespaces: vec![exact("bookinfo")],
                ..Match::default()
            }],
        ])]
    );
    let global = &cfg.policies[2];
    assert_eq!(global.scope, Scope::Global);
    assert_eq!(
        global.rules,
        vec![rule(vec![vec![Match {
            source_ips: vec![parse_cidr("192.0.2.0/24").unwrap()],
            ..Match::default()
        }]])]
    );

    // End to end.
    let pp = Some("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage");
    let outsider = Some("spiffe://cluster.local/ns/other/sa/default");
    let v1_ip = v1.workload_ips[0].to_string();
    let ratings_ip = ratings.workload_ips[0].to_string();
    assert!(admitted(&cfg, &connection(pp, &v1_ip, 9080)));
    assert!(!admitted(&cfg, &connection(outsider, &v1_ip, 9080)));
    assert!(admitted(&cfg, &connection(outsider, &ratings_ip, 9080)));
    assert!(!admitted(&cfg, &connection(outsider, &ratings_ip, 15014)));
    let mut blocked = connection(pp, &ratings_ip, 9080);
    blocked.source_ip = ip("192.0.2.7");
    assert!(!admitted(&cfg, &blocked));
}

fn policy(yaml: &str) -> AuthorizationPolicy {
    match parse(yaml).unwrap().remove(0) {
        Object::AuthorizationPolicy(ap) => ap,
        other => panic!("{other:?}"),
    }
}

fn convert(yaml: &str) -> Conversion {
    convert_authorization_policy(&policy(yaml), ROOT_NAMESPACE)
}

fn authz(yaml: &str) -> Authorization {
    convert(yaml).authorization.unwrap()
}

const HEADER: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n";

#[test]
fn istio_doc_examples_allow_nothing_and_allow_all() {
    // docs: "allow-nothing" — an ALLOW policy without rules denies everything in its scope.
    let a = authz(&format!(
        "{HEADER}metadata: {{name: allow-nothing, namespace: foo}}\nspec: {{}}\n"
    ));
    assert_eq!(
        a,
        Authorization {
            name: "allow-nothing".into(),
            namespace: "foo".into(),
            scope: Scope::Namespace,
            action: Action::Allow,
            rules: vec![],
            dry_run: false,
        }
    );
    // docs: "allow-all" — one empty rule matches everything.
    let a = authz(&format!(
        "{HEADER}metadata: {{name: allow-all, namespace: foo}}\nspec: {{rules: [{{}}]}}\n"
    ));
    assert_eq!(a.rules, vec![Rule { clauses: vec![] }]);
    // docs: "deny-all" mesh-wide in the root namespace.
    let a = authz(&format!(
        "{HEADER}metadata: {{name: deny-all, namespace: istio-system}}\nspec: {{action: DENY, rules: [{{}}]}}\n"
    ));
    assert_eq!((a.scope, a.action), (Scope::Global, Action::Deny));
}

#[test]
fn istio_doc_example_l4_allow() {
    // docs: ambient/usage/l4-policy
    let a = authz(&format!(
        "{HEADER}metadata: {{name: allow-curl-to-httpbin, namespace: ambient-demo}}\nspec:
  selector: {{matchLabels: {{app: httpbin}}}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/ambient-demo/sa/curl
"
    ));
    assert_eq!(a.scope, Scope::WorkloadSelector);
    assert_eq!(
        a.rules,
        vec![rule(vec![vec![Match {
            principals: vec![exact("cluster.local/ns/ambient-demo/sa/curl")],
            ..Match::default()
        }]])]
    );
}

#[test]
fn string_matching_follows_istio() {
    assert_eq!(string_match("*"), StringMatch::Presence);
    assert_eq!(
        string_match("cluster.local/ns/foo/*"),
        StringMatch::Prefix("cluster.local/ns/foo/".into())
    );
    assert_eq!(
        string_match("*/sa/admin"),
        StringMatch::Suffix("/sa/admin".into())
    );
    assert_eq!(string_match("exact"), exact("exact"));
    let a = authz(&format!(
        "{HEADER}metadata: {{name: p, namespace: foo}}\nspec:
  rules:
  - from:
    - source:
        principals: ['*', 'cluster.local/ns/foo/*']
        notPrincipals: ['*/sa/admin']
        namespaces: ['prod-*']
        ipBlocks: ['10.0.0.0/8', '10.1.2.3']
        notIpBlocks: ['10.9.0.0/16']
    - source:
        serviceAccounts: [sleep, other/curl]
        notServiceAccounts: [bad]
"
    ));
    let from = &a.rules[0].clauses[0].matches;
    assert_eq!(
        from[0],
        Match {
            principals: vec![
                StringMatch::Presence,
                StringMatch::Prefix("cluster.local/ns/foo/".into())
            ],
            not_principals: vec![StringMatch::Suffix("/sa/admin".into())],
            namespaces: vec![StringMatch::Prefix("prod-".into())],
            source_ips: vec![
                parse_cidr("10.0.0.0/8").unwrap(),
                parse_cidr("10.1.2.3/32").unwrap()
            ],
            not_source_ips: vec![parse_cidr("10.9.0.0/16").unwrap()],
            ..Match::default()
        }
    );
    let sa = |ns: &str, name: &str| ServiceAccountMatch {
        namespace: ns.into(),
        service_account: name.into(),
    };
    assert_eq!(
        from[1].service_accounts,
        vec![sa("foo", "sleep"), sa("other", "curl")]
    );
    assert_eq!(from[1].not_service_accounts, vec![sa("foo", "bad")]);
}

#[test]
fn when_conditions_become_clauses() {
    let a = authz(&format!(
        "{HEADER}metadata: {{name: p, namespace: foo}}\nspec:
  action: DENY
  rules:
  - when:
    - {{key: source.namespace, values: [dev]}}
    - {{key: destination.port, notValues: ['22']}}
    - {{key: source.ip, values: ['10.0.0.0/8']}}
    - {{key: destination.ip, values: ['10.96.0.1']}}
    - {{key: source.principal, notValues: ['cluster.local/ns/dev/sa/admin']}}
"
    ));
    let clauses: Vec<&Match> = a.rules[0].clauses.iter().map(|c| &c.matches[0]).collect();
    assert_eq!(clauses.len(), 5);
    assert_eq!(clauses[0].namespaces, vec![exact("dev")]);
    assert_eq!(clauses[1].not_destination_ports, vec![22]);
    assert_eq!(
        clauses[2].source_ips,
        vec![parse_cidr("10.0.0.0/8").unwrap()]
    );
    assert_eq!(
        clauses[3].destination_ips,
        vec![parse_cidr("10.96.0.1").unwrap()]
    );
    assert_eq!(
        clauses[4].not_principals,
        vec![exact("cluster.local/ns/dev/sa/admin")]
    );
}

#[test]
fn http_attributes_in_allow_policies_drop_the_rule() {
    // docs (authorization/http): allow GET on /info* — nothing of it can be checked at L4.
    let c = convert(&format!(
        "{HEADER}metadata: {{name: httpbin, namespace: foo}}\nspec:
  selector: {{matchLabels: {{app: httpbin}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: ['cluster.local/ns/default/sa/sleep']}}}}]
    to: [{{operation: {{methods: [GET], paths: ['/info*']}}}}]
  - from: [{{source: {{namespaces: [ops]}}}}]
  - to: [{{operation: {{ports: ['8080']}}}}]
    when: [{{key: 'request.headers[x-token]', values: [secret]}}]
"
    ));
    let a = c.authorization.unwrap();
    // Only the L4 rule is left.
    assert_eq!(
        a.rules,
        vec![rule(vec![vec![Match {
            namespaces: vec![exact("ops")],
            ..Match::default()
        }]])]
    );
    let message = c.message.unwrap();
    assert!(
        message.starts_with(
            "ztunnel does not support HTTP attributes (found: methods, paths, request.headers[x-token])"
        ),
        "{message}"
    );
    assert!(
        message.contains("rules matching HTTP attributes are omitted"),
        "{message}"
    );

    // If every rule is HTTP, the ALLOW policy allows nothing.
    let a = authz(&format!(
        "{HEADER}metadata: {{name: p, namespace: foo}}\nspec:\n  rules: [{{to: [{{operation: {{methods: [GET]}}}}]}}]\n"
    ));
    assert!(a.rules.is_empty());
}

#[test]
fn http_attributes_in_deny_policies_are_left_out() {
    // docs (authorization/deny): deny POST from dev. At ztunnel the `to` clause keeps only an
    // empty match, which never matches: the DENY has no effect there (istiod says so).
    let c = convert(&format!(
        "{HEADER}metadata: {{name: deny-post, namespace: foo}}\nspec:
  action: DENY
  rules:
  - from: [{{source: {{namespaces: [dev]}}}}]
    to: [{{operation: {{methods: [POST]}}}}]
"
    ));
    let a = c.authorization.unwrap();
    assert_eq!(
        a.rules,
        vec![rule(vec![
            vec![Match::default()],
            vec![Match {
                namespaces: vec![exact("dev")],
                ..Match::default()
            }],
        ])]
    );
    assert!(c.message.unwrap().contains("will have no effect"));
    let dev = Some("spiffe://cluster.local/ns/dev/sa/default");
    assert!(!a.matches(&connection(dev, "10.0.0.1", 80)));

    // With an L4 field left in the operation, the DENY applies to all of it: broader than asked.
    let c = convert(&format!(
        "{HEADER}metadata: {{name: deny-post, namespace: foo}}\nspec:
  action: DENY
  rules:
  - from: [{{source: {{namespaces: [dev], requestPrincipals: ['*']}}}}]
    to: [{{operation: {{methods: [POST], ports: ['8080']}}}}]
"
    ));
    let a = c.authorization.unwrap();
    assert!(c
        .message
        .unwrap()
        .contains("more restrictive than requested"));
    assert!(a.matches(&connection(dev, "10.0.0.1", 8080)));
    assert!(!a.matches(&connection(dev, "10.0.0.1", 9090)));
}

#[test]
fn policies_ztunnel_does_not_take() {
    let c = convert(&format!(
        "{HEADER}metadata: {{name: audit, namespace: foo}}\nspec: {{action: AUDIT, rules: [{{}}]}}\n"
    ));
    assert_eq!(c.authorization, None);
    assert_eq!(
        c.message.as_deref(),
        Some("ztunnel does not support the AUDIT action")
    );
    let c = convert(&format!(
        "{HEADER}metadata: {{name: ext, namespace: foo}}\nspec: {{action: CUSTOM, provider: {{name: x}}, rules: [{{}}]}}\n"
    ));
    assert_eq!(c.authorization, None);
    let c = convert(&format!(
        "{HEADER}metadata: {{name: wp, namespace: foo}}\nspec: {{targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]}}\n"
    ));
    assert_eq!(
        c,
        Conversion {
            authorization: None,
            message: None
        }
    );
    // Dry run.
    let a = authz(&format!(
        "{HEADER}metadata: {{name: p, namespace: foo, annotations: {{istio.io/dry-run: 'true'}}}}\nspec: {{}}\n"
    ));
    assert!(a.dry_run);
}

#[test]
fn apply_reports_istiod_warnings() {
    let mut state = ClusterState::new();
    let changes = state
        .apply(
            &parse(&format!(
                "{HEADER}metadata: {{name: p, namespace: default}}\nspec:\n  selector: {{}}\n  rules: [{{to: [{{operation: {{paths: [/a]}}}}]}}]\n"
            ))
            .unwrap(),
        )
        .unwrap();
    assert_eq!(changes.warnings.len(), 2, "{:?}", changes.warnings);
    assert!(changes.warnings[0]
        .contains("AuthorizationPolicy default/p: workload selector specified without labels"));
    assert!(changes.warnings[1].contains("ztunnel does not support HTTP attributes (found: paths)"));
    assert!(changes
        .to_string()
        .contains("Warning: AuthorizationPolicy default/p"));
    let messages = state.policy_messages();
    assert_eq!(messages.len(), 2);
    assert_eq!(
        messages[1].0,
        ObjectRef::new(Kind::AuthorizationPolicy, "default", "p")
    );
}

fn peer(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n---\n"
    )
}

#[test]
fn strict_peer_authentication_denies_plaintext() {
    let strict_key = format!("{ROOT_NAMESPACE}/{STATIC_STRICT_POLICY}");
    let text = format!(
        "{}{}",
        demo_text(),
        peer("demo", "default", "{mtls: {mode: STRICT}}")
    );
    let mut state = applied(&text);
    state
        .apply(&parse("apiVersion: v1\nkind: Pod\nmetadata: {name: outside}\nspec: {containers: [{name: c, image: i}]}\n").unwrap())
        .unwrap();
    let cfg = config_for(&state);
    assert!(cfg.policies.contains(&static_strict_policy(ROOT_NAMESPACE)));
    let strict = cfg
        .policies
        .iter()
        .find(|p| p.name == STATIC_STRICT_POLICY)
        .unwrap();
    assert_eq!(
        (strict.scope, strict.action, &strict.rules),
        (
            Scope::WorkloadSelector,
            Action::Deny,
            &vec![rule(vec![vec![Match {
                not_principals: vec![StringMatch::Presence],
                ..Match::default()
            }]])]
        )
    );
    for w in &cfg.workloads {
        let listed = w.authorization_policies.contains(&strict_key);
        assert_eq!(listed, w.namespace == "demo", "{}", w.uid);
    }
    let client = cfg.workloads.iter().find(|w| w.name == "client").unwrap();
    let client_ip = client.workload_ips[0].to_string();
    assert!(!admitted(&cfg, &connection(None, &client_ip, 80)));
    assert!(admitted(
        &cfg,
        &connection(Some("spiffe://cluster.local/ns/x/sa/y"), &client_ip, 80)
    ));

    // A workload policy relaxing a port takes over from the static policy for its pods.
    let text = format!(
        "{text}{}",
        peer(
            "demo",
            "echo-metrics",
            "{selector: {matchLabels: {app: echo}}, portLevelMtls: {9090: {mode: PERMISSIVE}}}"
        )
    );
    let state = applied(&text);
    let cfg = config_for(&state);
    let echo = cfg.workloads.iter().find(|w| w.name == "echo-0").unwrap();
    assert_eq!(
        echo.authorization_policies,
        // istiod's order: selector policies (sorted), then the PeerAuthentication-derived.
        vec![
            "demo/echo-allow-client",
            "demo/converted_peer_authentication_echo-metrics"
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
    );
    let converted = cfg
        .policies
        .iter()
        .find(|p| p.name == "converted_peer_authentication_echo-metrics")
        .unwrap();
    assert_eq!(converted.action, Action::Deny);
    assert_eq!(converted.scope, Scope::WorkloadSelector);
    assert_eq!(
        converted.rules,
        vec![rule(vec![
            vec![Match {
                not_destination_ports: vec![9090],
                ..Match::default()
            }],
            vec![Match {
                not_principals: vec![StringMatch::Presence],
                ..Match::default()
            }],
        ])]
    );
    assert!(converted.matches(&connection(None, "10.0.0.1", 8080)));
    assert!(!converted.matches(&connection(None, "10.0.0.1", 9090)));
    let client = cfg.workloads.iter().find(|w| w.name == "client").unwrap();
    assert_eq!(client.authorization_policies, vec![strict_key.clone()]);
}

#[test]
fn peer_authentication_inheritance() {
    let strict_key = format!("{ROOT_NAMESPACE}/{STATIC_STRICT_POLICY}");
    let lists_strict = |extra: &str| -> Vec<(String, bool)> {
        let state = applied(&format!("{}{extra}", demo_text()));
        let cfg = config_for(&state);
        cfg.workloads
            .iter()
            .map(|w| {
                (
                    w.name.clone(),
                    w.authorization_policies.contains(&strict_key),
                )
            })
            .collect()
    };
    // Mesh-wide STRICT applies to all ...
    let mesh = peer("istio-system", "default", "{mtls: {mode: STRICT}}");
    assert!(lists_strict(&mesh).iter().all(|(_, s)| *s));
    // ... a namespace PERMISSIVE overrides it ...
    let ns = peer("demo", "permissive", "{mtls: {mode: PERMISSIVE}}");
    assert!(lists_strict(&format!("{mesh}{ns}"))
        .iter()
        .all(|(_, s)| !*s));
    // ... and a workload STRICT overrides that.
    let wl = peer(
        "demo",
        "echo-strict",
        "{selector: {matchLabels: {app: echo}}, mtls: {mode: STRICT}}",
    );
    let got = lists_strict(&format!("{mesh}{ns}{wl}"));
    assert_eq!(
        got,
        vec![
            ("client".to_owned(), false),
            ("echo-0".to_owned(), true),
            ("echo-1".to_owned(), true),
        ]
    );
    // An UNSET namespace policy inherits the mesh's STRICT.
    let unset = peer("demo", "unset", "{}");
    assert!(lists_strict(&format!("{mesh}{unset}"))
        .iter()
        .all(|(_, s)| *s));
    // A PERMISSIVE-only policy publishes the static policy but nobody lists it.
    let state = applied(&format!(
        "{}{}",
        demo_text(),
        peer("demo", "p", "{mtls: {mode: PERMISSIVE}}")
    ));
    let cfg = config_for(&state);
    assert!(cfg.policies.iter().any(|p| p.name == STATIC_STRICT_POLICY));
    assert!(cfg
        .workloads
        .iter()
        .all(|w| !w.authorization_policies.contains(&strict_key)));
    // The oldest namespace policy wins.
    let older = peer("demo", "b-older", "{mtls: {mode: STRICT}}");
    let newer = peer("demo", "a-newer", "{mtls: {mode: PERMISSIVE}}");
    let mut state = applied(&format!("{}{older}", demo_text()));
    state.apply(&parse(&newer).unwrap()).unwrap();
    let cfg = config_for(&state);
    assert!(cfg
        .workloads
        .iter()
        .all(|w| w.authorization_policies.contains(&strict_key)));
}

#[test]
fn port_level_strict_under_permissive() {
    let pa = peer(
        "demo",
        "echo-admin",
        "{selector: {matchLabels: {app: echo}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {9443: {mode: STRICT}}}",
    );
    let state = applied(&format!("{}{pa}", demo_text()));
    let cfg = config_for(&state);
    let converted = cfg
        .policies
        .iter()
        .find(|p| p.name == "converted_peer_authentication_echo-admin")
        .unwrap();
    assert_eq!(
        converted.rules,
        vec![rule(vec![vec![Match {
            not_principals: vec![StringMatch::Presence],
            destination_ports: vec![9443],
            ..Match::default()
        }]])]
    );
    let echo = cfg.workloads.iter().find(|w| w.name == "echo-1").unwrap();
    assert!(echo
        .authorization_policies
        .contains(&"demo/converted_peer_authentication_echo-admin".to_owned()));
}

// ---------------------------------------------------------------------------------------------
// what each waypoint enforces at L7

#[test]
fn waypoint_l7_objects_follow_use_waypoint_bindings_and_target_refs() {
    let state = applied(
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec: {selector: {app: cart}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: shop}
spec: {selector: {app: other}, ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: cart-route, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: cart}]
  rules: [{backendRefs: [{name: cart, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: other-route, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: other}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: on-gateway, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: on-cart, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: cart}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: on-other, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: other}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: for-ztunnel, namespace: shop}
spec: {}
"#,
    );
    let names: Vec<String> = state
        .waypoint_l7_objects("shop", "waypoint")
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        names,
        [
            "HTTPRoute shop/cart-route",
            "AuthorizationPolicy shop/on-cart",
            "AuthorizationPolicy shop/on-gateway",
        ]
    );
    assert!(state.waypoint_l7_objects("shop", "nope").is_empty());
}

// ---------------------------------------------------------------------------------------------
// waypoint bindings: istiod's rules, and failing closed where L7 policy exists

const BINDINGS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: ns-wp}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ns-wp, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: pods-wp, namespace: shop, labels: {istio.io/waypoint-for: workload}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: all-wp, namespace: shop, labels: {istio.io/waypoint-for: all}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {selector: {app: cart}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: orders, namespace: shop, labels: {istio.io/use-waypoint: pods-wp}}
spec: {selector: {app: orders}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: pay, namespace: shop, labels: {istio.io/use-waypoint: all-wp}}
spec: {selector: {app: pay}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: opted-out, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec: {selector: {app: x}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ghost, namespace: shop, labels: {istio.io/use-waypoint: misspelt}}
spec: {selector: {app: ghost}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-0, namespace: shop, labels: {app: cart}}
spec: {containers: [{name: c, image: ambit/echo}]}
---
apiVersion: v1
kind: Pod
metadata: {name: pay-0, namespace: shop, labels: {app: pay, istio.io/use-waypoint: all-wp}}
spec: {containers: [{name: c, image: ambit/echo}]}
---
apiVersion: v1
kind: Pod
metadata: {name: odd-0, namespace: shop, labels: {istio.io/use-waypoint: ns-wp}}
spec: {containers: [{name: c, image: ambit/echo}]}
---
apiVersion: v1
kind: Pod
metadata: {name: ghost-0, namespace: shop, labels: {app: ghost}}
spec: {containers: [{name: c, image: ambit/echo}]}
"#;

fn waypoint(name: &str) -> WaypointRef {
    WaypointRef {
        namespace: "shop".into(),
        name: name.into(),
    }
}

#[test]
fn waypoint_for_binds_services_and_pods_as_istiod_does() {
    let state = applied(BINDINGS);
    let service = |name| state.service_binding(state.service("shop", name).unwrap());
    let pod = |name| state.pod_binding(state.pod("shop", name).unwrap());
    // Inherited from the namespace; the default waypoint-for is `service`.
    assert_eq!(service("cart"), Some(Binding::Bound(waypoint("ns-wp"))));
    assert_eq!(
        service("orders"),
        Some(Binding::UnsupportedTraffic {
            waypoint: waypoint("pods-wp"),
            waypoint_for: "workload".into()
        })
    );
    assert_eq!(service("pay"), Some(Binding::Bound(waypoint("all-wp"))));
    assert_eq!(service("opted-out"), None);
    assert_eq!(
        service("ghost"),
        Some(Binding::Missing {
            waypoint: waypoint("misspelt"),
            inherited: false
        })
    );
    // A pod inheriting a service waypoint has none; its own label must name a waypoint that
    // takes workload traffic.
    assert_eq!(pod("cart-0"), None);
    assert_eq!(pod("pay-0"), Some(Binding::Bound(waypoint("all-wp"))));
    assert_eq!(
        pod("odd-0"),
        Some(Binding::UnsupportedTraffic {
            waypoint: waypoint("ns-wp"),
            waypoint_for: "service".into()
        })
    );

    let mut running = running(&state, true);
    for (i, name) in ["ns-wp", "pods-wp", "all-wp"].iter().enumerate() {
        running.push(RunningPod {
            namespace: "shop".into(),
            name: (*name).into(),
            ip: ip(&format!("10.0.1.{}", i + 1)),
            node: "node-1".into(),
            enrolled: false,
            ready: true,
        });
    }
    let cfg = ztunnel_config(&state, &running, &vips(&state), "cluster.local");
    let address = |ip_text: &str| GatewayAddress {
        destination: GatewayDestination::Address(NetworkAddress {
            network: String::new(),
            address: ip(ip_text),
        }),
        hbone_mtls_port: 15008,
    };
    let svc = |name: &str| cfg.services.iter().find(|s| s.name == name).unwrap();
    let wl = |name: &str| cfg.workloads.iter().find(|w| w.name == name).unwrap();
    assert_eq!(svc("cart").waypoint, Some(address("10.0.1.1")));
    assert_eq!(svc("orders").waypoint, None);
    assert_eq!(svc("pay").waypoint, Some(address("10.0.1.3")));
    // No L7 policy would apply at the missing waypoint: direct, as in Istio.
    assert_eq!(svc("ghost").waypoint, None);
    assert_eq!(wl("pay-0").waypoint, Some(address("10.0.1.3")));
    assert_eq!(wl("cart-0").waypoint, None);
    assert_eq!(wl("odd-0").waypoint, None);
    let warnings = state.waypoint_warnings(&|_| true);
    assert!(
        warnings.iter().any(|w| w.starts_with(
            "Service shop/orders uses waypoint shop/pods-wp, which takes no service traffic"
        )),
        "{warnings:#?}"
    );
    assert!(
        warnings.iter().any(|w| w
            .starts_with("Service shop/ghost uses waypoint shop/misspelt, which does not exist")
            && w.contains("goes straight to the pods")),
        "{warnings:#?}"
    );
}

#[test]
fn l7_policy_keeps_traffic_off_a_missing_or_stopped_waypoint() {
    let mut state = applied(BINDINGS);
    // A policy on the misspelt waypoint's Service, a FAIL_OPEN plugin and an AUDIT policy on
    // the namespace waypoint (neither of which makes traffic fail closed).
    let changes = state
        .apply(
            &parse(
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ghost-admin, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: ghost}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: ns-wp}]
  action: AUDIT
  rules: [{}]
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: optional, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: ns-wp}]
  url: file:///nonexistent.wasm
  failStrategy: FAIL_OPEN
"#,
            )
            .unwrap(),
        )
        .unwrap();
    assert!(
        changes.warnings.iter().any(|w| w
            .starts_with("Service shop/ghost uses waypoint shop/misspelt, which does not exist")
            && w.contains("its traffic is refused")
            && w.contains("AuthorizationPolicy shop/ghost-admin")),
        "{:#?}",
        changes.warnings
    );
    // Only the namespace waypoint's pod runs.
    let mut running = running(&state, true);
    running.push(RunningPod {
        namespace: "shop".into(),
        name: "ns-wp".into(),
        ip: ip("10.0.1.1"),
        node: "node-1".into(),
        enrolled: false,
        ready: true,
    });
    let cfg = ztunnel_config(&state, &running, &vips(&state), "cluster.local");
    let svc = |cfg: &LocalConfig, name: &str| {
        cfg.services
            .iter()
            .find(|s| s.name == name)
            .unwrap()
            .waypoint
            .clone()
    };
    let unreachable = |name: &str| {
        Some(GatewayAddress {
            destination: GatewayDestination::Hostname(NamespacedHostname {
                namespace: "shop".into(),
                hostname: format!("{name}.shop.waypoint.invalid"),
            }),
            hbone_mtls_port: 15008,
        })
    };
    assert_eq!(svc(&cfg, "ghost"), unreachable("misspelt"));
    // pay's waypoint is not running and nothing targets it: direct.
    assert_eq!(svc(&cfg, "pay"), None);
    // An L7 policy on pay's waypoint: refused while it is down, for the Service and for the pod
    // that names it too.
    state
        .apply(
            &parse(
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: pay-only-get, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: all-wp}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
"#,
            )
            .unwrap(),
        )
        .unwrap();
    let cfg = ztunnel_config(&state, &running, &vips(&state), "cluster.local");
    assert_eq!(svc(&cfg, "pay"), unreachable("all-wp"));
    let pay = cfg.workloads.iter().find(|w| w.name == "pay-0").unwrap();
    assert_eq!(pay.waypoint, unreachable("all-wp"));
    // Whatever comes out is a valid state, and ztunnel cannot resolve the refused waypoint.
    let snapshot = Snapshot::build(cfg.workloads, cfg.services, cfg.policies).unwrap();
    let gateway = unreachable("all-wp").unwrap();
    assert!(snapshot.waypoint_identities(&gateway).is_empty());
    let warnings = state.waypoint_warnings(&|w| w.name == "ns-wp");
    assert!(
        warnings.iter().any(|w| w.starts_with(
            "Service shop/pay uses waypoint shop/all-wp, which is not running: its traffic is refused"
        )),
        "{warnings:#?}"
    );
    assert!(
        warnings.iter().any(
            |w| w.starts_with("Pod shop/pay-0 uses waypoint shop/all-wp, which is not running")
        ),
        "{warnings:#?}"
    );
    // cart's waypoint has only AUDIT and FAIL_OPEN attached: no plaintext warning about it,
    // while pay's pod (policy, no STRICT) is reported reachable in plaintext.
    assert!(
        !warnings.iter().any(|w| w.contains("shop/cart")),
        "{warnings:#?}"
    );
    assert!(
        warnings.iter().any(|w| w
            .starts_with("Service shop/pay: L7 policy at waypoint shop/all-wp")
            && w.contains("(shop/pay-0 on 8080)")),
        "{warnings:#?}"
    );
    // STRICT removes the plaintext warning.
    let changes = state
        .apply(&parse(&peer("shop", "strict", "{mtls: {mode: STRICT}}")).unwrap())
        .unwrap();
    assert!(changes.warnings.is_empty(), "{:#?}", changes.warnings);
    let warnings = state.waypoint_warnings(&|_| true);
    assert!(
        !warnings.iter().any(|w| w.contains("plaintext")),
        "{warnings:#?}"
    );
}
