//! Istio's own documentation YAML, applied unchanged to `ambit mesh`'s control plane.
//!
//! Each manifest below is reproduced verbatim (config data, trimmed to the objects used) from the
//! Istio page or sample its comment cites. They go through `ambit_local::manifest::parse` and
//! [`ClusterState::apply`] exactly as `ambit mesh apply -f` takes them, the namespace is labelled
//! as the docs' `kubectl label` commands do, and the result is checked the way istiod would
//! translate it: ambient enrollment, ztunnel's workloads/services/L4 policy, the waypoint and
//! what it enforces at L7, the WasmPlugin as stored. No mesh (netns, processes) is started.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ambit_local::control::{
    convert_authorization_policy, ztunnel_config, ClusterState, RunningPod, ROOT_NAMESPACE,
};
use ambit_local::manifest::{parse, Kind, Object, ObjectRef};
use ambit_mesh::rbac::{Action, Scope, StringMatch};
use ambit_mesh::state::{GatewayDestination, Protocol, Snapshot};

/// istio/istio `samples/bookinfo/platform/kube/bookinfo.yaml` (the productpage and reviews
/// parts, unchanged), which the ambient getting-started guide applies
/// (https://istio.io/latest/docs/ambient/getting-started/deploy-sample-app/).
const BOOKINFO: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: reviews
  labels:
    app: reviews
    service: reviews
spec:
  ports:
  - port: 9080
    name: http
  selector:
    app: reviews
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: bookinfo-reviews
  labels:
    account: reviews
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: reviews-v1
  labels:
    app: reviews
    version: v1
spec:
  replicas: 1
  selector:
    matchLabels:
      app: reviews
      version: v1
  template:
    metadata:
      labels:
        app: reviews
        version: v1
    spec:
      serviceAccountName: bookinfo-reviews
      containers:
      - name: reviews
        image: docker.io/istio/examples-bookinfo-reviews-v1:1.20.1
        imagePullPolicy: IfNotPresent
        env:
        - name: LOG_DIR
          value: "/tmp/logs"
        ports:
        - containerPort: 9080
        volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: wlp-output
          mountPath: /opt/ibm/wlp/output
      volumes:
      - name: wlp-output
        emptyDir: {}
      - name: tmp
        emptyDir: {}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: reviews-v2
  labels:
    app: reviews
    version: v2
spec:
  replicas: 1
  selector:
    matchLabels:
      app: reviews
      version: v2
  template:
    metadata:
      labels:
        app: reviews
        version: v2
    spec:
      serviceAccountName: bookinfo-reviews
      containers:
      - name: reviews
        image: docker.io/istio/examples-bookinfo-reviews-v2:1.20.1
        imagePullPolicy: IfNotPresent
        env:
        - name: LOG_DIR
          value: "/tmp/logs"
        ports:
        - containerPort: 9080
        volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: wlp-output
          mountPath: /opt/ibm/wlp/output
      volumes:
      - name: wlp-output
        emptyDir: {}
      - name: tmp
        emptyDir: {}
---
apiVersion: v1
kind: Service
metadata:
  name: productpage
  labels:
    app: productpage
    service: productpage
spec:
  ports:
  - port: 9080
    name: http
  selector:
    app: productpage
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: bookinfo-productpage
  labels:
    account: productpage
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: productpage-v1
  labels:
    app: productpage
    version: v1
spec:
  replicas: 1
  selector:
    matchLabels:
      app: productpage
      version: v1
  template:
    metadata:
      annotations:
        prometheus.io/scrape: "true"
        prometheus.io/port: "9080"
        prometheus.io/path: "/metrics"
      labels:
        app: productpage
        version: v1
    spec:
      serviceAccountName: bookinfo-productpage
      containers:
      - name: productpage
        image: docker.io/istio/examples-bookinfo-productpage-v1:1.20.1
        imagePullPolicy: IfNotPresent
        ports:
        - containerPort: 9080
        volumeMounts:
        - name: tmp
          mountPath: /tmp
      volumes:
      - name: tmp
        emptyDir: {}
"#;

/// istio/istio `samples/bookinfo/platform/kube/bookinfo-versions.yaml` (reviews-v1 and -v2), the
/// version Services the HTTPRoute below splits between
/// (https://istio.io/latest/docs/ambient/getting-started/deploy-sample-app/).
const BOOKINFO_VERSIONS: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: reviews-v1
spec:
  ports:
  - port: 9080
    name: http
  selector:
    app: reviews
    version: v1
---
apiVersion: v1
kind: Service
metadata:
  name: reviews-v2
spec:
  ports:
  - port: 9080
    name: http
  selector:
    app: reviews
    version: v2
"#;

/// https://istio.io/latest/docs/ambient/getting-started/enforce-auth-policies/ ("Enforce Layer 4
/// authorization policy").
const L4_POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: productpage-viewer
  namespace: default
spec:
  selector:
    matchLabels:
      app: productpage
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/default/sa/bookinfo-gateway-istio
"#;

/// `istioctl waypoint generate --for service -n default`, as printed on
/// https://istio.io/latest/docs/ambient/usage/waypoint/ ("Deploy a waypoint proxy").
const WAYPOINT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  labels:
    istio.io/waypoint-for: service
  name: waypoint
  namespace: default
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
"#;

/// https://istio.io/latest/docs/ambient/getting-started/enforce-auth-policies/ ("Enforce Layer 7
/// authorization policy"): the same name, now with `targetRefs`, replacing the L4 one.
const L7_POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: productpage-viewer
  namespace: default
spec:
  targetRefs:
  - kind: Service
    group: ""
    name: productpage
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/default/sa/curl
    to:
    - operation:
        methods: ["GET"]
"#;

/// https://istio.io/latest/docs/ambient/getting-started/manage-traffic/ ("Split traffic between
/// services").
const HTTP_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata:
  name: reviews
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: reviews
    port: 9080
  rules:
  - backendRefs:
    - name: reviews-v1
      port: 9080
      weight: 90
    - name: reviews-v2
      port: 9080
      weight: 10
"#;

/// https://istio.io/latest/docs/ambient/usage/extend-waypoint-wasm/ ("Apply WasmPlugin at
/// waypoint proxy").
const WASM_PLUGIN: &str = r#"
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata:
  name: basic-auth-at-waypoint
spec:
  targetRefs:
    - kind: Gateway
      group: gateway.networking.k8s.io
      name: waypoint # gateway name retrieved from previous step
  url: oci://ghcr.io/istio-ecosystem/wasm-extensions/basic_auth:1.12.0
  phase: AUTHN
  pluginConfig:
    basic_auth_rules:
      - prefix: "/productpage"
        request_methods:
          - "GET"
          - "POST"
        credentials:
          - "ok:test"
          - "YWRtaW4zOmFkbWluMw=="
"#;

const PEER: &str = "Istio docs YAML";

fn apply(state: &mut ClusterState, what: &str, text: &str) -> ambit_local::control::ChangeSet {
    let objects = parse(text)
        .unwrap_or_else(|e| panic!("{PEER} ({what}) → ambit-local manifest parser: {e}"));
    state
        .apply(&objects)
        .unwrap_or_else(|e| panic!("{PEER} ({what}) → ClusterState::apply: {e}"))
}

fn running(state: &ClusterState) -> Vec<RunningPod> {
    state
        .pods()
        .enumerate()
        .map(|(i, p)| RunningPod {
            namespace: p.metadata.namespace.clone(),
            name: p.metadata.name.clone(),
            ip: format!("10.244.1.{}", i + 10).parse().unwrap(),
            node: "node1".into(),
            enrolled: true,
            ready: true,
        })
        .collect()
}

fn vips(state: &ClusterState) -> BTreeMap<(String, String), IpAddr> {
    state
        .services()
        .enumerate()
        .map(|(i, s)| {
            let key = (s.metadata.namespace.clone(), s.metadata.name.clone());
            (key, format!("10.96.0.{}", i + 20).parse().unwrap())
        })
        .collect()
}

#[test]
fn bookinfo_and_the_l4_policy_from_istio_docs_translate_as_istiod_would() {
    let mut state = ClusterState::new();
    let changes = apply(&mut state, "bookinfo.yaml", BOOKINFO);
    let mut pods: Vec<String> = changes.pods_added.iter().map(|p| p.to_string()).collect();
    pods.sort();
    assert_eq!(
        pods,
        [
            "default/productpage-v1-0",
            "default/reviews-v1-0",
            "default/reviews-v2-0"
        ],
        "{PEER} (bookinfo.yaml): pods the Deployments create"
    );
    apply(&mut state, "bookinfo-versions.yaml", BOOKINFO_VERSIONS);

    // `kubectl label namespace default istio.io/dataplane-mode=ambient`
    // (https://istio.io/latest/docs/ambient/getting-started/secure-and-visualize/).
    let changes = state
        .label(
            Kind::Namespace,
            "",
            "default",
            "istio.io/dataplane-mode",
            Some("ambient"),
        )
        .unwrap_or_else(|e| panic!("{PEER} (label namespace ambient): {e}"));
    assert_eq!(
        changes.pods_relabeled.len(),
        3,
        "{PEER} (label namespace ambient): every bookinfo pod must be re-evaluated for enrollment"
    );
    assert_eq!(
        state
            .namespace_labels("default")
            .and_then(|l| l.get("istio.io/dataplane-mode"))
            .map(String::as_str),
        Some("ambient")
    );

    let changes = apply(&mut state, "L4 AuthorizationPolicy", L4_POLICY);
    assert!(
        changes.warnings.is_empty(),
        "{PEER} (L4 AuthorizationPolicy): a pure L4 policy converts without warnings: {:?}",
        changes.warnings
    );

    let cfg = ztunnel_config(&state, &running(&state), &vips(&state), "cluster.local");
    let step = format!("{PEER} → ztunnel config");
    let productpage = cfg
        .workloads
        .iter()
        .find(|w| w.name == "productpage-v1-0")
        .unwrap_or_else(|| panic!("{step}: productpage workload missing: {:?}", cfg.workloads));
    assert_eq!(
        productpage.uid, "Kubernetes//Pod/default/productpage-v1-0",
        "{step}: uid"
    );
    assert_eq!(
        productpage.protocol,
        Protocol::Hbone,
        "{step}: productpage captured"
    );
    assert_eq!(
        productpage.identity().unwrap().to_string(),
        "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
        "{step}: productpage identity from serviceAccountName"
    );
    assert_eq!(
        productpage.canonical_name, "productpage",
        "{step}: app label"
    );
    assert_eq!(
        productpage.canonical_revision, "v1",
        "{step}: version label"
    );
    assert_eq!(
        productpage
            .services
            .get("default/productpage.default.svc.cluster.local"),
        Some(&BTreeMap::from([(9080, 9080)])),
        "{step}: productpage's service ports (no targetPort: the port itself)"
    );
    assert_eq!(
        productpage.authorization_policies,
        ["default/productpage-viewer"],
        "{step}: the L4 policy selects productpage by app label"
    );
    let reviews_v1 = cfg
        .workloads
        .iter()
        .find(|w| w.name == "reviews-v1-0")
        .unwrap_or_else(|| panic!("{step}: reviews-v1 workload missing"));
    assert!(
        reviews_v1.authorization_policies.is_empty(),
        "{step}: the L4 policy does not select reviews: {:?}",
        reviews_v1.authorization_policies
    );
    let mut keys: Vec<&str> = reviews_v1.services.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "default/reviews-v1.default.svc.cluster.local",
            "default/reviews.default.svc.cluster.local"
        ],
        "{step}: reviews-v1 is an endpoint of reviews and reviews-v1"
    );

    let policy = cfg
        .policies
        .iter()
        .find(|p| p.name == "productpage-viewer")
        .unwrap_or_else(|| {
            panic!(
                "{step}: policy productpage-viewer missing: {:?}",
                cfg.policies
            )
        });
    assert_eq!(policy.namespace, "default");
    assert_eq!(
        policy.scope,
        Scope::WorkloadSelector,
        "{step}: policy scope"
    );
    assert_eq!(policy.action, Action::Allow, "{step}: policy action");
    let principals: Vec<&StringMatch> = policy
        .rules
        .iter()
        .flat_map(|r| &r.clauses)
        .flat_map(|c| &c.matches)
        .flat_map(|m| &m.principals)
        .collect();
    assert_eq!(
        principals,
        [&StringMatch::Exact(
            "cluster.local/ns/default/sa/bookinfo-gateway-istio".into()
        )],
        "{step}: the policy's principals as istiod sends them to ztunnel"
    );

    // What comes out is a state ztunnel accepts.
    Snapshot::build(
        cfg.workloads.clone(),
        cfg.services.clone(),
        cfg.policies.clone(),
    )
    .unwrap_or_else(|e| panic!("{step}: not a valid ztunnel state: {e}"));
}

#[test]
fn waypoint_httproute_l7_policy_and_wasmplugin_from_istio_docs() {
    let mut state = ClusterState::new();
    apply(&mut state, "bookinfo.yaml", BOOKINFO);
    apply(&mut state, "bookinfo-versions.yaml", BOOKINFO_VERSIONS);
    state
        .label(
            Kind::Namespace,
            "",
            "default",
            "istio.io/dataplane-mode",
            Some("ambient"),
        )
        .unwrap();

    apply(&mut state, "waypoint Gateway", WAYPOINT);
    assert_eq!(
        state.waypoint_names(),
        ["default/waypoint"],
        "{PEER} (waypoint Gateway): gatewayClassName istio-waypoint makes a waypoint"
    );
    let gateway = state.gateway("default", "waypoint").unwrap();
    assert_eq!(gateway.spec.listeners.len(), 1);
    assert_eq!(
        (
            gateway.spec.listeners[0].port,
            gateway.spec.listeners[0].protocol.as_str()
        ),
        (15008, "HBONE"),
        "{PEER} (waypoint Gateway): the mesh listener"
    );
    // `istioctl waypoint apply --enroll-namespace` labels the namespace
    // `istio.io/use-waypoint: waypoint` (enforce-auth-policies page).
    state
        .label(
            Kind::Namespace,
            "",
            "default",
            "istio.io/use-waypoint",
            Some("waypoint"),
        )
        .unwrap();

    apply(&mut state, "L4 AuthorizationPolicy", L4_POLICY);
    let changes = apply(&mut state, "L7 AuthorizationPolicy", L7_POLICY);
    assert_eq!(
        changes.objects,
        [(
            ObjectRef::new(Kind::AuthorizationPolicy, "default", "productpage-viewer"),
            ambit_local::control::ChangeAction::Configured
        )],
        "{PEER} (L7 AuthorizationPolicy): the same policy, reconfigured"
    );
    apply(&mut state, "HTTPRoute weighted split", HTTP_ROUTE);
    apply(&mut state, "WasmPlugin", WASM_PLUGIN);

    // The L7 policy leaves ztunnel (targetRefs: the waypoint enforces it) ...
    let Some(Object::AuthorizationPolicy(l7)) = state.get(&ObjectRef::new(
        Kind::AuthorizationPolicy,
        "default",
        "productpage-viewer",
    )) else {
        panic!("{PEER} (L7 AuthorizationPolicy): stored");
    };
    let conversion = convert_authorization_policy(l7, ROOT_NAMESPACE);
    assert!(
        conversion.authorization.is_none(),
        "{PEER} (L7 AuthorizationPolicy): a targetRefs policy is not sent to ztunnel: {conversion:?}"
    );
    // ... and reaches the waypoint, with the route of the Service it now carries and the
    // WasmPlugin that targets its Gateway.
    let l7_objects = state.waypoint_l7_objects("default", "waypoint");
    assert_eq!(
        l7_objects,
        [
            ObjectRef::new(Kind::HttpRoute, "default", "reviews"),
            ObjectRef::new(Kind::AuthorizationPolicy, "default", "productpage-viewer"),
            ObjectRef::new(Kind::WasmPlugin, "default", "basic-auth-at-waypoint"),
        ],
        "{PEER}: what the waypoint default/waypoint enforces"
    );
    let Some(Object::HttpRoute(route)) =
        state.get(&ObjectRef::new(Kind::HttpRoute, "default", "reviews"))
    else {
        panic!("{PEER} (HTTPRoute): stored");
    };
    assert!(
        route.spec.parent_refs[0].is_service(),
        "{PEER} (HTTPRoute): Service parentRef"
    );
    let route_json = format!("{:?}", route.spec.rules);
    for needle in ["reviews-v1", "reviews-v2", "90", "10"] {
        assert!(
            route_json.contains(needle),
            "{PEER} (HTTPRoute): {needle} in the weighted backends: {route_json}"
        );
    }

    // ztunnel sends reviews and productpage through the waypoint, once the runner has deployed
    // it (a pod named after the Gateway, as `ambit mesh` runs it).
    let waypoint_ip: IpAddr = "10.244.1.200".parse().unwrap();
    let mut pods = running(&state);
    pods.push(RunningPod {
        namespace: "default".into(),
        name: "waypoint".into(),
        ip: waypoint_ip,
        node: "node1".into(),
        enrolled: false,
        ready: true,
    });
    let cfg = ztunnel_config(&state, &pods, &vips(&state), "cluster.local");
    for name in ["reviews", "productpage", "reviews-v1"] {
        let service = cfg
            .services
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{PEER} → ztunnel config: service {name} missing"));
        let waypoint = service.waypoint.as_ref().unwrap_or_else(|| {
            panic!("{PEER} → ztunnel config: service {name} has no waypoint: {service:?}")
        });
        assert_eq!(
            waypoint.hbone_mtls_port, 15008,
            "{PEER} → ztunnel config: service {name}'s waypoint port"
        );
        assert!(
            matches!(&waypoint.destination, GatewayDestination::Address(a) if a.address == waypoint_ip),
            "{PEER} → ztunnel config: service {name}'s waypoint is the waypoint pod: {waypoint:?}"
        );
    }
    let waypoint_workload = cfg
        .workloads
        .iter()
        .find(|w| w.name == "waypoint")
        .unwrap_or_else(|| panic!("{PEER} → ztunnel config: the waypoint workload is missing"));
    assert_eq!(
        waypoint_workload.identity().unwrap().to_string(),
        "spiffe://cluster.local/ns/default/sa/waypoint",
        "{PEER} → ztunnel config: the waypoint's identity"
    );
    Snapshot::build(
        cfg.workloads.clone(),
        cfg.services.clone(),
        cfg.policies.clone(),
    )
    .unwrap_or_else(|e| panic!("{PEER} → ztunnel config with a waypoint: not a valid state: {e}"));

    let Some(Object::WasmPlugin(plugin)) = state.get(&ObjectRef::new(
        Kind::WasmPlugin,
        "default",
        "basic-auth-at-waypoint",
    )) else {
        panic!("{PEER} (WasmPlugin): stored in default");
    };
    assert_eq!(
        plugin.spec.url, "oci://ghcr.io/istio-ecosystem/wasm-extensions/basic_auth:1.12.0",
        "{PEER} (WasmPlugin): url"
    );
    assert_eq!(
        plugin.spec.target_refs.len(),
        1,
        "{PEER} (WasmPlugin): targetRefs"
    );
    assert_eq!(
        format!("{:?}", plugin.spec.phase),
        "Authn",
        "{PEER} (WasmPlugin): phase AUTHN"
    );
    let config = plugin.spec.plugin_config.as_ref().expect("pluginConfig");
    assert_eq!(
        config["basic_auth_rules"][0]["credentials"][1], "YWRtaW4zOmFkbWluMw==",
        "{PEER} (WasmPlugin): pluginConfig kept as JSON"
    );
}
