//! Mesh names → addresses, from one state snapshot.
//!
//! Kubernetes service names (`<svc>.<ns>.svc.cluster.local`) are found in O(1) by the state's
//! service key (`<ns>/<hostname>`). Other hostnames (ServiceEntry-style, exact or `*.` wildcard)
//! go through a [`HostIndex`] built from the snapshot on first need and kept until the snapshot
//! changes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};

use ambit_mesh::state::{HealthStatus, Service, Snapshot};
use rand::seq::SliceRandom;

use super::CLUSTER_DOMAIN;

/// Address family asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Family {
    V4,
    V6,
}

impl Family {
    fn matches(self, address: &IpAddr) -> bool {
        match self {
            Family::V4 => address.is_ipv4(),
            Family::V6 => address.is_ipv6(),
        }
    }
}

/// What the mesh says about a name.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Resolution {
    /// A mesh name: its addresses of the asked family, maybe none (an empty NOERROR).
    Addresses(Vec<IpAddr>),
    /// Under the cluster domain and not in the mesh: NXDOMAIN.
    NoSuchName,
    /// Not the mesh's to answer: ask upstream.
    Forward,
}

/// Where the lookup happens: the snapshot and the asking pod's view.
pub(super) struct Lookup<'a> {
    pub snapshot: &'a Arc<Snapshot>,
    /// Consulted only when the Kubernetes shortcut does not find the name.
    pub index: &'a IndexCache,
    /// The node's network: VIPs on other networks are not reachable from here.
    pub network: &'a str,
    /// The asking pod's namespace, preferred among services sharing a hostname.
    pub namespace: &'a str,
}

impl Lookup<'_> {
    /// Resolves `host` (lower case, no trailing dot).
    pub fn resolve(&self, host: &str, family: Family) -> Resolution {
        if let Some(service) = self.find_service(host) {
            return Resolution::Addresses(self.addresses(&service, family));
        }
        if !in_cluster_domain(host) {
            return Resolution::Forward;
        }
        // `<a-b-c-d>.<ns>.pod.cluster.local`: a pod's own name, which only the cluster's DNS
        // answers.
        if host
            .strip_suffix(CLUSTER_DOMAIN)
            .and_then(|rest| rest.strip_suffix(".pod."))
            .is_some_and(|rest| rest.split('.').count() == 2 && !rest.split('.').any(str::is_empty))
        {
            return Resolution::Forward;
        }
        // `<pod>.<svc>.<ns>.svc.cluster.local` of a known service: a StatefulSet pod's own name,
        // which only the cluster's DNS knows.
        if let Some([_pod, service, namespace]) = svc_labels::<3>(host) {
            let service_host = format!("{service}.{namespace}.svc.{CLUSTER_DOMAIN}");
            if self
                .snapshot
                .service(&format!("{namespace}/{service_host}"))
                .is_some()
            {
                return Resolution::Forward;
            }
        }
        Resolution::NoSuchName
    }

    fn find_service(&self, host: &str) -> Option<Arc<Service>> {
        if let Some([_, namespace]) = svc_labels::<2>(host) {
            if let Some(service) = self.snapshot.service(&format!("{namespace}/{host}")) {
                if answerable(service) {
                    return Some(service.clone());
                }
            }
        }
        // The exact name first, then ever wider wildcards: a.b.c → *.b.c → *.c.
        let index = self.index.get(self.snapshot);
        if let Some(service) = index.best(host, self.namespace) {
            return Some(service.clone());
        }
        let mut rest = host;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(service) = index.best(&format!("*.{parent}"), self.namespace) {
                return Some(service.clone());
            }
            rest = parent;
        }
        None
    }

    /// The service's VIPs of `family` on this network, shuffled to spread clients that take the
    /// first; for a headless service, its healthy endpoints' addresses.
    fn addresses(&self, service: &Service, family: Family) -> Vec<IpAddr> {
        let mut addresses: Vec<IpAddr> = if service.vips.is_empty() {
            self.snapshot
                .endpoints(&service.key())
                .iter()
                .filter(|w| w.status == HealthStatus::Healthy)
                .filter_map(|w| w.workload_ips.iter().copied().find(|a| family.matches(a)))
                .collect()
        } else {
            service
                .vips
                .iter()
                .filter(|vip| vip.network == self.network && family.matches(&vip.address))
                .map(|vip| vip.address)
                .collect()
        };
        addresses.shuffle(&mut rand::rng());
        addresses
    }
}

/// Whether the mesh answers for this service: it has VIPs, or it is a headless Kubernetes
/// service (answered with its endpoints). A ServiceEntry without addresses is resolved upstream,
/// as in Istio.
fn answerable(service: &Service) -> bool {
    !service.vips.is_empty() || svc_labels::<2>(&service.hostname.to_ascii_lowercase()).is_some()
}

fn in_cluster_domain(host: &str) -> bool {
    host == CLUSTER_DOMAIN
        || host
            .strip_suffix(CLUSTER_DOMAIN)
            .is_some_and(|rest| rest.ends_with('.'))
}

/// The `N` labels before `.svc.cluster.local`, if `host` has exactly that shape.
fn svc_labels<const N: usize>(host: &str) -> Option<[&str; N]> {
    let rest = host.strip_suffix(CLUSTER_DOMAIN)?.strip_suffix(".svc.")?;
    let labels: Vec<&str> = rest.split('.').collect();
    if labels.iter().any(|l| l.is_empty()) {
        return None;
    }
    labels.try_into().ok()
}

/// Services whose hostname the Kubernetes shortcut would not find, by lower-case hostname.
#[derive(Default)]
pub(super) struct HostIndex {
    by_host: HashMap<String, Vec<Arc<Service>>>,
}

impl HostIndex {
    fn build(snapshot: &Snapshot) -> Self {
        let mut by_host: HashMap<String, Vec<Arc<Service>>> = HashMap::new();
        for service in snapshot.services() {
            let host = service.hostname.to_ascii_lowercase();
            let kubernetes =
                svc_labels::<2>(&host).is_some_and(|[_, namespace]| namespace == service.namespace);
            if !kubernetes && answerable(service) {
                by_host.entry(host).or_default().push(service.clone());
            }
        }
        // A stable choice among namespaces that are not the client's.
        for services in by_host.values_mut() {
            services.sort_by(|a, b| a.namespace.cmp(&b.namespace));
        }
        HostIndex { by_host }
    }

    /// The service for `host`: the one in `namespace` if there is one, else the first.
    fn best(&self, host: &str, namespace: &str) -> Option<&Arc<Service>> {
        let services = self.by_host.get(host)?;
        services
            .iter()
            .find(|s| s.namespace == namespace)
            .or_else(|| services.first())
    }
}

/// One [`HostIndex`], rebuilt when the snapshot changes.
#[derive(Default)]
pub(super) struct IndexCache {
    /// The snapshot the index was built from. A `Weak` does not keep the snapshot's data alive,
    /// but it keeps its allocation, so a newer snapshot can never have the same address.
    current: Mutex<Option<(Weak<Snapshot>, Arc<HostIndex>)>>,
}

impl IndexCache {
    pub fn get(&self, snapshot: &Arc<Snapshot>) -> Arc<HostIndex> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((built_from, index)) = current.as_ref() {
            if std::ptr::eq(built_from.as_ptr(), Arc::as_ptr(snapshot)) {
                return index.clone();
            }
        }
        let index = Arc::new(HostIndex::build(snapshot));
        *current = Some((Arc::downgrade(snapshot), index.clone()));
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_mesh::state::{NetworkAddress, Workload};

    fn service(name: &str, namespace: &str, hostname: &str, vips: &[&str]) -> Service {
        Service {
            name: name.into(),
            namespace: namespace.into(),
            hostname: hostname.into(),
            vips: vips
                .iter()
                .map(|v| NetworkAddress {
                    network: String::new(),
                    address: v.parse().unwrap(),
                })
                .collect(),
            ports: Default::default(),
            app_protocols: Default::default(),
            subject_alt_names: Vec::new(),
            waypoint: None,
        }
    }

    fn snapshot() -> Arc<Snapshot> {
        let headless_pod: Workload = serde_json::from_value(serde_json::json!({
            "uid": "db-0", "name": "db-0", "namespace": "data",
            "workloadIps": ["10.0.0.7", "fd00::7"],
            "services": {"data/db.data.svc.cluster.local": {}},
        }))
        .unwrap();
        Arc::new(
            Snapshot::build(
                vec![headless_pod],
                vec![
                    service(
                        "echo",
                        "default",
                        "echo.default.svc.cluster.local",
                        &["10.96.0.10"],
                    ),
                    service(
                        "dual",
                        "default",
                        "dual.default.svc.cluster.local",
                        &["10.96.0.11", "fd00::11"],
                    ),
                    service("db", "data", "db.data.svc.cluster.local", &[]),
                    service("api", "ext", "API.example.com", &["240.0.0.1"]),
                    service("api", "default", "api.example.com", &["240.0.0.2"]),
                    service("wild", "ext", "*.wild.example.com", &["240.0.0.3"]),
                    service("noaddr", "ext", "noaddr.example.com", &[]),
                ],
                Vec::new(),
            )
            .unwrap(),
        )
    }

    fn resolve(snapshot: &Arc<Snapshot>, host: &str, family: Family) -> Resolution {
        Lookup {
            snapshot,
            index: &IndexCache::default(),
            network: "",
            namespace: "default",
        }
        .resolve(host, family)
    }

    fn addresses(list: &[&str]) -> Resolution {
        Resolution::Addresses(list.iter().map(|a| a.parse().unwrap()).collect())
    }

    #[test]
    fn kubernetes_services_resolve_to_their_vips_by_family() {
        let s = snapshot();
        let v4 = Family::V4;
        assert_eq!(
            resolve(&s, "echo.default.svc.cluster.local", v4),
            addresses(&["10.96.0.10"])
        );
        assert_eq!(
            resolve(&s, "echo.default.svc.cluster.local", Family::V6),
            addresses(&[])
        );
        assert_eq!(
            resolve(&s, "dual.default.svc.cluster.local", Family::V6),
            addresses(&["fd00::11"])
        );
    }

    #[test]
    fn headless_services_resolve_to_their_endpoints() {
        let s = snapshot();
        assert_eq!(
            resolve(&s, "db.data.svc.cluster.local", Family::V4),
            addresses(&["10.0.0.7"])
        );
        assert_eq!(
            resolve(&s, "db.data.svc.cluster.local", Family::V6),
            addresses(&["fd00::7"])
        );
    }

    #[test]
    fn the_cluster_domain_is_authoritative_except_for_pod_names() {
        let s = snapshot();
        for host in [
            "nope.default.svc.cluster.local",
            "echo.default.default.svc.cluster.local",
            "echo.default.svc.default.svc.cluster.local",
            "default.svc.cluster.local",
            "cluster.local",
            "default.pod.cluster.local",
            "a.b.default.pod.cluster.local",
        ] {
            assert_eq!(
                resolve(&s, host, Family::V4),
                Resolution::NoSuchName,
                "{host}"
            );
        }
        for forwarded in [
            "db-0.db.data.svc.cluster.local",
            "10-244-1-2.default.pod.cluster.local",
        ] {
            assert_eq!(
                resolve(&s, forwarded, Family::V4),
                Resolution::Forward,
                "{forwarded}"
            );
        }
    }

    #[test]
    fn other_hostnames_resolve_as_written_preferring_the_client_namespace() {
        let s = snapshot();
        assert_eq!(
            resolve(&s, "api.example.com", Family::V4),
            addresses(&["240.0.0.2"])
        );
        assert_eq!(
            resolve(&s, "a.wild.example.com", Family::V4),
            addresses(&["240.0.0.3"])
        );
        assert_eq!(
            resolve(&s, "a.b.wild.example.com", Family::V4),
            addresses(&["240.0.0.3"])
        );
        assert_eq!(
            resolve(&s, "wild.example.com", Family::V4),
            Resolution::Forward
        );
        assert_eq!(
            resolve(&s, "noaddr.example.com", Family::V4),
            Resolution::Forward
        );
        assert_eq!(resolve(&s, "example.org", Family::V4), Resolution::Forward);
        assert_eq!(
            resolve(&s, "notcluster.local", Family::V4),
            Resolution::Forward
        );
    }

    #[test]
    fn the_index_follows_the_snapshot() {
        let cache = IndexCache::default();
        let first = snapshot();
        let index = cache.get(&first);
        assert!(Arc::ptr_eq(&index, &cache.get(&first)));
        let second = snapshot();
        assert!(!Arc::ptr_eq(&index, &cache.get(&second)));
    }
}
