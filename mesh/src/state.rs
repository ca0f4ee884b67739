//! What the data path knows about the mesh: workloads, services and authorization policies,
//! following Istio's WDS model, indexed for O(1) lookups by workload IP, service VIP, uid and
//! namespace/name.
//!
//! A [`Snapshot`] is immutable and complete; a [`StateStore`] swaps whole snapshots atomically, so
//! a connection resolves against one consistent view and updates never stall traffic. Sources (the
//! local YAML file today, Istio xDS next) build snapshots and hand them to the store.

pub mod local;
mod model;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;

pub use model::{
    AppProtocol, GatewayAddress, GatewayDestination, HealthStatus, NamespacedHostname,
    NetworkAddress, PortMap, Protocol, Service, Workload,
};

use crate::identity::Identity;
use crate::rbac::{Authorization, PolicySet};

/// Why a set of workloads, services and policies cannot become the mesh's state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("workload uid {0:?} appears twice")]
    DuplicateWorkload(String),
    #[error("workload {uid:?}: {reason}")]
    BadWorkload { uid: String, reason: String },
    #[error("address {address} belongs to both workload {first:?} and workload {second:?}")]
    DuplicateAddress {
        address: String,
        first: String,
        second: String,
    },
    #[error("service {0:?} appears twice")]
    DuplicateService(String),
    #[error("service {service:?}: {reason}")]
    BadService { service: String, reason: String },
    #[error("authorization policy {0:?} appears twice")]
    DuplicatePolicy(String),
    #[error("authorization policy {policy:?}: {reason}")]
    BadPolicy { policy: String, reason: String },
}

/// Where an outbound connection's original destination leads.
#[derive(Clone, Debug)]
pub enum Destination {
    /// A service VIP: `endpoint` was picked among its healthy endpoints serving the port.
    Service {
        service: Arc<Service>,
        endpoint: Arc<Workload>,
        target_port: u16,
    },
    /// A service VIP with no endpoint able to take the connection.
    NoEndpoint { service: Arc<Service> },
    /// A workload IP directly.
    Workload { workload: Arc<Workload>, port: u16 },
    /// Not in the mesh: forwarded unchanged as plain TCP.
    Passthrough,
}

/// One consistent view of the mesh.
#[derive(Default)]
pub struct Snapshot {
    workloads: HashMap<String, Arc<Workload>>,
    workloads_by_address: HashMap<(String, IpAddr), Arc<Workload>>,
    /// Namespace → name → workloads: how a node finds the workload of a pod its node agent
    /// names (several clusters or nodes may hold the same name).
    workloads_by_name: HashMap<String, HashMap<String, Vec<Arc<Workload>>>>,
    services: HashMap<String, Arc<Service>>,
    services_by_vip: HashMap<(String, IpAddr), Arc<Service>>,
    /// Service key → the workloads backing it, in uid order (stable endpoint picking).
    endpoints: HashMap<String, Vec<Arc<Workload>>>,
    policies: PolicySet,
}

impl Snapshot {
    /// Builds and validates a snapshot: uids, addresses, service keys and VIPs are unique, every
    /// workload has a valid identity and well-formed service references.
    pub fn build(
        workloads: Vec<Workload>,
        services: Vec<Service>,
        policies: Vec<Authorization>,
    ) -> Result<Self, StateError> {
        let mut snapshot = Snapshot::default();
        for service in services {
            let key = service.key();
            if service.hostname.is_empty() || service.namespace.is_empty() {
                return Err(StateError::BadService {
                    service: service.name.clone(),
                    reason: "namespace and hostname are required".into(),
                });
            }
            for san in &service.subject_alt_names {
                san.parse::<Identity>()
                    .map_err(|e| StateError::BadService {
                        service: key.clone(),
                        reason: format!("subjectAltNames: {e}"),
                    })?;
            }
            let service = Arc::new(service);
            for vip in &service.vips {
                let index = (vip.network.clone(), vip.address);
                if let Some(other) = snapshot.services_by_vip.insert(index, service.clone()) {
                    return Err(StateError::BadService {
                        service: key,
                        reason: format!("VIP {vip} is already service {:?}'s", other.key()),
                    });
                }
            }
            if snapshot.services.insert(key.clone(), service).is_some() {
                return Err(StateError::DuplicateService(key));
            }
        }
        for workload in workloads {
            let uid = workload.uid.clone();
            let bad = |reason: String| StateError::BadWorkload {
                uid: uid.clone(),
                reason,
            };
            if uid.is_empty() {
                return Err(bad("uid is required".into()));
            }
            workload.identity().map_err(|e| bad(e.to_string()))?;
            for key in workload.services.keys() {
                if !key.contains('/') {
                    return Err(bad(format!(
                        "services key {key:?} must be \"<namespace>/<hostname>\""
                    )));
                }
            }
            let workload = Arc::new(workload);
            for ip in &workload.workload_ips {
                let index = (workload.network.clone(), *ip);
                if let Some(other) = snapshot
                    .workloads_by_address
                    .insert(index, workload.clone())
                {
                    return Err(StateError::DuplicateAddress {
                        address: format!("{}/{ip}", workload.network),
                        first: other.uid.clone(),
                        second: uid,
                    });
                }
            }
            snapshot
                .workloads_by_name
                .entry(workload.namespace.clone())
                .or_default()
                .entry(workload.name.clone())
                .or_default()
                .push(workload.clone());
            for key in workload.services.keys() {
                snapshot
                    .endpoints
                    .entry(key.clone())
                    .or_default()
                    .push(workload.clone());
            }
            if snapshot.workloads.insert(uid.clone(), workload).is_some() {
                return Err(StateError::DuplicateWorkload(uid));
            }
        }
        for endpoints in snapshot.endpoints.values_mut() {
            endpoints.sort_by(|a, b| a.uid.cmp(&b.uid));
        }
        let mut seen = HashSet::new();
        for policy in policies {
            let key = policy.key();
            policy.validate().map_err(|e| StateError::BadPolicy {
                policy: key.clone(),
                reason: e.to_string(),
            })?;
            if !seen.insert(key.clone()) {
                return Err(StateError::DuplicatePolicy(key));
            }
            snapshot.policies.insert(policy);
        }
        Ok(snapshot)
    }

    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    /// Every workload called `name` in `namespace`, on any node, in no particular order.
    pub fn workloads_named(&self, namespace: &str, name: &str) -> &[Arc<Workload>] {
        self.workloads_by_name
            .get(namespace)
            .and_then(|names| names.get(name))
            .map_or(&[], Vec::as_slice)
    }

    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads_by_address.get(&(network.to_owned(), ip))
    }

    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    pub fn service_by_vip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Service>> {
        self.services_by_vip.get(&(network.to_owned(), ip))
    }

    /// The workloads backing a service, healthy or not.
    pub fn endpoints(&self, service_key: &str) -> &[Arc<Workload>] {
        self.endpoints.get(service_key).map_or(&[], Vec::as_slice)
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    /// Every identity the waypoint behind `gateway` may present, whichever of its pods answers:
    /// the workload at its address, or the endpoints (and SANs) of the waypoint service it names
    /// by VIP or hostname. Empty when the waypoint is unknown, so nothing checked against it
    /// passes.
    pub fn waypoint_identities(&self, gateway: &GatewayAddress) -> Vec<Identity> {
        let key = match &gateway.destination {
            GatewayDestination::Address(address) => {
                if let Some(workload) = self.workload_by_ip(&address.network, address.address) {
                    return workload.identity().into_iter().collect();
                }
                match self.service_by_vip(&address.network, address.address) {
                    Some(service) => service.key(),
                    None => return Vec::new(),
                }
            }
            GatewayDestination::Hostname(name) => format!("{}/{}", name.namespace, name.hostname),
        };
        let sans = self
            .service(&key)
            .into_iter()
            .flat_map(|s| s.subject_alt_names.iter())
            .filter_map(|san| san.parse().ok());
        self.endpoints(&key)
            .iter()
            .filter_map(|w| w.identity().ok())
            .chain(sans)
            .collect()
    }

    /// Whether `identity` belongs to a waypoint some service or workload of the state uses.
    /// Walks the state: meant for the rare check of a peer that speaks for another client, not
    /// for every connection.
    pub fn is_waypoint_identity(&self, identity: &Identity) -> bool {
        let gateways = self
            .services
            .values()
            .filter_map(|s| s.waypoint.as_ref())
            .chain(self.workloads.values().filter_map(|w| w.waypoint.as_ref()));
        let mut seen: Vec<&GatewayAddress> = Vec::new();
        for gateway in gateways {
            if seen.contains(&gateway) {
                continue;
            }
            seen.push(gateway);
            if self.waypoint_identities(gateway).contains(identity) {
                return true;
            }
        }
        false
    }

    /// Resolves an original destination seen on `network`. For a service, `pick` chooses among
    /// the healthy endpoints that serve the port (the caller passes a random or round-robin
    /// number to spread load).
    pub fn resolve(&self, network: &str, destination: SocketAddr, pick: usize) -> Destination {
        if let Some(service) = self.service_by_vip(network, destination.ip()) {
            let key = service.key();
            let port = destination.port();
            let candidates: Vec<(&Arc<Workload>, u16)> = self
                .endpoints(&key)
                .iter()
                .filter(|w| w.status == HealthStatus::Healthy)
                .filter_map(|w| Some((w, self.endpoint_port(service, w, port)?)))
                .collect();
            if candidates.is_empty() {
                return Destination::NoEndpoint {
                    service: service.clone(),
                };
            }
            let (endpoint, target_port) = candidates[pick % candidates.len()];
            return Destination::Service {
                service: service.clone(),
                endpoint: endpoint.clone(),
                target_port,
            };
        }
        if let Some(workload) = self.workload_by_ip(network, destination.ip()) {
            return Destination::Workload {
                workload: workload.clone(),
                port: destination.port(),
            };
        }
        Destination::Passthrough
    }

    /// The port `endpoint` serves `service`'s `port` on: the workload's own mapping first, the
    /// service's port list second; `None` if the service does not expose `port`.
    fn endpoint_port(&self, service: &Service, endpoint: &Workload, port: u16) -> Option<u16> {
        endpoint.target_port(&service.key(), port).or_else(|| {
            service
                .ports
                .get(&port)
                .map(|&target| if target == 0 { port } else { target })
        })
    }
}

/// The current snapshot, swapped atomically by sources and read lock-free by the data path.
pub struct StateStore {
    current: ArcSwap<Snapshot>,
    /// Bumped on every swap, for whoever must react (re-checking live connections' policy).
    version: tokio::sync::watch::Sender<u64>,
}

impl Default for StateStore {
    fn default() -> Self {
        Self::new(Snapshot::default())
    }
}

impl StateStore {
    pub fn new(snapshot: Snapshot) -> Self {
        StateStore {
            current: ArcSwap::from_pointee(snapshot),
            version: tokio::sync::watch::channel(0).0,
        }
    }

    /// The snapshot to resolve one connection against.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn replace(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
        self.version.send_modify(|version| *version += 1);
    }

    /// Notified after each [`replace`](Self::replace).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }
}
