//! The manifests in `deploy/`: rendered by kustomize, every object parsed into its k8s-openapi
//! type (so a misspelt field or a wrong type fails here, not on a cluster), and the properties
//! that matter checked: least-privilege RBAC, the capabilities each container gets, the host paths
//! the node agent and ztunnel share, and what the overlay replacing Istio's ztunnel keeps and
//! drops.
//!
//! The renderer is `kubectl kustomize` when kubectl is on PATH; otherwise (CI machines may lack
//! kubectl) a small kustomize in this file, [`mini_kustomize`], which supports exactly what the
//! kustomization.yaml files in `deploy/` use. When kubectl is there, both run and must agree
//! object for object, which keeps the small one honest. `AMBIT_TEST_KUBECTL` overrides the
//! program (`AMBIT_TEST_KUBECTL=none`: the small kustomize only).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
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

/// The non-empty documents of a (multi-document) YAML text.
fn yaml_documents(text: &str, origin: &Path) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|document| {
            Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", origin.display()))
        })
        .filter(|object| !object.is_null())
        .collect()
}

/// `kubectl kustomize <dir>`, or why not when kubectl is unwanted or cannot be started.
fn kubectl_kustomize(dir: &Path) -> Result<Vec<Value>, String> {
    let program = std::env::var("AMBIT_TEST_KUBECTL").unwrap_or_else(|_| "kubectl".to_owned());
    if program == "none" {
        return Err("AMBIT_TEST_KUBECTL=none".to_owned());
    }
    let output = Command::new(&program)
        .arg("kustomize")
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run `{program} kustomize`: {e}"))?;
    assert!(
        output.status.success(),
        "{program} kustomize {}: {}(kubectl with kustomize v5 is needed; \
         AMBIT_TEST_KUBECTL=none uses the test's own kustomize)",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    Ok(yaml_documents(&text, dir))
}

/// (kind, namespace, name) of an object.
type ObjectId = (String, Option<String>, String);

fn object_id(object: &Value) -> ObjectId {
    let metadata = &object["metadata"];
    (
        object["kind"].as_str().expect("kind").to_owned(),
        metadata["namespace"].as_str().map(str::to_owned),
        metadata["name"].as_str().expect("metadata.name").to_owned(),
    )
}

fn by_id(objects: &[Value], renderer: &str) -> BTreeMap<ObjectId, Value> {
    let mut map = BTreeMap::new();
    for object in objects {
        let id = object_id(object);
        assert!(
            map.insert(id.clone(), object.clone()).is_none(),
            "{renderer}: {id:?} twice"
        );
    }
    map
}

fn render_objects(dir: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
    let fallback = mini_kustomize(&path);
    match kubectl_kustomize(&path) {
        Ok(objects) => {
            // Both renderers must agree, object for object.
            let kubectl = by_id(&objects, "kubectl kustomize");
            let mini = by_id(&fallback, "the test's kustomize");
            assert_eq!(
                kubectl.keys().collect::<Vec<_>>(),
                mini.keys().collect::<Vec<_>>(),
                "{dir}: kubectl kustomize and the test's kustomize render different objects"
            );
            for (id, object) in &kubectl {
                assert_eq!(
                    object, &mini[id],
                    "{dir}: {id:?} differs between kubectl kustomize (left) and the test's \
                     kustomize (right)"
                );
            }
            eprintln!("{dir}: rendered by `kubectl kustomize` (the test's kustomize agrees)");
            objects
        }
        Err(why) => {
            eprintln!("{dir}: rendered by the test's own kustomize ({why})");
            fallback
        }
    }
}

fn render(dir: &str) -> Rendered {
    let mut rendered = Rendered::default();
    for object in render_objects(dir) {
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

// ---- A small kustomize: what deploy/'s kustomization.yaml files use, and nothing more. ----

/// The kinds that have no namespace (of those a kustomization here could plausibly hold).
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    #[allow(dead_code)]
    api_version: Option<String>,
    #[allow(dead_code)]
    kind: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    images: Vec<Image>,
    #[serde(default)]
    patches: Vec<Patch>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Image {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Patch {
    target: Target,
    patch: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Target {
    kind: String,
    name: Option<String>,
}

/// A JSON6902 operation; only `replace` is supported.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Operation {
    op: String,
    path: String,
    value: Value,
}

/// Renders the kustomization in `dir` as kustomize v5 does for the features used in `deploy/`:
/// `resources` (files, and directories holding a kustomization), then `patches` (a strategic
/// merge `$patch: delete`, or JSON6902 `replace`s), `namespace` and `images`, in kustomize's
/// order; renamed ConfigMaps, Secrets and ServiceAccounts are followed by the pod specs naming
/// them, as kustomize's name references do.
fn mini_kustomize(dir: &Path) -> Vec<Value> {
    let file = ["kustomization.yaml", "kustomization.yml", "Kustomization"]
        .iter()
        .map(|name| dir.join(name))
        .find(|file| file.is_file())
        .unwrap_or_else(|| panic!("{}: no kustomization", dir.display()));
    let text = std::fs::read_to_string(&file).unwrap();
    let kustomization: Kustomization = serde_yaml::from_str(&text)
        .unwrap_or_else(|e| panic!("{}: not supported by this test: {e}", file.display()));

    let mut objects = Vec::new();
    for resource in &kustomization.resources {
        let path: PathBuf = dir.join(resource);
        if path.is_dir() {
            objects.extend(mini_kustomize(&path));
        } else {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            objects.extend(yaml_documents(&text, &path));
        }
    }

    // Renames by the patches: (kind, old name, new name).
    let mut renames = Vec::new();
    for patch in &kustomization.patches {
        apply_patch(&mut objects, patch, &mut renames, &file);
    }
    if let Some(namespace) = &kustomization.namespace {
        set_namespace(&mut objects, namespace);
    }
    for image in &kustomization.images {
        for object in &mut objects {
            set_image(object, image);
        }
    }
    for (kind, old, new) in &renames {
        for object in &mut objects {
            rename_references(object, kind, old, new);
        }
    }
    objects
}

fn matches(object: &Value, target: &Target) -> bool {
    object["kind"] == target.kind.as_str()
        && target
            .name
            .as_ref()
            .is_none_or(|name| object["metadata"]["name"] == name.as_str())
}

fn apply_patch(
    objects: &mut Vec<Value>,
    patch: &Patch,
    renames: &mut Vec<(String, String, String)>,
    file: &Path,
) {
    let body: Value = serde_yaml::from_str(&patch.patch)
        .unwrap_or_else(|e| panic!("{}: invalid patch: {e}", file.display()));
    match body {
        Value::Object(ref fields) => {
            assert_eq!(
                fields.get("$patch").and_then(Value::as_str),
                Some("delete"),
                "{}: only `$patch: delete` strategic merge patches are supported",
                file.display()
            );
            objects.retain(|object| !matches(object, &patch.target));
        }
        Value::Array(_) => {
            let operations: Vec<Operation> = serde_json::from_value(body)
                .unwrap_or_else(|e| panic!("{}: unsupported JSON6902 patch: {e}", file.display()));
            for object in objects.iter_mut().filter(|o| matches(o, &patch.target)) {
                for operation in &operations {
                    assert_eq!(
                        operation.op,
                        "replace",
                        "{}: only `op: replace` is supported",
                        file.display()
                    );
                    let old_name = object["metadata"]["name"].as_str().unwrap().to_owned();
                    let slot = object.pointer_mut(&operation.path).unwrap_or_else(|| {
                        panic!("{}: no {} to replace", file.display(), operation.path)
                    });
                    *slot = operation.value.clone();
                    if operation.path == "/metadata/name" {
                        let new_name = operation.value.as_str().unwrap().to_owned();
                        let kind = object["kind"].as_str().unwrap().to_owned();
                        renames.push((kind, old_name, new_name));
                    }
                }
            }
        }
        _ => panic!("{}: unsupported patch {}", file.display(), patch.patch),
    }
}

/// kustomize's `namespace`: every namespaced object moves into `namespace`, and so do the
/// ServiceAccount subjects of (Cluster)RoleBindings naming a ServiceAccount of the set (their
/// name references) or `default`.
fn set_namespace(objects: &mut [Value], namespace: &str) {
    let service_accounts: BTreeSet<String> = objects
        .iter()
        .filter(|o| o["kind"] == "ServiceAccount")
        .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    for object in objects.iter_mut() {
        let kind = object["kind"].as_str().unwrap().to_owned();
        if !CLUSTER_SCOPED.contains(&kind.as_str()) {
            object["metadata"]["namespace"] = namespace.into();
        }
        if kind == "RoleBinding" || kind == "ClusterRoleBinding" {
            if let Some(subjects) = object.get_mut("subjects").and_then(Value::as_array_mut) {
                for subject in subjects {
                    let name = subject["name"].as_str().unwrap_or_default();
                    if subject["kind"] == "ServiceAccount"
                        && (name == "default" || service_accounts.contains(name))
                    {
                        subject["namespace"] = namespace.into();
                    }
                }
            }
        }
    }
}

/// Calls `visit` on every container and init container anywhere in `value`.
fn each_container(value: &mut Value, visit: &mut dyn FnMut(&mut Value)) {
    match value {
        Value::Object(fields) => {
            for (key, field) in fields.iter_mut() {
                if key == "containers" || key == "initContainers" {
                    if let Some(containers) = field.as_array_mut() {
                        containers.iter_mut().for_each(&mut *visit);
                        continue;
                    }
                }
                each_container(field, visit);
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|item| each_container(item, visit)),
        _ => {}
    }
}

/// kustomize's `images`: `name[:tag][@digest]` with a matching name gets the new name and tag.
fn set_image(object: &mut Value, image: &Image) {
    each_container(object, &mut |container| {
        let Some(current) = container["image"].as_str() else {
            return;
        };
        let (reference, digest) = match current.split_once('@') {
            Some((reference, digest)) => (reference, Some(digest)),
            None => (current, None),
        };
        // A tag follows the last ':' after the last '/' (a registry may have a port).
        let (name, tag) = match reference.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => (name, Some(tag)),
            _ => (reference, None),
        };
        if name != image.name {
            return;
        }
        let mut new = image.new_name.clone().unwrap_or_else(|| name.to_owned());
        match (&image.new_tag, tag, digest) {
            (Some(new_tag), _, _) => new = format!("{new}:{new_tag}"),
            (None, tag, digest) => {
                if let Some(tag) = tag {
                    new = format!("{new}:{tag}");
                }
                if let Some(digest) = digest {
                    new = format!("{new}@{digest}");
                }
            }
        }
        container["image"] = new.into();
    });
}

/// The pod spec of a workload, if it has one.
fn pod_spec_mut(object: &mut Value) -> Option<&mut Value> {
    let path = match object["kind"].as_str()? {
        "Pod" => "/spec",
        "CronJob" => "/spec/jobTemplate/spec/template/spec",
        "Deployment" | "DaemonSet" | "StatefulSet" | "ReplicaSet" | "Job" => "/spec/template/spec",
        _ => return None,
    };
    object.pointer_mut(path)
}

/// kustomize's name references: a renamed ConfigMap, Secret or ServiceAccount is renamed where
/// pod specs and bindings name it.
fn rename_references(object: &mut Value, kind: &str, old: &str, new: &str) {
    let rename = |slot: Option<&mut Value>| {
        if let Some(slot) = slot.filter(|slot| *slot == old) {
            *slot = new.into();
        }
    };
    if kind == "ServiceAccount" {
        if let Some(subjects) = object.get_mut("subjects").and_then(Value::as_array_mut) {
            for subject in subjects
                .iter_mut()
                .filter(|s| s["kind"] == "ServiceAccount")
            {
                rename(subject.get_mut("name"));
            }
        }
    }
    let Some(spec) = pod_spec_mut(object) else {
        return;
    };
    if kind == "ServiceAccount" {
        rename(spec.get_mut("serviceAccountName"));
        rename(spec.get_mut("serviceAccount"));
        return;
    }
    let (env_from, key_ref, volume) = match kind {
        "ConfigMap" => ("configMapRef", "configMapKeyRef", "configMap"),
        "Secret" => ("secretRef", "secretKeyRef", "secret"),
        _ => return,
    };
    // Secret volumes name theirs `secretName`.
    let volume_name = if kind == "Secret" {
        "secretName"
    } else {
        "name"
    };
    for volume_entry in spec
        .get_mut("volumes")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        rename(volume_entry.pointer_mut(&format!("/{volume}/{volume_name}")));
        for source in volume_entry
            .pointer_mut("/projected/sources")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            rename(source.pointer_mut(&format!("/{volume}/name")));
        }
    }
    each_container(spec, &mut |container| {
        for entry in container
            .get_mut("envFrom")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            rename(entry.pointer_mut(&format!("/{env_from}/name")));
        }
        for entry in container
            .get_mut("env")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            rename(entry.pointer_mut(&format!("/valueFrom/{key_ref}/name")));
        }
    });
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
    // The kubelet probes where the agent serves readiness (host network: the node's port).
    let probe = cni
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("ambit-cni has an HTTP readiness probe");
    let address: std::net::SocketAddr = env(cni, "AMBIT_READINESS_ADDRESS")
        .as_deref()
        .unwrap_or(ambit_cni::health::DEFAULT_ADDRESS)
        .parse()
        .unwrap();
    assert_eq!(
        probe.path.as_deref(),
        Some(ambit_cni::health::READINESS_PATH)
    );
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(address.port().into())
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

/// Each binary drains until a little before SIGKILL, reading the pod's grace period from
/// `TERMINATION_GRACE_PERIOD_SECONDS` (Istio's name): the two must agree, or the drain outlives
/// the pod (cut by SIGKILL) or ends long before it need.
#[test]
fn every_pod_passes_its_grace_period_to_its_drain() {
    let base = render("deploy/base");
    let waypoint = render("deploy/base/waypoint");
    let specs = [
        ("ambit-cni", pod_spec(&base.daemonsets["ambit-cni"])),
        ("ztunnel", pod_spec(&base.daemonsets["ztunnel"])),
        (
            "waypoint",
            waypoint.deployments["waypoint"]
                .spec
                .as_ref()
                .unwrap()
                .template
                .spec
                .as_ref()
                .unwrap(),
        ),
    ];
    for (name, spec) in specs {
        let grace = spec
            .termination_grace_period_seconds
            .unwrap_or_else(|| panic!("{name} sets no terminationGracePeriodSeconds"));
        assert_eq!(
            env(container(spec, name), "TERMINATION_GRACE_PERIOD_SECONDS"),
            Some(grace.to_string()),
            "{name}: TERMINATION_GRACE_PERIOD_SECONDS differs from terminationGracePeriodSeconds"
        );
    }
}
