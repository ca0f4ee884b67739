//! Istio's translation of AuthorizationPolicy and PeerAuthentication into ztunnel's L4
//! `istio.security.Authorization`, as istiod does it for ambient
//! (`pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go`:
//! `convertAuthorizationPolicy`, `handleRule`, `convertPeerAuthentication`,
//! `convertedSelectorPeerAuthentications`; the static STRICT policy in `policies.go`).
//!
//! AuthorizationPolicy:
//! - `targetRefs` policies are for waypoints: not sent to ztunnel.
//! - scope: `selector` → WorkloadSelector (listed by each selected workload), no selector →
//!   Namespace, no selector in the root namespace → Global.
//! - actions: ALLOW and DENY; AUDIT and CUSTOM are not supported by ztunnel (not sent).
//! - each rule becomes one ztunnel rule whose clauses are, in order: one clause for `to` (a match
//!   per operation: `ports`/`notPorts`), one for `from` (a match per source: `principals`,
//!   `namespaces`, `serviceAccounts`, `ipBlocks` and their `not` twins), one per `when`
//!   condition (keys `source.ip`, `source.namespace`, `source.principal`, `destination.ip`,
//!   `destination.port`).
//! - HTTP-only attributes (`hosts`, `methods`, `paths`, `requestPrincipals`, `remoteIpBlocks`,
//!   `trustDomains`, other `when` keys, all with their `not` twins) cannot be checked at L4. In an
//!   ALLOW policy the whole rule carrying them is dropped (it can never allow; a policy left with
//!   no rules allows nothing). In a DENY policy they are left out of their match and the rest is
//!   kept: the deny becomes broader where L4 fields remain, and a match left empty is skipped by
//!   ztunnel, so a clause made only of HTTP attributes never matches and its rule is inert (a
//!   DENY with only HTTP conditions has no effect at ztunnel). Either way a warning says so, in
//!   istiod's words.
//! - string values: `*` → presence, `prefix*` → prefix, `*suffix` → suffix, else exact.
//! - annotation `istio.io/dry-run: "true"` → `dry_run` (istiod sends these only behind
//!   `AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY`; Ambit's ztunnel supports dry-run, so the
//!   local mesh always sends them).
//!
//! PeerAuthentication never reaches ztunnel as such: when any exists, istiod publishes the static
//! DENY policy `<root>/istio_converted_static_strict` (deny connections without a peer identity,
//! `notPrincipals: [presence]`) and every workload whose effective mode (mesh → namespace →
//! workload, oldest policy wins at each level) is STRICT lists it; a workload policy with
//! port-level exceptions becomes its own DENY policy `converted_peer_authentication_<name>`.

use ambit_mesh::rbac::{
    parse_cidr, Action, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch, StringMatch,
};

use crate::manifest::{
    selector_matches, AuthorizationAction, AuthorizationPolicy, AuthorizationRule, MtlsMode,
    PeerAuthentication, PeerAuthenticationSpec, Pod,
};

/// Name of the static policy that enforces STRICT mTLS (illegal as a Kubernetes name on purpose,
/// so it cannot collide with a user's policy).
pub const STATIC_STRICT_POLICY: &str = "istio_converted_static_strict";
/// Prefix of PeerAuthentications converted into policies.
pub const CONVERTED_PEER_AUTHENTICATION_PREFIX: &str = "converted_peer_authentication_";
/// Annotation that turns a policy into a dry run.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// The outcome of converting one AuthorizationPolicy for ztunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversion {
    /// What ztunnel receives; `None` when the policy is not for ztunnel (targetRefs) or cannot be
    /// enforced there (AUDIT, CUSTOM).
    pub authorization: Option<Authorization>,
    /// What istiod would write in the policy's status (unsupported action, HTTP attributes).
    pub message: Option<String>,
}

const HTTP_DENY_NO_EFFECT: &str = "After omitting unsupported HTTP attributes, this DENY policy \
     has no enforceable rules at ztunnel and will have no effect. Deploy a waypoint proxy and use \
     a targetRef to enforce this policy.";
const HTTP_DENY_MIXED: &str = "DENY policy with HTTP attributes is enforced without the HTTP \
     rules. This will be more restrictive than requested.";
const HTTP_ALLOW_RULE: &str = "Within an ALLOW policy, rules matching HTTP attributes are \
     omitted. This will be more restrictive than requested.";

/// Addresses and networks that parse; istiod skips the rest (validation refused them already).
/// A macro so the network type comes from the `Match` field being filled.
macro_rules! ips {
    ($values:expr) => {
        $values
            .iter()
            .filter_map(|v: &String| parse_cidr(v).ok())
            .collect()
    };
}

/// `when` keys ztunnel can evaluate.
const L4_CONDITION_KEYS: &[&str] = &[
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

/// Converts one AuthorizationPolicy the way istiod does for ztunnel.
pub fn convert_authorization_policy(
    policy: &AuthorizationPolicy,
    root_namespace: &str,
) -> Conversion {
    let meta = &policy.metadata;
    let spec = &policy.spec;
    if !spec.target_refs.is_empty() {
        // Enforced by the waypoint (or gateway) the policy targets.
        return Conversion {
            authorization: None,
            message: None,
        };
    }
    let mut messages = Vec::new();
    let dry_run = match meta.annotations.get(DRY_RUN_ANNOTATION) {
        None => false,
        Some(v) => parse_go_bool(v).unwrap_or_else(|| {
            messages.push(format!(
                "annotation {DRY_RUN_ANNOTATION}: {v:?} is not a boolean; the policy is enforced"
            ));
            false
        }),
    };
    let action = match spec.action {
        AuthorizationAction::Allow => Action::Allow,
        AuthorizationAction::Deny => Action::Deny,
        other => {
            return Conversion {
                authorization: None,
                message: Some(format!(
                    "ztunnel does not support the {} action",
                    other.as_str()
                )),
            }
        }
    };
    let scope = match (&spec.selector, meta.namespace == root_namespace) {
        (Some(_), _) => Scope::WorkloadSelector,
        (None, true) => Scope::Global,
        (None, false) => Scope::Namespace,
    };
    let mut http_attributes = std::collections::BTreeSet::new();
    let mut rules = Vec::new();
    for rule in &spec.rules {
        let (converted, found) = handle_rule(action, rule, &meta.namespace);
        rules.extend(converted);
        http_attributes.extend(found);
    }
    if !http_attributes.is_empty() {
        let boilerplate = match action {
            Action::Deny if !has_effective_rules(&rules) => HTTP_DENY_NO_EFFECT,
            Action::Deny => HTTP_DENY_MIXED,
            Action::Allow => HTTP_ALLOW_RULE,
        };
        let found: Vec<&str> = http_attributes.iter().map(String::as_str).collect();
        messages.push(format!(
            "ztunnel does not support HTTP attributes (found: {}). In ambient mode you must use \
             a waypoint proxy to enforce HTTP rules. {boilerplate}",
            found.join(", ")
        ));
    }
    Conversion {
        authorization: Some(Authorization {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            scope,
            action,
            rules,
            dry_run,
        }),
        message: (!messages.is_empty()).then(|| messages.join("; ")),
    }
}

/// Go's `strconv.ParseBool`, which istiod uses for the dry-run annotation.
fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// One AuthorizationPolicy rule → at most one ztunnel rule, plus the HTTP attributes found.
fn handle_rule(
    action: Action,
    rule: &AuthorizationRule,
    namespace: &str,
) -> (Option<Rule>, Vec<String>) {
    let mut http = Vec::new();
    let mut clauses = Vec::new();
    if !rule.to.is_empty() {
        let matches = rule
            .to
            .iter()
            .map(|op| {
                for (name, values) in [
                    ("hosts", &op.hosts),
                    ("notHosts", &op.not_hosts),
                    ("methods", &op.methods),
                    ("notMethods", &op.not_methods),
                    ("paths", &op.paths),
                    ("notPaths", &op.not_paths),
                ] {
                    if !values.is_empty() {
                        http.push(name.to_owned());
                    }
                }
                Match {
                    destination_ports: ports(&op.ports),
                    not_destination_ports: ports(&op.not_ports),
                    ..Match::default()
                }
            })
            .collect();
        clauses.push(Clause { matches });
    }
    if !rule.from.is_empty() {
        let matches = rule
            .from
            .iter()
            .map(|s| {
                for (name, values) in [
                    ("remoteIpBlocks", &s.remote_ip_blocks),
                    ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
                    ("requestPrincipals", &s.request_principals),
                    ("notRequestPrincipals", &s.not_request_principals),
                    // A match has no trust-domain field, and folding it into principals would
                    // widen a source that sets both; istiod reports it instead.
                    ("trustDomains", &s.trust_domains),
                    ("notTrustDomains", &s.not_trust_domains),
                ] {
                    if !values.is_empty() {
                        http.push(name.to_owned());
                    }
                }
                Match {
                    source_ips: ips!(&s.ip_blocks),
                    not_source_ips: ips!(&s.not_ip_blocks),
                    namespaces: string_matches(&s.namespaces),
                    not_namespaces: string_matches(&s.not_namespaces),
                    service_accounts: service_accounts(&s.service_accounts, namespace),
                    not_service_accounts: service_accounts(&s.not_service_accounts, namespace),
                    principals: string_matches(&s.principals),
                    not_principals: string_matches(&s.not_principals),
                    ..Match::default()
                }
            })
            .collect();
        clauses.push(Clause { matches });
    }
    for when in &rule.when {
        if !L4_CONDITION_KEYS.contains(&when.key.as_str()) {
            http.push(when.key.clone());
        }
        let pick = |key: &str, values: &[String]| -> Vec<String> {
            if when.key == key {
                values.to_vec()
            } else {
                Vec::new()
            }
        };
        let (v, nv) = (&when.values, &when.not_values);
        clauses.push(Clause {
            matches: vec![Match {
                namespaces: string_matches(&pick("source.namespace", v)),
                principals: string_matches(&pick("source.principal", v)),
                source_ips: ips!(&pick("source.ip", v)),
                destination_ports: ports(&pick("destination.port", v)),
                destination_ips: ips!(&pick("destination.ip", v)),
                not_namespaces: string_matches(&pick("source.namespace", nv)),
                not_principals: string_matches(&pick("source.principal", nv)),
                not_source_ips: ips!(&pick("source.ip", nv)),
                not_destination_ports: ports(&pick("destination.port", nv)),
                not_destination_ips: ips!(&pick("destination.ip", nv)),
                ..Match::default()
            }],
        });
    }
    if action == Action::Allow && !http.is_empty() {
        // An HTTP condition can never be satisfied at L4, so the rule can never allow.
        return (None, http);
    }
    (Some(Rule { clauses }), http)
}

/// Whether some rule can fire at ztunnel: a rule with no clauses always matches; otherwise every
/// clause needs a non-empty match (empty matches are skipped, i.e. never match).
fn has_effective_rules(rules: &[Rule]) -> bool {
    rules.iter().any(|rule| {
        rule.clauses
            .iter()
            .all(|c| c.matches.iter().any(|m| !m.is_empty()))
    })
}

/// Istio's string matching: `*` any non-empty value, `*suffix`, `prefix*`, else exact.
pub fn string_match(value: &str) -> StringMatch {
    if value == "*" {
        StringMatch::Presence
    } else if let Some(suffix) = value.strip_prefix('*') {
        StringMatch::Suffix(suffix.to_owned())
    } else if let Some(prefix) = value.strip_suffix('*') {
        StringMatch::Prefix(prefix.to_owned())
    } else {
        StringMatch::Exact(value.to_owned())
    }
}

fn string_matches(values: &[String]) -> Vec<StringMatch> {
    values.iter().map(|v| string_match(v)).collect()
}

/// `ns/sa`, or `sa` in the policy's namespace.
fn service_accounts(values: &[String], namespace: &str) -> Vec<ServiceAccountMatch> {
    values
        .iter()
        .map(|v| match v.split_once('/') {
            Some((ns, sa)) => ServiceAccountMatch {
                namespace: ns.to_owned(),
                service_account: sa.to_owned(),
            },
            None => ServiceAccountMatch {
                namespace: namespace.to_owned(),
                service_account: v.clone(),
            },
        })
        .collect()
}

/// Ports that parse; istiod skips the rest (validation has refused them already).
fn ports(values: &[String]) -> Vec<u16> {
    values.iter().filter_map(|v| v.parse().ok()).collect()
}

/// A match that holds for connections without a peer identity (plaintext).
fn no_identity() -> Match {
    Match {
        not_principals: vec![StringMatch::Presence],
        ..Match::default()
    }
}

/// The static STRICT policy: deny any connection without a peer identity, for the workloads
/// that list it.
pub fn static_strict_policy(root_namespace: &str) -> Authorization {
    Authorization {
        name: STATIC_STRICT_POLICY.into(),
        namespace: root_namespace.into(),
        scope: Scope::WorkloadSelector,
        action: Action::Deny,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![no_identity()],
            }],
        }],
        dry_run: false,
    }
}

/// The key a workload lists to pick up the static STRICT policy.
pub fn static_strict_key(root_namespace: &str) -> String {
    format!("{root_namespace}/{STATIC_STRICT_POLICY}")
}

fn converted_name(pa: &PeerAuthentication) -> String {
    format!("{CONVERTED_PEER_AUTHENTICATION_PREFIX}{}", pa.metadata.name)
}

/// A workload PeerAuthentication with port-level modes → the DENY policy expressing its
/// exceptions, given the effective namespace-wide (`namespace_pa`) and mesh-wide (`mesh_pa`)
/// policies. `None` when the policy needs no converted form (not a workload policy with
/// port-level modes, or nothing beyond what the static STRICT policy covers).
pub fn convert_peer_authentication(
    pa: &PeerAuthentication,
    root_namespace: &str,
    namespace_pa: Option<&PeerAuthenticationSpec>,
    mesh_pa: Option<&PeerAuthenticationSpec>,
) -> Option<Authorization> {
    let spec = &pa.spec;
    if pa.metadata.namespace == root_namespace
        || !spec.has_selector()
        || spec.port_level_mtls.is_empty()
    {
        return None;
    }
    let mode = spec.mtls;
    let ns_mode = namespace_pa.map(|p| p.mtls);
    let mesh_mode = mesh_pa.map(|p| p.mtls);
    let ns_strict = ns_mode == Some(MtlsMode::Strict);
    let mesh_strict = mesh_mode == Some(MtlsMode::Strict);
    let ns_unset_or_absent = matches!(ns_mode, None | Some(MtlsMode::Unset));

    // Clauses of the final rule (ANDed), and whole rules (ORed).
    let mut clauses = Vec::new();
    let mut rules = Vec::new();
    if mode == MtlsMode::Strict {
        clauses.push(Clause {
            matches: vec![no_identity()],
        });
    }
    let mut found_non_strict_port = false;
    for (&port, &port_mode) in &spec.port_level_mtls {
        match port_mode {
            MtlsMode::Strict => {
                // Already enforced by the parent policy (workload STRICT, or workload UNSET under
                // a STRICT namespace, or under a STRICT mesh with the namespace unset). istiod's
                // Go condition binds the mesh case without the "workload UNSET" test (an operator
                // precedence slip); this follows the documented intent, which keeps the STRICT
                // port enforced under a PERMISSIVE workload policy.
                let inherited = mode == MtlsMode::Strict
                    || (mode == MtlsMode::Unset
                        && (ns_strict || (ns_unset_or_absent && mesh_strict)));
                if inherited {
                    continue;
                }
                rules.push(Rule {
                    clauses: vec![Clause {
                        matches: vec![Match {
                            not_principals: vec![StringMatch::Presence],
                            destination_ports: vec![port],
                            ..Match::default()
                        }],
                    }],
                });
            }
            MtlsMode::Permissive | MtlsMode::Disable => {
                if matches!(mode, MtlsMode::Permissive | MtlsMode::Disable) {
                    continue;
                }
                let effective_not_strict = match (ns_mode, mesh_mode) {
                    (Some(ns), _) => ns != MtlsMode::Strict,
                    (None, Some(mesh)) => mesh != MtlsMode::Strict,
                    (None, None) => true,
                };
                if mode == MtlsMode::Unset && effective_not_strict {
                    continue;
                }
                found_non_strict_port = true;
                // Exempt the port: deny only when the connection is not to it.
                clauses.push(Clause {
                    matches: vec![Match {
                        not_destination_ports: vec![port],
                        ..Match::default()
                    }],
                });
            }
            MtlsMode::Unset => {}
        }
    }
    if mode == MtlsMode::Strict && !found_non_strict_port {
        // Plain STRICT: the static policy covers it.
        return None;
    }
    if clauses.is_empty() && rules.is_empty() {
        return None;
    }
    // Merge when a STRICT mesh policy is in force (namespace absent, unset or also STRICT) or
    // the namespace itself is STRICT.
    let merge_strict =
        ns_strict || (mesh_strict && matches!(ns_mode, None | Some(MtlsMode::Unset)));
    if merge_strict && found_non_strict_port {
        clauses.push(Clause {
            matches: vec![no_identity()],
        });
    }
    if !clauses.is_empty() {
        rules.push(Rule { clauses });
    }
    Some(Authorization {
        name: converted_name(pa),
        namespace: pa.metadata.namespace.clone(),
        scope: Scope::WorkloadSelector,
        action: Action::Deny,
        rules,
        dry_run: false,
    })
}

/// A PeerAuthentication and its creation order (older wins conflicts, as in istiod).
pub type Aged<'a> = (&'a PeerAuthentication, u64);

fn oldest<'a>(candidates: impl Iterator<Item = Aged<'a>>) -> Option<&'a PeerAuthentication> {
    candidates.min_by_key(|(_, age)| *age).map(|(pa, _)| pa)
}

/// The oldest mesh-wide PeerAuthentication.
pub fn mesh_peer_authentication<'a>(
    all: &[Aged<'a>],
    root_namespace: &str,
) -> Option<&'a PeerAuthentication> {
    oldest(
        all.iter()
            .copied()
            .filter(|(pa, _)| pa.metadata.namespace == root_namespace && !pa.spec.has_selector()),
    )
}

/// The oldest namespace-wide PeerAuthentication of `namespace`.
pub fn namespace_peer_authentication<'a>(
    all: &[Aged<'a>],
    namespace: &str,
    root_namespace: &str,
) -> Option<&'a PeerAuthentication> {
    if namespace == root_namespace {
        return None;
    }
    oldest(
        all.iter()
            .copied()
            .filter(|(pa, _)| pa.metadata.namespace == namespace && !pa.spec.has_selector()),
    )
}

/// The PeerAuthentication-derived policy keys `pod` lists: the static STRICT policy when its
/// effective mode is STRICT, and the converted form of its workload policy when that has
/// port-level exceptions.
pub fn peer_authentication_keys(all: &[Aged<'_>], pod: &Pod, root_namespace: &str) -> Vec<String> {
    let ns = &pod.metadata.namespace;
    let mesh = mesh_peer_authentication(all, root_namespace);
    let namespace = namespace_peer_authentication(all, ns, root_namespace);
    let workload = if *ns == root_namespace {
        None
    } else {
        oldest(all.iter().copied().filter(|(pa, _)| {
            pa.metadata.namespace == *ns
                && pa
                    .spec
                    .selector
                    .as_ref()
                    .is_some_and(|s| !s.is_empty() && selector_matches(s, &pod.metadata.labels))
        }))
    };

    let mut strict = mesh.is_some_and(|m| m.spec.mtls == MtlsMode::Strict);
    if let Some(n) = namespace {
        if n.spec.mtls != MtlsMode::Unset {
            strict = n.spec.mtls == MtlsMode::Strict;
        }
    }
    let mut port_policy = None;
    if let Some(w) = workload {
        let spec = &w.spec;
        match spec.mtls {
            MtlsMode::Strict => strict = true,
            MtlsMode::Permissive | MtlsMode::Disable => strict = false,
            MtlsMode::Unset => {}
        }
        let key = || format!("{}/{}", w.metadata.namespace, converted_name(w));
        let any_port =
            |modes: &[MtlsMode]| spec.port_level_mtls.values().any(|m| modes.contains(m));
        if !spec.port_level_mtls.is_empty() {
            match spec.mtls {
                MtlsMode::Strict => {
                    if any_port(&[MtlsMode::Permissive, MtlsMode::Disable]) {
                        // The converted policy carries STRICT itself, with the exceptions.
                        port_policy = Some(key());
                        strict = false;
                    }
                }
                MtlsMode::Permissive | MtlsMode::Disable => {
                    if any_port(&[MtlsMode::Strict]) {
                        port_policy = Some(key());
                    }
                }
                MtlsMode::Unset => {
                    if strict {
                        // istiod looks for PERMISSIVE ports only here: a DISABLE port under an
                        // inherited STRICT stays STRICT (DISABLE cannot be honored in ambient).
                        if any_port(&[MtlsMode::Permissive]) {
                            port_policy = Some(key());
                            strict = false;
                        }
                    } else if any_port(&[MtlsMode::Strict]) {
                        port_policy = Some(key());
                    }
                }
            }
        }
    }
    let mut keys = Vec::new();
    if strict {
        keys.push(static_strict_key(root_namespace));
    }
    keys.extend(port_policy);
    keys.sort();
    keys
}
