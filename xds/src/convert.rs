//! Turns istiod's protobufs into Ambit's state model (`ambit_mesh::state`, `ambit_mesh::rbac`).
//!
//! Every field the model has is mapped; fields it has no place for (locality, network gateway,
//! load balancing, extensions...) are dropped. Defaults follow Istio's ztunnel: an empty trust
//! domain is `cluster.local`, an empty service account `default`, an empty cluster id
//! `Kubernetes`. Each resource is also validated on its own the way a snapshot would be, so a bad
//! resource is refused alone, with its name and the offending field.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ambit_mesh::hbone::HBONE_PORT;
use ambit_mesh::identity::DEFAULT_TRUST_DOMAIN;
use ambit_mesh::rbac::{self, Authorization};
use ambit_mesh::state::{self, Snapshot};
use ipnet::IpNet;
use prost::Message;

use crate::proto::google::Any;
use crate::proto::{security, workload, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

/// Cluster id Istio assumes when a workload names none.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// Why a resource from istiod cannot enter the state.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ConvertError {
    #[error("resource {name:?} has no body")]
    Empty { name: String },
    #[error("resource {name:?} is a {actual:?}, expected {expected:?}")]
    WrongType {
        name: String,
        expected: &'static str,
        actual: String,
    },
    #[error("resource {name:?} is not a valid {expected}: {reason}")]
    Decode {
        name: String,
        expected: &'static str,
        reason: String,
    },
    #[error("{kind} {name:?}: field {field}: {reason}")]
    Field {
        kind: &'static str,
        name: String,
        field: String,
        reason: String,
    },
}

/// One `istio.workload.Address` in the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressResource {
    Workload(state::Workload),
    Service(state::Service),
}

/// Decodes and converts an `Address` resource named `name`.
pub fn address_from_any(name: &str, any: Option<&Any>) -> Result<AddressResource, ConvertError> {
    let message: workload::Address = decode(name, any, ADDRESS_TYPE_URL, "istio.workload.Address")?;
    match message.r#type {
        Some(workload::address::Type::Workload(w)) => {
            Ok(AddressResource::Workload(convert_workload(name, w)?))
        }
        Some(workload::address::Type::Service(s)) => {
            Ok(AddressResource::Service(convert_service(name, s)?))
        }
        None => Err(ConvertError::Field {
            kind: "address",
            name: name.to_owned(),
            field: "type".into(),
            reason: "neither a workload nor a service".into(),
        }),
    }
}

/// Decodes and converts an `Authorization` resource named `name`.
pub fn authorization_from_any(
    name: &str,
    any: Option<&Any>,
) -> Result<Authorization, ConvertError> {
    let message: security::Authorization = decode(
        name,
        any,
        AUTHORIZATION_TYPE_URL,
        "istio.security.Authorization",
    )?;
    convert_authorization(name, message)
}

fn decode<M: Message + Default>(
    name: &str,
    any: Option<&Any>,
    type_url: &'static str,
    expected: &'static str,
) -> Result<M, ConvertError> {
    let any = any.ok_or_else(|| ConvertError::Empty {
        name: name.to_owned(),
    })?;
    if any.type_url != type_url {
        return Err(ConvertError::WrongType {
            name: name.to_owned(),
            expected: type_url,
            actual: any.type_url.clone(),
        });
    }
    M::decode(any.value.as_slice()).map_err(|e| ConvertError::Decode {
        name: name.to_owned(),
        expected,
        reason: e.to_string(),
    })
}

/// Names the resource in field errors.
struct Ctx<'a> {
    kind: &'static str,
    name: &'a str,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> ConvertError {
        ConvertError::Field {
            kind: self.kind,
            name: self.name.to_owned(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn ip(&self, field: impl Into<String>, bytes: &[u8]) -> Result<IpAddr, ConvertError> {
        ip_from_bytes(bytes).ok_or_else(|| {
            self.err(
                field,
                format!(
                    "{} bytes; an IP address is 4 (IPv4) or 16 (IPv6) bytes",
                    bytes.len()
                ),
            )
        })
    }

    fn port(&self, field: impl Into<String>, value: u32) -> Result<u16, ConvertError> {
        u16::try_from(value).map_err(|_| self.err(field, format!("{value} is not a port number")))
    }

    fn gateway(
        &self,
        field: &str,
        gateway: workload::GatewayAddress,
    ) -> Result<state::GatewayAddress, ConvertError> {
        use workload::gateway_address::Destination;
        let destination = match gateway.destination {
            Some(Destination::Hostname(h)) => {
                if h.namespace.is_empty() || h.hostname.is_empty() {
                    return Err(self.err(
                        format!("{field}.hostname"),
                        "namespace and hostname are required",
                    ));
                }
                state::GatewayDestination::Hostname(state::NamespacedHostname {
                    namespace: h.namespace,
                    hostname: h.hostname,
                })
            }
            Some(Destination::Address(a)) => {
                state::GatewayDestination::Address(state::NetworkAddress {
                    address: self.ip(format!("{field}.address.address"), &a.address)?,
                    network: a.network,
                })
            }
            None => return Err(self.err(format!("{field}.destination"), "missing")),
        };
        // Proto3 cannot tell an unset port from 0; 0 is never a usable port, so it means "the
        // HBONE port", as the local format's default does.
        let hbone_mtls_port = match gateway.hbone_mtls_port {
            0 => HBONE_PORT,
            port => self.port(format!("{field}.hbone_mtls_port"), port)?,
        };
        Ok(state::GatewayAddress {
            destination,
            hbone_mtls_port,
        })
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(bytes).ok()?,
        ))),
        _ => None,
    }
}

fn or_default(value: String, default: &str) -> String {
    if value.is_empty() {
        default.to_owned()
    } else {
        value
    }
}

/// Converts a `Workload` (resource `name`, normally its uid).
pub fn convert_workload(
    name: &str,
    w: workload::Workload,
) -> Result<state::Workload, ConvertError> {
    let ctx = Ctx {
        kind: "workload",
        name,
    };
    if w.uid.is_empty() {
        return Err(ctx.err("uid", "required"));
    }
    let workload_ips = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, bytes)| ctx.ip(format!("addresses[{i}]"), bytes))
        .collect::<Result<Vec<_>, _>>()?;
    let protocol = match workload::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(workload::TunnelProtocol::None) => state::Protocol::Tcp,
        Ok(workload::TunnelProtocol::Hbone) => state::Protocol::Hbone,
        Ok(workload::TunnelProtocol::LegacyIstioMtls) => {
            return Err(ctx.err(
                "tunnel_protocol",
                "LEGACY_ISTIO_MTLS is not supported (ztunnel speaks HBONE or plain TCP)",
            ))
        }
        Err(_) => {
            return Err(ctx.err(
                "tunnel_protocol",
                format!("unknown value {}", w.tunnel_protocol),
            ))
        }
    };
    let status = match workload::WorkloadStatus::try_from(w.status) {
        Ok(workload::WorkloadStatus::Healthy) => state::HealthStatus::Healthy,
        Ok(workload::WorkloadStatus::Unhealthy) => state::HealthStatus::Unhealthy,
        Err(_) => return Err(ctx.err("status", format!("unknown value {}", w.status))),
    };
    let waypoint = w.waypoint.map(|g| ctx.gateway("waypoint", g)).transpose()?;
    let mut services = std::collections::BTreeMap::new();
    for (key, list) in w.services {
        if !key.contains('/') {
            return Err(ctx.err(
                format!("services[{key:?}]"),
                "the key must be \"<namespace>/<hostname>\"",
            ));
        }
        let mut ports = state::PortMap::new();
        for (i, port) in list.ports.iter().enumerate() {
            let field = |f: &str| format!("services[{key:?}].ports[{i}].{f}");
            ports.insert(
                ctx.port(field("service_port"), port.service_port)?,
                ctx.port(field("target_port"), port.target_port)?,
            );
        }
        services.insert(key, ports);
    }
    let converted = state::Workload {
        uid: w.uid,
        name: w.name,
        namespace: w.namespace,
        service_account: or_default(w.service_account, "default"),
        trust_domain: or_default(w.trust_domain, DEFAULT_TRUST_DOMAIN),
        workload_ips,
        protocol,
        node: w.node,
        network: w.network,
        waypoint,
        services,
        authorization_policies: w.authorization_policies,
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        workload_name: w.workload_name,
        cluster_id: or_default(w.cluster_id, DEFAULT_CLUSTER_ID),
        status,
    };
    if let Err(e) = converted.identity() {
        return Err(ctx.err("trust_domain/namespace/service_account", e.to_string()));
    }
    // The snapshot's own checks, on this resource alone: whatever they refuse, they refuse here
    // with the resource's name, instead of failing the whole state later.
    Snapshot::build(vec![converted.clone()], vec![], vec![])
        .map_err(|e| ctx.err("(validation)", state_reason(e)))?;
    Ok(converted)
}

/// Converts a `Service` (resource `name`, normally `namespace/hostname`).
pub fn convert_service(name: &str, s: workload::Service) -> Result<state::Service, ConvertError> {
    let ctx = Ctx {
        kind: "service",
        name,
    };
    if s.namespace.is_empty() {
        return Err(ctx.err("namespace", "required"));
    }
    if s.hostname.is_empty() {
        return Err(ctx.err("hostname", "required"));
    }
    let mut vips = Vec::with_capacity(s.addresses.len());
    for (i, a) in s.addresses.into_iter().enumerate() {
        let address = ctx.ip(format!("addresses[{i}].address"), &a.address)?;
        let full = if address.is_ipv4() { 32 } else { 128 };
        match a.length {
            None => {}
            Some(length) if length == full => {}
            // A range (ServiceEntry CIDR) cannot be a VIP in the model; the service stays usable
            // through its other addresses and by hostname, so skip it rather than refuse all.
            Some(length) => {
                tracing::warn!(service = name, %address, length, "service address range ignored: only single VIPs are supported");
                continue;
            }
        }
        vips.push(state::NetworkAddress {
            network: a.network,
            address,
        });
    }
    let mut ports = state::PortMap::new();
    let mut app_protocols = std::collections::BTreeMap::new();
    for (i, port) in s.ports.iter().enumerate() {
        let service_port = ctx.port(format!("ports[{i}].service_port"), port.service_port)?;
        ports.insert(
            service_port,
            ctx.port(format!("ports[{i}].target_port"), port.target_port)?,
        );
        if let Some(protocol) = app_protocol(port.app_protocol) {
            app_protocols.insert(service_port, protocol);
        }
    }
    let waypoint = s.waypoint.map(|g| ctx.gateway("waypoint", g)).transpose()?;
    let converted = state::Service {
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        vips,
        ports,
        app_protocols,
        subject_alt_names: s.subject_alt_names,
        waypoint,
    };
    Snapshot::build(vec![], vec![converted.clone()], vec![])
        .map_err(|e| ctx.err("(validation)", state_reason(e)))?;
    Ok(converted)
}

/// Converts an `Authorization` (resource `name`, normally `namespace/name`).
pub fn convert_authorization(
    name: &str,
    p: security::Authorization,
) -> Result<Authorization, ConvertError> {
    let ctx = Ctx {
        kind: "authorization policy",
        name,
    };
    let scope = match security::Scope::try_from(p.scope) {
        Ok(security::Scope::Global) => rbac::Scope::Global,
        Ok(security::Scope::Namespace) => rbac::Scope::Namespace,
        Ok(security::Scope::WorkloadSelector) => rbac::Scope::WorkloadSelector,
        Err(_) => return Err(ctx.err("scope", format!("unknown value {}", p.scope))),
    };
    let action = match security::Action::try_from(p.action) {
        Ok(security::Action::Allow) => rbac::Action::Allow,
        Ok(security::Action::Deny) => rbac::Action::Deny,
        Err(_) => return Err(ctx.err("action", format!("unknown value {}", p.action))),
    };
    let mut rules = Vec::with_capacity(p.rules.len());
    for (r, rule) in p.rules.into_iter().enumerate() {
        let mut clauses = Vec::with_capacity(rule.clauses.len());
        for (c, clause) in rule.clauses.into_iter().enumerate() {
            let mut matches = Vec::with_capacity(clause.matches.len());
            for (m, one) in clause.matches.into_iter().enumerate() {
                let at = format!("rules[{r}].clauses[{c}].matches[{m}]");
                matches.push(convert_match(&ctx, &at, one)?);
            }
            clauses.push(rbac::Clause { matches });
        }
        rules.push(rbac::Rule { clauses });
    }
    let converted = Authorization {
        name: p.name,
        namespace: p.namespace,
        scope,
        action,
        rules,
        dry_run: p.dry_run,
    };
    converted
        .validate()
        .map_err(|e| ctx.err("name/namespace", e.to_string()))?;
    Ok(converted)
}

fn convert_match(ctx: &Ctx<'_>, at: &str, m: security::Match) -> Result<rbac::Match, ConvertError> {
    let strings = |field: &str, list: Vec<security::StringMatch>| {
        list.into_iter()
            .enumerate()
            .map(|(i, s)| {
                use security::string_match::MatchType;
                match s.match_type {
                    Some(MatchType::Exact(v)) => Ok(rbac::StringMatch::Exact(v)),
                    Some(MatchType::Prefix(v)) => Ok(rbac::StringMatch::Prefix(v)),
                    Some(MatchType::Suffix(v)) => Ok(rbac::StringMatch::Suffix(v)),
                    Some(MatchType::Presence(_)) => Ok(rbac::StringMatch::Presence),
                    None => Err(ctx.err(format!("{at}.{field}[{i}]"), "no match type set")),
                }
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let accounts = |list: Vec<security::ServiceAccountMatch>| {
        list.into_iter()
            .map(|a| rbac::ServiceAccountMatch {
                namespace: a.namespace,
                service_account: a.service_account,
            })
            .collect::<Vec<_>>()
    };
    let nets = |field: &str, list: Vec<security::Address>| {
        list.into_iter()
            .enumerate()
            .map(|(i, a)| {
                let field = format!("{at}.{field}[{i}]");
                let ip = ctx.ip(format!("{field}.address"), &a.address)?;
                u8::try_from(a.length)
                    .ok()
                    .and_then(|len| IpNet::new(ip, len).ok())
                    .ok_or_else(|| {
                        ctx.err(
                            format!("{field}.length"),
                            format!("{} is not a prefix length for {ip}", a.length),
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let ports = |field: &str, list: Vec<u32>| {
        list.into_iter()
            .enumerate()
            .map(|(i, p)| ctx.port(format!("{at}.{field}[{i}]"), p))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(rbac::Match {
        namespaces: strings("namespaces", m.namespaces)?,
        not_namespaces: strings("not_namespaces", m.not_namespaces)?,
        service_accounts: accounts(m.service_accounts),
        not_service_accounts: accounts(m.not_service_accounts),
        principals: strings("principals", m.principals)?,
        not_principals: strings("not_principals", m.not_principals)?,
        source_ips: nets("source_ips", m.source_ips)?,
        not_source_ips: nets("not_source_ips", m.not_source_ips)?,
        destination_ips: nets("destination_ips", m.destination_ips)?,
        not_destination_ips: nets("not_destination_ips", m.not_destination_ips)?,
        destination_ports: ports("destination_ports", m.destination_ports)?,
        not_destination_ports: ports("not_destination_ports", m.not_destination_ports)?,
    })
}

/// The reason part of a snapshot error (its subject is the resource already named).
/// The model's protocol for a wire `AppProtocol`; `UNKNOWN` (and values newer than this build)
/// leave the port undeclared, so a waypoint sniffs it.
fn app_protocol(value: i32) -> Option<state::AppProtocol> {
    match workload::AppProtocol::try_from(value).ok()? {
        workload::AppProtocol::Unknown => None,
        workload::AppProtocol::Http11 => Some(state::AppProtocol::Http11),
        workload::AppProtocol::Http2 => Some(state::AppProtocol::Http2),
        workload::AppProtocol::Grpc => Some(state::AppProtocol::Grpc),
        workload::AppProtocol::Tcp => Some(state::AppProtocol::Tcp),
        workload::AppProtocol::Tls => Some(state::AppProtocol::Tls),
    }
}

/// The wire value for a port's declared protocol (the inverse of [`app_protocol`]).
pub fn app_protocol_proto(protocol: Option<&state::AppProtocol>) -> i32 {
    let wire = match protocol {
        None => workload::AppProtocol::Unknown,
        Some(state::AppProtocol::Http11) => workload::AppProtocol::Http11,
        Some(state::AppProtocol::Http2) => workload::AppProtocol::Http2,
        Some(state::AppProtocol::Grpc) => workload::AppProtocol::Grpc,
        Some(state::AppProtocol::Tcp) => workload::AppProtocol::Tcp,
        Some(state::AppProtocol::Tls) => workload::AppProtocol::Tls,
    };
    wire as i32
}

fn state_reason(e: state::StateError) -> String {
    match e {
        state::StateError::BadWorkload { reason, .. }
        | state::StateError::BadService { reason, .. }
        | state::StateError::BadPolicy { reason, .. } => reason,
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::google::Empty;
    use crate::proto::to_any;
    use std::collections::BTreeMap;

    fn full_workload() -> workload::Workload {
        workload::Workload {
            uid: "cluster1//v1/Pod/demo/echo-1".into(),
            name: "echo-1".into(),
            namespace: "demo".into(),
            addresses: vec![
                vec![10, 0, 2, 2],
                "fd00::2".parse::<Ipv6Addr>().unwrap().octets().to_vec(),
            ],
            network: "net1".into(),
            tunnel_protocol: workload::TunnelProtocol::Hbone as i32,
            trust_domain: String::new(),
            service_account: String::new(),
            waypoint: Some(workload::GatewayAddress {
                destination: Some(workload::gateway_address::Destination::Hostname(
                    workload::NamespacedHostname {
                        namespace: "demo".into(),
                        hostname: "waypoint.demo.svc.cluster.local".into(),
                    },
                )),
                hbone_mtls_port: 0,
            }),
            node: "node-2".into(),
            canonical_name: "echo".into(),
            canonical_revision: "v1".into(),
            workload_name: "echo".into(),
            services: BTreeMap::from([(
                "demo/echo.demo.svc.cluster.local".into(),
                workload::PortList {
                    ports: vec![workload::Port {
                        service_port: 80,
                        target_port: 8080,
                        app_protocol: 0,
                    }],
                },
            )]),
            authorization_policies: vec!["demo/allow-sleep".into()],
            status: workload::WorkloadStatus::Unhealthy as i32,
            ..Default::default()
        }
    }

    #[test]
    fn a_workload_maps_every_model_field_with_istio_defaults() {
        let any = to_any(
            ADDRESS_TYPE_URL,
            &workload::Address {
                r#type: Some(workload::address::Type::Workload(full_workload())),
            },
        );
        let AddressResource::Workload(w) = address_from_any("echo-1", Some(&any)).unwrap() else {
            panic!("a workload");
        };
        assert_eq!(w.uid, "cluster1//v1/Pod/demo/echo-1");
        assert_eq!(
            w.workload_ips,
            vec![
                IpAddr::from([10, 0, 2, 2]),
                "fd00::2".parse::<IpAddr>().unwrap()
            ]
        );
        assert_eq!(w.protocol, state::Protocol::Hbone);
        assert_eq!(w.service_account, "default");
        assert_eq!(w.trust_domain, "cluster.local");
        assert_eq!(w.cluster_id, "Kubernetes");
        assert_eq!(w.network, "net1");
        assert_eq!(w.node, "node-2");
        assert_eq!(w.status, state::HealthStatus::Unhealthy);
        assert_eq!(
            w.target_port("demo/echo.demo.svc.cluster.local", 80),
            Some(8080)
        );
        assert_eq!(w.authorization_policies, ["demo/allow-sleep"]);
        let waypoint = w.waypoint.unwrap();
        assert_eq!(
            waypoint.hbone_mtls_port, 15008,
            "an unset port is the HBONE port"
        );
        assert!(
            matches!(waypoint.destination, state::GatewayDestination::Hostname(h) if h.hostname == "waypoint.demo.svc.cluster.local")
        );
    }

    /// Breaks a valid workload one way.
    type Breakage = fn(&mut workload::Workload);

    #[test]
    fn malformed_workloads_name_the_resource_and_field() {
        let cases: Vec<(Breakage, &str)> = vec![
            (|w| w.uid.clear(), "field uid: required"),
            (
                |w| w.addresses = vec![vec![1, 2, 3]],
                "field addresses[0]: 3 bytes",
            ),
            (
                |w| w.tunnel_protocol = 2,
                "field tunnel_protocol: LEGACY_ISTIO_MTLS",
            ),
            (
                |w| w.tunnel_protocol = 9,
                "field tunnel_protocol: unknown value 9",
            ),
            (|w| w.status = 5, "field status: unknown value 5"),
            (
                |w| w.namespace = "Bad_NS".into(),
                "field trust_domain/namespace/service_account",
            ),
            (
                |w| w.waypoint.as_mut().unwrap().destination = None,
                "field waypoint.destination: missing",
            ),
            (
                |w| w.waypoint.as_mut().unwrap().hbone_mtls_port = 70000,
                "field waypoint.hbone_mtls_port: 70000",
            ),
            (
                |w| {
                    w.services
                        .get_mut("demo/echo.demo.svc.cluster.local")
                        .unwrap()
                        .ports[0]
                        .target_port = 65536
                },
                "ports[0].target_port: 65536 is not a port number",
            ),
            (
                |w| w.services = BTreeMap::from([("nohost".into(), Default::default())]),
                "services[\"nohost\"]",
            ),
        ];
        for (break_it, expected) in cases {
            let mut w = full_workload();
            break_it(&mut w);
            let err = convert_workload("res-name", w).unwrap_err().to_string();
            assert!(err.starts_with("workload \"res-name\": "), "{err}");
            assert!(err.contains(expected), "{err} does not contain {expected}");
        }
    }

    #[test]
    fn services_and_wrong_types_and_bad_bytes() {
        let service = workload::Service {
            name: "echo".into(),
            namespace: "demo".into(),
            hostname: "echo.demo.svc.cluster.local".into(),
            addresses: vec![
                workload::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 96, 0, 10],
                    length: Some(32),
                },
                workload::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 97, 0, 0],
                    length: Some(16),
                },
            ],
            ports: vec![
                workload::Port {
                    service_port: 80,
                    target_port: 0,
                    app_protocol: workload::AppProtocol::Grpc as i32,
                },
                workload::Port {
                    service_port: 81,
                    target_port: 0,
                    app_protocol: 0,
                },
            ],
            subject_alt_names: vec!["spiffe://cluster.local/ns/demo/sa/echo".into()],
            ..Default::default()
        };
        let s = convert_service("demo/echo.demo.svc.cluster.local", service.clone()).unwrap();
        assert_eq!(s.vips.len(), 1, "the range is skipped");
        assert_eq!(s.vips[0].to_string(), "/10.96.0.10");
        assert_eq!(s.ports.get(&80), Some(&0));
        assert_eq!(
            s.app_protocols,
            std::collections::BTreeMap::from([(80, state::AppProtocol::Grpc)]),
            "UNKNOWN declares nothing"
        );
        assert_eq!(
            s.subject_alt_names,
            ["spiffe://cluster.local/ns/demo/sa/echo"]
        );
        let mut bad = service.clone();
        bad.subject_alt_names = vec!["not-spiffe".into()];
        let err = convert_service("svc", bad).unwrap_err().to_string();
        assert!(
            err.contains("service \"svc\"") && err.contains("subjectAltNames"),
            "{err}"
        );
        let mut bad = service;
        bad.hostname.clear();
        assert!(convert_service("svc", bad)
            .unwrap_err()
            .to_string()
            .contains("field hostname: required"));

        let policy = to_any(AUTHORIZATION_TYPE_URL, &security::Authorization::default());
        let err = address_from_any("x", Some(&policy)).unwrap_err();
        assert!(matches!(err, ConvertError::WrongType { .. }), "{err}");
        let err = address_from_any("x", None).unwrap_err();
        assert_eq!(err.to_string(), "resource \"x\" has no body");
        let empty = to_any(ADDRESS_TYPE_URL, &workload::Address { r#type: None });
        assert!(address_from_any("x", Some(&empty))
            .unwrap_err()
            .to_string()
            .contains("neither a workload nor a service"));
    }

    #[test]
    fn an_authorization_maps_every_match_field() {
        let s = |v: &str| security::StringMatch {
            match_type: Some(security::string_match::MatchType::Prefix(v.into())),
        };
        let net = |a: [u8; 4], length| security::Address {
            address: a.to_vec(),
            length,
        };
        let m = security::Match {
            namespaces: vec![s("de")],
            not_namespaces: vec![s("kube")],
            service_accounts: vec![security::ServiceAccountMatch {
                namespace: "demo".into(),
                service_account: "sleep".into(),
            }],
            not_service_accounts: vec![],
            principals: vec![security::StringMatch {
                match_type: Some(security::string_match::MatchType::Presence(Empty {})),
            }],
            not_principals: vec![s("cluster.local/ns/evil")],
            source_ips: vec![net([10, 0, 0, 0], 8)],
            not_source_ips: vec![net([10, 9, 0, 0], 16)],
            destination_ips: vec![net([10, 0, 2, 2], 32)],
            not_destination_ips: vec![],
            destination_ports: vec![8080],
            not_destination_ports: vec![9999],
            extensions: vec![],
        };
        let p = security::Authorization {
            name: "allow".into(),
            namespace: "demo".into(),
            scope: security::Scope::WorkloadSelector as i32,
            action: security::Action::Deny as i32,
            rules: vec![security::Rule {
                clauses: vec![security::Clause { matches: vec![m] }],
            }],
            dry_run: true,
            extensions: vec![],
        };
        let a = authorization_from_any("demo/allow", Some(&to_any(AUTHORIZATION_TYPE_URL, &p)))
            .unwrap();
        assert_eq!(a.scope, rbac::Scope::WorkloadSelector);
        assert_eq!(a.action, rbac::Action::Deny);
        assert!(a.dry_run);
        let m = &a.rules[0].clauses[0].matches[0];
        assert_eq!(m.namespaces, [rbac::StringMatch::Prefix("de".into())]);
        assert_eq!(m.principals, [rbac::StringMatch::Presence]);
        assert_eq!(m.service_accounts[0].service_account, "sleep");
        assert_eq!(m.source_ips[0].to_string(), "10.0.0.0/8");
        assert_eq!(m.not_source_ips[0].to_string(), "10.9.0.0/16");
        assert_eq!(m.destination_ips[0].to_string(), "10.0.2.2/32");
        assert_eq!(m.destination_ports, [8080]);
        assert_eq!(m.not_destination_ports, [9999]);

        let mut bad = p.clone();
        bad.rules[0].clauses[0].matches[0].source_ips[0].length = 33;
        let err = convert_authorization("demo/allow", bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rules[0].clauses[0].matches[0].source_ips[0].length: 33"),
            "{err}"
        );
        let mut bad = p.clone();
        bad.rules[0].clauses[0].matches[0].principals[0].match_type = None;
        let err = convert_authorization("demo/allow", bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("principals[0]: no match type set"), "{err}");
        let mut bad = p;
        bad.scope = security::Scope::Namespace as i32;
        bad.namespace.clear();
        let err = convert_authorization("/allow", bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("scope Namespace but no namespace"), "{err}");
    }

    #[test]
    fn istio_tag_numbers_are_on_the_wire() {
        use prost::Message;
        // Workload.uid is field 20 (varint key 0xa2 0x01), services 22, Clause.matches 2.
        let w = workload::Workload {
            uid: "u".into(),
            ..Default::default()
        };
        assert_eq!(w.encode_to_vec(), [0xa2, 0x01, 0x01, b'u']);
        let c = security::Clause {
            matches: vec![security::Match::default()],
        };
        assert_eq!(c.encode_to_vec(), [0x12, 0x00]);
        let r = crate::proto::envoy::DeltaDiscoveryRequest {
            response_nonce: "n".into(),
            ..Default::default()
        };
        assert_eq!(r.encode_to_vec(), [0x32, 0x01, b'n']);
    }
}
