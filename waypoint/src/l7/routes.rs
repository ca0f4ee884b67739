//! HTTPRoutes compiled for the data path: for each Service a route is attached to (GAMMA:
//! `parentRefs` of `group: ""`, `kind: Service`), every (rule, match) pair of every route, sorted
//! once by Gateway API precedence so a request takes the first entry that matches.
//!
//! Precedence (Gateway API, as istiod orders the generated routes): Exact path before PathPrefix
//! before RegularExpression, then the longer path value, then a method match, then more header
//! matches, then more query parameter matches; ties go to the route that sorts first by
//! `namespace/name` (Gateway API says oldest first, then alphabetical; the file has no creation
//! times, so alphabetical decides), then to the earlier rule and match within a route.
//!
//! Hostnames are not consulted: for a Service parent the Service itself says which traffic the
//! route is for.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ambit_local::manifest::{
    Fraction, HeaderModifier, HttpRoute, HttpRouteFilter, HttpRouteRule, PathMatchType,
    PathModifier, RequestRedirect, UrlRewrite, ValueMatchType,
};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Method;
use regex::Regex;

use super::CompileError;

/// Istio's default retry count when a route sets `retry` without `attempts`.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
/// Envoy's default base interval between retries.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// The routes of every Service that has any.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// (namespace, Service name) → entries in precedence order.
    services: HashMap<(String, String), Vec<Entry>>,
    routes: usize,
}

#[derive(Debug)]
struct Entry {
    /// The parentRef's `port`: the entry applies to that Service port only.
    port: Option<u16>,
    matcher: RequestMatcher,
    rule: Arc<Rule>,
}

/// One compiled rule: what to do with a request that matched it.
#[derive(Debug)]
pub struct Rule {
    /// `namespace/name[index]`, for logs.
    pub name: String,
    /// The route's namespace: where its backends are.
    pub namespace: String,
    pub request_headers: Option<HeaderOps>,
    pub response_headers: Option<HeaderOps>,
    pub redirect: Option<RequestRedirect>,
    pub rewrite: Option<UrlRewrite>,
    pub mirrors: Vec<Mirror>,
    /// Empty: the parent Service itself (a mesh route that only filters or sets policy).
    pub backends: Vec<Backend>,
    /// Whole request (all attempts), until response headers.
    pub request_timeout: Option<Duration>,
    /// One attempt.
    pub backend_timeout: Option<Duration>,
    /// `None`: Istio's default retry policy.
    pub retry: Option<RetryPolicy>,
}

/// A Service port requests go to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    pub weight: u32,
}

#[derive(Clone, Debug)]
pub struct Mirror {
    pub backend: Backend,
    pub fraction: Option<Fraction>,
}

/// A route's `retry` (GEP-1731) as Istio applies it.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Response codes retried.
    pub codes: Vec<u16>,
    /// Retries after the first attempt.
    pub attempts: u32,
    pub backoff: Duration,
}

/// A header modifier with names and values checked once.
#[derive(Clone, Debug, Default)]
pub struct HeaderOps {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

#[derive(Debug)]
struct RequestMatcher {
    path: PathMatcher,
    headers: Vec<(HeaderName, ValueMatcher)>,
    query: Vec<(String, ValueMatcher)>,
    method: Option<Method>,
}

#[derive(Debug)]
enum PathMatcher {
    Exact(String),
    /// Without its trailing slash; empty matches every path.
    Prefix(String),
    /// Anchored at both ends: the whole path must match, as Envoy's `safe_regex` does.
    Regex(Regex, usize),
}

#[derive(Debug)]
enum ValueMatcher {
    Exact(String),
    Regex(Regex),
}

impl ValueMatcher {
    fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatcher::Exact(v) => v == value,
            ValueMatcher::Regex(r) => r.is_match(value),
        }
    }
}

/// The parts of a request routing looks at.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// Without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// What routing decided for a request.
#[derive(Debug)]
pub enum Routing<'a> {
    /// No route is attached to this Service port: the Service itself, as without routes.
    Default,
    /// Routes exist but none matches: 404, `NR`.
    NoMatch,
    Matched {
        rule: &'a Arc<Rule>,
        /// The PathPrefix that matched (what `ReplacePrefixMatch` replaces).
        prefix: Option<&'a str>,
    },
}

impl RouteTable {
    pub fn compile(routes: &[&HttpRoute]) -> Result<Self, CompileError> {
        let mut sorted: Vec<&HttpRoute> = routes.to_vec();
        sorted.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        let mut table = RouteTable::default();
        // (rank, route order, rule index, match index) per entry, for the stable sort below.
        let mut ranked: HashMap<(String, String), Vec<Ranked>> = HashMap::new();
        for (order, route) in sorted.iter().enumerate() {
            let parents: Vec<(String, String, Option<u16>)> = route
                .spec
                .parent_refs
                .iter()
                .filter(|p| (p.group.is_empty() || p.group == "core") && p.kind == "Service")
                .map(|p| {
                    let namespace = p
                        .namespace
                        .clone()
                        .unwrap_or_else(|| route.metadata.namespace.clone());
                    (namespace, p.name.clone(), p.port)
                })
                .collect();
            if parents.is_empty() {
                tracing::debug!(route = %route.metadata.name, "no Service parent; not a mesh route, ignored");
                continue;
            }
            table.routes += 1;
            let default_rule;
            let rules: &[HttpRouteRule] = if route.spec.rules.is_empty() {
                default_rule = [HttpRouteRule::default()];
                &default_rule
            } else {
                &route.spec.rules
            };
            for (rule_index, rule) in rules.iter().enumerate() {
                let compiled = Arc::new(compile_rule(route, rule_index, rule)?);
                let default_match = [Default::default()];
                let matches = if rule.matches.is_empty() {
                    &default_match[..]
                } else {
                    &rule.matches[..]
                };
                for (match_index, m) in matches.iter().enumerate() {
                    let field = format!("spec.rules[{rule_index}].matches[{match_index}]");
                    let (matcher, rank) = compile_match(route, &field, m)?;
                    for (namespace, name, port) in &parents {
                        let entry = Entry {
                            port: *port,
                            matcher: matcher.clone_compiled(),
                            rule: compiled.clone(),
                        };
                        ranked
                            .entry((namespace.clone(), name.clone()))
                            .or_default()
                            .push((rank, order, rule_index, match_index, entry));
                    }
                }
            }
        }
        for (service, mut entries) in ranked {
            entries.sort_by(|a, b| {
                b.0.cmp(&a.0)
                    .then(a.1.cmp(&b.1))
                    .then(a.2.cmp(&b.2))
                    .then(a.3.cmp(&b.3))
            });
            table
                .services
                .insert(service, entries.into_iter().map(|e| e.4).collect());
        }
        Ok(table)
    }

    /// How many routes attach to some Service.
    pub fn len(&self) -> usize {
        self.routes
    }

    pub fn is_empty(&self) -> bool {
        self.routes == 0
    }

    /// Routes a request addressed to Service `namespace/name` on `port`.
    pub fn route(
        &self,
        namespace: &str,
        name: &str,
        port: u16,
        request: RequestView<'_>,
    ) -> Routing<'_> {
        let Some(entries) = self.services.get(&(namespace.to_owned(), name.to_owned())) else {
            return Routing::Default;
        };
        let mut any = false;
        for entry in entries.iter().filter(|e| e.port.is_none_or(|p| p == port)) {
            any = true;
            if entry.matcher.matches(&request) {
                let prefix = match &entry.matcher.path {
                    PathMatcher::Prefix(p) => Some(p.as_str()),
                    _ => None,
                };
                return Routing::Matched {
                    rule: &entry.rule,
                    prefix,
                };
            }
        }
        if any {
            Routing::NoMatch
        } else {
            Routing::Default
        }
    }
}

/// Precedence, greatest first: path kind, path length, method, header count, query count.
type Rank = (u8, usize, bool, usize, usize);

/// An entry with its precedence, route order, rule index and match index.
type Ranked = (Rank, usize, usize, usize, Entry);

fn error(route: &HttpRoute, field: String, message: impl Into<String>) -> CompileError {
    CompileError {
        object: format!(
            "HTTPRoute {}/{}",
            route.metadata.namespace, route.metadata.name
        ),
        field,
        message: message.into(),
    }
}

fn regex(route: &HttpRoute, field: String, pattern: &str) -> Result<Regex, CompileError> {
    Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| error(route, field, format!("invalid regular expression: {e}")))
}

fn compile_match(
    route: &HttpRoute,
    field: &str,
    m: &ambit_local::manifest::HttpRouteMatch,
) -> Result<(RequestMatcher, Rank), CompileError> {
    let (path, path_rank, path_len) = match &m.path {
        None => (PathMatcher::Prefix(String::new()), 2, 1),
        Some(p) => match p.kind {
            PathMatchType::Exact => (PathMatcher::Exact(p.value.clone()), 3, p.value.len()),
            PathMatchType::PathPrefix => (
                PathMatcher::Prefix(p.value.trim_end_matches('/').to_owned()),
                2,
                p.value.len(),
            ),
            PathMatchType::RegularExpression => {
                let r = regex(route, format!("{field}.path.value"), &p.value)?;
                (PathMatcher::Regex(r, p.value.len()), 1, p.value.len())
            }
        },
    };
    let mut headers = Vec::new();
    for (i, h) in m.headers.iter().enumerate() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|e| error(route, format!("{field}.headers[{i}].name"), e.to_string()))?;
        let matcher = match h.kind {
            ValueMatchType::Exact => ValueMatcher::Exact(h.value.clone()),
            ValueMatchType::RegularExpression => ValueMatcher::Regex(regex(
                route,
                format!("{field}.headers[{i}].value"),
                &h.value,
            )?),
        };
        headers.push((name, matcher));
    }
    let mut query = Vec::new();
    for (i, q) in m.query_params.iter().enumerate() {
        let matcher = match q.kind {
            ValueMatchType::Exact => ValueMatcher::Exact(q.value.clone()),
            ValueMatchType::RegularExpression => ValueMatcher::Regex(regex(
                route,
                format!("{field}.queryParams[{i}].value"),
                &q.value,
            )?),
        };
        query.push((q.name.clone(), matcher));
    }
    let method = m
        .method
        .as_deref()
        .map(|s| Method::from_bytes(s.as_bytes()))
        .transpose()
        .map_err(|e| error(route, format!("{field}.method"), e.to_string()))?;
    let rank = (
        path_rank,
        path_len,
        method.is_some(),
        headers.len(),
        query.len(),
    );
    Ok((
        RequestMatcher {
            path,
            headers,
            query,
            method,
        },
        rank,
    ))
}

impl RequestMatcher {
    /// A copy for another parent (regexes are reference-counted inside, so this is cheap).
    fn clone_compiled(&self) -> Self {
        let value = |v: &ValueMatcher| match v {
            ValueMatcher::Exact(s) => ValueMatcher::Exact(s.clone()),
            ValueMatcher::Regex(r) => ValueMatcher::Regex(r.clone()),
        };
        RequestMatcher {
            path: match &self.path {
                PathMatcher::Exact(s) => PathMatcher::Exact(s.clone()),
                PathMatcher::Prefix(s) => PathMatcher::Prefix(s.clone()),
                PathMatcher::Regex(r, n) => PathMatcher::Regex(r.clone(), *n),
            },
            headers: self
                .headers
                .iter()
                .map(|(n, v)| (n.clone(), value(v)))
                .collect(),
            query: self
                .query
                .iter()
                .map(|(n, v)| (n.clone(), value(v)))
                .collect(),
            method: self.method.clone(),
        }
    }

    fn matches(&self, request: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatcher::Exact(p) => request.path == p,
            PathMatcher::Prefix(p) => prefix_matches(p, request.path),
            PathMatcher::Regex(r, _) => r.is_match(request.path),
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| m == request.method)
            && self.headers.iter().all(|(name, matcher)| {
                // Repeated headers are matched as one comma-joined value, as Envoy does.
                let values: Vec<&str> = request
                    .headers
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                !values.is_empty() && matcher.matches(&values.join(","))
            })
            && self.query.iter().all(|(name, matcher)| {
                // Gateway API: with a parameter repeated, only the first occurrence counts.
                query_param(request.query, name).is_some_and(|v| matcher.matches(v))
            })
    }
}

/// Gateway API's PathPrefix: whole path elements, trailing slash ignored (`/foo` matches `/foo`,
/// `/foo/` and `/foo/bar`, not `/foobar`).
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix.is_empty()
        || path == prefix
        || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn header_ops(
    route: &HttpRoute,
    field: &str,
    m: &HeaderModifier,
) -> Result<HeaderOps, CompileError> {
    let pair = |kind: &str, i: usize, (name, value): &(String, String)| {
        let n = HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| error(route, format!("{field}.{kind}[{i}].name"), e.to_string()))?;
        let v = HeaderValue::from_str(value)
            .map_err(|e| error(route, format!("{field}.{kind}[{i}].value"), e.to_string()))?;
        Ok::<_, CompileError>((n, v))
    };
    Ok(HeaderOps {
        set: m
            .set
            .iter()
            .enumerate()
            .map(|(i, p)| pair("set", i, p))
            .collect::<Result<_, _>>()?,
        add: m
            .add
            .iter()
            .enumerate()
            .map(|(i, p)| pair("add", i, p))
            .collect::<Result<_, _>>()?,
        remove: m
            .remove
            .iter()
            .enumerate()
            .map(|(i, n)| {
                HeaderName::from_bytes(n.as_bytes())
                    .map_err(|e| error(route, format!("{field}.remove[{i}]"), e.to_string()))
            })
            .collect::<Result<_, _>>()?,
    })
}

fn compile_rule(
    route: &HttpRoute,
    index: usize,
    rule: &HttpRouteRule,
) -> Result<Rule, CompileError> {
    let namespace = route.metadata.namespace.clone();
    let mut compiled = Rule {
        name: format!("{namespace}/{}[{index}]", route.metadata.name),
        namespace: namespace.clone(),
        request_headers: None,
        response_headers: None,
        redirect: None,
        rewrite: None,
        mirrors: Vec::new(),
        backends: rule
            .backend_refs
            .iter()
            .map(|b| Backend {
                namespace: namespace.clone(),
                name: b.backend.name.clone(),
                port: b.backend.port,
                weight: b.weight,
            })
            .collect(),
        // "0s" disables a timeout.
        request_timeout: rule.timeouts.request.filter(|d| !d.is_zero()),
        backend_timeout: rule.timeouts.backend_request.filter(|d| !d.is_zero()),
        retry: rule.retry.as_ref().map(|r| RetryPolicy {
            codes: r.codes.clone(),
            attempts: r.attempts.unwrap_or(DEFAULT_RETRY_ATTEMPTS),
            backoff: r
                .backoff
                .filter(|d| !d.is_zero())
                .unwrap_or(DEFAULT_RETRY_BACKOFF),
        }),
    };
    for (i, filter) in rule.filters.iter().enumerate() {
        let field = format!("spec.rules[{index}].filters[{i}]");
        match filter {
            HttpRouteFilter::RequestHeaderModifier(m) => {
                compiled.request_headers = Some(header_ops(
                    route,
                    &format!("{field}.requestHeaderModifier"),
                    m,
                )?)
            }
            HttpRouteFilter::ResponseHeaderModifier(m) => {
                compiled.response_headers = Some(header_ops(
                    route,
                    &format!("{field}.responseHeaderModifier"),
                    m,
                )?)
            }
            HttpRouteFilter::RequestRedirect(r) => compiled.redirect = Some(r.clone()),
            HttpRouteFilter::UrlRewrite(r) => compiled.rewrite = Some(r.clone()),
            HttpRouteFilter::RequestMirror(m) => compiled.mirrors.push(Mirror {
                backend: Backend {
                    namespace: namespace.clone(),
                    name: m.backend_ref.name.clone(),
                    port: m.backend_ref.port,
                    weight: 1,
                },
                fraction: m.fraction,
            }),
        }
    }
    Ok(compiled)
}

/// The path after a `ReplacePrefixMatch` of `prefix` (the matched PathPrefix, without its
/// trailing slash) by `replacement`: `/foo/bar` with `/foo` → `/baz` is `/baz/bar`; with `/` it
/// is `/bar`.
pub fn replace_prefix(path: &str, prefix: &str, replacement: &str) -> String {
    let rest = path.get(prefix.len()..).unwrap_or_default();
    let head = replacement.trim_end_matches('/');
    let joined = format!("{head}{rest}");
    if joined.is_empty() {
        "/".to_owned()
    } else if !joined.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    }
}

/// The rewritten path for a path modifier.
pub fn modify_path(path: &str, prefix: Option<&str>, modifier: &PathModifier) -> String {
    match modifier {
        PathModifier::ReplaceFullPath(p) => p.clone(),
        PathModifier::ReplacePrefixMatch(replacement) => {
            replace_prefix(path, prefix.unwrap_or_default(), replacement)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_local::manifest::{parse, Object};

    fn table(yaml: &str) -> RouteTable {
        let objects = parse(yaml).unwrap();
        let routes: Vec<&HttpRoute> = objects
            .iter()
            .filter_map(|o| match o {
                Object::HttpRoute(r) => Some(r),
                _ => None,
            })
            .collect();
        RouteTable::compile(&routes).unwrap()
    }

    fn route_name(t: &RouteTable, method: &str, uri: &str, headers: &[(&str, &str)]) -> String {
        let uri: http::Uri = uri.parse().unwrap();
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let view = RequestView {
            method: &method,
            path: uri.path(),
            query: uri.query(),
            headers: &map,
        };
        match t.route("default", "echo", 80, view) {
            Routing::Default => "default".into(),
            Routing::NoMatch => "none".into(),
            Routing::Matched { rule, .. } => rule.name.clone(),
        }
    }

    const PRECEDENCE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b-route}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
  - matches: [{path: {type: PathPrefix, value: /api/v1}}]
  - matches: [{path: {type: Exact, value: /api/v1/x}}]
  - matches: [{path: {type: PathPrefix, value: /api}, method: POST}]
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-a, value: "1"}]}]
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-a, value: "1"}, {name: x-b, type: RegularExpression, value: "b.*"}]}]
  - matches: [{path: {type: PathPrefix, value: /api}, queryParams: [{name: q, value: "1"}]}]
  - matches: [{path: {type: RegularExpression, value: "/re/[0-9]+"}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a-route}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
"#;

    #[test]
    fn gateway_api_precedence() {
        let t = table(PRECEDENCE);
        // Exact beats every prefix.
        assert_eq!(
            route_name(&t, "POST", "/api/v1/x", &[("x-a", "1")]),
            "default/b-route[2]"
        );
        // The longest prefix wins, before method and headers.
        assert_eq!(
            route_name(&t, "POST", "/api/v1/y", &[("x-a", "1")]),
            "default/b-route[1]"
        );
        // Same prefix: method before headers.
        assert_eq!(
            route_name(&t, "POST", "/api/z", &[("x-a", "1")]),
            "default/b-route[3]"
        );
        // More headers before fewer; headers before query parameters.
        assert_eq!(
            route_name(&t, "GET", "/api/z?q=1", &[("x-a", "1"), ("x-b", "bee")]),
            "default/b-route[5]"
        );
        assert_eq!(
            route_name(&t, "GET", "/api/z?q=1", &[("x-a", "1")]),
            "default/b-route[4]"
        );
        assert_eq!(
            route_name(&t, "GET", "/api/z?q=1", &[]),
            "default/b-route[6]"
        );
        // Equal precedence: the route first by namespace/name.
        assert_eq!(route_name(&t, "GET", "/api/z", &[]), "default/a-route[0]");
        // Path elements, not characters.
        assert_eq!(route_name(&t, "GET", "/apis", &[]), "none");
        assert_eq!(route_name(&t, "GET", "/api/", &[]), "default/a-route[0]");
        // Regular expressions match the whole path.
        assert_eq!(route_name(&t, "GET", "/re/42", &[]), "default/b-route[7]");
        assert_eq!(route_name(&t, "GET", "/re/42/x", &[]), "none");
        // A regex header must match the whole value.
        assert_eq!(
            route_name(&t, "GET", "/api/z", &[("x-a", "1"), ("x-b", "xbee")]),
            "default/b-route[4]"
        );
    }

    #[test]
    fn ports_and_services_scope_routes() {
        let t = table(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 8080}]
"#,
        );
        let method = Method::GET;
        let headers = HeaderMap::new();
        let view = RequestView {
            method: &method,
            path: "/",
            query: None,
            headers: &headers,
        };
        assert!(matches!(
            t.route("default", "echo", 80, view),
            Routing::Default
        ));
        assert!(matches!(
            t.route("default", "other", 8080, view),
            Routing::Default
        ));
        // No rules: the default rule, PathPrefix `/` to the parent.
        let Routing::Matched { rule, .. } = t.route("default", "echo", 8080, view) else {
            panic!("expected a match");
        };
        assert!(rule.backends.is_empty());
    }

    #[test]
    fn bad_regex_names_the_field() {
        let objects = parse(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: echo}]\n  rules: [{matches: [{path: {type: RegularExpression, value: \"(\"}}]}]\n",
        )
        .unwrap();
        let Object::HttpRoute(r) = &objects[0] else {
            panic!()
        };
        let err = RouteTable::compile(&[r]).unwrap_err();
        assert_eq!(err.object, "HTTPRoute default/r");
        assert_eq!(err.field, "spec.rules[0].matches[0].path.value");
    }

    #[test]
    fn prefix_replacement() {
        assert_eq!(replace_prefix("/foo/bar", "/foo", "/baz"), "/baz/bar");
        assert_eq!(replace_prefix("/foo/bar", "/foo", "/"), "/bar");
        assert_eq!(replace_prefix("/foo", "/foo", "/"), "/");
        assert_eq!(replace_prefix("/foo", "/foo", "/baz/"), "/baz");
        assert_eq!(replace_prefix("/x", "", "/y"), "/y/x");
    }
}
