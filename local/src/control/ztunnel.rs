//! The cluster state as ztunnel sees it: workloads, services and L4 policies in the shape of
//! ztunnel's local configuration, built the way istiod builds WDS/RBAC resources for ambient
//! (`pilot/pkg/serviceregistry/kube/controller/ambient`: `workloads.go`, `services.go`,
//! `authorization.go`).
//!
//! - every running pod is a workload (host-network pods excepted, as in istiod: they have the
//!   node's address), `HBONE` once enrolled, plain `TCP` otherwise, so that enrolled clients
//!   still reach it;
//! - its `services` map has, for each Service selecting it, service port → target port, a named
//!   `targetPort` resolved against the pod's own container ports (a pod without that port
//!   does not serve that service port);
//! - its `authorizationPolicies` list the converted selector policies of its namespace and the
//!   root namespace that select it, then the PeerAuthentication-derived ones;
//! - a running waypoint (a Gateway of class `istio-waypoint`, run by the runner as a pod named
//!   after it, service account = its name, as Istio deploys them) is an HBONE workload; Services
//!   and pods bound to it by `istio.io/use-waypoint` (rules in `waypoints`) get its address, or,
//!   where L7 policy would be skipped, an address that refuses their traffic;
//! - `targetRefs` policies are the waypoint's, not ztunnel's.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ambit_mesh::rbac::{Authorization, ConnectionInfo, PolicySet};
use ambit_mesh::state::local::LocalConfig;
use ambit_mesh::state::{
    AppProtocol, GatewayAddress, GatewayDestination, HealthStatus, NamespacedHostname,
    NetworkAddress, PortMap, Protocol, Service, Workload,
};

use super::authz::{self, convert_authorization_policy};
use super::waypoints::{Binding, Route, WaypointRef};
use super::{ClusterState, ROOT_NAMESPACE};
use crate::manifest::{selector_matches, Kind, ObjectRef, Pod, ServicePort, TargetPort};

/// The cluster name in workload uids (`<cluster>//Pod/<ns>/<name>`), istiod's default.
pub const CLUSTER_ID: &str = "Kubernetes";

/// Kubernetes' cluster domain: services are `<name>.<ns>.svc.cluster.local`.
pub const DOMAIN_SUFFIX: &str = "cluster.local";

/// A pod the runner has started, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningPod {
    pub namespace: String,
    pub name: String,
    pub ip: IpAddr,
    /// The node (network namespace) it runs on.
    pub node: String,
    /// Whether the node agent has handed it to ztunnel (it then accepts HBONE).
    pub enrolled: bool,
    /// Ready as kubelet decides (running, its readiness probes passing): a pod that is not is
    /// `Unhealthy`, which takes it out of every Service's endpoints, as istiod does.
    pub ready: bool,
}

/// Canonical service name, as Istio derives it (`pkg/model` `CanonicalService`).
fn canonical_name(pod: &Pod) -> String {
    let labels = &pod.metadata.labels;
    [
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ]
    .iter()
    .find_map(|k| labels.get(*k))
    .cloned()
    .unwrap_or_else(|| pod.workload_name().to_owned())
}

/// Canonical revision, as Istio derives it.
fn canonical_revision(pod: &Pod) -> String {
    let labels = &pod.metadata.labels;
    [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .iter()
    .find_map(|k| labels.get(*k))
    .cloned()
    .unwrap_or_else(|| "latest".into())
}

/// The policies ztunnel receives, and which selector policy keys select which labels.
struct Policies {
    list: Vec<Authorization>,
    /// `(policy namespace, selector, key)` of converted WorkloadSelector policies.
    selectors: Vec<(String, BTreeMap<String, String>, String)>,
}

fn policies(state: &ClusterState) -> Policies {
    let mut list = Vec::new();
    let mut selectors = Vec::new();
    for ap in state.authorization_policies() {
        let conversion = convert_authorization_policy(ap, ROOT_NAMESPACE);
        if let Some(message) = &conversion.message {
            let r = ObjectRef::new(
                Kind::AuthorizationPolicy,
                &ap.metadata.namespace,
                &ap.metadata.name,
            );
            tracing::warn!(policy = %r, "{message}");
        }
        let Some(authorization) = conversion.authorization else {
            continue;
        };
        if let Some(selector) = &ap.spec.selector {
            selectors.push((
                ap.metadata.namespace.clone(),
                selector.clone(),
                authorization.key(),
            ));
        }
        list.push(authorization);
    }
    let peer = state.aged_peer_authentications();
    if !peer.is_empty() {
        list.push(authz::static_strict_policy(ROOT_NAMESPACE));
        let mesh = authz::mesh_peer_authentication(&peer, ROOT_NAMESPACE);
        for (pa, _) in &peer {
            let namespace =
                authz::namespace_peer_authentication(&peer, &pa.metadata.namespace, ROOT_NAMESPACE);
            if let Some(converted) = authz::convert_peer_authentication(
                pa,
                ROOT_NAMESPACE,
                namespace.map(|p| &p.spec),
                mesh.map(|p| &p.spec),
            ) {
                list.push(converted);
            }
        }
    }
    list.sort_by_key(Authorization::key);
    Policies { list, selectors }
}

/// The selector policies (by key) that apply to `pod`: those of its own namespace and of the
/// root namespace whose (non-empty) selector its labels satisfy. An empty selector selects
/// nothing, as in istiod.
fn selected_policies(policies: &Policies, pod: &Pod) -> Vec<String> {
    let mut keys: Vec<String> = policies
        .selectors
        .iter()
        .filter(|(ns, selector, _)| {
            (*ns == pod.metadata.namespace || ns == ROOT_NAMESPACE)
                && !selector.is_empty()
                && selector_matches(selector, &pod.metadata.labels)
        })
        .map(|(_, _, key)| key.clone())
        .collect();
    keys.sort();
    keys
}

/// The services map of a workload: `<ns>/<hostname>` → service port → target port.
fn workload_services(state: &ClusterState, pod: &Pod) -> BTreeMap<String, PortMap> {
    let mut out = BTreeMap::new();
    for service in state.services_for_pod(pod) {
        let mut ports = PortMap::new();
        for port in &service.spec.ports {
            if let Some(target) = target_port(port, pod) {
                ports.entry(port.port).or_insert(target);
            }
        }
        out.insert(
            format!(
                "{}/{}",
                service.metadata.namespace,
                service.hostname(DOMAIN_SUFFIX)
            ),
            ports,
        );
    }
    out
}

/// The port `pod` serves a Service port on; `None` when it lacks a named target port (istiod
/// then leaves the port out).
fn target_port(port: &ServicePort, pod: &Pod) -> Option<u16> {
    match &port.target_port {
        TargetPort::Number(n) => Some(*n),
        TargetPort::Name(name) => pod.named_port(name, port.protocol),
    }
}

/// L4 policy as ztunnel enforces it, asked what a client without a mesh identity (a plaintext
/// client outside the mesh, or a socket carrying ztunnel's mark) may reach.
pub(super) struct PlaintextCheck<'a> {
    state: &'a ClusterState,
    policies: Policies,
    set: PolicySet,
}

impl<'a> PlaintextCheck<'a> {
    pub(super) fn new(state: &'a ClusterState) -> Self {
        let policies = policies(state);
        let mut set = PolicySet::new();
        for policy in &policies.list {
            set.insert(policy.clone());
        }
        PlaintextCheck {
            state,
            policies,
            set,
        }
    }

    /// The ports `pod` serves `service` on that accept plaintext, judged for a client at an
    /// address no policy names.
    pub(super) fn open_ports(&self, service: &crate::manifest::Service, pod: &Pod) -> Vec<u16> {
        let mut keys = selected_policies(&self.policies, pod);
        let peer = self.state.aged_peer_authentications();
        keys.extend(authz::peer_authentication_keys(&peer, pod, ROOT_NAMESPACE));
        let mut open: Vec<u16> = service
            .spec
            .ports
            .iter()
            .filter_map(|p| target_port(p, pod))
            .filter(|&port| {
                let connection = ConnectionInfo {
                    source_identity: None,
                    source_ip: IpAddr::from([0, 0, 0, 0]),
                    destination_ip: IpAddr::from([0, 0, 0, 0]),
                    destination_port: port,
                };
                self.set
                    .evaluate(&pod.metadata.namespace, &keys, &connection)
                    .allowed
            })
            .collect();
        open.sort_unstable();
        open.dedup();
        open
    }
}

/// ztunnel's configuration for the current state: `running` says which pods have an address
/// (pods not running are not workloads yet), `vips` gives each Service's VIP by
/// `(namespace, name)` (a Service without one is headless to ztunnel), `trust_domain` the SPIFFE
/// trust domain of the workloads.
pub fn ztunnel_config(
    state: &ClusterState,
    running: &[RunningPod],
    vips: &BTreeMap<(String, String), IpAddr>,
    trust_domain: &str,
) -> LocalConfig {
    let policies = policies(state);
    let peer = state.aged_peer_authentications();
    let mut seen = BTreeSet::new();
    let mut workloads = Vec::new();
    for rp in running {
        if !seen.insert((rp.namespace.as_str(), rp.name.as_str())) {
            continue;
        }
        let Some(pod) = state.pod(&rp.namespace, &rp.name) else {
            if is_waypoint(state, &rp.namespace, &rp.name) {
                workloads.push(waypoint_workload(rp, trust_domain));
            } else {
                tracing::debug!(pod = %format!("{}/{}", rp.namespace, rp.name), "running pod not in the state; skipped");
            }
            continue;
        };
        if pod.spec.host_network {
            continue;
        }
        let mut authorization_policies = selected_policies(&policies, pod);
        authorization_policies.extend(authz::peer_authentication_keys(&peer, pod, ROOT_NAMESPACE));
        workloads.push(Workload {
            uid: format!("{CLUSTER_ID}//Pod/{}/{}", rp.namespace, rp.name),
            name: rp.name.clone(),
            namespace: rp.namespace.clone(),
            service_account: pod.spec.service_account_name.clone(),
            trust_domain: trust_domain.to_owned(),
            workload_ips: vec![rp.ip],
            protocol: if rp.enrolled {
                Protocol::Hbone
            } else {
                Protocol::Tcp
            },
            node: rp.node.clone(),
            network: String::new(),
            waypoint: waypoint_address(state, state.pod_binding(pod), None, running),
            services: workload_services(state, pod),
            authorization_policies,
            canonical_name: canonical_name(pod),
            canonical_revision: canonical_revision(pod),
            workload_name: pod.workload_name().to_owned(),
            cluster_id: CLUSTER_ID.to_owned(),
            status: if rp.ready {
                HealthStatus::Healthy
            } else {
                HealthStatus::Unhealthy
            },
        });
    }
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));

    let services = state
        .services()
        .map(|svc| {
            let (ns, name) = (&svc.metadata.namespace, &svc.metadata.name);
            let mut ports = PortMap::new();
            let mut app_protocols = BTreeMap::new();
            for p in &svc.spec.ports {
                if let Some(protocol) = declared_protocol(p) {
                    app_protocols.insert(p.port, protocol);
                }
                match p.target_port {
                    TargetPort::Number(n) => {
                        ports.entry(p.port).or_insert(n);
                    }
                    // A named target port resolves per pod, and each workload's services map
                    // carries its number. istiod sends 0 here ("ask the workload"), but Ambit's
                    // state model reads 0 as "same as the service port", which would send
                    // traffic for pods lacking the named port to the wrong port; leaving the
                    // port out makes such pods simply not endpoints for it, as in Kubernetes.
                    TargetPort::Name(_) => {}
                }
            }
            Service {
                name: name.clone(),
                namespace: ns.clone(),
                hostname: svc.hostname(DOMAIN_SUFFIX),
                vips: vips
                    .get(&(ns.clone(), name.clone()))
                    .map(|ip| NetworkAddress {
                        network: String::new(),
                        address: *ip,
                    })
                    .into_iter()
                    .collect(),
                ports,
                app_protocols,
                subject_alt_names: Vec::new(),
                waypoint: waypoint_address(state, state.service_binding(svc), Some(svc), running),
            }
        })
        .collect();

    LocalConfig {
        workloads,
        services,
        policies: policies.list,
    }
}

fn is_waypoint(state: &ClusterState, namespace: &str, name: &str) -> bool {
    state
        .gateway(namespace, name)
        .is_some_and(|g| g.spec.gateway_class_name == super::WAYPOINT_GATEWAY_CLASS)
}

/// A waypoint as ztunnel sees it: an HBONE workload with the waypoint's own identity.
fn waypoint_workload(rp: &RunningPod, trust_domain: &str) -> Workload {
    Workload {
        uid: format!("{CLUSTER_ID}//Pod/{}/{}", rp.namespace, rp.name),
        name: rp.name.clone(),
        namespace: rp.namespace.clone(),
        service_account: rp.name.clone(),
        trust_domain: trust_domain.to_owned(),
        workload_ips: vec![rp.ip],
        protocol: Protocol::Hbone,
        node: rp.node.clone(),
        network: String::new(),
        waypoint: None,
        services: BTreeMap::new(),
        authorization_policies: Vec::new(),
        canonical_name: rp.name.clone(),
        canonical_revision: "latest".into(),
        workload_name: rp.name.clone(),
        cluster_id: CLUSTER_ID.to_owned(),
        status: HealthStatus::Healthy,
    }
}

/// Where ztunnel sends a bound Service's or pod's traffic (`waypoints` module docs): the running
/// waypoint's address; for traffic that is refused, an address no ztunnel resolves (a hostname
/// under `.invalid`, which can never be a Service), so the source ztunnel refuses the connection
/// and the destination refuses tunnels that skip the waypoint; `None` to go direct.
fn waypoint_address(
    state: &ClusterState,
    binding: Option<Binding>,
    service: Option<&crate::manifest::Service>,
    running: &[RunningPod],
) -> Option<GatewayAddress> {
    let pod_of = |w: &WaypointRef| {
        running
            .iter()
            .find(|rp| rp.namespace == w.namespace && rp.name == w.name)
    };
    let destination = match state.route(&binding?, service, &|w| pod_of(w).is_some()) {
        Route::Waypoint(w) => GatewayDestination::Address(NetworkAddress {
            network: String::new(),
            address: pod_of(&w)?.ip,
        }),
        Route::Refused { waypoint, .. } => GatewayDestination::Hostname(NamespacedHostname {
            hostname: format!(
                "{}.{}.{UNREACHABLE_WAYPOINT_DOMAIN}",
                waypoint.name, waypoint.namespace
            ),
            namespace: waypoint.namespace,
        }),
        Route::Direct { .. } => return None,
    };
    Some(GatewayAddress {
        destination,
        hbone_mtls_port: ambit_mesh::hbone::HBONE_PORT,
    })
}

/// The domain of the addresses given to refused waypoint bindings (RFC 6761: never resolves).
pub const UNREACHABLE_WAYPOINT_DOMAIN: &str = "waypoint.invalid";

/// The protocol a Service port declares, by Istio's rules: `appProtocol` first, else the port
/// name's `<protocol>[-suffix]` prefix, case-insensitively. Protocols other than HTTP that Istio
/// knows (mongo, mysql, redis, ...) are TCP to a waypoint; anything else declares nothing and is
/// sniffed.
fn declared_protocol(port: &ServicePort) -> Option<AppProtocol> {
    let known = |name: &str| -> Option<AppProtocol> {
        match name.to_ascii_lowercase().as_str() {
            "http" | "http_proxy" | "kubernetes.io/ws" | "kubernetes.io/wss" => {
                Some(AppProtocol::Http11)
            }
            "http2" | "kubernetes.io/h2c" => Some(AppProtocol::Http2),
            "grpc" | "grpc-web" => Some(AppProtocol::Grpc),
            "https" | "tls" => Some(AppProtocol::Tls),
            "tcp" | "mongo" | "mysql" | "redis" | "thrift" => Some(AppProtocol::Tcp),
            _ => None,
        }
    };
    if let Some(declared) = port.app_protocol.as_deref().and_then(known) {
        return Some(declared);
    }
    let name = port.name.as_deref()?;
    // `grpc-web` is a protocol of its own, not `grpc` with a suffix.
    known(name).or_else(|| known(name.split('-').next()?))
}
