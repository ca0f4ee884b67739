//! HTTPRoute rules (`spec.rules[]`), typed and validated with the Gateway API's own rules (the
//! CRD schema and its CEL validations, `apis/v1/httproute_types.go`) and istiod's conversion
//! limits (`pilot/pkg/config/kube/gateway/conversion.go`): a route the waypoint cannot apply as
//! written is refused here with the field that is wrong, instead of being half applied.
//!
//! Supported: matches on path (Exact, PathPrefix, RegularExpression), headers and query
//! parameters (Exact, RegularExpression) and method; filters RequestHeaderModifier,
//! ResponseHeaderModifier, RequestRedirect, URLRewrite and RequestMirror; weighted `backendRefs`
//! to Services in the route's namespace; `timeouts` and `retry` (GEP-1731). Refused with a reason:
//! other filter types (CORS, ExtensionRef, ExternalAuth), per-backend filters, cross-namespace
//! backends (no ReferenceGrant in the local mesh) and `sessionPersistence`.

use std::collections::BTreeSet;
use std::time::Duration;

use super::super::decode::{Fields, Node, Result};

/// One `rules[]` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpRouteRule {
    pub name: Option<String>,
    /// ORed; empty means Gateway API's default (PathPrefix `/`).
    pub matches: Vec<HttpRouteMatch>,
    /// In the order written.
    pub filters: Vec<HttpRouteFilter>,
    pub backend_refs: Vec<HttpBackendRef>,
    pub timeouts: HttpRouteTimeouts,
    pub retry: Option<HttpRouteRetry>,
}

/// One `matches[]` entry: every condition set must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpRouteMatch {
    /// `None`: Gateway API's default, PathPrefix `/`.
    pub path: Option<PathMatch>,
    pub headers: Vec<ValueMatch>,
    pub query_params: Vec<ValueMatch>,
    pub method: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathMatchType {
    Exact,
    PathPrefix,
    RegularExpression,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathMatch {
    pub kind: PathMatchType,
    pub value: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueMatchType {
    Exact,
    RegularExpression,
}

/// A header or query parameter match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueMatch {
    pub kind: ValueMatchType,
    pub name: String,
    pub value: String,
}

/// A filter, with its configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpRouteFilter {
    RequestHeaderModifier(HeaderModifier),
    ResponseHeaderModifier(HeaderModifier),
    RequestRedirect(RequestRedirect),
    UrlRewrite(UrlRewrite),
    RequestMirror(RequestMirror),
}

/// `set`, `add` and `remove`, applied in that order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderModifier {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathModifier {
    ReplaceFullPath(String),
    ReplacePrefixMatch(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRedirect {
    /// `http` or `https`.
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    /// 301, 302 (the default), 303, 307 or 308.
    pub status_code: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

/// A share of requests: `percent` is `n/100`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fraction {
    pub numerator: u32,
    pub denominator: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestMirror {
    pub backend_ref: BackendRef,
    /// `None`: every request.
    pub fraction: Option<Fraction>,
}

/// A Service in the route's namespace (`group: ""`, `kind: Service`, the only backend kind the
/// waypoint routes to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendRef {
    pub name: String,
    /// The Service port; required for a Service backend.
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpBackendRef {
    pub backend: BackendRef,
    /// Proportional share, 0-1,000,000 (default 1); 0 sends nothing.
    pub weight: u32,
}

/// `timeouts`; `Some(ZERO)` ("0s") disables a timeout explicitly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpRouteTimeouts {
    /// The whole request, until the response headers (all attempts).
    pub request: Option<Duration>,
    /// One attempt at a backend.
    pub backend_request: Option<Duration>,
}

/// `retry` (GEP-1731, experimental channel).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpRouteRetry {
    /// Response codes (400-599) that are retried.
    pub codes: Vec<u16>,
    /// Retries after the first attempt; `None` is Istio's default, 2.
    pub attempts: Option<u32>,
    /// Base interval between attempts; `None` is Envoy's default, 25 ms.
    pub backoff: Option<Duration>,
}

const MAX_MATCHES: usize = 64;
const MAX_FILTERS: usize = 16;
const MAX_BACKENDS: usize = 16;
const MAX_HEADERS: usize = 16;
const MAX_WEIGHT: i64 = 1_000_000;

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// One `rules[]` entry.
pub(in crate::manifest) fn rule(node: &Node<'_>) -> Result<HttpRouteRule> {
    let f = node.fields()?;
    let name = f.str("name")?;
    let matches = bounded(&f, "matches", MAX_MATCHES, route_match)?;
    let filters_node = f.get("filters");
    let filters = bounded(&f, "filters", MAX_FILTERS, filter)?;
    let backend_refs = bounded(&f, "backendRefs", MAX_BACKENDS, http_backend_ref)?;
    let timeouts = match f.get("timeouts") {
        None => HttpRouteTimeouts::default(),
        Some(n) => timeouts(&n)?,
    };
    let retry = f.get("retry").map(|n| retry(&n)).transpose()?;
    if f.get("sessionPersistence").is_some() {
        return Err(f.error_at(
            "sessionPersistence",
            "session persistence is not supported by the waypoint",
        ));
    }
    f.finish()?;
    if let Some(filters_node) = filters_node {
        check_filters(&filters_node, &filters, &matches)?;
    }
    Ok(HttpRouteRule {
        name,
        matches,
        filters,
        backend_refs,
        timeouts,
        retry,
    })
}

/// One GRPCRoute `rules[]` entry as an HTTPRoute rule, as istiod translates it: a method match
/// becomes a path match (both names: Exact `/<service>/<method>`; the service only: PathPrefix
/// `/<service>`; the method only, or `RegularExpression`: a path regex), headers stay header
/// matches; its filters (RequestHeaderModifier, ResponseHeaderModifier, RequestMirror) and
/// weighted backends are HTTPRoute's.
pub(in crate::manifest) fn grpc_rule(node: &Node<'_>) -> Result<HttpRouteRule> {
    let f = node.fields()?;
    let name = f.str("name")?;
    let matches = bounded(&f, "matches", MAX_MATCHES, grpc_match)?;
    let filters = bounded(&f, "filters", MAX_FILTERS, |n| {
        let filter = filter(n)?;
        match filter {
            HttpRouteFilter::RequestHeaderModifier(_)
            | HttpRouteFilter::ResponseHeaderModifier(_)
            | HttpRouteFilter::RequestMirror(_) => Ok(filter),
            _ => Err(n.error(
                "a GRPCRoute rule takes RequestHeaderModifier, ResponseHeaderModifier and \
                 RequestMirror filters only",
            )),
        }
    })?;
    let backend_refs = bounded(&f, "backendRefs", MAX_BACKENDS, http_backend_ref)?;
    if f.get("sessionPersistence").is_some() {
        return Err(f.error_at(
            "sessionPersistence",
            "session persistence is not supported by the waypoint",
        ));
    }
    f.finish()?;
    Ok(HttpRouteRule {
        name,
        matches,
        filters,
        backend_refs,
        ..HttpRouteRule::default()
    })
}

fn grpc_match(node: &Node<'_>) -> Result<HttpRouteMatch> {
    let f = node.fields()?;
    let path = f.get("method").map(|n| grpc_method(&n)).transpose()?;
    let headers = bounded(&f, "headers", MAX_HEADERS, |n| value_match(n, true))?;
    f.finish()?;
    Ok(HttpRouteMatch {
        path,
        headers,
        ..HttpRouteMatch::default()
    })
}

/// A GRPCMethodMatch as the path it stands for.
fn grpc_method(node: &Node<'_>) -> Result<PathMatch> {
    let f = node.fields()?;
    let exact = match f.str("type")?.as_deref() {
        None | Some("Exact") => true,
        Some("RegularExpression") => false,
        Some(other) => {
            return Err(f.error_at(
                "type",
                format!("unknown method match type {other:?}; expected Exact or RegularExpression"),
            ))
        }
    };
    let service = f.str("service")?;
    let method = f.str("method")?;
    f.finish()?;
    if exact {
        // The CRD's rules: `service` a dotted name, `method` a plain name.
        let check = |value: &Option<String>, field: &str, dots: bool| -> Result<()> {
            match value {
                Some(v)
                    if v.is_empty()
                        || !v.bytes().all(|b| {
                            b.is_ascii_alphanumeric() || b == b'_' || (dots && b == b'.')
                        }) =>
                {
                    Err(node.error(format!("{field} {v:?} is not a valid gRPC name")))
                }
                _ => Ok(()),
            }
        };
        check(&service, "service", true)?;
        check(&method, "method", false)?;
    }
    let (kind, value) = match (exact, service, method) {
        (_, None, None) => {
            return Err(node.error("a method match needs a service, a method or both"));
        }
        (true, Some(s), Some(m)) => (PathMatchType::Exact, format!("/{s}/{m}")),
        (true, Some(s), None) => (PathMatchType::PathPrefix, format!("/{s}")),
        (true, None, Some(m)) => (PathMatchType::RegularExpression, format!("/[^/]+/{m}")),
        (false, s, m) => (
            PathMatchType::RegularExpression,
            format!(
                "/{}/{}",
                s.as_deref().unwrap_or("[^/]+"),
                m.as_deref().unwrap_or("[^/]+")
            ),
        ),
    };
    Ok(PathMatch { kind, value })
}

/// The list under `key`, at most `max` long.
fn bounded<'a, T>(
    f: &Fields<'a>,
    key: &str,
    max: usize,
    item: impl Fn(&Node<'a>) -> Result<T>,
) -> Result<Vec<T>> {
    let list = f.list_of(key, item)?;
    if list.len() > max {
        return Err(f.error_at(key, format!("at most {max} entries, found {}", list.len())));
    }
    Ok(list)
}

fn route_match(node: &Node<'_>) -> Result<HttpRouteMatch> {
    let f = node.fields()?;
    let path = f.get("path").map(|n| path_match(&n)).transpose()?;
    let headers = bounded(&f, "headers", MAX_HEADERS, |n| value_match(n, true))?;
    let query_params = bounded(&f, "queryParams", MAX_HEADERS, |n| value_match(n, false))?;
    let method = match f.get("method") {
        None => None,
        Some(n) => {
            let m = n.str()?;
            if !METHODS.contains(&m.as_str()) {
                return Err(n.error(format!(
                    "unsupported method {m:?}; expected one of {}",
                    METHODS.join(", ")
                )));
            }
            Some(m)
        }
    };
    f.finish()?;
    Ok(HttpRouteMatch {
        path,
        headers,
        query_params,
        method,
    })
}

fn path_match(node: &Node<'_>) -> Result<PathMatch> {
    let f = node.fields()?;
    let kind = match f.str("type")?.as_deref() {
        None | Some("PathPrefix") => PathMatchType::PathPrefix,
        Some("Exact") => PathMatchType::Exact,
        Some("RegularExpression") => PathMatchType::RegularExpression,
        Some(other) => {
            return Err(f.error_at(
                "type",
                format!(
                    "unknown value {other:?}; expected one of Exact, PathPrefix, RegularExpression"
                ),
            ))
        }
    };
    let value = f.str("value")?.unwrap_or_else(|| "/".to_owned());
    if kind != PathMatchType::RegularExpression {
        // The CRD's CEL rules.
        if !value.starts_with('/') {
            return Err(f.error_at("value", "value must be an absolute path and start with '/'"));
        }
        for bad in ["//", "/./", "/../", "%2f", "%2F", "#"] {
            if value.contains(bad) {
                return Err(f.error_at("value", format!("must not contain {bad:?}")));
            }
        }
        if value.ends_with("/..") || value.ends_with("/.") {
            return Err(f.error_at("value", "must not end with '/..' or '/.'"));
        }
    }
    f.finish()?;
    Ok(PathMatch { kind, value })
}

fn value_match(node: &Node<'_>, header: bool) -> Result<ValueMatch> {
    let f = node.fields()?;
    let kind = match f.str("type")?.as_deref() {
        None | Some("Exact") => ValueMatchType::Exact,
        Some("RegularExpression") => ValueMatchType::RegularExpression,
        Some(other) => {
            return Err(f.error_at(
                "type",
                format!("unknown value {other:?}; expected Exact or RegularExpression"),
            ))
        }
    };
    let name = f.require("name")?.non_empty_str()?;
    if header && !is_token(&name) {
        return Err(f.error_at("name", format!("{name:?} is not a valid header name")));
    }
    let value = f.require("value")?.str()?;
    f.finish()?;
    Ok(ValueMatch { kind, name, value })
}

/// An HTTP token (RFC 9110 §5.6.2): what a header name may be.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn filter(node: &Node<'_>) -> Result<HttpRouteFilter> {
    let f = node.fields()?;
    let kind_node = f.require("type")?;
    let kind = kind_node.str()?;
    let config = |key: &str| f.require(key);
    let filter = match kind.as_str() {
        "RequestHeaderModifier" => HttpRouteFilter::RequestHeaderModifier(header_modifier(
            &config("requestHeaderModifier")?,
        )?),
        "ResponseHeaderModifier" => HttpRouteFilter::ResponseHeaderModifier(header_modifier(
            &config("responseHeaderModifier")?,
        )?),
        "RequestRedirect" => {
            HttpRouteFilter::RequestRedirect(redirect(&config("requestRedirect")?)?)
        }
        "URLRewrite" => HttpRouteFilter::UrlRewrite(url_rewrite(&config("urlRewrite")?)?),
        "RequestMirror" => HttpRouteFilter::RequestMirror(mirror(&config("requestMirror")?)?),
        "CORS" | "ExtensionRef" | "ExternalAuth" => {
            return Err(kind_node.error(format!(
                "unsupported filter type {kind:?}: the waypoint supports RequestHeaderModifier, \
                 ResponseHeaderModifier, RequestRedirect, URLRewrite and RequestMirror"
            )))
        }
        other => {
            return Err(kind_node.error(format!(
                "unknown filter type {other:?}; expected RequestHeaderModifier, \
                 ResponseHeaderModifier, RequestRedirect, URLRewrite or RequestMirror"
            )))
        }
    };
    // The CRD: the configuration field must match the type, so any other one is an error.
    f.finish()?;
    Ok(filter)
}

/// Gateway API's rules across a rule's filters.
fn check_filters(
    node: &Node<'_>,
    filters: &[HttpRouteFilter],
    matches: &[HttpRouteMatch],
) -> Result<()> {
    let mut seen = BTreeSet::new();
    let mut redirect = false;
    let mut rewrite = false;
    for (i, filter) in filters.iter().enumerate() {
        let (name, prefix_path) = match filter {
            HttpRouteFilter::RequestHeaderModifier(_) => ("RequestHeaderModifier", false),
            HttpRouteFilter::ResponseHeaderModifier(_) => ("ResponseHeaderModifier", false),
            HttpRouteFilter::RequestRedirect(r) => {
                redirect = true;
                (
                    "RequestRedirect",
                    matches!(r.path, Some(PathModifier::ReplacePrefixMatch(_))),
                )
            }
            HttpRouteFilter::UrlRewrite(r) => {
                rewrite = true;
                (
                    "URLRewrite",
                    matches!(r.path, Some(PathModifier::ReplacePrefixMatch(_))),
                )
            }
            // Several mirrors are allowed.
            HttpRouteFilter::RequestMirror(_) => ("RequestMirror", false),
        };
        let path = format!("{}[{i}]", node.path);
        if name != "RequestMirror" && !seen.insert(name) {
            return Err(super::super::decode::FieldError {
                field: path,
                message: format!("{name} may appear at most once per rule"),
            });
        }
        if prefix_path {
            let prefixes = matches
                .iter()
                .filter(|m| {
                    m.path
                        .as_ref()
                        .is_none_or(|p| p.kind == PathMatchType::PathPrefix)
                })
                .count();
            if matches.len() > 1 || prefixes != matches.len() {
                return Err(super::super::decode::FieldError {
                    field: path,
                    message: "ReplacePrefixMatch requires exactly one match, of type PathPrefix"
                        .into(),
                });
            }
        }
    }
    if redirect && rewrite {
        return Err(node.error("RequestRedirect and URLRewrite cannot be used in the same rule"));
    }
    Ok(())
}

fn header_modifier(node: &Node<'_>) -> Result<HeaderModifier> {
    let f = node.fields()?;
    let pairs = |key: &str| {
        bounded(&f, key, MAX_HEADERS, |n| {
            let hf = n.fields()?;
            let name = hf.require("name")?.non_empty_str()?;
            if !is_token(&name) {
                return Err(hf.error_at("name", format!("{name:?} is not a valid header name")));
            }
            let value = hf.require("value")?.str()?;
            hf.finish()?;
            Ok((name, value))
        })
    };
    let set = pairs("set")?;
    let add = pairs("add")?;
    let remove = f.string_list("remove")?;
    for (i, name) in remove.iter().enumerate() {
        if !is_token(name) {
            return Err(f.error_at(
                &format!("remove[{i}]"),
                format!("{name:?} is not a valid header name"),
            ));
        }
    }
    f.finish()?;
    Ok(HeaderModifier { set, add, remove })
}

fn path_modifier(node: &Node<'_>) -> Result<PathModifier> {
    let f = node.fields()?;
    let kind = f.require("type")?.str()?;
    let modifier = match kind.as_str() {
        "ReplaceFullPath" => {
            let v = f.require("replaceFullPath")?.str()?;
            PathModifier::ReplaceFullPath(v)
        }
        "ReplacePrefixMatch" => {
            let v = f.require("replacePrefixMatch")?.str()?;
            PathModifier::ReplacePrefixMatch(v)
        }
        other => {
            return Err(f.error_at(
                "type",
                format!("unknown value {other:?}; expected ReplaceFullPath or ReplacePrefixMatch"),
            ))
        }
    };
    if f.get("replaceFullPath").is_some() && kind != "ReplaceFullPath" {
        return Err(f.error_at(
            "replaceFullPath",
            "replaceFullPath must be specified when type is set to 'ReplaceFullPath'",
        ));
    }
    if f.get("replacePrefixMatch").is_some() && kind != "ReplacePrefixMatch" {
        return Err(f.error_at(
            "replacePrefixMatch",
            "replacePrefixMatch must be specified when type is set to 'ReplacePrefixMatch'",
        ));
    }
    let value = match &modifier {
        PathModifier::ReplaceFullPath(v) | PathModifier::ReplacePrefixMatch(v) => v,
    };
    if !value.starts_with('/') {
        return Err(node.error(format!("{value:?}: the path must start with '/'")));
    }
    f.finish()?;
    Ok(modifier)
}

fn hostname(f: &Fields<'_>) -> Result<Option<String>> {
    let Some(h) = f.str("hostname")? else {
        return Ok(None);
    };
    super::super::names::dns1123_subdomain(&h).map_err(|e| f.error_at("hostname", e))?;
    Ok(Some(h))
}

fn redirect(node: &Node<'_>) -> Result<RequestRedirect> {
    let f = node.fields()?;
    let scheme = f.str("scheme")?;
    if let Some(s) = &scheme {
        if s != "http" && s != "https" {
            return Err(f.error_at(
                "scheme",
                format!("unknown value {s:?}; expected http or https"),
            ));
        }
    }
    let hostname = hostname(&f)?;
    let path = f.get("path").map(|n| path_modifier(&n)).transpose()?;
    let port = f.get("port").map(|n| n.port()).transpose()?;
    let status_code = match f.get("statusCode") {
        None => 302,
        Some(n) => {
            let code = n.i64()?;
            if ![301, 302, 303, 307, 308].contains(&code) {
                return Err(n.error(format!(
                    "unsupported value {code}; expected 301, 302, 303, 307 or 308"
                )));
            }
            code as u16
        }
    };
    f.finish()?;
    Ok(RequestRedirect {
        scheme,
        hostname,
        path,
        port,
        status_code,
    })
}

fn url_rewrite(node: &Node<'_>) -> Result<UrlRewrite> {
    let f = node.fields()?;
    let hostname = hostname(&f)?;
    let path = f.get("path").map(|n| path_modifier(&n)).transpose()?;
    f.finish()?;
    Ok(UrlRewrite { hostname, path })
}

fn mirror(node: &Node<'_>) -> Result<RequestMirror> {
    let f = node.fields()?;
    let backend_ref = backend_ref(&f.require("backendRef")?, &[])?;
    let percent = f.get("percent");
    let fraction = f.get("fraction");
    let fraction = match (percent, fraction) {
        (Some(_), Some(_)) => {
            return Err(f.error_at("fraction", "only one of percent or fraction may be set"))
        }
        (Some(p), None) => {
            let n = p.i64()?;
            if !(0..=100).contains(&n) {
                return Err(p.error(format!("{n} is out of range (0-100)")));
            }
            Some(Fraction {
                numerator: n as u32,
                denominator: 100,
            })
        }
        (None, Some(fr)) => {
            let ff = fr.fields()?;
            let num_node = ff.require("numerator")?;
            let numerator = num_node.i64()?;
            let denominator = ff.get("denominator").map(|n| n.i64()).transpose()?;
            let denominator = denominator.unwrap_or(100);
            ff.finish()?;
            if denominator < 1 || numerator < 0 || numerator > denominator {
                return Err(fr.error(
                    "numerator must be 0 or more and at most denominator, which must be 1 or more",
                ));
            }
            Some(Fraction {
                numerator: numerator as u32,
                denominator: denominator.min(u32::MAX as i64) as u32,
            })
        }
        (None, None) => None,
    };
    f.finish()?;
    Ok(RequestMirror {
        backend_ref,
        fraction,
    })
}

fn http_backend_ref(node: &Node<'_>) -> Result<HttpBackendRef> {
    let f = node.fields()?;
    let weight = match f.get("weight") {
        None => 1,
        Some(n) => {
            let w = n.i64()?;
            if !(0..=MAX_WEIGHT).contains(&w) {
                return Err(n.error(format!("{w} is out of range (0-{MAX_WEIGHT})")));
            }
            w as u32
        }
    };
    if let Some(filters) = f.get("filters") {
        if !filters.list()?.is_empty() {
            return Err(filters.error(
                "filters on a backendRef are not supported by the waypoint; put them on the rule",
            ));
        }
    }
    let backend = backend_ref(node, &["weight", "filters"])?;
    Ok(HttpBackendRef { backend, weight })
}

/// A BackendObjectReference: a Service in the route's namespace, with its port.
fn backend_ref(node: &Node<'_>, also: &[&str]) -> Result<BackendRef> {
    let f = node.fields()?;
    f.ignore(also);
    let group = f.str("group")?.unwrap_or_default();
    let kind = f.str("kind")?.unwrap_or_else(|| "Service".to_owned());
    if !(group.is_empty() || group == "core") || kind != "Service" {
        let shown = if group.is_empty() {
            kind
        } else {
            format!("{group}/{kind}")
        };
        return Err(node.error(format!(
            "unsupported backend {shown}: the waypoint routes to Services (group \"\", kind Service)"
        )));
    }
    let name = f.require("name")?.non_empty_str()?;
    if f.str("namespace")?.is_some_and(|ns| !ns.is_empty()) {
        // A cross-namespace reference needs a ReferenceGrant, which the local mesh has no way to
        // express; the same namespace is the only one a route may name without one.
        return Err(f.error_at(
            "namespace",
            "backends in another namespace need a ReferenceGrant, which is not supported; leave \
             it out",
        ));
    }
    let port = f
        .require("port")
        .map_err(|mut e| {
            e.message = "required: a Service backend needs its port".into();
            e
        })?
        .port()?;
    f.finish()?;
    Ok(BackendRef { name, port })
}

fn timeouts(node: &Node<'_>) -> Result<HttpRouteTimeouts> {
    let f = node.fields()?;
    let read = |key: &str| -> Result<Option<Duration>> {
        f.get(key)
            .map(|n| {
                let s = n.str()?;
                parse_duration(&s).ok_or_else(|| {
                    n.error(format!(
                        "invalid duration {s:?}: expected Gateway API's format, such as 10s, \
                         500ms or 1h30m (units h, m, s, ms)"
                    ))
                })
            })
            .transpose()
    };
    let request = read("request")?;
    let backend_request = read("backendRequest")?;
    f.finish()?;
    if let (Some(r), Some(b)) = (request, backend_request) {
        if !r.is_zero() && (b.is_zero() || b > r) {
            return Err(node.error("backendRequest timeout cannot be longer than request timeout"));
        }
    }
    Ok(HttpRouteTimeouts {
        request,
        backend_request,
    })
}

fn retry(node: &Node<'_>) -> Result<HttpRouteRetry> {
    let f = node.fields()?;
    let codes = f.list_of("codes", |n| {
        let c = n.i64()?;
        if !(400..=599).contains(&c) {
            return Err(n.error(format!("{c} is out of range (400-599)")));
        }
        Ok(c as u16)
    })?;
    let attempts = match f.get("attempts") {
        None => None,
        Some(n) => {
            let a = n.i64()?;
            if !(0..=i64::from(u16::MAX)).contains(&a) {
                return Err(n.error(format!("{a} is out of range (0 or more)")));
            }
            Some(a as u32)
        }
    };
    let backoff = match f.get("backoff") {
        None => None,
        Some(n) => {
            let s = n.str()?;
            Some(parse_duration(&s).ok_or_else(|| {
                n.error(format!(
                    "invalid duration {s:?}: expected Gateway API's format, such as 25ms or 1s"
                ))
            })?)
        }
    };
    f.finish()?;
    Ok(HttpRouteRetry {
        codes,
        attempts,
        backoff,
    })
}

/// A Gateway API duration (GEP-2257): one to four `<1-5 digits><h|m|s|ms>` parts, such as
/// `1h30m`, `500ms` or `0s`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut parts = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return None;
        };
        rest = &rest[len..];
        total += unit * n as u32;
        parts += 1;
    }
    (1..=4).contains(&parts).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_api_durations() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_duration("1s500ms"), Some(Duration::from_millis(1500)));
        for bad in [
            "",
            "10",
            "1.5s",
            "s",
            "123456s",
            "1h1h1h1h1h",
            "10us",
            "-1s",
            "1 s",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
