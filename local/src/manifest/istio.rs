//! Istio's policy and extension resources: AuthorizationPolicy and PeerAuthentication
//! (`security.istio.io/v1` and `v1beta1`) and WasmPlugin (`extensions.istio.io/v1alpha1`).
//!
//! Their schemas are small and every field has a security or traffic meaning, so unknown fields
//! are refused outright, and the validation follows istiod's (`pkg/config/validation`
//! `ValidateAuthorizationPolicy`, `ValidatePeerAuthentication`, `ValidateWasmPlugin`), with its
//! messages where they exist.

use std::collections::{BTreeMap, BTreeSet};

use super::decode::{FieldError, Fields, Node, Result};
use super::kube::validate_labels;
use super::Metadata;

/// An `AuthorizationPolicy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    pub metadata: Metadata,
    pub spec: AuthorizationPolicySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthorizationPolicySpec {
    /// `selector.matchLabels`; `None` when the policy has no selector (namespace-wide, or
    /// mesh-wide in the root namespace). `Some` of an empty map is kept distinct because Istio
    /// treats it differently (a selector policy that selects nothing).
    pub selector: Option<BTreeMap<String, String>>,
    /// `targetRefs` (and the deprecated `targetRef`): the policy is for waypoints/gateways.
    pub target_refs: Vec<PolicyTargetRef>,
    pub action: AuthorizationAction,
    /// `provider.name`, for CUSTOM.
    pub provider: Option<String>,
    pub rules: Vec<AuthorizationRule>,
}

/// `spec.action`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuthorizationAction {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

impl AuthorizationAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthorizationAction::Allow => "ALLOW",
            AuthorizationAction::Deny => "DENY",
            AuthorizationAction::Audit => "AUDIT",
            AuthorizationAction::Custom => "CUSTOM",
        }
    }
}

/// One rule: it matches when any `from` source, any `to` operation and every `when` condition
/// matches (an absent list imposes nothing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthorizationRule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

/// `rules[].from[].source`: all set fields must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub request_principals: Vec<String>,
    pub not_request_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub service_accounts: Vec<String>,
    pub not_service_accounts: Vec<String>,
    pub ip_blocks: Vec<String>,
    pub not_ip_blocks: Vec<String>,
    pub remote_ip_blocks: Vec<String>,
    pub not_remote_ip_blocks: Vec<String>,
    pub trust_domains: Vec<String>,
    pub not_trust_domains: Vec<String>,
}

/// `rules[].to[].operation`: all set fields must match. Ports stay strings, as in the API.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Operation {
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub ports: Vec<String>,
    pub not_ports: Vec<String>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

/// `rules[].when[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Condition {
    pub key: String,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

/// A policy's `targetRefs[]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyTargetRef {
    /// `""` for core (Service).
    pub group: String,
    pub kind: String,
    pub name: String,
}

/// A `PeerAuthentication`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthentication {
    pub metadata: Metadata,
    pub spec: PeerAuthenticationSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerAuthenticationSpec {
    /// `selector.matchLabels`; `None` or empty means namespace-wide (mesh-wide in the root
    /// namespace), as Istio reads it.
    pub selector: Option<BTreeMap<String, String>>,
    /// `mtls.mode`; [`MtlsMode::Unset`] when `mtls` or its mode is absent (inherit).
    pub mtls: MtlsMode,
    /// `portLevelMtls`: target port → mode.
    pub port_level_mtls: BTreeMap<u16, MtlsMode>,
}

impl PeerAuthenticationSpec {
    /// Whether the policy targets workloads (non-empty selector) rather than a namespace.
    pub fn has_selector(&self) -> bool {
        self.selector.as_ref().is_some_and(|s| !s.is_empty())
    }
}

/// `mtls.mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MtlsMode {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

/// A `WasmPlugin`, or the Wasm form of a `TrafficExtension` (Istio 1.30's successor, the same
/// fields with the module's under `wasm:`): a proxy-wasm module for waypoints (and gateways).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WasmPlugin {
    pub metadata: Metadata,
    pub spec: WasmPluginSpec,
    /// Which resource it was written as.
    pub api: WasmApi,
}

/// The resource a [`WasmPlugin`] came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WasmApi {
    #[default]
    WasmPlugin,
    TrafficExtension,
}

impl WasmPlugin {
    /// `WasmPlugin` or `TrafficExtension`, as written.
    pub fn kind(&self) -> super::Kind {
        match self.api {
            WasmApi::WasmPlugin => super::Kind::WasmPlugin,
            WasmApi::TrafficExtension => super::Kind::TrafficExtension,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WasmPluginSpec {
    pub selector: Option<BTreeMap<String, String>>,
    pub target_refs: Vec<PolicyTargetRef>,
    /// `oci://`, `file://`, `http(s)://`, or a bare OCI reference.
    pub url: String,
    /// Lowercase hex SHA-256 of the module, checked before it is loaded.
    pub sha256: Option<String>,
    /// `IfNotPresent`, `Always` (or unset).
    pub image_pull_policy: Option<String>,
    pub image_pull_secret: Option<String>,
    pub verification_key: Option<String>,
    /// Handed to the plugin at configure time (as JSON).
    pub plugin_config: Option<serde_json::Value>,
    /// The root id inside the module.
    pub plugin_name: Option<String>,
    pub phase: WasmPhase,
    /// Higher runs first within a phase.
    pub priority: Option<i32>,
    pub fail_strategy: FailStrategy,
    /// `vmConfig.env`.
    pub vm_env: Vec<WasmEnvVar>,
    /// `match[]`: which traffic the plugin applies to (all when empty).
    pub matches: Vec<WasmTrafficSelector>,
    pub plugin_type: WasmPluginType,
}

/// `phase`: where in the filter chain the plugin goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WasmPhase {
    /// Before Istio's stats filter, after authorization (`UNSPECIFIED_PHASE`).
    #[default]
    Unspecified,
    Authn,
    Authz,
    Stats,
}

/// `failStrategy`: what happens when the plugin cannot be loaded or crashes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailStrategy {
    /// Fail requests (`FAIL_CLOSE`, the default).
    #[default]
    FailClose,
    /// Skip the plugin.
    FailOpen,
    /// Reload the VM and retry.
    FailReload,
}

/// `type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WasmPluginType {
    /// HTTP unless said otherwise.
    #[default]
    Unspecified,
    Http,
    Network,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WasmEnvVar {
    pub name: String,
    /// `valueFrom: HOST` reads the proxy's own environment variable `name`.
    pub from_host: bool,
    pub value: String,
}

/// `match[]` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WasmTrafficSelector {
    /// `UNDEFINED`, `CLIENT`, `SERVER`, `CLIENT_AND_SERVER`.
    pub mode: String,
    pub ports: Vec<u16>,
}

fn enum_value<T: Copy>(node: Option<Node<'_>>, values: &[(&str, T)], default: T) -> Result<T> {
    let Some(node) = node else {
        return Ok(default);
    };
    let s = node.str()?;
    values
        .iter()
        .find(|(name, _)| *name == s)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = values.iter().map(|(n, _)| *n).collect();
            node.error(format!(
                "unknown value {s:?}; expected one of {}",
                names.join(", ")
            ))
        })
}

/// `selector: {matchLabels: ...}` → `Some(labels)`, with Istio's checks (no empty keys, no
/// wildcards).
fn workload_selector(f: &Fields<'_>) -> Result<Option<BTreeMap<String, String>>> {
    let Some(node) = f.get("selector") else {
        return Ok(None);
    };
    let sf = node.fields()?;
    let labels = sf.string_map("matchLabels")?;
    sf.finish()?;
    let path = format!("{}.matchLabels", node.path);
    for (k, v) in &labels {
        if k.contains('*') || v.contains('*') {
            return Err(FieldError {
                field: format!("{path}[{k}]"),
                message: format!("wildcard is not supported in selector: \"{k}={v}\""),
            });
        }
    }
    validate_labels(&labels, &path)?;
    Ok(Some(labels))
}

/// `targetRef` (deprecated) and `targetRefs`, merged.
fn target_refs(f: &Fields<'_>, allowed: &[(&str, &str)]) -> Result<Vec<PolicyTargetRef>> {
    let mut refs = Vec::new();
    if let Some(single) = f.get("targetRef") {
        refs.push(target_ref(&single, allowed)?);
    }
    refs.extend(f.list_of("targetRefs", |n| target_ref(n, allowed))?);
    Ok(refs)
}

fn target_ref(node: &Node<'_>, allowed: &[(&str, &str)]) -> Result<PolicyTargetRef> {
    let f = node.fields()?;
    let group = f.str("group")?.unwrap_or_default();
    let kind = f.require("kind")?.non_empty_str()?;
    let name = f.require("name")?.non_empty_str()?;
    if let Some(ns) = f.str("namespace")? {
        if !ns.is_empty() {
            // Istio's CRD refuses any namespace here ("cross namespace referencing is not
            // currently supported"); the referent is in the policy's namespace.
            return Err(f.error_at(
                "namespace",
                "cross namespace referencing is not supported; leave it out",
            ));
        }
    }
    if !allowed.iter().any(|(g, k)| *g == group && *k == kind) {
        let names: Vec<String> = allowed
            .iter()
            .map(|(g, k)| {
                if g.is_empty() {
                    k.to_string()
                } else {
                    format!("{g}/{k}")
                }
            })
            .collect();
        return Err(node.error(format!(
            "targetRef must be to one of {} but was {}",
            names.join(", "),
            if group.is_empty() {
                kind.clone()
            } else {
                format!("{group}/{kind}")
            }
        )));
    }
    f.finish()?;
    Ok(PolicyTargetRef { group, kind, name })
}

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// What an AuthorizationPolicy may target (Istio `allowedTargetRefs`).
const AUTHZ_TARGETS: &[(&str, &str)] = &[
    (GATEWAY_GROUP, "Gateway"),
    (GATEWAY_GROUP, "GatewayClass"),
    ("", "Service"),
    ("networking.istio.io", "ServiceEntry"),
];

/// What a WasmPlugin may target.
const WASM_TARGETS: &[(&str, &str)] = &[
    (GATEWAY_GROUP, "Gateway"),
    (GATEWAY_GROUP, "GatewayClass"),
    ("", "Service"),
];

fn one_of_selector(
    f: &Fields<'_>,
    selector: &Option<BTreeMap<String, String>>,
    refs: &[PolicyTargetRef],
) -> Result<()> {
    if selector.is_some() && !refs.is_empty() {
        let field = if f.get("targetRefs").is_some() {
            "targetRefs"
        } else {
            "targetRef"
        };
        return Err(f.error_at(
            field,
            "only one of targetRefs or selector can be set: selector policies are enforced by \
             ztunnel, targetRefs policies by waypoints",
        ));
    }
    Ok(())
}

pub(super) fn authorization_policy_spec(node: Option<Node<'_>>) -> Result<AuthorizationPolicySpec> {
    // `spec: {}` (or no spec) is a valid policy: ALLOW with no rules, i.e. deny all.
    let Some(node) = node else {
        return Ok(AuthorizationPolicySpec::default());
    };
    let f = node.fields()?;
    let selector = workload_selector(&f)?;
    let target_refs = target_refs(&f, AUTHZ_TARGETS)?;
    one_of_selector(&f, &selector, &target_refs)?;
    let action = enum_value(
        f.get("action"),
        &[
            ("ALLOW", AuthorizationAction::Allow),
            ("DENY", AuthorizationAction::Deny),
            ("AUDIT", AuthorizationAction::Audit),
            ("CUSTOM", AuthorizationAction::Custom),
        ],
        AuthorizationAction::Allow,
    )?;
    let provider = match f.get("provider") {
        None => None,
        Some(p) => {
            let pf = p.fields()?;
            let name = pf.str("name")?;
            pf.finish()?;
            Some(name.unwrap_or_default())
        }
    };
    let rules = f.list_of("rules", authorization_rule)?;
    match action {
        AuthorizationAction::Custom => {
            if rules.is_empty() {
                return Err(f.error_at(
                    "rules",
                    "CUSTOM action without `rules` is meaningless as it will never be \
                     triggered, add an empty rule `{}` if you want it be triggered for every \
                     request",
                ));
            }
            if provider.as_deref().unwrap_or("").is_empty() {
                return Err(f.error_at("provider.name", "must not be empty for a CUSTOM action"));
            }
        }
        _ if provider.is_some() => {
            return Err(f.error_at(
                "provider",
                format!(
                    "`provider` must not be with non CUSTOM action, found {}",
                    action.as_str()
                ),
            ))
        }
        AuthorizationAction::Deny if rules.is_empty() => {
            return Err(f.error_at(
                "rules",
                "DENY action without `rules` is meaningless as it will never be triggered, add \
                 an empty rule `{}` if you want it be triggered for every request",
            ))
        }
        _ => {}
    }
    f.finish()?;
    Ok(AuthorizationPolicySpec {
        selector,
        target_refs,
        action,
        provider,
        rules,
    })
}

/// A list of non-empty strings (Istio `CheckEmptyValues`).
fn values(f: &Fields<'_>, key: &str) -> Result<Vec<String>> {
    let Some(node) = f.get(key) else {
        return Ok(Vec::new());
    };
    node.list()?
        .iter()
        .map(|n| {
            let s = n.str()?;
            if s.is_empty() {
                Err(n.error("empty value is not allowed"))
            } else {
                Ok(s)
            }
        })
        .collect()
}

fn cidrs(f: &Fields<'_>, key: &str) -> Result<Vec<String>> {
    let list = values(f, key)?;
    for (i, v) in list.iter().enumerate() {
        ambit_mesh::rbac::parse_cidr(v)
            .map_err(|e| f.error_at(&format!("{key}[{i}]"), e.to_string()))?;
    }
    Ok(list)
}

fn ports(f: &Fields<'_>, key: &str) -> Result<Vec<String>> {
    let list = values(f, key)?;
    for (i, v) in list.iter().enumerate() {
        let ok = v
            .parse::<i64>()
            .ok()
            .and_then(super::decode::port_in_range)
            .is_some();
        if !ok {
            return Err(f.error_at(
                &format!("{key}[{i}]"),
                format!("invalid port {v:?}: expected a number 1-65535"),
            ));
        }
    }
    Ok(list)
}

fn authorization_rule(node: &Node<'_>) -> Result<AuthorizationRule> {
    let f = node.fields()?;
    let from_node = f.get("from");
    let from = f.list_of("from", |n| {
        let sf = n.fields()?;
        let source = sf.require("source")?;
        let s = source_of(&source)?;
        sf.finish()?;
        Ok(s)
    })?;
    if let (Some(n), true) = (&from_node, from.is_empty()) {
        return Err(n.error("`from` must not be empty"));
    }
    let to_node = f.get("to");
    let to = f.list_of("to", |n| {
        let of = n.fields()?;
        let op = of.require("operation")?;
        let o = operation_of(&op)?;
        of.finish()?;
        Ok(o)
    })?;
    if let (Some(n), true) = (&to_node, to.is_empty()) {
        return Err(n.error("`to` must not be empty"));
    }
    let when = f.list_of("when", condition)?;
    f.finish()?;
    Ok(AuthorizationRule { from, to, when })
}

fn source_of(node: &Node<'_>) -> Result<Source> {
    let f = node.fields()?;
    let s = Source {
        principals: values(&f, "principals")?,
        not_principals: values(&f, "notPrincipals")?,
        request_principals: values(&f, "requestPrincipals")?,
        not_request_principals: values(&f, "notRequestPrincipals")?,
        namespaces: values(&f, "namespaces")?,
        not_namespaces: values(&f, "notNamespaces")?,
        service_accounts: values(&f, "serviceAccounts")?,
        not_service_accounts: values(&f, "notServiceAccounts")?,
        ip_blocks: cidrs(&f, "ipBlocks")?,
        not_ip_blocks: cidrs(&f, "notIpBlocks")?,
        remote_ip_blocks: cidrs(&f, "remoteIpBlocks")?,
        not_remote_ip_blocks: cidrs(&f, "notRemoteIpBlocks")?,
        trust_domains: values(&f, "trustDomains")?,
        not_trust_domains: values(&f, "notTrustDomains")?,
    };
    f.finish()?;
    if s == Source::default() {
        return Err(node.error("`from.source` must not be empty"));
    }
    let identity_fields = !(s.principals.is_empty()
        && s.not_principals.is_empty()
        && s.namespaces.is_empty()
        && s.not_namespaces.is_empty());
    let sa_fields = !(s.service_accounts.is_empty() && s.not_service_accounts.is_empty());
    if identity_fields && sa_fields {
        return Err(node.error("cannot set serviceAccounts with namespaces or principals"));
    }
    for (key, list) in [
        ("serviceAccounts", &s.service_accounts),
        ("notServiceAccounts", &s.not_service_accounts),
    ] {
        for (i, sa) in list.iter().enumerate() {
            // `<namespace>/<name>` or `<name>` (in the policy's namespace).
            let valid = match sa.split_once('/') {
                Some((ns, name)) => !ns.is_empty() && !name.is_empty() && !name.contains('/'),
                None => true,
            };
            if !valid {
                return Err(f.error_at(
                    &format!("{key}[{i}]"),
                    format!("{sa:?} must be <name> or <namespace>/<name>"),
                ));
            }
        }
    }
    Ok(s)
}

fn operation_of(node: &Node<'_>) -> Result<Operation> {
    let f = node.fields()?;
    let o = Operation {
        hosts: values(&f, "hosts")?,
        not_hosts: values(&f, "notHosts")?,
        ports: ports(&f, "ports")?,
        not_ports: ports(&f, "notPorts")?,
        methods: values(&f, "methods")?,
        not_methods: values(&f, "notMethods")?,
        paths: values(&f, "paths")?,
        not_paths: values(&f, "notPaths")?,
    };
    f.finish()?;
    if o == Operation::default() {
        return Err(node.error("`to.operation` must not be empty"));
    }
    Ok(o)
}

/// `when` keys Istio knows (`security.ValidateAttribute`); bracketed ones take a name.
const CONDITION_KEYS: &[&str] = &[
    "source.ip",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "remote.ip",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "destination.ip",
    "destination.port",
    "connection.sni",
];
const CONDITION_PREFIXES: &[&str] = &[
    "request.headers[",
    "request.auth.claims[",
    "experimental.envoy.filters.",
];

fn condition(node: &Node<'_>) -> Result<Condition> {
    let f = node.fields()?;
    let key_node = f.require("key")?;
    let key = key_node.non_empty_str()?;
    let known = CONDITION_KEYS.contains(&key.as_str())
        || CONDITION_PREFIXES
            .iter()
            .any(|p| key.starts_with(p) && (!p.ends_with('[') || key.ends_with(']')));
    if !known {
        return Err(key_node.error(format!(
            "unknown attribute {key:?}; see Istio's authorization policy conditions"
        )));
    }
    let (values, not_values) = (values(&f, "values")?, values(&f, "notValues")?);
    if values.is_empty() && not_values.is_empty() {
        return Err(node.error(format!(
            "at least one of `values` or `notValues` must be set for key {key}"
        )));
    }
    for (field, list) in [("values", &values), ("notValues", &not_values)] {
        for (i, v) in list.iter().enumerate() {
            let problem = match key.as_str() {
                "source.ip" | "remote.ip" | "destination.ip" => {
                    ambit_mesh::rbac::parse_cidr(v).err().map(|e| e.to_string())
                }
                "destination.port" => v
                    .parse::<i64>()
                    .ok()
                    .and_then(super::decode::port_in_range)
                    .is_none()
                    .then(|| format!("invalid port {v:?}: expected a number 1-65535")),
                _ => None,
            };
            if let Some(message) = problem {
                return Err(f.error_at(&format!("{field}[{i}]"), message));
            }
        }
    }
    f.finish()?;
    Ok(Condition {
        key,
        values,
        not_values,
    })
}

const MTLS_MODES: &[(&str, MtlsMode)] = &[
    ("UNSET", MtlsMode::Unset),
    ("DISABLE", MtlsMode::Disable),
    ("PERMISSIVE", MtlsMode::Permissive),
    ("STRICT", MtlsMode::Strict),
];

fn mtls(node: &Node<'_>) -> Result<MtlsMode> {
    let f = node.fields()?;
    let mode = enum_value(f.get("mode"), MTLS_MODES, MtlsMode::Unset)?;
    f.finish()?;
    Ok(mode)
}

pub(super) fn peer_authentication_spec(node: Option<Node<'_>>) -> Result<PeerAuthenticationSpec> {
    let Some(node) = node else {
        return Ok(PeerAuthenticationSpec::default());
    };
    let f = node.fields()?;
    let selector = workload_selector(&f)?;
    let mtls_mode = match f.get("mtls") {
        None => MtlsMode::Unset,
        Some(n) => mtls(&n)?,
    };
    let mut port_level_mtls = BTreeMap::new();
    if let Some(levels) = f.get("portLevelMtls") {
        let lf = levels.fields()?;
        let entries = lf.entries();
        if entries.is_empty() {
            return Err(levels.error("port level mTLS, if defined, must have at least one element"));
        }
        for (key, value) in entries {
            // YAML writes the ports as integer keys; quoted ones are accepted too.
            let port = match key {
                serde_yaml::Value::Number(n) => n.as_i64(),
                serde_yaml::Value::String(s) => s.parse().ok(),
                _ => None,
            }
            .and_then(super::decode::port_in_range)
            .ok_or_else(|| value.error("port must be in range 1..65535"))?;
            port_level_mtls.insert(port, mtls(&value)?);
        }
    }
    let spec = PeerAuthenticationSpec {
        selector,
        mtls: mtls_mode,
        port_level_mtls,
    };
    if !spec.has_selector() && !spec.port_level_mtls.is_empty() {
        return Err(f.error_at(
            "portLevelMtls",
            "mesh/namespace peer authentication cannot have port level mTLS",
        ));
    }
    f.finish()?;
    Ok(spec)
}

pub(super) fn wasm_plugin_spec(node: &Node<'_>) -> Result<WasmPluginSpec> {
    let f = node.fields()?;
    let mut spec = wasm_targeting(&f, &[])?;
    wasm_module(&f, &mut spec)?;
    f.finish()?;
    Ok(spec)
}

/// WasmPlugin's phase names.
const PHASES: [(&str, WasmPhase); 4] = [
    ("UNSPECIFIED_PHASE", WasmPhase::Unspecified),
    ("AUTHN", WasmPhase::Authn),
    ("AUTHZ", WasmPhase::Authz),
    ("STATS", WasmPhase::Stats),
];

/// Where a plugin applies and in which order: `selector`, `targetRefs`, `phase` (its names, plus
/// `more_phases`), `priority`, `match`. Shared by WasmPlugin and TrafficExtension.
pub(super) fn wasm_targeting(
    f: &Fields<'_>,
    more_phases: &[(&str, WasmPhase)],
) -> Result<WasmPluginSpec> {
    let selector = workload_selector(f)?;
    let target_refs = target_refs(f, WASM_TARGETS)?;
    one_of_selector(f, &selector, &target_refs)?;
    let phases: Vec<(&str, WasmPhase)> = PHASES.iter().chain(more_phases).copied().collect();
    let phase = enum_value(f.get("phase"), &phases, WasmPhase::Unspecified)?;
    let priority = match f.get("priority") {
        None => None,
        Some(n) => {
            let p = n.i64()?;
            Some(i32::try_from(p).map_err(|_| n.error(format!("{p} does not fit in 32 bits")))?)
        }
    };
    let matches = f.list_of("match", |n| {
        let mf = n.fields()?;
        let mode = match mf.get("mode") {
            None => "UNDEFINED".to_owned(),
            Some(m) => {
                let v = m.str()?;
                if !matches!(v.as_str(), "UNDEFINED" | "CLIENT" | "SERVER" | "CLIENT_AND_SERVER") {
                    return Err(m.error(format!(
                        "unknown value {v:?}; expected one of UNDEFINED, CLIENT, SERVER, CLIENT_AND_SERVER"
                    )));
                }
                v
            }
        };
        let ports = mf.list_of("ports", |p| {
            let pf = p.fields()?;
            let number = pf.require("number")?.port()?;
            pf.finish()?;
            Ok(number)
        })?;
        mf.finish()?;
        Ok(WasmTrafficSelector { mode, ports })
    })?;
    Ok(WasmPluginSpec {
        selector,
        target_refs,
        phase,
        priority,
        matches,
        ..WasmPluginSpec::default()
    })
}

/// The module and how it runs: `url`, `sha256`, `imagePullPolicy`, `imagePullSecret`,
/// `verificationKey`, `pluginConfig`, `pluginName`, `failStrategy`, `vmConfig`, `type`. Shared by
/// WasmPlugin (in its spec) and TrafficExtension (under `wasm:`).
pub(super) fn wasm_module(f: &Fields<'_>, spec: &mut WasmPluginSpec) -> Result<()> {
    let url_node = f.require("url")?;
    let url = url_node.non_empty_str()?;
    if let Some((scheme, _)) = url.split_once("://") {
        if !matches!(scheme, "oci" | "file" | "http" | "https") {
            return Err(url_node.error(format!(
                "unsupported scheme {scheme:?}: use oci://, file://, http:// or https://"
            )));
        }
    }
    let sha256 = f.str("sha256")?;
    if let Some(sum) = &sha256 {
        let ok = sum.len() == 64
            && sum
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return Err(f.error_at("sha256", "must be 64 lowercase hexadecimal characters"));
        }
    }
    let image_pull_policy = match f.get("imagePullPolicy") {
        None => None,
        Some(n) => {
            let v = n.str()?;
            if !matches!(v.as_str(), "UNSPECIFIED_POLICY" | "IfNotPresent" | "Always") {
                return Err(n.error(format!(
                    "unknown value {v:?}; expected one of UNSPECIFIED_POLICY, IfNotPresent, Always"
                )));
            }
            Some(v)
        }
    };
    let image_pull_secret = f.str("imagePullSecret")?;
    let verification_key = f.str("verificationKey")?;
    let plugin_config = f.get("pluginConfig").map(|n| n.json()).transpose()?;
    if let Some(cfg) = &plugin_config {
        if !cfg.is_object() {
            return Err(f.error_at("pluginConfig", "expected a mapping"));
        }
    }
    let plugin_name = f.str("pluginName")?;
    let fail_strategy = enum_value(
        f.get("failStrategy"),
        &[
            ("FAIL_CLOSE", FailStrategy::FailClose),
            ("FAIL_OPEN", FailStrategy::FailOpen),
            ("FAIL_RELOAD", FailStrategy::FailReload),
        ],
        FailStrategy::FailClose,
    )?;
    let vm_env = match f.get("vmConfig") {
        None => Vec::new(),
        Some(vm) => {
            let vf = vm.fields()?;
            let env = vf.list_of("env", wasm_env)?;
            vf.finish()?;
            let mut seen = BTreeSet::new();
            for (i, e) in env.iter().enumerate() {
                if !seen.insert(&e.name) {
                    return Err(FieldError {
                        field: format!("{}.env[{i}].name", vm.path),
                        message: format!("duplicate env name {:?}", e.name),
                    });
                }
            }
            env
        }
    };
    let plugin_type = enum_value(
        f.get("type"),
        &[
            ("UNSPECIFIED_PLUGIN_TYPE", WasmPluginType::Unspecified),
            ("HTTP", WasmPluginType::Http),
            ("NETWORK", WasmPluginType::Network),
        ],
        WasmPluginType::Unspecified,
    )?;
    spec.url = url;
    spec.sha256 = sha256;
    spec.image_pull_policy = image_pull_policy;
    spec.image_pull_secret = image_pull_secret;
    spec.verification_key = verification_key;
    spec.plugin_config = plugin_config;
    spec.plugin_name = plugin_name;
    spec.fail_strategy = fail_strategy;
    spec.vm_env = vm_env;
    spec.plugin_type = plugin_type;
    Ok(())
}

fn wasm_env(node: &Node<'_>) -> Result<WasmEnvVar> {
    let f = node.fields()?;
    let name = f.require("name")?.non_empty_str()?;
    let from_host = enum_value(
        f.get("valueFrom"),
        &[("INLINE", false), ("HOST", true)],
        false,
    )?;
    let value = f.str("value")?.unwrap_or_default();
    if from_host && !value.is_empty() {
        return Err(f.error_at("value", "must be empty when valueFrom is HOST"));
    }
    f.finish()?;
    Ok(WasmEnvVar {
        name,
        from_host,
        value,
    })
}
