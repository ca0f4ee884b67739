//! L7 AuthorizationPolicy, enforced the way Istio's waypoint (Envoy's RBAC filters) enforces
//! policies that name it with `targetRefs`: a policy applies when it targets this waypoint's
//! Gateway (kind Gateway, same namespace), the `istio-waypoint` GatewayClass (from the root
//! namespace), or the Service the request is addressed to (kind Service, same namespace).
//!
//! Decision, as Istio's: a matching CUSTOM policy denies (the waypoint has no external
//! authorizer to ask, so it fails closed); then any matching DENY denies; AUDIT never changes the
//! outcome; then, if any ALLOW policy applies, one of them must match or the request is denied.
//! A rule matches when any `from` source, any `to` operation and every `when` condition match.
//! Strings use Istio's forms: exact, `prefix*`, `*suffix`, `*` (present).
//!
//! Attributes without a source here — request authentication (`request.auth.*`; there is no
//! RequestAuthentication), `connection.sni`, `experimental.*` — fail closed: such a condition
//! never lets an ALLOW rule match and always lets a DENY rule match, and loading the policy
//! warns. `requestPrincipals` simply has no principal to match, as in Istio for a request
//! without a JWT.
//!
//! Policies annotated `istio.io/dry-run: "true"` are evaluated and logged, never enforced.
//!
//! A connection proxied at L4 (a TCP port) has no HTTP attributes, and Istio's TCP rule applies:
//! an ALLOW rule that names HTTP-only fields (`methods`, `paths`, `hosts`, `requestPrincipals`,
//! `request.headers[...]`) never matches, and a DENY rule is enforced without them, so mixing
//! HTTP fields into a policy can only make TCP traffic more restricted, never less.

use std::net::{IpAddr, SocketAddr};

use ambit_local::control::{
    string_match, DRY_RUN_ANNOTATION, ROOT_NAMESPACE, WAYPOINT_GATEWAY_CLASS,
};
use ambit_local::manifest::{
    AuthorizationAction, AuthorizationPolicy, AuthorizationRule, Condition, Operation, Source,
};
use ambit_mesh::identity::Identity;
use ambit_mesh::rbac::{parse_cidr, StringMatch};
use http::HeaderMap;
use ipnet::IpNet;

use super::WaypointName;

/// The compiled policies that can apply to this waypoint.
#[derive(Debug, Default)]
pub struct PolicyTable {
    policies: Vec<Policy>,
}

#[derive(Debug)]
struct Policy {
    /// `namespace/name`.
    name: String,
    action: AuthorizationAction,
    dry_run: bool,
    /// Targets this waypoint's Gateway (or the waypoint class): applies to all its traffic.
    for_gateway: bool,
    /// Service names (in `namespace`) it targets.
    services: Vec<String>,
    namespace: String,
    rules: Vec<Rule>,
}

#[derive(Debug, Default)]
struct Rule {
    from: Vec<SourceMatch>,
    to: Vec<OperationMatch>,
    when: Vec<ConditionMatch>,
    /// Names a field only HTTP requests have.
    uses_http: bool,
}

/// A list condition with its `not` twin: a set `any` list needs one match, a set `none` list
/// needs no match.
#[derive(Debug)]
struct Values<T> {
    any: Vec<T>,
    none: Vec<T>,
}

impl<T> Default for Values<T> {
    fn default() -> Self {
        Values {
            any: Vec::new(),
            none: Vec::new(),
        }
    }
}

impl<T> Values<T> {
    fn new(any: Vec<T>, none: Vec<T>) -> Self {
        Values { any, none }
    }

    fn is_set(&self) -> bool {
        !self.any.is_empty() || !self.none.is_empty()
    }

    fn check(&self, matches: impl Fn(&T) -> bool) -> bool {
        (self.any.is_empty() || self.any.iter().any(&matches)) && !self.none.iter().any(&matches)
    }
}

fn strings(values: &[String]) -> Vec<StringMatch> {
    values.iter().map(|v| string_match(v)).collect()
}

fn nets(values: &[String]) -> Vec<IpNet> {
    // Validated by the manifest parser already.
    values.iter().filter_map(|v| parse_cidr(v).ok()).collect()
}

fn ports(values: &[String]) -> Vec<u16> {
    values.iter().filter_map(|v| v.parse().ok()).collect()
}

#[derive(Debug, Default)]
struct SourceMatch {
    principals: Values<StringMatch>,
    request_principals: Values<StringMatch>,
    namespaces: Values<StringMatch>,
    /// (namespace, service account).
    service_accounts: Values<(String, String)>,
    ip_blocks: Values<IpNet>,
    remote_ip_blocks: Values<IpNet>,
    trust_domains: Values<StringMatch>,
}

#[derive(Debug, Default)]
struct OperationMatch {
    hosts: Values<StringMatch>,
    ports: Values<u16>,
    methods: Values<StringMatch>,
    paths: Values<StringMatch>,
}

#[derive(Debug)]
enum ConditionMatch {
    Header(String, Values<StringMatch>),
    SourceIp(Values<IpNet>),
    RemoteIp(Values<IpNet>),
    SourceNamespace(Values<StringMatch>),
    SourcePrincipal(Values<StringMatch>),
    DestinationIp(Values<IpNet>),
    DestinationPort(Values<u16>),
    /// A key the waypoint has no value for: fails closed.
    Unsupported,
}

/// What authorization looks at in one request or L4 connection.
#[derive(Clone, Copy, Debug)]
pub struct RequestAttributes<'a> {
    /// The HBONE peer's verified identity.
    pub source_principal: Option<&'a Identity>,
    /// The client's address: the tunnel's peer, or its `forwarded: for` claim when the peer may
    /// make it (`proxy::inbound`).
    pub source_ip: IpAddr,
    /// `remote.ip`: see [`remote_ip`].
    pub remote_ip: IpAddr,
    /// The tunnel's target: the VIP or pod address and port the client addressed.
    pub destination: SocketAddr,
    /// The addressed Service's (namespace, name), when a Service was addressed.
    pub service: Option<(&'a str, &'a str)>,
    /// `None` for a connection proxied at L4.
    pub http: Option<HttpAttributes<'a>>,
}

/// The HTTP side of a request.
#[derive(Clone, Copy, Debug)]
pub struct HttpAttributes<'a> {
    pub method: &'a str,
    /// Without the query, dot segments resolved.
    pub path: &'a str,
    /// `:authority` / `host`.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

/// The outcome for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Denied, naming the policy (or `allow-nomatch` when no ALLOW policy matched).
    Deny(String),
}

impl PolicyTable {
    /// Keeps the policies with `targetRefs` that can apply to this waypoint: its Gateway, the
    /// waypoint class, or any Service (whether a Service's traffic comes here is the state's
    /// business, decided per request).
    pub fn compile(policies: &[&AuthorizationPolicy], me: &WaypointName) -> Self {
        let mut table = PolicyTable::default();
        for policy in policies {
            let meta = &policy.metadata;
            let name = format!("{}/{}", meta.namespace, meta.name);
            let mut for_gateway = false;
            let mut services = Vec::new();
            for target in &policy.spec.target_refs {
                match target.kind.as_str() {
                    "Gateway" => {
                        for_gateway |= meta.namespace == me.namespace && target.name == me.gateway
                    }
                    "GatewayClass" => {
                        for_gateway |= meta.namespace == ROOT_NAMESPACE
                            && target.name == WAYPOINT_GATEWAY_CLASS
                    }
                    "Service" => services.push(target.name.clone()),
                    other => {
                        tracing::warn!(policy = %name, kind = other, "targetRef kind not enforced by the waypoint")
                    }
                }
            }
            if !for_gateway && services.is_empty() {
                continue;
            }
            let dry_run = meta
                .annotations
                .get(DRY_RUN_ANNOTATION)
                .is_some_and(|v| matches!(v.as_str(), "1" | "t" | "T" | "TRUE" | "true" | "True"));
            if policy.spec.action == AuthorizationAction::Custom {
                tracing::warn!(policy = %name, "CUSTOM authorization has no external authorizer in the waypoint; requests it matches are denied");
            }
            let rules = policy
                .spec
                .rules
                .iter()
                .map(|r| compile_rule(&name, r, &meta.namespace))
                .collect();
            table.policies.push(Policy {
                name,
                action: policy.spec.action,
                dry_run,
                for_gateway,
                services,
                namespace: meta.namespace.clone(),
                rules,
            });
        }
        table
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Istio's decision for one request.
    pub fn evaluate(&self, request: &RequestAttributes<'_>) -> Verdict {
        let applies = |p: &&Policy| {
            p.for_gateway
                || request.service.is_some_and(|(ns, name)| {
                    p.namespace == ns && p.services.iter().any(|s| s == name)
                })
        };
        let applicable: Vec<&Policy> = self.policies.iter().filter(applies).collect();
        let matched = |p: &Policy| {
            let deny_side = p.action != AuthorizationAction::Allow;
            p.rules.iter().any(|r| r.matches(request, deny_side))
        };
        for action in [AuthorizationAction::Custom, AuthorizationAction::Deny] {
            for policy in applicable.iter().filter(|p| p.action == action) {
                if matched(policy) {
                    if policy.dry_run {
                        tracing::info!(policy = %policy.name, "dry-run policy would deny the request");
                        continue;
                    }
                    return Verdict::Deny(policy.name.clone());
                }
            }
        }
        for policy in applicable
            .iter()
            .filter(|p| p.action == AuthorizationAction::Audit)
        {
            if matched(policy) {
                tracing::info!(policy = %policy.name, path = request.http.map(|h| h.path), destination = %request.destination, "audited request");
            }
        }
        let allow: Vec<&&Policy> = applicable
            .iter()
            .filter(|p| p.action == AuthorizationAction::Allow)
            .collect();
        let enforced = allow.iter().filter(|p| !p.dry_run).count();
        if allow.is_empty() {
            return Verdict::Allow;
        }
        if allow.iter().any(|p| !p.dry_run && matched(p)) {
            return Verdict::Allow;
        }
        if enforced == 0 {
            if !allow.iter().any(|p| matched(p)) {
                tracing::info!("dry-run ALLOW policies would deny the request");
            }
            return Verdict::Allow;
        }
        Verdict::Deny("allow-nomatch".to_owned())
    }
}

fn compile_rule(policy: &str, rule: &AuthorizationRule, namespace: &str) -> Rule {
    let source = |s: &Source| SourceMatch {
        principals: Values::new(strings(&s.principals), strings(&s.not_principals)),
        request_principals: Values::new(
            strings(&s.request_principals),
            strings(&s.not_request_principals),
        ),
        namespaces: Values::new(strings(&s.namespaces), strings(&s.not_namespaces)),
        service_accounts: Values::new(
            service_accounts(&s.service_accounts, namespace),
            service_accounts(&s.not_service_accounts, namespace),
        ),
        ip_blocks: Values::new(nets(&s.ip_blocks), nets(&s.not_ip_blocks)),
        remote_ip_blocks: Values::new(nets(&s.remote_ip_blocks), nets(&s.not_remote_ip_blocks)),
        trust_domains: Values::new(strings(&s.trust_domains), strings(&s.not_trust_domains)),
    };
    let operation = |o: &Operation| OperationMatch {
        hosts: Values::new(
            strings(&lowercase(&o.hosts)),
            strings(&lowercase(&o.not_hosts)),
        ),
        ports: Values::new(ports(&o.ports), ports(&o.not_ports)),
        methods: Values::new(strings(&o.methods), strings(&o.not_methods)),
        paths: Values::new(strings(&o.paths), strings(&o.not_paths)),
    };
    let condition = |c: &Condition| {
        let s = || Values::new(strings(&c.values), strings(&c.not_values));
        let n = || Values::new(nets(&c.values), nets(&c.not_values));
        match c.key.as_str() {
            "source.ip" => ConditionMatch::SourceIp(n()),
            "remote.ip" => ConditionMatch::RemoteIp(n()),
            "source.namespace" => ConditionMatch::SourceNamespace(s()),
            "source.principal" => ConditionMatch::SourcePrincipal(s()),
            "destination.ip" => ConditionMatch::DestinationIp(n()),
            "destination.port" => {
                ConditionMatch::DestinationPort(Values::new(ports(&c.values), ports(&c.not_values)))
            }
            key => match key
                .strip_prefix("request.headers[")
                .and_then(|k| k.strip_suffix(']'))
            {
                Some(header) => ConditionMatch::Header(header.to_ascii_lowercase(), s()),
                None => {
                    tracing::warn!(policy, key, "condition key not available in the waypoint; it fails closed (never allows, always denies)");
                    ConditionMatch::Unsupported
                }
            },
        }
    };
    let from: Vec<SourceMatch> = rule.from.iter().map(source).collect();
    let to: Vec<OperationMatch> = rule.to.iter().map(operation).collect();
    let when: Vec<ConditionMatch> = rule.when.iter().map(condition).collect();
    let uses_http = from.iter().any(|s| s.request_principals.is_set())
        || to
            .iter()
            .any(|o| o.hosts.is_set() || o.methods.is_set() || o.paths.is_set())
        || when.iter().any(|c| matches!(c, ConditionMatch::Header(..)));
    Rule {
        from,
        to,
        when,
        uses_http,
    }
}

fn lowercase(values: &[String]) -> Vec<String> {
    values.iter().map(|v| v.to_ascii_lowercase()).collect()
}

/// `ns/sa`, or `sa` in the policy's namespace.
fn service_accounts(values: &[String], namespace: &str) -> Vec<(String, String)> {
    values
        .iter()
        .map(|v| match v.split_once('/') {
            Some((ns, sa)) => (ns.to_owned(), sa.to_owned()),
            None => (namespace.to_owned(), v.clone()),
        })
        .collect()
}

/// Istio's principal form: the SPIFFE id without `spiffe://`.
fn principal(identity: &Identity) -> String {
    let id = identity.to_string();
    id.strip_prefix("spiffe://").unwrap_or(&id).to_owned()
}

impl Rule {
    /// Whether the rule matches; `deny_side` decides what an unsupported condition does (fail
    /// closed: it matches for DENY-like policies, never for ALLOW).
    fn matches(&self, r: &RequestAttributes<'_>, deny_side: bool) -> bool {
        if r.http.is_none() && self.uses_http && !deny_side {
            return false;
        }
        // At L4 on the deny side, the HTTP-only fields are left out of the rule.
        let http = |check: &dyn Fn(&HttpAttributes<'_>) -> bool| r.http.as_ref().is_none_or(check);
        let principal = r.source_principal.map(principal).unwrap_or_default();
        let namespace = r
            .source_principal
            .map(|i| i.namespace())
            .unwrap_or_default();
        let remote_ip = r.remote_ip;
        let from = self.from.is_empty()
            || self.from.iter().any(|s| {
                s.principals.check(|m| m.matches(&principal))
                    // No request authentication: there is never a request principal.
                    && http(&|_| s.request_principals.check(|_| false))
                    && s.namespaces.check(|m| m.matches(namespace))
                    && s.service_accounts.check(|(ns, sa)| {
                        r.source_principal
                            .is_some_and(|i| i.namespace() == ns && i.service_account() == sa)
                    })
                    && s.ip_blocks.check(|n| n.contains(&r.source_ip))
                    && s.remote_ip_blocks.check(|n| n.contains(&remote_ip))
                    && s.trust_domains.check(|m| {
                        r.source_principal.is_some_and(|i| m.matches(i.trust_domain()))
                    })
            });
        let to = self.to.is_empty()
            || self.to.iter().any(|o| {
                o.ports.check(|p| *p == r.destination.port())
                    && http(&|h| {
                        let host = h.host.to_ascii_lowercase();
                        let host_no_port = strip_port(&host);
                        o.hosts
                            .check(|m| m.matches(&host) || m.matches(host_no_port))
                            && o.methods.check(|m| m.matches(h.method))
                            && o.paths.check(|m| m.matches(h.path))
                    })
            });
        let when = self.when.iter().all(|c| match c {
            ConditionMatch::Header(name, values) => http(&|h| {
                let value = h
                    .headers
                    .get_all(name.as_str())
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect::<Vec<_>>()
                    .join(",");
                values.check(|m| m.matches(&value))
            }),
            ConditionMatch::SourceIp(v) => v.check(|n| n.contains(&r.source_ip)),
            ConditionMatch::RemoteIp(v) => v.check(|n| n.contains(&remote_ip)),
            ConditionMatch::SourceNamespace(v) => v.check(|m| m.matches(namespace)),
            ConditionMatch::SourcePrincipal(v) => v.check(|m| m.matches(&principal)),
            ConditionMatch::DestinationIp(v) => v.check(|n| n.contains(&r.destination.ip())),
            ConditionMatch::DestinationPort(v) => v.check(|p| *p == r.destination.port()),
            ConditionMatch::Unsupported => deny_side,
        });
        from && to && when
    }
}

/// `remote.ip` (and `remoteIpBlocks`) as Envoy derives Istio's: with `trusted_proxies` proxies
/// in front (`gatewayTopology.numTrustedProxies`), the `x-forwarded-for` entry that many places
/// from the right, which the outermost trusted proxy appended; with none, or fewer entries than
/// that, the source address. Entries further left are the client's own word.
pub fn remote_ip(source_ip: IpAddr, headers: Option<&HeaderMap>, trusted_proxies: usize) -> IpAddr {
    if trusted_proxies == 0 {
        return source_ip;
    }
    let entries: Vec<&str> = headers
        .into_iter()
        .flat_map(|h| h.get_all("x-forwarded-for"))
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    entries
        .len()
        .checked_sub(trusted_proxies)
        .and_then(|i| entries[i].parse().ok())
        .unwrap_or(source_ip)
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.find(']') {
            Some(i) => &host[..i + 2],
            None => host,
        };
    }
    match host.split_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// The path authorization compares: no query or fragment, dot segments resolved (Istio's
/// default `BASE` normalization), so `/public/../admin` cannot pass as `/public/*`.
pub fn normalize_path(path: &str) -> String {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => {
                if i == segments.len() - 1 {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == segments.len() - 1 {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_local::manifest::{parse, Object};

    fn table(yaml: &str) -> PolicyTable {
        let objects = parse(yaml).unwrap();
        let policies: Vec<&AuthorizationPolicy> = objects
            .iter()
            .filter_map(|o| match o {
                Object::AuthorizationPolicy(p) => Some(p),
                _ => None,
            })
            .collect();
        PolicyTable::compile(
            &policies,
            &WaypointName {
                namespace: "default".into(),
                gateway: "waypoint".into(),
            },
        )
    }

    /// The verdict for `default/<sa>` calling the echo service on `port`.
    fn verdict(t: &PolicyTable, sa: &str, port: u16, http: Option<HttpAttributes<'_>>) -> Verdict {
        let identity = Identity::new("cluster.local", "default", sa).unwrap();
        t.evaluate(&RequestAttributes {
            source_principal: Some(&identity),
            source_ip: "10.0.0.1".parse().unwrap(),
            remote_ip: "10.0.0.1".parse().unwrap(),
            destination: format!("10.96.0.10:{port}").parse().unwrap(),
            service: Some(("default", "echo")),
            http,
        })
    }

    fn check(t: &PolicyTable, sa: &str, method: &str, path: &str) -> Verdict {
        let headers = HeaderMap::new();
        let normalized = normalize_path(path);
        let http = HttpAttributes {
            method,
            path: &normalized,
            host: "echo.default.svc.cluster.local:80",
            headers: &headers,
        };
        verdict(t, sa, 80, Some(http))
    }

    fn check_l4(t: &PolicyTable, sa: &str, port: u16) -> Verdict {
        verdict(t, sa, port, None)
    }

    #[test]
    fn l4_connections_follow_istios_tcp_rule() {
        // An ALLOW rule with an HTTP field never matches a TCP connection; one without does.
        let t = table(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
    to: [{operation: {methods: ["GET"]}}]
  - from: [{source: {principals: ["cluster.local/ns/default/sa/db-client"]}}]
    to: [{operation: {ports: ["5432"]}}]
"#,
        );
        let nomatch = Verdict::Deny("allow-nomatch".into());
        assert_eq!(check_l4(&t, "sleep", 80), nomatch);
        assert_eq!(check(&t, "sleep", "GET", "/"), Verdict::Allow);
        assert_eq!(check_l4(&t, "db-client", 5432), Verdict::Allow);
        assert_eq!(check_l4(&t, "db-client", 5433), nomatch);
        // A DENY rule is enforced without its HTTP fields: the whole connection is denied.
        let t = table(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
    to: [{operation: {paths: ["/admin*"]}}]
    when: [{key: "request.headers[x-debug]", values: ["1"]}]
"#,
        );
        assert_eq!(
            check_l4(&t, "sleep", 80),
            Verdict::Deny("default/deny-admin".into())
        );
        assert_eq!(check_l4(&t, "other", 80), Verdict::Allow);
        assert_eq!(check(&t, "sleep", "GET", "/"), Verdict::Allow);
    }

    #[test]
    fn istio_path_matching_and_actions() {
        let t = table(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*", "*.secret", "/exact"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
    to: [{operation: {methods: ["GET"], hosts: ["echo.default.svc.cluster.local"]}}]
"#,
        );
        let deny = Verdict::Deny("default/deny-admin".into());
        assert_eq!(check(&t, "sleep", "GET", "/admin/x"), deny);
        assert_eq!(check(&t, "sleep", "GET", "/adminx"), deny);
        assert_eq!(check(&t, "sleep", "GET", "/a/b.secret"), deny);
        assert_eq!(check(&t, "sleep", "GET", "/exact"), deny);
        assert_eq!(check(&t, "sleep", "GET", "/exact?q=1"), deny);
        // Dot segments cannot smuggle a denied path past a prefix.
        assert_eq!(check(&t, "sleep", "GET", "/public/../admin"), deny);
        assert_eq!(check(&t, "sleep", "GET", "/exact/more"), Verdict::Allow);
        assert_eq!(check(&t, "sleep", "GET", "/"), Verdict::Allow);
        // The ALLOW policy applies and does not match: denied.
        let nomatch = Verdict::Deny("allow-nomatch".into());
        assert_eq!(check(&t, "sleep", "POST", "/"), nomatch);
        assert_eq!(check(&t, "other", "GET", "/"), nomatch);
    }

    #[test]
    fn unsupported_conditions_fail_closed() {
        let t = table(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt-allow}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules: [{when: [{key: "request.auth.claims[iss]", values: ["x"]}]}]
"#,
        );
        assert_eq!(
            check(&t, "sleep", "GET", "/"),
            Verdict::Deny("allow-nomatch".into())
        );
        let t = table(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt-deny}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{when: [{key: "request.auth.claims[iss]", notValues: ["x"]}]}]
"#,
        );
        assert_eq!(
            check(&t, "sleep", "GET", "/"),
            Verdict::Deny("default/jwt-deny".into())
        );
    }

    #[test]
    fn other_gateways_and_services_do_not_apply() {
        let t = table(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: other-waypoint}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other-svc}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
"#,
        );
        assert_eq!(t.len(), 1);
        assert_eq!(check(&t, "sleep", "GET", "/"), Verdict::Allow);
    }

    #[test]
    fn path_normalization() {
        assert_eq!(normalize_path("/a/./b/../c?x=/d"), "/a/c");
        assert_eq!(normalize_path("/.."), "/");
        assert_eq!(normalize_path("/a/b/.."), "/a/");
        assert_eq!(normalize_path("/"), "/");
    }

    #[test]
    fn remote_ip_trusts_only_the_configured_proxies() {
        let source: IpAddr = "10.0.0.1".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "1.1.1.1, 2.2.2.2".parse().unwrap());
        headers.append("x-forwarded-for", "3.3.3.3".parse().unwrap());
        // Istio's default: no trusted proxy, the client's own header counts for nothing.
        assert_eq!(remote_ip(source, Some(&headers), 0), source);
        // One trusted proxy appended the last entry: the address it saw.
        assert_eq!(
            remote_ip(source, Some(&headers), 1),
            "3.3.3.3".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            remote_ip(source, Some(&headers), 3),
            "1.1.1.1".parse::<IpAddr>().unwrap()
        );
        // More trusted proxies than entries, or no header: the source address.
        assert_eq!(remote_ip(source, Some(&headers), 4), source);
        assert_eq!(remote_ip(source, None, 1), source);
    }
}
