//! Parser and validation tests: each kind parses into the expected typed object, and each
//! validation failure names the object, the field and the problem.

use super::*;

fn one(text: &str) -> Object {
    let mut objects = parse(text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(objects.len(), 1, "{objects:?}");
    objects.remove(0)
}

/// Parses `text`, expecting an error that mentions every one of `needles`.
fn fails(text: &str, needles: &[&str]) -> ManifestError {
    let err = parse(text).expect_err("expected a parse error");
    let msg = err.to_string();
    for needle in needles {
        assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    }
    err
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: sleep
  labels: {app: sleep}
  annotations: {note: "hello"}
  uid: 5f1d-...            # what `kubectl get -o yaml` prints is tolerated
  resourceVersion: "42"
  creationTimestamp: "2024-01-01T00:00:00Z"
  managedFields: [{manager: kubectl}]
spec:
  serviceAccountName: sleep
  nodeName: node-1
  restartPolicy: Always
  terminationGracePeriodSeconds: 0
  containers:
  - name: sleep
    image: curlimages/curl
    imagePullPolicy: IfNotPresent
    command: ["/bin/sleep"]
    args: ["infinity"]
    resources: {limits: {cpu: 100m}}
    env:
    - {name: MODE, value: "test"}
    - {name: EMPTY}
    - name: POD_IP
      valueFrom: {fieldRef: {fieldPath: status.podIP, apiVersion: v1}}
    ports:
    - {containerPort: 8080, name: http}
    - {containerPort: 5353, protocol: UDP}
status:
  phase: Running
"#;

#[test]
fn parses_a_pod() {
    let Object::Pod(pod) = one(POD) else {
        panic!("not a pod")
    };
    assert_eq!(pod.metadata.name, "sleep");
    assert_eq!(pod.metadata.namespace, "default");
    assert_eq!(pod.metadata.labels, labels(&[("app", "sleep")]));
    assert_eq!(pod.metadata.annotations, labels(&[("note", "hello")]));
    assert_eq!(pod.spec.service_account_name, "sleep");
    assert_eq!(pod.spec.node_name.as_deref(), Some("node-1"));
    assert!(!pod.spec.host_network);
    assert_eq!(pod.owner, None);
    let c = &pod.spec.containers[0];
    assert_eq!(c.name, "sleep");
    assert_eq!(c.image, "curlimages/curl");
    assert_eq!(c.command, vec!["/bin/sleep"]);
    assert_eq!(c.args, vec!["infinity"]);
    assert_eq!(
        c.env,
        vec![
            EnvVar {
                name: "MODE".into(),
                value: EnvValue::Literal("test".into())
            },
            EnvVar {
                name: "EMPTY".into(),
                value: EnvValue::Literal(String::new())
            },
            EnvVar {
                name: "POD_IP".into(),
                value: EnvValue::FieldRef("status.podIP".into())
            },
        ]
    );
    assert_eq!(
        c.ports,
        vec![
            ContainerPort {
                container_port: 8080,
                protocol: Protocol::Tcp,
                name: Some("http".into())
            },
            ContainerPort {
                container_port: 5353,
                protocol: Protocol::Udp,
                name: None
            },
        ]
    );
    assert_eq!(
        pod.container_env(
            c,
            "10.0.0.5".parse().unwrap(),
            "172.18.0.2".parse().unwrap(),
            "node-1",
            "5f1d0c3e-0000-4000-8000-000000000001"
        ),
        vec![
            ("MODE".to_owned(), "test".to_owned()),
            ("EMPTY".to_owned(), String::new()),
            ("POD_IP".to_owned(), "10.0.0.5".to_owned()),
        ]
    );
    assert_eq!(pod.named_port("http", Protocol::Tcp), Some(8080));
    assert_eq!(pod.named_port("http", Protocol::Udp), None);
    assert_eq!(pod.workload_name(), "sleep");
}

#[test]
fn defaults_and_host_network() {
    let Object::Pod(pod) = one(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: demo}\nspec:\n  hostNetwork: true\n  containers: [{name: c, image: i}]\n",
    ) else {
        panic!()
    };
    assert_eq!(pod.metadata.namespace, "demo");
    assert_eq!(pod.spec.service_account_name, "default");
    assert!(pod.spec.host_network);
    // `kubectl apply -n`.
    let objects = parse_in(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a}\n",
        "other",
    )
    .unwrap();
    assert_eq!(objects[0].object_ref().namespace, "other");
}

#[test]
fn restart_policies_as_kubernetes_allows_them() {
    let pod = |policy: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec:\n  {policy}containers: [{{name: c, image: i}}]\n")
    };
    for (line, want) in [
        ("", RestartPolicy::Always),
        ("restartPolicy: Always\n  ", RestartPolicy::Always),
        ("restartPolicy: OnFailure\n  ", RestartPolicy::OnFailure),
        ("restartPolicy: Never\n  ", RestartPolicy::Never),
    ] {
        let Object::Pod(p) = one(&pod(line)) else {
            panic!()
        };
        assert_eq!(p.spec.restart_policy, want, "{line}");
    }
    fails(
        &pod("restartPolicy: Sometimes\n  "),
        &[
            "Pod default/p",
            "spec.restartPolicy",
            "Always, OnFailure or Never",
        ],
    );
    // A Deployment's pods always restart.
    fails(
        &DEPLOYMENT.replace("serviceAccountName: echo", "restartPolicy: Never"),
        &["Deployment demo/echo", "spec.template.spec", "Always"],
    );
}

#[test]
fn multi_document_streams_skip_empty_documents() {
    let text = r#"
---
# only a comment
---
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: demo}
secrets: [{name: token}]
automountServiceAccountToken: false
---
"#;
    let objects = parse(text).unwrap();
    assert_eq!(objects.len(), 2);
    let Object::Namespace(ns) = &objects[0] else {
        panic!()
    };
    assert_eq!(ns.metadata.namespace, "");
    assert_eq!(
        ns.metadata.labels,
        labels(&[("istio.io/dataplane-mode", "ambient")])
    );
    assert_eq!(objects[0].object_ref().to_string(), "Namespace demo");
    assert_eq!(
        objects[1].object_ref().to_string(),
        "ServiceAccount demo/client"
    );
    assert_eq!(parse("").unwrap(), vec![]);
    assert_eq!(parse("---\n---\n").unwrap(), vec![]);
}

#[test]
fn lists_are_unpacked() {
    let text = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: ServiceAccount, metadata: {name: a}}
- {apiVersion: v1, kind: ServiceAccount, metadata: {name: b}}
"#;
    let names: Vec<String> = parse(text)
        .unwrap()
        .iter()
        .map(|o| o.metadata().name.clone())
        .collect();
    assert_eq!(names, vec!["a", "b"]);
}

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: demo}
spec:
  replicas: 3
  strategy: {type: RollingUpdate}
  selector: {matchLabels: {app: echo}}
  template:
    metadata:
      labels: {app: echo, version: v2}
      annotations: {a: b}
    spec:
      serviceAccountName: echo
      containers: [{name: echo, image: ambit/echo, ports: [{containerPort: 8080}]}]
"#;

#[test]
fn parses_a_deployment_and_expands_its_pods() {
    let Object::Deployment(d) = one(DEPLOYMENT) else {
        panic!()
    };
    assert_eq!(d.spec.replicas, 3);
    assert_eq!(d.spec.selector, labels(&[("app", "echo")]));
    let pods = d.pods();
    let names: Vec<&str> = pods.iter().map(|p| p.metadata.name.as_str()).collect();
    assert_eq!(names, vec!["echo-0", "echo-1", "echo-2"]);
    for p in &pods {
        assert_eq!(p.metadata.namespace, "demo");
        assert_eq!(
            p.metadata.labels,
            labels(&[("app", "echo"), ("version", "v2")])
        );
        assert_eq!(p.metadata.annotations, labels(&[("a", "b")]));
        assert_eq!(p.owner.as_deref(), Some("echo"));
        assert_eq!(p.workload_name(), "echo");
        assert_eq!(p.spec.service_account_name, "echo");
    }
    // Replicas default to 1 and may be 0.
    let Object::Deployment(d) = one(&DEPLOYMENT.replace("  replicas: 3\n", "")) else {
        panic!()
    };
    assert_eq!(d.pods().len(), 1);
    let Object::Deployment(d) = one(&DEPLOYMENT.replace("replicas: 3", "replicas: 0")) else {
        panic!()
    };
    assert!(d.pods().is_empty());
}

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: bookinfo
  labels: {app: reviews, istio.io/use-waypoint: waypoint}
spec:
  type: ClusterIP
  sessionAffinity: None
  selector: {app: reviews}
  ports:
  - {name: http, port: 9080, targetPort: http-web, appProtocol: http}
  - {name: grpc, port: 9090, targetPort: 19090, protocol: TCP}
  - {name: quoted, port: 9091, targetPort: "19091"}
  - {name: default, port: 9092}
"#;

#[test]
fn parses_a_service() {
    let Object::Service(svc) = one(SERVICE) else {
        panic!()
    };
    assert_eq!(svc.metadata.labels["istio.io/use-waypoint"], "waypoint");
    assert_eq!(svc.spec.selector, labels(&[("app", "reviews")]));
    assert_eq!(svc.spec.cluster_ip, ClusterIp::Auto);
    let targets: Vec<&TargetPort> = svc.spec.ports.iter().map(|p| &p.target_port).collect();
    assert_eq!(
        targets,
        vec![
            &TargetPort::Name("http-web".into()),
            &TargetPort::Number(19090),
            &TargetPort::Number(19091),
            &TargetPort::Number(9092),
        ]
    );
    assert_eq!(svc.spec.ports[0].app_protocol.as_deref(), Some("http"));
    assert_eq!(
        svc.hostname("cluster.local"),
        "reviews.bookinfo.svc.cluster.local"
    );
    let Object::Service(headless) = one(&SERVICE.replace("type: ClusterIP", "clusterIP: None"))
    else {
        panic!()
    };
    assert_eq!(headless.spec.cluster_ip, ClusterIp::Headless);
    let Object::Service(fixed) = one(&SERVICE.replace("type: ClusterIP", "clusterIP: 10.96.0.10"))
    else {
        panic!()
    };
    assert_eq!(
        fixed.spec.cluster_ip,
        ClusterIp::Fixed("10.96.0.10".parse().unwrap())
    );
}

const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin, version: v1}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
        notNamespaces: ["kube-*"]
        ipBlocks: ["10.0.0.0/8", "192.168.1.7"]
        requestPrincipals: ["*"]
    - source:
        namespaces: ["dev"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/info*"]
        ports: ["8080"]
        notPorts: ["9090"]
        hosts: ["a.example"]
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
    - key: source.ip
      notValues: ["10.1.2.3"]
"#;

#[test]
fn parses_an_authorization_policy() {
    let Object::AuthorizationPolicy(ap) = one(POLICY) else {
        panic!()
    };
    let spec = &ap.spec;
    assert_eq!(
        spec.selector,
        Some(labels(&[("app", "httpbin"), ("version", "v1")]))
    );
    assert_eq!(spec.action, AuthorizationAction::Allow);
    assert!(spec.target_refs.is_empty());
    let rule = &spec.rules[0];
    assert_eq!(rule.from.len(), 2);
    assert_eq!(
        rule.from[0].principals,
        vec!["cluster.local/ns/default/sa/sleep"]
    );
    assert_eq!(rule.from[0].not_namespaces, vec!["kube-*"]);
    assert_eq!(rule.from[0].ip_blocks, vec!["10.0.0.0/8", "192.168.1.7"]);
    assert_eq!(rule.from[0].request_principals, vec!["*"]);
    assert_eq!(rule.from[1].namespaces, vec!["dev"]);
    let op = &rule.to[0];
    assert_eq!(op.methods, vec!["GET"]);
    assert_eq!(op.paths, vec!["/info*"]);
    assert_eq!(op.ports, vec!["8080"]);
    assert_eq!(op.not_ports, vec!["9090"]);
    assert_eq!(op.hosts, vec!["a.example"]);
    assert_eq!(rule.when.len(), 2);
    assert_eq!(rule.when[1].key, "source.ip");
    assert_eq!(rule.when[1].not_values, vec!["10.1.2.3"]);

    // v1beta1 is served too; `spec: {}` is ALLOW-nothing (deny all).
    let Object::AuthorizationPolicy(deny_all) = one(
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: foo}\nspec: {}\n",
    ) else {
        panic!()
    };
    assert_eq!(deny_all.spec, AuthorizationPolicySpec::default());
}

#[test]
fn parses_target_refs_and_other_actions() {
    let Object::AuthorizationPolicy(ap) = one(r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: wp, namespace: foo}
spec:
  targetRefs:
  - {kind: Service, group: "", name: reviews}
  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
  action: DENY
  rules: [{to: [{operation: {methods: [DELETE]}}]}]
"#)
    else {
        panic!()
    };
    assert_eq!(ap.spec.action, AuthorizationAction::Deny);
    assert_eq!(ap.spec.target_refs.len(), 2);
    assert_eq!(ap.spec.target_refs[0].kind, "Service");
    assert_eq!(ap.spec.target_refs[1].group, GATEWAY_API_GROUP);
    let Object::AuthorizationPolicy(custom) = one(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext, namespace: foo}\nspec:\n  action: CUSTOM\n  provider: {name: my-authz}\n  rules: [{}]\n",
    ) else {
        panic!()
    };
    assert_eq!(custom.spec.action, AuthorizationAction::Custom);
    assert_eq!(custom.spec.provider.as_deref(), Some("my-authz"));
    assert_eq!(custom.spec.rules, vec![AuthorizationRule::default()]);
}

#[test]
fn parses_peer_authentication() {
    let Object::PeerAuthentication(pa) = one(r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: finance, namespace: foo}
spec:
  selector: {matchLabels: {app: finance}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: DISABLE}
    "9090": {mode: PERMISSIVE}
"#)
    else {
        panic!()
    };
    assert_eq!(pa.spec.mtls, MtlsMode::Strict);
    assert!(pa.spec.has_selector());
    assert_eq!(
        pa.spec.port_level_mtls,
        BTreeMap::from([(8080, MtlsMode::Disable), (9090, MtlsMode::Permissive)])
    );
    let Object::PeerAuthentication(mesh) = one(
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {}}\n",
    ) else {
        panic!()
    };
    assert_eq!(mesh.spec.mtls, MtlsMode::Unset);
    assert!(!mesh.spec.has_selector());
}

#[test]
fn parses_gateway_and_http_route() {
    let objects = parse(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: bookinfo
  labels: {istio.io/waypoint-for: service}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - {name: mesh, port: 15008, protocol: HBONE}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs:
  - {group: "", kind: Service, name: reviews, port: 9080}
  hostnames: [reviews]
  rules:
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10}
"#,
    )
    .unwrap();
    let Object::Gateway(gw) = &objects[0] else {
        panic!()
    };
    assert_eq!(gw.spec.gateway_class_name, "istio-waypoint");
    assert_eq!(
        gw.spec.listeners,
        vec![Listener {
            name: "mesh".into(),
            hostname: None,
            port: 15008,
            protocol: "HBONE".into(),
            tls: None,
            allowed_routes: None,
        }]
    );
    let Object::HttpRoute(route) = &objects[1] else {
        panic!()
    };
    assert_eq!(
        objects[1].object_ref().to_string(),
        "HTTPRoute bookinfo/reviews"
    );
    let parent = &route.spec.parent_refs[0];
    assert!(parent.is_service());
    assert_eq!(parent.port, Some(9080));
    assert_eq!(route.spec.hostnames, vec!["reviews"]);
    assert_eq!(route.spec.rules[0].backend_refs[1].weight, 10);
    assert_eq!(
        route.spec.rules[0].backend_refs[1].backend.name,
        "reviews-v2"
    );
    assert_eq!(route.spec.rules[0].backend_refs[1].backend.port, 9080);
    // Defaults: a parentRef without group/kind is a Gateway.
    let Object::HttpRoute(r) = one(
        "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {parentRefs: [{name: gw}]}\n",
    ) else {
        panic!()
    };
    assert_eq!(r.spec.parent_refs[0].group, GATEWAY_API_GROUP);
    assert_eq!(r.spec.parent_refs[0].kind, "Gateway");
    assert!(!r.spec.parent_refs[0].is_service());
}

#[test]
fn parses_a_wasm_plugin() {
    let Object::WasmPlugin(wp) = one(r#"
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: openid-connect, namespace: bookinfo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  url: file:///opt/filters/openid.wasm
  sha256: 1ef0c9a92b0420cf25f7fe5d481b231464bc88f486ca3b9c83ed5cc21d2f6210
  phase: AUTHN
  priority: 10
  failStrategy: FAIL_OPEN
  pluginName: openid
  pluginConfig:
    openid_server: authn
    openid_realm: ingress
    ports: [80, 443]
  vmConfig:
    env: [{name: POD_NAME, valueFrom: HOST}, {name: TRUST, value: "yes"}]
  match:
  - mode: SERVER
    ports: [{number: 9080}]
  type: HTTP
"#)
    else {
        panic!()
    };
    let s = &wp.spec;
    assert_eq!(s.url, "file:///opt/filters/openid.wasm");
    assert_eq!(s.phase, WasmPhase::Authn);
    assert_eq!(s.priority, Some(10));
    assert_eq!(s.fail_strategy, FailStrategy::FailOpen);
    assert_eq!(s.plugin_name.as_deref(), Some("openid"));
    assert_eq!(
        s.plugin_config,
        Some(
            serde_json::json!({"openid_server": "authn", "openid_realm": "ingress", "ports": [80, 443]})
        )
    );
    assert_eq!(s.vm_env.len(), 2);
    assert!(s.vm_env[0].from_host);
    assert_eq!(s.vm_env[1].value, "yes");
    assert_eq!(
        s.matches,
        vec![WasmTrafficSelector {
            mode: "SERVER".into(),
            ports: vec![9080]
        }]
    );
    assert_eq!(s.plugin_type, WasmPluginType::Http);
    assert_eq!(s.target_refs[0].name, "waypoint");
}

// ---- validation errors: each names the object, the field and the problem ----

#[test]
fn unknown_kinds_and_api_versions_are_refused() {
    let err = fails(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\n",
        &["document 1", "(cfg)", "\"ConfigMap\"", "supports"],
    );
    assert!(matches!(err, ManifestError::UnsupportedKind { .. }));
    fails(
        "apiVersion: extensions/v1beta1\nkind: Deployment\nmetadata: {name: d}\n",
        &["\"extensions/v1beta1\"", "Deployment is served as apps/v1"],
    );
    fails(
        "apiVersion: networking.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\n",
        &["security.istio.io/v1"],
    );
    // Which document: the second one here.
    fails(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: Pod\n",
        &["document 2", "apiVersion: required"],
    );
    fails(
        "- a\n- b\n",
        &["document 1", "expected a Kubernetes object"],
    );
    let err = fails("a: [\n", &["document 1", "invalid YAML"]);
    assert!(
        matches!(err, ManifestError::Yaml { line: 2, .. }),
        "{err:?}"
    );
}

#[test]
fn missing_and_invalid_names() {
    fails(
        "apiVersion: v1\nkind: Pod\nmetadata: {namespace: demo}\nspec: {containers: [{name: c, image: i}]}\n",
        &["Pod demo/<no name>", "metadata.name", "required"],
    );
    fails(
        "apiVersion: v1\nkind: Pod\nmetadata: {generateName: web-}\nspec: {containers: [{name: c, image: i}]}\n",
        &["metadata.name", "generateName is not supported"],
    );
    fails(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: Sleep_1}\nspec: {containers: [{name: c, image: i}]}\n",
        &["Pod default/Sleep_1", "metadata.name", "DNS-1123 subdomain"],
    );
    fails(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a.b}\n",
        &["Namespace a.b", "metadata.name", "DNS-1123 label"],
    );
    fails(
        "apiVersion: v1\nkind: Service\nmetadata: {name: 9svc}\nspec: {selector: {a: b}, ports: [{port: 80}]}\n",
        &["Service default/9svc", "metadata.name", "DNS-1035"],
    );
    fails(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a, namespace: Demo}\n",
        &["ServiceAccount Demo/a", "metadata.namespace"],
    );
    fails(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {\"bad key!\": x}}\n",
        &[
            "Namespace a",
            "metadata.labels[bad key!]",
            "not a valid label key",
        ],
    );
    fails(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {version: 1.10}}\n",
        &["metadata.labels[version]", "quote it"],
    );
}

#[test]
fn pod_spec_errors_name_the_field() {
    let pod = |spec: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: demo}}\nspec: {spec}\n"
        )
    };
    fails(
        &pod("{containers: []}"),
        &["Pod demo/web", "spec.containers", "at least one container"],
    );
    fails(&pod("{}"), &["spec.containers", "required"]);
    fails(
        &pod("{containers: [{name: c}]}"),
        &["Pod demo/web", "spec.containers[0].image", "required"],
    );
    fails(
        &pod("{containers: [{name: c, image: i, ports: [{containerPort: 70000}]}]}"),
        &[
            "Pod demo/web",
            "spec.containers[0].ports[0].containerPort",
            "70000 is out of range (1-65535)",
        ],
    );
    fails(
        &pod("{containers: [{name: c, image: i, ports: [{containerPort: 0}]}]}"),
        &["containerPort", "0 is out of range"],
    );
    fails(
        &pod("{containers: [{name: c, image: i, ports: [{containerPort: 80, protocol: HTTP}]}]}"),
        &["spec.containers[0].ports[0].protocol", "TCP, UDP or SCTP"],
    );
    fails(
        &pod("{containers: [{name: c, image: i}, {name: c, image: j}]}"),
        &["spec.containers[1].name", "duplicate container name"],
    );
    fails(
        &pod("{containers: [{name: a, image: i, ports: [{containerPort: 1, name: web}]}, {name: b, image: i, ports: [{containerPort: 2, name: web}]}]}"),
        &["spec.containers[1].ports[0].name", "duplicate port name"],
    );
    fails(
        &pod("{containers: [{name: c, image: i, ports: [{containerPort: 1, name: Web_Port}]}]}"),
        &["spec.containers[0].ports[0].name", "not a valid port name"],
    );
    // Strict about what it does not know: a typo, an unsupported feature.
    fails(
        &pod("{containers: [{name: c, image: i, comand: [x]}]}"),
        &["Pod demo/web", "spec.containers[0].comand", "unknown field"],
    );
    fails(
        &pod("{initContainers: [], containers: [{name: c, image: i}]}"),
        &["spec.initContainers", "unknown field"],
    );
    fails(
        &pod("{containers: [{name: c, image: i, env: [{name: A, valueFrom: {secretKeyRef: {name: s, key: k}}}]}]}"),
        &["spec.containers[0].env[0].valueFrom.fieldRef", "required"],
    );
    fails(
        &pod("{containers: [{name: c, image: i, env: [{name: A, valueFrom: {fieldRef: {fieldPath: spec.volumes}}}]}]}"),
        &["spec.containers[0].env[0].valueFrom.fieldRef.fieldPath", "unsupported field path"],
    );
    fails(
        &pod("{containers: [{name: c, image: i, env: [{name: A, value: 1}]}]}"),
        &["spec.containers[0].env[0].value", "quote it"],
    );
    fails(
        &pod("{hostNetwork: yes, containers: [{name: c, image: i}]}"),
        &["spec.hostNetwork", "true or false"],
    );
    fails(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspce: {}\n",
        &["Pod default/web", "spec", "required"],
    );
    fails(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec: {containers: [{name: c, image: i}]}\nspce: {}\n",
        &["Pod default/web", "spce", "unknown field"],
    );
}

#[test]
fn deployment_errors() {
    fails(
        &DEPLOYMENT.replace("labels: {app: echo, version: v2}", "labels: {app: other}"),
        &[
            "Deployment demo/echo",
            "spec.template.metadata.labels",
            "`selector` does not match template `labels`",
        ],
    );
    fails(
        &DEPLOYMENT.replace("replicas: 3", "replicas: -1"),
        &["Deployment demo/echo", "spec.replicas", "-1"],
    );
    fails(
        &DEPLOYMENT.replace(
            "selector: {matchLabels: {app: echo}}",
            "selector: {matchExpressions: []}",
        ),
        &["spec.selector.matchExpressions", "not supported"],
    );
    fails(
        &DEPLOYMENT.replace("selector: {matchLabels: {app: echo}}", "selector: {}"),
        &["spec.selector", "empty selector"],
    );
    fails(
        &DEPLOYMENT.replace("image: ambit/echo, ", ""),
        &[
            "Deployment demo/echo",
            "spec.template.spec.containers[0].image",
            "required",
        ],
    );
}

#[test]
fn service_errors() {
    fails(
        "apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {ports: [{port: 5432}]}\n",
        &["Service default/db", "spec.selector", "needs a selector"],
    );
    fails(
        &SERVICE.replace("port: 9090,", "port: 0,"),
        &[
            "Service bookinfo/reviews",
            "spec.ports[1].port",
            "0 is out of range (1-65535)",
        ],
    );
    fails(
        &SERVICE.replace("targetPort: 19090", "targetPort: 99999"),
        &["spec.ports[1].targetPort", "99999 is out of range"],
    );
    fails(
        &SERVICE.replace("targetPort: http-web", "targetPort: \"http web\""),
        &["spec.ports[0].targetPort", "not a valid port name"],
    );
    fails(
        &SERVICE.replace("{name: grpc,", "{"),
        &["spec.ports[1].name", "more than one port"],
    );
    fails(
        &SERVICE.replace("name: grpc", "name: http"),
        &["spec.ports[1].name", "duplicate port name"],
    );
    fails(
        &SERVICE.replace("port: 9090", "port: 9080"),
        &["spec.ports[1].port", "duplicate port 9080/TCP"],
    );
    fails(
        &SERVICE.replace("type: ClusterIP", "type: NodePort"),
        &["spec.type", "use ClusterIP"],
    );
    fails(
        &SERVICE.replace("type: ClusterIP", "clusterIP: 10.0.0.300"),
        &["spec.clusterIP", "not an IP address"],
    );
}

fn ap(spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\nspec:\n{spec}\n"
    )
}

#[test]
fn authorization_policy_errors() {
    fails(
        &ap("  selector: {matchLabels: {app: a}}\n  targetRefs: [{kind: Service, group: \"\", name: a}]"),
        &["AuthorizationPolicy foo/p", "spec.targetRefs", "only one of targetRefs or selector"],
    );
    fails(
        &ap("  targetRefs: [{kind: Deployment, group: apps, name: a}]"),
        &["spec.targetRefs[0]", "targetRef must be to one of"],
    );
    fails(
        &ap("  targetRefs: [{kind: Service, group: \"\", name: a, namespace: other}]"),
        &["spec.targetRefs[0].namespace", "cross namespace"],
    );
    fails(
        &ap("  action: REJECT"),
        &["spec.action", "\"REJECT\"", "ALLOW, DENY, AUDIT, CUSTOM"],
    );
    fails(
        &ap("  action: DENY"),
        &["spec.rules", "DENY action without `rules`"],
    );
    fails(
        &ap("  action: CUSTOM\n  rules: [{}]"),
        &["spec.provider.name", "must not be empty"],
    );
    fails(
        &ap("  provider: {name: x}\n  rules: [{}]"),
        &["spec.provider", "non CUSTOM action"],
    );
    fails(
        &ap("  rules: [{from: []}]"),
        &["spec.rules[0].from", "`from` must not be empty"],
    );
    fails(
        &ap("  rules: [{to: []}]"),
        &["spec.rules[0].to", "`to` must not be empty"],
    );
    fails(
        &ap("  rules: [{from: [{}]}]"),
        &["spec.rules[0].from[0].source", "required"],
    );
    fails(
        &ap("  rules: [{from: [{source: {}}]}]"),
        &[
            "spec.rules[0].from[0].source",
            "`from.source` must not be empty",
        ],
    );
    fails(
        &ap("  rules: [{to: [{operation: {}}]}]"),
        &[
            "spec.rules[0].to[0].operation",
            "`to.operation` must not be empty",
        ],
    );
    fails(
        &ap("  rules: [{to: [{operation: {ports: [\"80000\"]}}]}]"),
        &[
            "spec.rules[0].to[0].operation.ports[0]",
            "invalid port \"80000\"",
        ],
    );
    fails(
        &ap("  rules: [{to: [{operation: {ports: [8080]}}]}]"),
        &["spec.rules[0].to[0].operation.ports[0]", "quote it"],
    );
    fails(
        &ap("  rules: [{from: [{source: {ipBlocks: [\"10.0.0.0/33\"]}}]}]"),
        &["spec.rules[0].from[0].source.ipBlocks[0]", "10.0.0.0/33"],
    );
    fails(
        &ap("  rules: [{from: [{source: {principals: [\"\"]}}]}]"),
        &["spec.rules[0].from[0].source.principals[0]", "empty value"],
    );
    fails(
        &ap("  rules: [{from: [{source: {namespaces: [a], serviceAccounts: [b]}}]}]"),
        &[
            "spec.rules[0].from[0].source",
            "cannot set serviceAccounts with namespaces or principals",
        ],
    );
    fails(
        &ap("  rules: [{from: [{source: {principal: [a]}}]}]"),
        &["spec.rules[0].from[0].source.principal", "unknown field"],
    );
    fails(
        &ap("  rules: [{when: [{key: source.ip}]}]"),
        &[
            "spec.rules[0].when[0]",
            "at least one of `values` or `notValues`",
        ],
    );
    fails(
        &ap("  rules: [{when: [{key: request.color, values: [red]}]}]"),
        &["spec.rules[0].when[0].key", "unknown attribute"],
    );
    fails(
        &ap("  rules: [{when: [{key: destination.port, values: [http]}]}]"),
        &["spec.rules[0].when[0].values[0]", "invalid port"],
    );
    fails(
        &ap("  selector: {matchLabels: {app: \"*\"}}"),
        &[
            "spec.selector.matchLabels[app]",
            "wildcard is not supported",
        ],
    );
    // A typo in a policy is an error, never a silently wider policy.
    fails(
        &ap("  selectr: {matchLabels: {app: a}}"),
        &["spec.selectr", "unknown field"],
    );
}

#[test]
fn peer_authentication_errors() {
    let pa = |spec: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p, namespace: foo}}\nspec: {spec}\n")
    };
    fails(
        &pa("{mtls: {mode: STRICTEST}}"),
        &["PeerAuthentication foo/p", "spec.mtls.mode", "STRICT"],
    );
    fails(
        &pa("{mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: DISABLE}}}"),
        &[
            "spec.portLevelMtls",
            "mesh/namespace peer authentication cannot have port level mTLS",
        ],
    );
    fails(
        &pa("{selector: {matchLabels: {a: b}}, portLevelMtls: {}}"),
        &["spec.portLevelMtls", "at least one element"],
    );
    fails(
        &pa("{selector: {matchLabels: {a: b}}, portLevelMtls: {0: {mode: STRICT}}}"),
        &["spec.portLevelMtls[0]", "1..65535"],
    );
}

#[test]
fn gateway_route_and_plugin_errors() {
    fails(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec: {listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n",
        &["Gateway default/g", "spec.gatewayClassName", "required"],
    );
    fails(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 150080, protocol: HBONE}]}\n",
        &["spec.listeners[0].port", "out of range"],
    );
    fails(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {parentRefs: [{kind: Service}]}\n",
        &["HTTPRoute default/r", "spec.parentRefs[0].name", "required"],
    );
    let wasm = |spec: &str| {
        format!("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: w}}\nspec: {spec}\n")
    };
    fails(
        &wasm("{phase: AUTHN}"),
        &["WasmPlugin default/w", "spec.url", "required"],
    );
    fails(
        &wasm("{url: ftp://x/y.wasm}"),
        &["spec.url", "unsupported scheme"],
    );
    fails(&wasm("{url: oci://x, sha256: abc}"), &["spec.sha256", "64"]);
    fails(
        &wasm("{url: oci://x, phase: LATE}"),
        &["spec.phase", "AUTHN"],
    );
    fails(
        &wasm("{url: oci://x, failStrategy: FAIL}"),
        &["spec.failStrategy", "FAIL_CLOSE"],
    );
    fails(
        &wasm("{url: oci://x, match: [{ports: [{number: 0}]}]}"),
        &["spec.match[0].ports[0].number", "out of range"],
    );
    fails(
        &wasm("{url: oci://x, selector: {matchLabels: {a: b}}, targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: g}]}"),
        &["spec.targetRefs", "only one of"],
    );
    fails(
        &wasm("{url: oci://x, vmConfig: {env: [{name: A, valueFrom: HOST, value: x}]}}"),
        &["spec.vmConfig.env[0].value", "HOST"],
    );
}

#[test]
fn kinds_parse_from_cli_spellings() {
    for (s, k) in [
        ("ns", Kind::Namespace),
        ("Pods", Kind::Pod),
        ("deployments.apps", Kind::Deployment),
        ("svc", Kind::Service),
        (
            "authorizationpolicies.security.istio.io",
            Kind::AuthorizationPolicy,
        ),
        ("HTTPRoute", Kind::HttpRoute),
    ] {
        assert_eq!(s.parse::<Kind>().unwrap(), k, "{s}");
    }
    assert!("configmap".parse::<Kind>().is_err());
}

#[test]
fn label_arguments() {
    assert_eq!(
        parse_label_arg("istio.io/dataplane-mode=ambient").unwrap(),
        ("istio.io/dataplane-mode".into(), Some("ambient".into()))
    );
    assert_eq!(
        parse_label_arg("istio.io/dataplane-mode-").unwrap(),
        ("istio.io/dataplane-mode".into(), None)
    );
    assert_eq!(
        parse_label_arg("a=").unwrap(),
        ("a".into(), Some(String::new()))
    );
    assert!(parse_label_arg("a").is_err());
    assert!(parse_label_arg("a=b c").is_err());
    assert!(parse_label_arg("-=x").is_err());
}

#[test]
fn the_demo_manifest_parses() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/demo.yaml"
    ))
    .unwrap();
    let refs: Vec<String> = parse(&text)
        .unwrap()
        .iter()
        .map(|o| o.object_ref().to_string())
        .collect();
    assert_eq!(
        refs,
        vec![
            "Namespace demo",
            "ServiceAccount demo/echo",
            "ServiceAccount demo/client",
            "Deployment demo/echo",
            "Service demo/echo",
            "Pod demo/client",
            "AuthorizationPolicy demo/echo-allow-client",
        ]
    );
}

#[test]
fn yaml_errors_point_into_the_stream() {
    let err =
        parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: [\n").unwrap_err();
    let ManifestError::Yaml { document, line, .. } = err else {
        panic!("{err:?}")
    };
    assert_eq!((document, line), (2, 6));
}

#[test]
fn grpc_routes_become_http_route_rules_with_path_matches() {
    let Object::GrpcRoute(route) = one(r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g}
spec:
  parentRefs: [{group: "", kind: Service, name: greeter}]
  rules:
  - matches:
    - method: {service: helloworld.Greeter, method: SayHello}
    - method: {service: helloworld.Greeter}
      headers: [{name: x-v, value: "2"}]
    - method: {method: SayHello}
    - method: {type: RegularExpression, service: "hello.*"}
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-a, value: b}]}}
    backendRefs: [{name: greeter-v2, port: 50051, weight: 3}]
"#)
    else {
        panic!()
    };
    let rule = &route.spec.rules[0];
    let paths: Vec<(PathMatchType, &str)> = rule
        .matches
        .iter()
        .map(|m| {
            let p = m.path.as_ref().unwrap();
            (p.kind, p.value.as_str())
        })
        .collect();
    assert_eq!(
        paths,
        [
            (PathMatchType::Exact, "/helloworld.Greeter/SayHello"),
            (PathMatchType::PathPrefix, "/helloworld.Greeter"),
            (PathMatchType::RegularExpression, "/[^/]+/SayHello"),
            (PathMatchType::RegularExpression, "/hello.*/[^/]+"),
        ]
    );
    assert_eq!(rule.matches[1].headers[0].name, "x-v");
    assert_eq!(rule.backend_refs[0].weight, 3);
    assert_eq!(rule.filters.len(), 1);
    let grpc = |rules: &str| {
        format!("apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g}}\nspec:\n  parentRefs: [{{name: gw}}]\n  rules: [{rules}]\n")
    };
    fails(
        &grpc("{matches: [{method: {}}]}"),
        &["a service, a method or both"],
    );
    fails(
        &grpc("{matches: [{method: {service: \"a/b\"}}]}"),
        &["not a valid gRPC name"],
    );
    fails(
        &grpc("{filters: [{type: URLRewrite, urlRewrite: {hostname: x}}]}"),
        &["RequestHeaderModifier, ResponseHeaderModifier and RequestMirror"],
    );
    assert_eq!("grpcroutes".parse::<Kind>().unwrap(), Kind::GrpcRoute);
}
