//! Gateway API resources (`gateway.networking.k8s.io/v1`, also `v1beta1`): Gateway (waypoints are
//! Gateways of class `istio-waypoint`), HTTPRoute and GRPCRoute. Everything the waypoint acts on is typed and
//! validated here the way the Gateway API CRDs (their CEL rules) and istiod validate it: route
//! rules with their matches, filters, weighted backends, timeouts and retry policy
//! ([`route`](self::route)).

mod route;

use std::collections::BTreeSet;

use super::decode::{FieldError, Node, Result};

use super::names;
use super::Metadata;
pub use route::{
    parse_duration, BackendRef, Fraction, HeaderModifier, HttpBackendRef, HttpRouteFilter,
    HttpRouteMatch, HttpRouteRetry, HttpRouteRule, HttpRouteTimeouts, PathMatch, PathMatchType,
    PathModifier, RequestMirror, RequestRedirect, UrlRewrite, ValueMatch, ValueMatchType,
};

/// The Gateway API group.
pub const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";

/// A `Gateway`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gateway {
    pub metadata: Metadata,
    pub spec: GatewaySpec,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewaySpec {
    /// `istio-waypoint` for a waypoint.
    pub gateway_class_name: String,
    pub listeners: Vec<Listener>,
    /// `addresses[]`, kept as written.
    pub addresses: Vec<serde_json::Value>,
    /// `infrastructure` (labels/annotations for generated resources), kept as written.
    pub infrastructure: Option<serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    pub hostname: Option<String>,
    pub port: u16,
    /// `HTTP`, `HTTPS`, `TLS`, `TCP`, `UDP`, `HBONE` (waypoints), or a domain-prefixed protocol.
    pub protocol: String,
    pub tls: Option<serde_json::Value>,
    pub allowed_routes: Option<serde_json::Value>,
}

/// An `HTTPRoute`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRoute {
    pub metadata: Metadata,
    pub spec: HttpRouteSpec,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    pub hostnames: Vec<String>,
    /// `rules[]`; a route without rules gets Gateway API's default one (all traffic to the
    /// parent), which the waypoint applies.
    pub rules: Vec<HttpRouteRule>,
}

/// A route's `parentRefs[]` entry, with Gateway API defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentRef {
    /// Defaults to `gateway.networking.k8s.io`; `""` for a Service (mesh routing).
    pub group: String,
    /// Defaults to `Gateway`.
    pub kind: String,
    /// `None`: the route's namespace.
    pub namespace: Option<String>,
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<u16>,
}

impl ParentRef {
    /// Whether this parent is a Service (GAMMA mesh routing through a waypoint).
    pub fn is_service(&self) -> bool {
        self.group.is_empty() && self.kind == "Service"
    }
}

pub(super) fn gateway_spec(node: &Node<'_>) -> Result<GatewaySpec> {
    let f = node.fields()?;
    let gateway_class_name = f.require("gatewayClassName")?.non_empty_str()?;
    names::dns1123_subdomain(&gateway_class_name).map_err(|e| f.error_at("gatewayClassName", e))?;
    let listeners_node = f.require("listeners")?;
    let listeners: Vec<Listener> = listeners_node
        .list()?
        .iter()
        .map(listener)
        .collect::<Result<_>>()?;
    if listeners.is_empty() {
        return Err(listeners_node.error("a Gateway needs at least one listener"));
    }
    let mut seen = BTreeSet::new();
    for (i, l) in listeners.iter().enumerate() {
        if !seen.insert(&l.name) {
            return Err(FieldError {
                field: format!("{}[{i}].name", listeners_node.path),
                message: format!("duplicate listener name {:?}", l.name),
            });
        }
    }
    let addresses = f.list_of("addresses", Node::json)?;
    let infrastructure = f.get("infrastructure").map(|n| n.json()).transpose()?;
    f.ignore(&["backendTLS"]);
    f.finish()?;
    Ok(GatewaySpec {
        gateway_class_name,
        listeners,
        addresses,
        infrastructure,
    })
}

fn listener(node: &Node<'_>) -> Result<Listener> {
    let f = node.fields()?;
    let name = f.require("name")?.str()?;
    names::dns1123_subdomain(&name).map_err(|e| f.error_at("name", e))?;
    let hostname = f.str("hostname")?;
    let port = f.require("port")?.port()?;
    let protocol = f.require("protocol")?.non_empty_str()?;
    let tls = f.get("tls").map(|n| n.json()).transpose()?;
    let allowed_routes = f.get("allowedRoutes").map(|n| n.json()).transpose()?;
    f.finish()?;
    Ok(Listener {
        name,
        hostname,
        port,
        protocol,
        tls,
        allowed_routes,
    })
}

pub(super) fn http_route_spec(node: &Node<'_>) -> Result<HttpRouteSpec> {
    route_spec(node, route::rule)
}

/// A GRPCRoute's spec, its rules translated to HTTPRoute rules.
pub(super) fn grpc_route_spec(node: &Node<'_>) -> Result<HttpRouteSpec> {
    route_spec(node, route::grpc_rule)
}

fn route_spec(
    node: &Node<'_>,
    rule: impl Fn(&Node<'_>) -> Result<route::HttpRouteRule>,
) -> Result<HttpRouteSpec> {
    let f = node.fields()?;
    let parent_refs = f.list_of("parentRefs", parent_ref)?;
    let hostnames = f.string_list("hostnames")?;
    let rules_node = f.get("rules");
    let rules = f.list_of("rules", rule)?;
    if let Some(n) = rules_node {
        if rules.len() > 16 {
            return Err(n.error(format!("at most 16 rules, found {}", rules.len())));
        }
    }
    f.finish()?;
    Ok(HttpRouteSpec {
        parent_refs,
        hostnames,
        rules,
    })
}

fn parent_ref(node: &Node<'_>) -> Result<ParentRef> {
    let f = node.fields()?;
    let group = f
        .str("group")?
        .unwrap_or_else(|| GATEWAY_API_GROUP.to_owned());
    let kind = f.str("kind")?.unwrap_or_else(|| "Gateway".to_owned());
    let namespace = f.str("namespace")?;
    let name = f.require("name")?.non_empty_str()?;
    let section_name = f.str("sectionName")?;
    let port = f.get("port").map(|n| n.port()).transpose()?;
    f.finish()?;
    Ok(ParentRef {
        group,
        kind,
        namespace,
        name,
        section_name,
        port,
    })
}
