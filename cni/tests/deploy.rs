//! The manifests in `deploy/`: rendered by kustomize (`kubectl kustomize`, which must be on PATH),
//! every object parsed into its k8s-openapi type (so a misspelt field or a wrong type fails
//! here, not on a cluster), and the properties that matter checked: least-privilege RBAC, the
//! capabilities each container gets, the host paths the node agent and ztunnel share, and what
//! the overlay replacing Istio's ztunnel keeps and drops.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Deserialize;
use serde_json::Value;

#[derive(Default)]
struct Rendered {
    daemonsets: BTreeMap<String, DaemonSet>,
    deployments: BTreeMap<String, Deployment>,
    services: BTreeMap<String, Service>,
    service_accounts: BTreeMap<String, ServiceAccount>,
    config_maps: BTreeMap<String, ConfigMap>,
    namespaces: BTreeMap<String, Namespace>,
    cluster_roles: BTreeMap<String, ClusterRole>,
    bindings: BTreeMap<String, ClusterRoleBinding>,
    /// Namespace of every namespaced object, by `Kind/name`.
    object_namespaces: BTreeMap<String, Option<String>>,
}

fn typed<T: serde::de::DeserializeOwned>(object: &Value) -> T {
    serde_json::from_value(object.clone())
        .unwrap_or_else(|e| panic!("{e}: not a valid {}", object["kind"]))
}

fn render(dir: &str) -> Rendered {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `kubectl kustomize` ({e}): install kubectl (with kustomize v5) to test deploy/")
        });
    assert!(
        output.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let mut rendered = Rendered::default();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let object: Value = Value::deserialize(document).unwrap();
        if object.is_null() {
            continue;
        }
        let kind = object["kind"].as_str().unwrap().to_owned();
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        rendered.object_namespaces.insert(
            format!("{kind}/{name}"),
            object["metadata"]["namespace"].as_str().map(str::to_owned),
        );
        match kind.as_str() {
            "DaemonSet" => drop(rendered.daemonsets.insert(name, typed(&object))),
            "Deployment" => drop(rendered.deployments.insert(name, typed(&object))),
            "Service" => drop(rendered.services.insert(name, typed(&object))),
            "ServiceAccount" => drop(rendered.service_accounts.insert(name, typed(&object))),
            "ConfigMap" => drop(rendered.config_maps.insert(name, typed(&object))),
            "Namespace" => drop(rendered.namespaces.insert(name, typed(&object))),
            "ClusterRole" => drop(rendered.cluster_roles.insert(name, typed(&object))),
            "ClusterRoleBinding" => drop(rendered.bindings.insert(name, typed(&object))),
            other => panic!("{dir}: unexpected kind {other} ({name}); add it to this test"),
        }
    }
    rendered
}

fn pod_spec(daemonset: &DaemonSet) -> &PodSpec {
    daemonset
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn capabilities(container: &Container) -> (BTreeSet<String>, BTreeSet<String>) {
    let security = container.security_context.as_ref().unwrap();
    assert_ne!(
        security.privileged,
        Some(true),
        "{} is not privileged",
        container.name
    );
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let caps = security.capabilities.as_ref().unwrap();
    let set = |v: &Option<Vec<String>>| v.iter().flatten().cloned().collect::<BTreeSet<_>>();
    (set(&caps.add), set(&caps.drop))
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn host_paths(spec: &PodSpec) -> BTreeMap<String, String> {
    spec.volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.clone(), v.host_path.as_ref()?.path.clone())))
        .collect()
}

fn mount_of(container: &Container, volume: &str) -> String {
    container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume)
        .unwrap_or_else(|| panic!("{} does not mount {volume}", container.name))
        .mount_path
        .clone()
}

fn env(container: &Container, name: &str) -> Option<String> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

fn env_field(container: &Container, name: &str) -> Option<String> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)?
        .value_from
        .as_ref()?
        .field_ref
        .as_ref()
        .map(|f| f.field_path.clone())
}

const CAPS: &[&str] = &["NET_ADMIN", "SYS_ADMIN", "NET_RAW"];

#[test]
fn base_renders_with_least_privilege_rbac() {
    let base = render("deploy/base");
    // RBAC: exactly one role, exactly these rules.
    assert_eq!(base.cluster_roles.keys().collect::<Vec<_>>(), ["ambit-cni"]);
    let mut granted = BTreeSet::new();
    for rule in base.cluster_roles["ambit-cni"].rules.iter().flatten() {
        assert_eq!(
            rule.api_groups.as_deref(),
            Some(&[String::new()][..]),
            "core group only"
        );
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for resource in rule.resources.iter().flatten() {
            for verb in &rule.verbs {
                granted.insert(format!("{resource}:{verb}"));
            }
        }
    }
    let expected: BTreeSet<String> = [
        "pods:get",
        "pods:list",
        "pods:watch",
        "namespaces:get",
        "namespaces:list",
        "namespaces:watch",
        "pods/status:patch",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(granted, expected);
    let binding = &base.bindings["ambit-cni"];
    assert_eq!(base.bindings.len(), 1);
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, "ambit-cni");
    let subjects = binding.subjects.as_ref().unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(
        (
            subjects[0].kind.as_str(),
            subjects[0].name.as_str(),
            subjects[0].namespace.as_deref()
        ),
        ("ServiceAccount", "ambit-cni", Some("ambit-system"))
    );
    assert_eq!(
        base.service_accounts.keys().collect::<Vec<_>>(),
        ["ambit-cni", "ztunnel"]
    );

    // Everything namespaced lands in ambit-system.
    for (object, namespace) in &base.object_namespaces {
        let cluster_scoped = object.starts_with("Namespace/")
            || object.starts_with("ClusterRole/")
            || object.starts_with("ClusterRoleBinding/");
        let expected = (!cluster_scoped).then(|| "ambit-system".to_owned());
        assert_eq!(namespace, &expected, "{object}");
    }
}

#[test]
fn base_daemonsets_get_only_the_capabilities_they_need() {
    let base = render("deploy/base");
    assert_eq!(
        base.daemonsets.keys().collect::<Vec<_>>(),
        ["ambit-cni", "ztunnel"]
    );

    let cni_spec = pod_spec(&base.daemonsets["ambit-cni"]);
    assert_eq!(cni_spec.service_account_name.as_deref(), Some("ambit-cni"));
    assert_eq!(
        cni_spec.host_network,
        Some(true),
        "the agent serves a host socket"
    );
    let cni = container(cni_spec, "ambit-cni");
    assert_eq!(capabilities(cni), (set(CAPS), set(&["ALL"])));
    assert_eq!(
        cni.command.as_deref(),
        Some(&["ambit-cni".to_owned(), "agent".to_owned()][..])
    );
    assert_eq!(
        env_field(cni, "NODE_NAME").as_deref(),
        Some("spec.nodeName")
    );
    let paths = host_paths(cni_spec);
    for (volume, host, mount) in [
        (
            "cni-ztunnel-sock-dir",
            "/var/run/ztunnel",
            "/var/run/ztunnel",
        ),
        ("cni-plugin-sock-dir", "/var/run/ambit", "/var/run/ambit"),
        ("cni-bin-dir", "/opt/cni/bin", "/host/opt/cni/bin"),
        ("cni-net-dir", "/etc/cni/net.d", "/host/etc/cni/net.d"),
        ("host-proc", "/proc", "/host/proc"),
        ("cni-netns-dir", "/var/run/netns", "/var/run/netns"),
    ] {
        assert_eq!(
            paths.get(volume).map(String::as_str),
            Some(host),
            "{volume}"
        );
        assert_eq!(mount_of(cni, volume), mount, "{volume}");
    }
    // The plugin socket must be where the plugin (on the host) finds it: same path both sides.
    assert_eq!(
        env(cni, "AMBIT_PLUGIN_SOCKET").as_deref(),
        Some("/var/run/ambit/pluginevent.sock")
    );
    assert_eq!(
        env(cni, "AMBIT_CNI_BIN_DIR").as_deref(),
        Some("/host/opt/cni/bin")
    );
    assert_eq!(
        env(cni, "AMBIT_CNI_CONF_DIR").as_deref(),
        Some("/host/etc/cni/net.d")
    );

    let zt_spec = pod_spec(&base.daemonsets["ztunnel"]);
    assert_eq!(zt_spec.service_account_name.as_deref(), Some("ztunnel"));
    assert_ne!(
        zt_spec.host_network,
        Some(true),
        "ztunnel runs in its own netns"
    );
    let zt = container(zt_spec, "ztunnel");
    assert_eq!(capabilities(zt), (set(CAPS), set(&["ALL"])));
    assert_eq!(
        host_paths(zt_spec)
            .get("cni-ztunnel-sock-dir")
            .map(String::as_str),
        Some("/var/run/ztunnel")
    );
    // Both ends of ZDS agree on the socket.
    assert_eq!(env(zt, "INPOD_UDS"), env(cni, "AMBIT_ZDS_SOCKET"));
    assert_eq!(
        env(zt, "INPOD_UDS").as_deref(),
        Some("/var/run/ztunnel/ztunnel.sock")
    );
    // Neither data-plane pod is ever captured itself.
    for daemonset in base.daemonsets.values() {
        let labels = daemonset
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert_eq!(
            labels.get("istio.io/dataplane-mode").map(String::as_str),
            Some("none")
        );
    }
}

#[test]
fn the_replace_istio_ztunnel_overlay_keeps_only_ztunnel_under_istios_names() {
    let overlay = render("deploy/overlays/replace-istio-ztunnel");
    assert_eq!(
        overlay.daemonsets.keys().collect::<Vec<_>>(),
        ["ambit-ztunnel"]
    );
    assert!(overlay.cluster_roles.is_empty() && overlay.bindings.is_empty());
    assert!(
        overlay.namespaces.is_empty(),
        "istio-system belongs to Istio"
    );
    assert!(
        overlay.service_accounts.is_empty(),
        "Istio's ztunnel service account is reused"
    );
    for (object, namespace) in &overlay.object_namespaces {
        assert_eq!(namespace.as_deref(), Some("istio-system"), "{object}");
    }
    let spec = pod_spec(&overlay.daemonsets["ambit-ztunnel"]);
    assert_eq!(spec.service_account_name.as_deref(), Some("ztunnel"));
    let zt = container(spec, "ztunnel");
    assert_eq!(capabilities(zt), (set(CAPS), set(&["ALL"])));
    // The renamed ConfigMap is the one referenced, and it points at istiod.
    let from = zt.env_from.as_ref().unwrap()[0]
        .config_map_ref
        .as_ref()
        .unwrap();
    assert_eq!(from.name, "ambit-ztunnel");
    let data = overlay.config_maps["ambit-ztunnel"].data.as_ref().unwrap();
    assert_eq!(data["XDS_ADDRESS"], "istiod.istio-system.svc:15012");
    assert_eq!(
        env(zt, "INPOD_UDS").as_deref(),
        Some("/var/run/ztunnel/ztunnel.sock")
    );
}

#[test]
fn the_waypoint_template_renders() {
    let waypoint = render("deploy/base/waypoint");
    let deployment = &waypoint.deployments["waypoint"];
    let template = &deployment.spec.as_ref().unwrap().template;
    let labels = template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
    assert_eq!(labels["gateway.networking.k8s.io/gateway-name"], "waypoint");
    assert_eq!(labels["istio.io/dataplane-mode"], "none");
    let spec = template.spec.as_ref().unwrap();
    let proxy = container(spec, "waypoint");
    let (add, drop) = capabilities(proxy);
    assert!(add.is_empty(), "the waypoint needs no capabilities");
    assert_eq!(drop, set(&["ALL"]));
    let service = &waypoint.services["waypoint"];
    let ports: Vec<i32> = service
        .spec
        .as_ref()
        .unwrap()
        .ports
        .iter()
        .flatten()
        .map(|p| p.port)
        .collect();
    assert!(ports.contains(&15008));
    assert!(waypoint.service_accounts.contains_key("waypoint"));
    assert!(waypoint.cluster_roles.is_empty(), "no API access");
}
