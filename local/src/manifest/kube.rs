//! Kubernetes core objects the local mesh runs: Namespace, ServiceAccount, Pod, Deployment
//! (`apps/v1`) and Service, in the subset that has a meaning on one machine.
//!
//! Fields that shape what runs or how it is reached (containers, ports, selectors, labels) are
//! read and validated strictly; fields that only matter to a real scheduler or kubelet
//! (resources, volumes, tolerations...) are accepted and ignored so that manifests
//! written for a cluster apply unchanged. Anything else is refused by name.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use super::decode::{FieldError, Node, Result};
use super::names;
use super::Metadata;

mod probe;

pub use probe::{Probe, ProbeAction, ProbeKind, Probes};

/// A namespace; its labels decide enrollment (`istio.io/dataplane-mode`) and waypoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub metadata: Metadata,
}

/// A service account: the `sa` of the SPIFFE identity of the pods that run as it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub metadata: Metadata,
}

/// A pod, applied directly or stamped out of a [`Deployment`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub metadata: Metadata,
    pub spec: PodSpec,
    /// The Deployment that owns this pod, if any (Kubernetes' ownerReferences, flattened).
    pub owner: Option<String>,
}

impl Pod {
    /// The workload name Istio derives: the owning Deployment's name, else the pod's own.
    pub fn workload_name(&self) -> &str {
        self.owner.as_deref().unwrap_or(&self.metadata.name)
    }

    /// The environment of `container` (one of this pod's) as the kubelet would set it, with the
    /// downward-API references resolved from the pod's runtime facts: `status.podIP(s)` →
    /// `pod_ip`, `status.hostIP(s)` → `host_ip`, `spec.nodeName` → `node`, `metadata.uid` → `uid`
    /// (the pod's Kubernetes UID, which the node agent hands to ztunnel).
    pub fn container_env(
        &self,
        container: &Container,
        pod_ip: IpAddr,
        host_ip: IpAddr,
        node: &str,
        uid: &str,
    ) -> Vec<(String, String)> {
        let meta = &self.metadata;
        let bracketed = |path: &str, prefix: &str| -> Option<String> {
            path.strip_prefix(prefix)?
                .strip_suffix("']")
                .map(str::to_owned)
        };
        container
            .env
            .iter()
            .map(|var| {
                let value = match &var.value {
                    EnvValue::Literal(v) => v.clone(),
                    EnvValue::FieldRef(path) => match path.as_str() {
                        "metadata.name" => meta.name.clone(),
                        "metadata.namespace" => meta.namespace.clone(),
                        "metadata.uid" => uid.to_owned(),
                        "spec.nodeName" => node.to_owned(),
                        "spec.serviceAccountName" => self.spec.service_account_name.clone(),
                        "status.podIP" | "status.podIPs" => pod_ip.to_string(),
                        "status.hostIP" | "status.hostIPs" => host_ip.to_string(),
                        other => {
                            if let Some(k) = bracketed(other, "metadata.labels['") {
                                meta.labels.get(&k).cloned().unwrap_or_default()
                            } else if let Some(k) = bracketed(other, "metadata.annotations['") {
                                meta.annotations.get(&k).cloned().unwrap_or_default()
                            } else {
                                String::new()
                            }
                        }
                    },
                };
                (var.name.clone(), value)
            })
            .collect()
    }

    /// The container port named `name` (protocol `protocol`), as a named `targetPort` resolves.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .find(|p| p.name.as_deref() == Some(name) && p.protocol == protocol)
            .map(|p| p.container_port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    /// `default` when the manifest names none, as the API server fills it in.
    pub service_account_name: String,
    /// Which "node" (node network namespace) runs the pod; the runner schedules pods without.
    pub node_name: Option<String>,
    /// A host-network pod shares its node's network and is never enrolled.
    pub host_network: bool,
    pub containers: Vec<Container>,
    /// What the runner does when a container exits.
    pub restart_policy: RestartPolicy,
    /// The pod's hostname (`spec.hostname`); the pod's name when absent.
    pub hostname: Option<String>,
    /// `spec.subdomain`: with a headless Service of that name selecting the pod, the pod is
    /// `<hostname>.<subdomain>.<ns>.svc.<zone>` in DNS and in its own `/etc/hosts`.
    pub subdomain: Option<String>,
}

/// `spec.restartPolicy`: whether kubelet starts a container again after it exits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestartPolicy {
    #[default]
    Always,
    /// Only after a failure: a non-zero exit code, or killed by a signal.
    OnFailure,
    Never,
}

impl RestartPolicy {
    /// Whether a container that exited this way starts again.
    pub fn restarts(self, success: bool) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Never => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    pub name: String,
    pub image: String,
    /// The entrypoint, replacing the image's.
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<EnvVar>,
    pub ports: Vec<ContainerPort>,
    pub working_dir: Option<String>,
    pub probes: Probes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvVar {
    pub name: String,
    pub value: EnvValue,
}

/// Where an environment variable's value comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnvValue {
    /// `value:` (empty when neither `value` nor `valueFrom` is given, as in Kubernetes).
    Literal(String),
    /// `valueFrom.fieldRef.fieldPath` (`metadata.name`, `status.podIP`, ...), which only the
    /// runner can resolve once the pod has an address.
    FieldRef(String),
}

/// Pod fields a `fieldRef` may name (the downward API's subset that exists locally).
const FIELD_REFS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "spec.nodeName",
    "spec.serviceAccountName",
    "status.hostIP",
    "status.hostIPs",
    "status.podIP",
    "status.podIPs",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    pub container_port: u16,
    pub protocol: Protocol,
    pub name: Option<String>,
}

/// A port's transport protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// A Deployment: `replicas` copies of its pod template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deployment {
    pub metadata: Metadata,
    pub spec: DeploymentSpec,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeploymentSpec {
    pub replicas: u32,
    /// `selector.matchLabels` (match expressions are not supported).
    pub selector: BTreeMap<String, String>,
    pub template: PodTemplate,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodTemplate {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub spec: PodSpec,
}

impl Deployment {
    /// The name of replica `index`. Kubernetes names pods `<deploy>-<rs hash>-<random>`; the
    /// local mesh uses stable, predictable names so tests and users can address them.
    pub fn pod_name(&self, index: u32) -> String {
        format!("{}-{index}", self.metadata.name)
    }

    /// The pods this Deployment stands for: `<name>-0` .. `<name>-<replicas-1>`, each with the
    /// template's labels, annotations and spec.
    pub fn pods(&self) -> Vec<Pod> {
        (0..self.spec.replicas).map(|i| self.pod(i)).collect()
    }

    /// Replica `index`, fresh from the template.
    pub fn pod(&self, index: u32) -> Pod {
        Pod {
            metadata: Metadata {
                name: self.pod_name(index),
                namespace: self.metadata.namespace.clone(),
                labels: self.spec.template.labels.clone(),
                annotations: self.spec.template.annotations.clone(),
            },
            spec: self.spec.template.spec.clone(),
            owner: Some(self.metadata.name.clone()),
        }
    }
}

/// A ClusterIP Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub metadata: Metadata,
    pub spec: ServiceSpec,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// The pods it sends to: those carrying all these labels, in the Service's namespace.
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
    pub cluster_ip: ClusterIp,
}

/// `spec.clusterIP`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClusterIp {
    /// Absent or empty: the runner allocates the VIP.
    #[default]
    Auto,
    /// `None`: a headless service, no VIP.
    Headless,
    /// A VIP the manifest asks for.
    Fixed(IpAddr),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    /// Defaults to `port`, as the API server does.
    pub target_port: TargetPort,
    pub protocol: Protocol,
    /// `appProtocol` (`http`, `http2`, `grpc`, `tcp`, ...), which Istio uses to pick L7 handling.
    pub app_protocol: Option<String>,
}

/// A Service's `targetPort`: a number, or the name of a container port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

impl Service {
    /// `<name>.<namespace>.svc.<domain>`.
    pub fn hostname(&self, domain: &str) -> String {
        format!(
            "{}.{}.svc.{domain}",
            self.metadata.name, self.metadata.namespace
        )
    }

    /// Whether the Service sends to `pod`: same namespace and every selector label present.
    pub fn selects(&self, pod: &Pod) -> bool {
        pod.metadata.namespace == self.metadata.namespace
            && !self.spec.selector.is_empty()
            && selector_matches(&self.spec.selector, &pod.metadata.labels)
    }
}

/// Whether `labels` carry every `selector` label (Kubernetes `matchLabels`).
pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Kubelet/scheduler fields of a pod spec with no local meaning.
const IGNORED_POD_SPEC_FIELDS: &[&str] = &[
    "activeDeadlineSeconds",
    "affinity",
    "automountServiceAccountToken",
    "dnsConfig",
    "dnsPolicy",
    "enableServiceLinks",
    "hostAliases",
    "imagePullSecrets",
    "nodeSelector",
    "os",
    "overhead",
    "preemptionPolicy",
    "priority",
    "priorityClassName",
    "readinessGates",
    "runtimeClassName",
    "schedulerName",
    "securityContext",
    "setHostnameAsFQDN",
    "terminationGracePeriodSeconds",
    "tolerations",
    "topologySpreadConstraints",
    "volumes",
];

const IGNORED_CONTAINER_FIELDS: &[&str] = &[
    "imagePullPolicy",
    "lifecycle",
    "resizePolicy",
    "resources",
    "securityContext",
    "stdin",
    "stdinOnce",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "tty",
    "volumeDevices",
    "volumeMounts",
];

fn protocol(node: Option<Node<'_>>) -> Result<Protocol> {
    let Some(node) = node else {
        return Ok(Protocol::Tcp);
    };
    match node.str()?.as_str() {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(node.error(format!(
            "unsupported protocol {other:?}: expected TCP, UDP or SCTP"
        ))),
    }
}

/// Reads a pod spec (of a Pod or a Deployment's template).
pub(super) fn pod_spec(node: &Node<'_>) -> Result<PodSpec> {
    let f = node.fields()?;
    f.ignore(IGNORED_POD_SPEC_FIELDS);
    let mut service_account_name = f.str("serviceAccountName")?;
    // `serviceAccount` is the deprecated spelling; Kubernetes still accepts it when it agrees.
    if let Some(old) = f.str("serviceAccount")? {
        match &service_account_name {
            Some(new) if *new != old => {
                return Err(f.error_at(
                    "serviceAccount",
                    format!("{old:?} disagrees with serviceAccountName {new:?}"),
                ))
            }
            _ => service_account_name = Some(old),
        }
    }
    let service_account_name = service_account_name.unwrap_or_else(|| "default".into());
    names::dns1123_subdomain(&service_account_name)
        .map_err(|e| f.error_at("serviceAccountName", e))?;
    let node_name = f.str("nodeName")?;
    if let Some(n) = &node_name {
        names::dns1123_subdomain(n).map_err(|e| f.error_at("nodeName", e))?;
    }
    let host_network = f.bool("hostNetwork")?.unwrap_or(false);
    // Both are single DNS labels, as the API server checks them.
    let hostname = f.str("hostname")?;
    if let Some(h) = &hostname {
        names::dns1123_label(h).map_err(|e| f.error_at("hostname", e))?;
    }
    let subdomain = f.str("subdomain")?;
    if let Some(s) = &subdomain {
        names::dns1123_label(s).map_err(|e| f.error_at("subdomain", e))?;
    }
    let restart_policy = match f.str("restartPolicy")?.as_deref() {
        None | Some("Always") => RestartPolicy::Always,
        Some("OnFailure") => RestartPolicy::OnFailure,
        Some("Never") => RestartPolicy::Never,
        Some(other) => {
            return Err(f.error_at(
                "restartPolicy",
                format!("{other:?}: expected Always, OnFailure or Never"),
            ))
        }
    };
    let containers_node = f.require("containers")?;
    let containers: Vec<Container> = containers_node
        .list()?
        .iter()
        .map(container)
        .collect::<Result<_>>()?;
    if containers.is_empty() {
        return Err(containers_node.error("a pod needs at least one container"));
    }
    let mut container_names = BTreeSet::new();
    let mut port_names = BTreeSet::new();
    for (i, c) in containers.iter().enumerate() {
        if !container_names.insert(&c.name) {
            return Err(FieldError {
                field: format!("{}[{i}].name", containers_node.path),
                message: format!("duplicate container name {:?}", c.name),
            });
        }
        for (j, p) in c.ports.iter().enumerate() {
            if let Some(name) = &p.name {
                if !port_names.insert(name) {
                    return Err(FieldError {
                        field: format!("{}[{i}].ports[{j}].name", containers_node.path),
                        message: format!("duplicate port name {name:?} in the pod"),
                    });
                }
            }
        }
    }
    f.finish()?;
    Ok(PodSpec {
        service_account_name,
        node_name,
        host_network,
        containers,
        restart_policy,
        hostname,
        subdomain,
    })
}

fn container(node: &Node<'_>) -> Result<Container> {
    let f = node.fields()?;
    f.ignore(IGNORED_CONTAINER_FIELDS);
    let name = f.require("name")?.str()?;
    names::dns1123_label(&name).map_err(|e| f.error_at("name", e))?;
    let image = f.require("image")?.non_empty_str()?;
    let command = f.string_list("command")?;
    let args = f.string_list("args")?;
    let env = f.list_of("env", env_var)?;
    let ports = f.list_of("ports", container_port)?;
    let working_dir = f.str("workingDir")?;
    let probes = probe::probes(&f, &ports)?;
    f.finish()?;
    Ok(Container {
        name,
        image,
        command,
        args,
        env,
        ports,
        working_dir,
        probes,
    })
}

fn env_var(node: &Node<'_>) -> Result<EnvVar> {
    let f = node.fields()?;
    let name = f.require("name")?.non_empty_str()?;
    if name.contains('=') {
        return Err(f.error_at("name", format!("{name:?} must not contain '='")));
    }
    let literal = f.str("value")?;
    let value = match f.get("valueFrom") {
        None => EnvValue::Literal(literal.unwrap_or_default()),
        Some(_) if literal.is_some() => {
            return Err(f.error_at("valueFrom", "may not be set together with `value`"))
        }
        Some(from) => {
            // Only the downward API's fieldRef can be served without an API server; secret and
            // config map references fall through to the unknown-field error.
            let from = from.fields()?;
            let field_ref = from.require("fieldRef")?;
            let fr = field_ref.fields()?;
            fr.ignore(&["apiVersion"]);
            let path = fr.require("fieldPath")?.str()?;
            let known = FIELD_REFS.contains(&path.as_str())
                || path.starts_with("metadata.labels['")
                || path.starts_with("metadata.annotations['");
            if !known {
                return Err(fr.error_at(
                    "fieldPath",
                    format!(
                        "unsupported field path {path:?}; supported: {}",
                        FIELD_REFS.join(", ")
                    ),
                ));
            }
            fr.finish()?;
            from.finish()?;
            EnvValue::FieldRef(path)
        }
    };
    f.finish()?;
    Ok(EnvVar { name, value })
}

fn container_port(node: &Node<'_>) -> Result<ContainerPort> {
    let f = node.fields()?;
    f.ignore(&["hostIP", "hostPort"]);
    let container_port = f.require("containerPort")?.port()?;
    let protocol = protocol(f.get("protocol"))?;
    let name = f.str("name")?;
    if let Some(n) = &name {
        names::iana_svc_name(n).map_err(|e| f.error_at("name", e))?;
    }
    f.finish()?;
    Ok(ContainerPort {
        container_port,
        protocol,
        name,
    })
}

pub(super) fn deployment_spec(node: &Node<'_>) -> Result<DeploymentSpec> {
    let f = node.fields()?;
    f.ignore(&[
        "minReadySeconds",
        "paused",
        "progressDeadlineSeconds",
        "revisionHistoryLimit",
        "strategy",
    ]);
    let replicas = match f.get("replicas") {
        None => 1,
        Some(n) => {
            let r = n.i64()?;
            u32::try_from(r).map_err(|_| n.error(format!("{r} must be 0 or more")))?
        }
    };
    let selector_node = f.require("selector")?;
    let sf = selector_node.fields()?;
    if sf.get("matchExpressions").is_some() {
        return Err(sf.error_at(
            "matchExpressions",
            "not supported by the local mesh; use matchLabels",
        ));
    }
    let selector = sf.string_map("matchLabels")?;
    sf.finish()?;
    if selector.is_empty() {
        return Err(selector_node.error("empty selector is invalid for a Deployment"));
    }
    validate_labels(&selector, &format!("{}.matchLabels", selector_node.path))?;
    let template_node = f.require("template")?;
    let tf = template_node.fields()?;
    let (labels, annotations) = match tf.get("metadata") {
        None => Default::default(),
        Some(m) => {
            let mf = m.fields()?;
            let labels = mf.string_map("labels")?;
            let annotations = mf.string_map("annotations")?;
            validate_labels(&labels, &format!("{}.labels", m.path))?;
            validate_annotations(&annotations, &format!("{}.annotations", m.path))?;
            // The rest of the template metadata (name, namespace...) is ignored by Kubernetes
            // too: pods get generated names in the Deployment's namespace.
            (labels, annotations)
        }
    };
    if !selector_matches(&selector, &labels) {
        return Err(FieldError {
            field: format!("{}.metadata.labels", template_node.path),
            message: format!(
                "`selector` does not match template `labels`: the pods would carry {labels:?} \
                 but the selector wants {selector:?}"
            ),
        });
    }
    let spec_node = tf.require("spec")?;
    let spec = pod_spec(&spec_node)?;
    if spec.restart_policy != RestartPolicy::Always {
        return Err(spec_node.error("restartPolicy: a Deployment's pods restart Always"));
    }
    tf.finish()?;
    f.finish()?;
    Ok(DeploymentSpec {
        replicas,
        selector,
        template: PodTemplate {
            labels,
            annotations,
            spec,
        },
    })
}

pub(super) fn service_spec(node: &Node<'_>) -> Result<ServiceSpec> {
    let f = node.fields()?;
    f.ignore(&[
        "clusterIPs",
        "internalTrafficPolicy",
        "ipFamilies",
        "ipFamilyPolicy",
        "publishNotReadyAddresses",
        "sessionAffinity",
        "sessionAffinityConfig",
        "trafficDistribution",
    ]);
    if let Some(t) = f.get("type") {
        let t = t.str()?;
        if t != "ClusterIP" {
            return Err(f.error_at(
                "type",
                format!("{t:?} services are not supported by the local mesh; use ClusterIP"),
            ));
        }
    }
    let cluster_ip = match f.str("clusterIP")?.as_deref() {
        None | Some("") => ClusterIp::Auto,
        Some("None") => ClusterIp::Headless,
        Some(ip) => ClusterIp::Fixed(ip.parse().map_err(|_| {
            f.error_at(
                "clusterIP",
                format!("{ip:?} is not an IP address (or \"None\" for a headless service)"),
            )
        })?),
    };
    let selector = f.string_map("selector")?;
    if selector.is_empty() {
        return Err(f.error_at(
            "selector",
            "a Service needs a selector: the local mesh has no EndpointSlices to fill a \
             selector-less Service",
        ));
    }
    validate_labels(&selector, &format!("{}.selector", node.path))?;
    let ports_node = f.require("ports")?;
    let ports: Vec<ServicePort> = ports_node
        .list()?
        .iter()
        .map(service_port)
        .collect::<Result<_>>()?;
    if ports.is_empty() {
        return Err(ports_node.error("a Service needs at least one port"));
    }
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let at = |field: &str, message: String| FieldError {
            field: format!("{}[{i}]{field}", ports_node.path),
            message,
        };
        match &p.name {
            None if ports.len() > 1 => {
                return Err(at(
                    ".name",
                    "required when a Service has more than one port".into(),
                ))
            }
            Some(name) if !names.insert(name) => {
                return Err(at(".name", format!("duplicate port name {name:?}")))
            }
            _ => {}
        }
        if !numbers.insert((p.port, p.protocol)) {
            return Err(at(
                ".port",
                format!("duplicate port {}/{}", p.port, p.protocol),
            ));
        }
    }
    f.finish()?;
    Ok(ServiceSpec {
        selector,
        ports,
        cluster_ip,
    })
}

fn service_port(node: &Node<'_>) -> Result<ServicePort> {
    let f = node.fields()?;
    let name = f.str("name")?;
    if let Some(n) = &name {
        // Service port names are DNS-1123 labels (IANA names are only for container ports).
        names::dns1123_label(n).map_err(|e| f.error_at("name", e))?;
    }
    let port = f.require("port")?.port()?;
    let target_port = match f.get("targetPort") {
        None => TargetPort::Number(port),
        Some(t) => int_or_name_port(&t)?,
    };
    let protocol = protocol(f.get("protocol"))?;
    let app_protocol = f.str("appProtocol")?;
    f.finish()?;
    Ok(ServicePort {
        name,
        port,
        target_port,
        protocol,
        app_protocol,
    })
}

/// A port given as Kubernetes' IntOrString: a number (quoted or not) or a container port name.
fn int_or_name_port(t: &Node<'_>) -> Result<TargetPort> {
    match t.value {
        serde_yaml::Value::Number(_) => Ok(TargetPort::Number(t.port()?)),
        serde_yaml::Value::String(s) => {
            // A quoted number is still a number to Kubernetes (IntOrString).
            match s.parse::<i64>() {
                Ok(n) => Ok(TargetPort::Number(
                    super::decode::port_in_range(n)
                        .ok_or_else(|| t.error(format!("{n} is out of range (1-65535)")))?,
                )),
                Err(_) => {
                    names::iana_svc_name(s).map_err(|e| t.error(e))?;
                    Ok(TargetPort::Name(s.clone()))
                }
            }
        }
        _ => Err(t.error("expected a port number or a container port name")),
    }
}

/// Checks label keys and values, naming the offending key.
pub(super) fn validate_labels(labels: &BTreeMap<String, String>, path: &str) -> Result<()> {
    for (k, v) in labels {
        names::qualified_name(k)
            .and_then(|()| names::label_value(v))
            .map_err(|message| FieldError {
                field: format!("{path}[{k}]"),
                message,
            })?;
    }
    Ok(())
}

/// Checks annotation keys (values are free text).
pub(super) fn validate_annotations(
    annotations: &BTreeMap<String, String>,
    path: &str,
) -> Result<()> {
    for k in annotations.keys() {
        names::qualified_name(k).map_err(|message| FieldError {
            field: format!("{path}[{k}]"),
            message,
        })?;
    }
    Ok(())
}
