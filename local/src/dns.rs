//! The local mesh's cluster DNS: the records of the Kubernetes DNS specification (schema 1.0.1,
//! `kubernetes/dns` `docs/specification.md`), built from the cluster's objects and its running
//! pods, and the answers a cluster's CoreDNS gives with them.
//!
//! Records, in `cluster.local` (TTL 5 s, CoreDNS's):
//! - `dns-version.cluster.local` TXT `1.0.1`;
//! - a Service with a VIP: `<svc>.<ns>.svc` A → the VIP; for each named port,
//!   `_<port>._<proto>.<svc>.<ns>.svc` SRV → `<svc>.<ns>.svc` (the A record in the additional
//!   section); PTR for the VIP;
//! - a headless Service: `<svc>.<ns>.svc` A → each endpoint's address, `<host>.<svc>.<ns>.svc` A
//!   per endpoint (`<host>` = the pod's `hostname` when its `subdomain` names the Service, else
//!   its address with dashes, as CoreDNS does), SRV per named port and endpoint, PTR per
//!   endpoint; no endpoints → NXDOMAIN, as the specification says;
//! - pods: `<a-b-c-d>.<ns>.pod` A → `a.b.c.d` for any address in an existing namespace (the
//!   specification's deprecated but required record; CoreDNS's `pods insecure`, kubeadm's
//!   default); PTR for a running pod's address → that name, unless a headless Service names it.
//!
//! The zone is authoritative for `cluster.local` and for the reverse zones of the pod and service
//! ranges: a name there that does not exist is NXDOMAIN at once (with the zone's SOA, so
//! resolvers cache it), which ends a search-list walk without a round trip upstream; a name that
//! exists without records of the asked type is an empty NOERROR. Every other name is forwarded
//! upstream (see [`ClusterDns`]). Comparisons ignore case; answers carry the owner name as asked.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ambit_mesh::dns::{Answer, Forwarder, Transport};
use arc_swap::ArcSwap;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::control::{ClusterState, RunningPod, DOMAIN_SUFFIX};
use crate::manifest::{Pod, Protocol, Service};

/// TTL of every record of the zone: CoreDNS's default, short enough that clients follow changes.
pub const TTL: u32 = 5;
/// The version of the Kubernetes DNS schema served (`dns-version.<zone>` TXT).
pub const SCHEMA_VERSION: &str = "1.0.1";

/// Everything the zone is built from.
pub struct ZoneSource<'a> {
    pub cluster: &'a ClusterState,
    /// Pods that have an address.
    pub pods: &'a [RunningPod],
    /// Each Service's VIP by `(namespace, name)`; a Service without one is headless.
    pub vips: &'a BTreeMap<(String, String), IpAddr>,
    /// The first two octets of the /16 ranges whose reverse zones are the cluster's (pods,
    /// services).
    pub reverse_ranges: &'a [(u8, u8)],
}

/// The cluster's records, by lower-case name (with the trailing dot). A name present with no
/// records exists (an empty non-terminal such as `<ns>.svc.cluster.local.`).
#[derive(Default)]
pub struct Zone {
    names: HashMap<String, Vec<RData>>,
    namespaces: BTreeSet<String>,
    /// Lower-case apexes with the trailing dot: `cluster.local.`, `244.10.in-addr.arpa.`, ...
    apexes: Vec<(String, Name)>,
}

impl Zone {
    pub fn build(source: &ZoneSource<'_>) -> Zone {
        let mut zone = Zone {
            namespaces: source
                .cluster
                .namespaces()
                .map(|n| n.metadata.name.clone())
                .collect(),
            ..Zone::default()
        };
        let cluster_apex = format!("{DOMAIN_SUFFIX}.");
        zone.add_apex(&cluster_apex);
        for (a, b) in source.reverse_ranges {
            zone.add_apex(&format!("{b}.{a}.in-addr.arpa."));
        }
        zone.add(
            &format!("dns-version.{cluster_apex}"),
            RData::TXT(TXT::new(vec![SCHEMA_VERSION.to_owned()])),
        );
        for namespace in zone.namespaces.clone() {
            zone.add_name(&format!("{namespace}.svc.{cluster_apex}"));
            zone.add_name(&format!("{namespace}.pod.{cluster_apex}"));
        }

        // Reverse names: a headless Service's endpoint name wins over the pod name.
        let mut reverse: BTreeMap<IpAddr, String> = BTreeMap::new();
        for service in source.cluster.services() {
            let key = (
                service.metadata.namespace.clone(),
                service.metadata.name.clone(),
            );
            let host = format!("{}.", service.hostname(DOMAIN_SUFFIX));
            match source.vips.get(&key) {
                Some(vip) => {
                    zone.add(&host, address(*vip));
                    for (port, protocol, number) in named_ports(service) {
                        zone.add(
                            &format!("_{port}._{protocol}.{host}"),
                            srv(100, number, &host),
                        );
                    }
                    reverse.insert(*vip, host);
                }
                None => {
                    let endpoints = endpoints(source, service);
                    let weight = u16::try_from(100 / endpoints.len().max(1)).unwrap_or(100);
                    for (endpoint, ip) in &endpoints {
                        let endpoint_host = format!("{endpoint}.{host}");
                        zone.add(&host, address(*ip));
                        zone.add(&endpoint_host, address(*ip));
                        for (port, protocol, number) in named_ports(service) {
                            zone.add(
                                &format!("_{port}._{protocol}.{host}"),
                                srv(weight.max(1), number, &endpoint_host),
                            );
                        }
                        reverse.entry(*ip).or_insert(endpoint_host);
                    }
                }
            }
        }
        for pod in source.pods {
            let IpAddr::V4(ip) = pod.ip else { continue };
            reverse
                .entry(pod.ip)
                .or_insert_with(|| pod_host(ip, &pod.namespace));
        }
        for (ip, target) in reverse {
            if let Ok(target) = Name::from_ascii(&target) {
                zone.add(&reverse_name(ip), RData::PTR(PTR(target)));
            }
        }
        zone
    }

    fn add_apex(&mut self, apex: &str) {
        let Ok(name) = Name::from_ascii(apex) else {
            return;
        };
        self.apexes.push((apex.to_owned(), name.clone()));
        self.add(apex, RData::SOA(soa(&name)));
    }

    /// Adds `name` (and every name between it and its apex, as empty non-terminals).
    fn add_name(&mut self, name: &str) -> &mut Vec<RData> {
        let apex = self
            .apexes
            .iter()
            .find(|(apex, _)| in_zone(name, apex))
            .map(|(apex, _)| apex.len());
        if let Some(apex_len) = apex {
            let mut rest = name;
            while rest.len() > apex_len {
                let Some((_, parent)) = rest.split_once('.') else {
                    break;
                };
                self.names.entry(parent.to_owned()).or_default();
                rest = parent;
            }
        }
        self.names.entry(name.to_owned()).or_default()
    }

    fn add(&mut self, name: &str, rdata: RData) {
        let records = self.add_name(&name.to_ascii_lowercase());
        if !records.contains(&rdata) {
            records.push(rdata);
        }
    }

    /// The apex of the zone `name` (lower case, trailing dot) is in, if it is the cluster's.
    fn apex(&self, name: &str) -> Option<&Name> {
        self.apexes
            .iter()
            .find(|(apex, _)| in_zone(name, apex))
            .map(|(_, apex)| apex)
    }

    /// The records at `name`: `None` when the name does not exist.
    fn records(&self, name: &str) -> Option<Vec<RData>> {
        if let Some(records) = self.names.get(name) {
            return Some(records.clone());
        }
        // `<a-b-c-d>.<ns>.pod.<zone>.` for any address, in an existing namespace.
        let rest = name.strip_suffix(&format!(".pod.{DOMAIN_SUFFIX}."))?;
        let (dashed, namespace) = rest.split_once('.')?;
        if !self.namespaces.contains(namespace) {
            return None;
        }
        let octets: Vec<u8> = dashed
            .split('-')
            .map(|o| o.parse::<u8>().ok().filter(|_| o.len() <= 3))
            .collect::<Option<_>>()?;
        let [a, b, c, d] = octets.as_slice() else {
            return None;
        };
        Some(vec![RData::A(A(Ipv4Addr::new(*a, *b, *c, *d)))])
    }

    /// Answers `query` into `response` when its name is the cluster's; `false` when it is not
    /// (forward it).
    pub fn answer(&self, query: &Query, response: &mut Message) -> bool {
        let owner = query.name();
        let mut key = owner.to_lowercase().to_ascii();
        if !key.ends_with('.') {
            key.push('.');
        }
        let Some(apex) = self.apex(&key) else {
            return false;
        };
        if query.query_class() != DNSClass::IN {
            // The zone has Internet records only.
            response.metadata.response_code = ResponseCode::Refused;
            return true;
        }
        response.metadata.authoritative = true;
        let negative = Record::from_rdata(apex.clone(), TTL, RData::SOA(soa(apex)));
        let Some(records) = self.records(&key) else {
            response.metadata.response_code = ResponseCode::NXDomain;
            response.authorities = vec![negative];
            return true;
        };
        let wanted = query.query_type();
        response.answers = records
            .into_iter()
            .filter(|r| wanted == RecordType::ANY || r.record_type() == wanted)
            .map(|r| Record::from_rdata(owner.clone(), TTL, r))
            .collect();
        if response.answers.is_empty() {
            response.authorities = vec![negative];
        }
        // SRV targets' addresses, so the client needs no second query.
        let targets: BTreeSet<String> = response
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => Some(srv.target.to_lowercase().to_ascii()),
                _ => None,
            })
            .collect();
        for target in targets {
            let Ok(name) = Name::from_ascii(&target) else {
                continue;
            };
            for rdata in self.records(&target).unwrap_or_default() {
                if matches!(rdata, RData::A(_) | RData::AAAA(_)) {
                    response
                        .additionals
                        .push(Record::from_rdata(name.clone(), TTL, rdata));
                }
            }
        }
        true
    }
}

/// The cluster DNS: the current [`Zone`], and a forwarder for every other name.
pub struct ClusterDns {
    zone: ArcSwap<Zone>,
    forwarder: Forwarder,
}

impl ClusterDns {
    pub fn new(zone: Zone, forwarder: Forwarder) -> Self {
        ClusterDns {
            zone: ArcSwap::from_pointee(zone),
            forwarder,
        }
    }

    /// Serves `zone` from now on (queries in flight finish with the one they started with).
    pub fn replace(&self, zone: Zone) {
        self.zone.store(Arc::new(zone));
    }
}

impl Answer for ClusterDns {
    async fn answer(&self, query: &Query, _: Transport, response: &mut Message) {
        if self.zone.load().answer(query, response) {
            tracing::debug!(target: "dns", name = %query.name(), query_type = %query.query_type(), code = %response.metadata.response_code, answers = response.answers.len(), "cluster name");
            return;
        }
        match self
            .forwarder
            .forward(query.name().clone(), query.query_type())
            .await
        {
            Ok(forwarded) => {
                response.metadata.response_code = forwarded.code;
                response.answers = forwarded.answers;
                response.authorities = forwarded.authorities;
            }
            Err(error) => {
                tracing::debug!(target: "dns", name = %query.name(), %error, "forwarding failed");
                response.metadata.response_code = error.code();
            }
        }
    }
}

/// Whether `name` is `apex` or under it (both lower case with the trailing dot).
fn in_zone(name: &str, apex: &str) -> bool {
    name == apex
        || name
            .strip_suffix(apex)
            .is_some_and(|rest| rest.ends_with('.'))
}

fn address(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(ip) => RData::A(A(ip)),
        IpAddr::V6(ip) => RData::AAAA(AAAA(ip)),
    }
}

fn srv(weight: u16, port: u16, target: &str) -> RData {
    let target = Name::from_ascii(target).unwrap_or_else(|_| Name::root());
    RData::SRV(SRV::new(0, weight, port, target))
}

/// CoreDNS's SOA for a zone: `ns.dns.<apex> hostmaster.<apex>`, negative answers cached 5 s.
fn soa(apex: &Name) -> SOA {
    let under = |label: &str| {
        Name::from_ascii(label)
            .and_then(|l| l.append_domain(apex))
            .unwrap_or_else(|_| apex.clone())
    };
    SOA::new(
        under("ns.dns"),
        under("hostmaster"),
        1,
        7200,
        1800,
        86400,
        TTL,
    )
}

/// `(name, protocol, port)` of a Service's named ports, protocol as SRV names spell it.
fn named_ports(service: &Service) -> Vec<(String, &'static str, u16)> {
    service
        .spec
        .ports
        .iter()
        .filter_map(|p| {
            let protocol = match p.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
                Protocol::Sctp => "sctp",
            };
            Some((p.name.clone()?, protocol, p.port))
        })
        .collect()
}

/// A headless Service's endpoints: `(hostname, address)` of each ready pod it selects, as
/// CoreDNS answers from EndpointSlices (not-ready addresses are left out).
fn endpoints(source: &ZoneSource<'_>, service: &Service) -> Vec<(String, IpAddr)> {
    let mut out: Vec<(String, IpAddr)> = source
        .pods
        .iter()
        .filter(|running| running.ready)
        .filter_map(|running| {
            let pod = source.cluster.pod(&running.namespace, &running.name)?;
            service
                .selects(pod)
                .then(|| (endpoint_hostname(pod, service, running.ip), running.ip))
        })
        .collect();
    out.sort();
    out
}

/// The endpoint's hostname as the endpoints controller and CoreDNS give it: the pod's `hostname`
/// when its `subdomain` is the Service, else its address with dashes.
fn endpoint_hostname(pod: &Pod, service: &Service, ip: IpAddr) -> String {
    match (&pod.spec.hostname, &pod.spec.subdomain) {
        (Some(hostname), Some(subdomain)) if *subdomain == service.metadata.name => {
            hostname.clone()
        }
        _ => ip.to_string().replace(['.', ':'], "-"),
    }
}

/// `<a-b-c-d>.<ns>.pod.<zone>.`
fn pod_host(ip: Ipv4Addr, namespace: &str) -> String {
    let dashed = ip.to_string().replace('.', "-");
    format!("{dashed}.{namespace}.pod.{DOMAIN_SUFFIX}.")
}

/// The `in-addr.arpa` / `ip6.arpa` name of `ip`.
fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => {
            let [a, b, c, d] = ip.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa.")
        }
        IpAddr::V6(ip) => {
            let mut name = String::new();
            for byte in ip.octets().iter().rev() {
                name.push_str(&format!("{:x}.{:x}.", byte & 0x0f, byte >> 4));
            }
            name + "ip6.arpa."
        }
    }
}

#[cfg(test)]
mod tests;
