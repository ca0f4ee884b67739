//! Kubernetes/Istio manifests in, typed objects out: the subset of the Kubernetes API the local
//! mesh serves, read from the multi-document YAML `kubectl apply -f` takes.
//!
//! Supported kinds: `v1` Namespace, ServiceAccount, Pod, Service (and `v1` List of them),
//! `apps/v1` Deployment, `security.istio.io/v1|v1beta1` AuthorizationPolicy and
//! PeerAuthentication, `gateway.networking.k8s.io/v1|v1beta1` Gateway and HTTPRoute,
//! `gateway.networking.k8s.io/v1` GRPCRoute, `extensions.istio.io/v1alpha1` WasmPlugin and
//! TrafficExtension (its Wasm form).
//! Anything else is refused, naming the document.
//!
//! Strictness follows what a real cluster does with `kubectl apply` (strict field validation):
//! metadata is read leniently (uid, resourceVersion, managedFields... are what `kubectl get -o
//! yaml` prints and are ignored), `status` is ignored, fields with a meaning here are validated
//! like the API server and istiod validate them, fields that only a real kubelet or scheduler
//! uses are accepted and ignored, and any other field is an error naming its path — a misspelt
//! `selectr:` must not silently widen a policy.

mod decode;
mod gateway;
mod istio;
mod kube;
mod names;
mod traffic_extension;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::Deserialize;
use serde_yaml::Value;

use decode::{FieldError, Fields, Node};

pub use gateway::{
    parse_duration, BackendRef, Fraction, Gateway, GatewaySpec, HeaderModifier, HttpBackendRef,
    HttpRoute, HttpRouteFilter, HttpRouteMatch, HttpRouteRetry, HttpRouteRule, HttpRouteSpec,
    HttpRouteTimeouts, Listener, ParentRef, PathMatch, PathMatchType, PathModifier, RequestMirror,
    RequestRedirect, UrlRewrite, ValueMatch, ValueMatchType, GATEWAY_API_GROUP,
};
pub use istio::{
    AuthorizationAction, AuthorizationPolicy, AuthorizationPolicySpec, AuthorizationRule,
    Condition, FailStrategy, MtlsMode, Operation, PeerAuthentication, PeerAuthenticationSpec,
    PolicyTargetRef, Source, WasmApi, WasmEnvVar, WasmPhase, WasmPlugin, WasmPluginSpec,
    WasmPluginType, WasmTrafficSelector,
};
pub use kube::{
    selector_matches, ClusterIp, Container, ContainerPort, Deployment, DeploymentSpec, EnvValue,
    EnvVar, Namespace, Pod, PodSpec, PodTemplate, Probe, ProbeAction, ProbeKind, Probes, Protocol,
    RestartPolicy, Service, ServiceAccount, ServicePort, ServiceSpec, TargetPort,
};

/// Where namespaced objects without `metadata.namespace` go, as with `kubectl apply`.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The kinds of object the local mesh understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    ServiceAccount,
    Service,
    Deployment,
    Pod,
    AuthorizationPolicy,
    PeerAuthentication,
    Gateway,
    HttpRoute,
    GrpcRoute,
    WasmPlugin,
    TrafficExtension,
}

impl Kind {
    pub const ALL: [Kind; 12] = [
        Kind::Namespace,
        Kind::ServiceAccount,
        Kind::Service,
        Kind::Deployment,
        Kind::Pod,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
        Kind::Gateway,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::WasmPlugin,
        Kind::TrafficExtension,
    ];

    /// The `kind:` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::Service => "Service",
            Kind::Deployment => "Deployment",
            Kind::Pod => "Pod",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::Gateway => "Gateway",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::WasmPlugin => "WasmPlugin",
            Kind::TrafficExtension => "TrafficExtension",
        }
    }

    /// The `apiVersion`s served for this kind.
    pub fn api_versions(self) -> &'static [&'static str] {
        match self {
            Kind::Namespace | Kind::ServiceAccount | Kind::Service | Kind::Pod => &["v1"],
            Kind::Deployment => &["apps/v1"],
            Kind::AuthorizationPolicy | Kind::PeerAuthentication => {
                &["security.istio.io/v1", "security.istio.io/v1beta1"]
            }
            Kind::Gateway | Kind::HttpRoute => &[
                "gateway.networking.k8s.io/v1",
                "gateway.networking.k8s.io/v1beta1",
            ],
            Kind::GrpcRoute => &["gateway.networking.k8s.io/v1"],
            Kind::WasmPlugin | Kind::TrafficExtension => &["extensions.istio.io/v1alpha1"],
        }
    }

    /// Whether objects of this kind live in a namespace (all but Namespace).
    pub fn is_namespaced(self) -> bool {
        self != Kind::Namespace
    }

    /// kubectl's `<resource>.<group>` spelling, as in `deployment.apps/echo created`.
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Namespace => "namespace",
            Kind::ServiceAccount => "serviceaccount",
            Kind::Service => "service",
            Kind::Deployment => "deployment.apps",
            Kind::Pod => "pod",
            Kind::AuthorizationPolicy => "authorizationpolicy.security.istio.io",
            Kind::PeerAuthentication => "peerauthentication.security.istio.io",
            Kind::Gateway => "gateway.gateway.networking.k8s.io",
            Kind::HttpRoute => "httproute.gateway.networking.k8s.io",
            Kind::GrpcRoute => "grpcroute.gateway.networking.k8s.io",
            Kind::WasmPlugin => "wasmplugin.extensions.istio.io",
            Kind::TrafficExtension => "trafficextension.extensions.istio.io",
        }
    }

    /// Checks an object name the way the API server does for this kind.
    fn validate_name(self, name: &str) -> Result<(), String> {
        match self {
            Kind::Namespace => names::dns1123_label(name),
            // Service names become DNS labels under `svc`, so they must start with a letter.
            Kind::Service => names::dns1035_label(name),
            _ => names::dns1123_subdomain(name),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = String;

    /// Accepts what kubectl accepts for these kinds: the kind, its plural, its short name, in
    /// any case, optionally with the group (`deployments.apps`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        let base = lower.split('.').next().unwrap_or_default();
        Ok(match base {
            "namespace" | "namespaces" | "ns" => Kind::Namespace,
            "serviceaccount" | "serviceaccounts" | "sa" => Kind::ServiceAccount,
            "service" | "services" | "svc" => Kind::Service,
            "deployment" | "deployments" | "deploy" => Kind::Deployment,
            "pod" | "pods" | "po" => Kind::Pod,
            "authorizationpolicy" | "authorizationpolicies" | "ap" => Kind::AuthorizationPolicy,
            "peerauthentication" | "peerauthentications" | "pa" => Kind::PeerAuthentication,
            "gateway" | "gateways" | "gtw" => Kind::Gateway,
            "httproute" | "httproutes" => Kind::HttpRoute,
            "grpcroute" | "grpcroutes" => Kind::GrpcRoute,
            "wasmplugin" | "wasmplugins" => Kind::WasmPlugin,
            "trafficextension" | "trafficextensions" => Kind::TrafficExtension,
            _ => {
                let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
                return Err(format!(
                    "unknown resource type {s:?}; known: {}",
                    known.join(", ")
                ));
            }
        })
    }
}

/// Which object: kind, namespace (empty for namespaces themselves) and name. Orders by kind,
/// then namespace, then name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        ObjectRef {
            kind,
            namespace: if kind.is_namespaced() {
                namespace.to_owned()
            } else {
                String::new()
            },
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for ObjectRef {
    /// `Pod default/sleep`, `Namespace demo`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = if self.name.is_empty() {
            "<no name>"
        } else {
            &self.name
        };
        if self.kind.is_namespaced() {
            write!(f, "{} {}/{name}", self.kind, self.namespace)
        } else {
            write!(f, "{} {name}", self.kind)
        }
    }
}

/// The metadata the local mesh keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metadata {
    pub name: String,
    /// Empty for cluster-scoped objects (Namespace).
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// One object of a supported kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    Service(Service),
    Deployment(Deployment),
    Pod(Pod),
    AuthorizationPolicy(AuthorizationPolicy),
    PeerAuthentication(PeerAuthentication),
    Gateway(Gateway),
    HttpRoute(HttpRoute),
    /// A GRPCRoute, translated as istiod translates it: method matches become path matches
    /// (`/<service>/<method>`), the rest is what an HTTPRoute rule holds.
    GrpcRoute(HttpRoute),
    /// A WasmPlugin, or a TrafficExtension's Wasm form ([`WasmPlugin::api`] says which).
    WasmPlugin(WasmPlugin),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::ServiceAccount(_) => Kind::ServiceAccount,
            Object::Service(_) => Kind::Service,
            Object::Deployment(_) => Kind::Deployment,
            Object::Pod(_) => Kind::Pod,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::PeerAuthentication(_) => Kind::PeerAuthentication,
            Object::Gateway(_) => Kind::Gateway,
            Object::HttpRoute(_) => Kind::HttpRoute,
            Object::GrpcRoute(_) => Kind::GrpcRoute,
            Object::WasmPlugin(o) => o.kind(),
        }
    }

    pub fn metadata(&self) -> &Metadata {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::ServiceAccount(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::Deployment(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::AuthorizationPolicy(o) => &o.metadata,
            Object::PeerAuthentication(o) => &o.metadata,
            Object::Gateway(o) => &o.metadata,
            Object::HttpRoute(o) | Object::GrpcRoute(o) => &o.metadata,
            Object::WasmPlugin(o) => &o.metadata,
        }
    }

    pub fn metadata_mut(&mut self) -> &mut Metadata {
        match self {
            Object::Namespace(o) => &mut o.metadata,
            Object::ServiceAccount(o) => &mut o.metadata,
            Object::Service(o) => &mut o.metadata,
            Object::Deployment(o) => &mut o.metadata,
            Object::Pod(o) => &mut o.metadata,
            Object::AuthorizationPolicy(o) => &mut o.metadata,
            Object::PeerAuthentication(o) => &mut o.metadata,
            Object::Gateway(o) => &mut o.metadata,
            Object::HttpRoute(o) | Object::GrpcRoute(o) => &mut o.metadata,
            Object::WasmPlugin(o) => &mut o.metadata,
        }
    }

    pub fn object_ref(&self) -> ObjectRef {
        let m = self.metadata();
        ObjectRef::new(self.kind(), &m.namespace, &m.name)
    }
}

/// Why manifests (or an operation on the cluster state) were refused. Every variant names the
/// document or object, and for field problems the field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The text is not YAML.
    #[error("document {document}: invalid YAML at line {line}, column {column}: {message}")]
    Yaml {
        /// 1-based position of the document in the stream.
        document: usize,
        line: usize,
        column: usize,
        message: String,
    },
    /// The document is not a Kubernetes object at all (not a mapping, no apiVersion/kind).
    #[error("document {document}: {message}")]
    Document { document: usize, message: String },
    /// A kind or apiVersion the local mesh does not serve.
    #[error(
        "document {document}{}: unsupported object {kind:?} in apiVersion {api_version:?}: {hint}",
        name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default()
    )]
    UnsupportedKind {
        document: usize,
        api_version: String,
        kind: String,
        name: Option<String>,
        hint: String,
    },
    /// A field has a bad value, is missing, or is unknown.
    #[error("{object}: {}{message}", if field.is_empty() { String::new() } else { format!("{field}: ") })]
    Invalid {
        object: ObjectRef,
        field: String,
        message: String,
    },
    /// The same object twice in one apply.
    #[error("{object} appears more than once in one apply")]
    Duplicate { object: ObjectRef },
    /// A namespaced object in a namespace that does not exist (and is not created by the same
    /// apply).
    #[error("{object}: namespace {namespace:?} not found; create it first (or in the same apply)")]
    NamespaceNotFound {
        object: ObjectRef,
        namespace: String,
    },
    /// Delete or label of an object that does not exist.
    #[error("{object} not found")]
    NotFound { object: ObjectRef },
    /// The change is valid YAML but not allowed (immutable fields, name clashes, protected
    /// namespaces).
    #[error("{object}: {message}")]
    Forbidden { object: ObjectRef, message: String },
}

impl ManifestError {
    fn invalid(object: &ObjectRef, err: FieldError) -> Self {
        ManifestError::Invalid {
            object: object.clone(),
            field: err.field,
            message: err.message,
        }
    }

    /// The object the error is about, when there is one.
    pub fn object(&self) -> Option<&ObjectRef> {
        match self {
            ManifestError::Invalid { object, .. }
            | ManifestError::Duplicate { object }
            | ManifestError::NamespaceNotFound { object, .. }
            | ManifestError::NotFound { object }
            | ManifestError::Forbidden { object, .. } => Some(object),
            _ => None,
        }
    }
}

/// Parses a multi-document manifest; objects without a namespace go to `default`.
pub fn parse(text: &str) -> Result<Vec<Object>, ManifestError> {
    parse_in(text, DEFAULT_NAMESPACE)
}

/// Parses a multi-document manifest (`---` separated; empty documents skipped), putting
/// namespaced objects that name no namespace into `default_namespace` (`kubectl apply -n`).
/// Objects come out in document order.
pub fn parse_in(text: &str, default_namespace: &str) -> Result<Vec<Object>, ManifestError> {
    Ok(parse_documents(text, default_namespace)?.unwrap_or_default())
}

/// Like [`parse_in`], but tells a text with no document at all (empty, blanks, comments, bare
/// `---`: `None`) from one whose documents hold no object (an empty `List`: `Some` of nothing),
/// for readers of files where an empty text may be a truncated one.
pub fn parse_documents(
    text: &str,
    default_namespace: &str,
) -> Result<Option<Vec<Object>>, ManifestError> {
    let mut objects = Vec::new();
    let mut any_document = false;
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value = Value::deserialize(document).map_err(|err| {
            let (line, column) = err.location().map_or((0, 0), |l| (l.line(), l.column()));
            ManifestError::Yaml {
                document: index,
                line,
                column,
                message: err.to_string(),
            }
        })?;
        any_document |= !value.is_null();
        decode_document(index, &value, default_namespace, &mut objects)?;
    }
    Ok(any_document.then_some(objects))
}

fn decode_document(
    document: usize,
    value: &Value,
    default_namespace: &str,
    out: &mut Vec<Object>,
) -> Result<(), ManifestError> {
    let doc_error = |message: String| ManifestError::Document { document, message };
    let map = match value {
        // `---` followed by nothing, or only comments.
        Value::Null => return Ok(()),
        Value::Mapping(map) => map,
        _ => {
            return Err(doc_error(
                "expected a Kubernetes object (a mapping with apiVersion, kind and metadata)"
                    .into(),
            ))
        }
    };
    let text_field = |key: &str| -> Result<String, ManifestError> {
        match map.get(key) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::String(_)) | None | Some(Value::Null) => {
                Err(doc_error(format!("{key}: required field is missing")))
            }
            Some(_) => Err(doc_error(format!("{key}: expected a string"))),
        }
    };
    let api_version = text_field("apiVersion")?;
    let kind_name = text_field("kind")?;
    if kind_name == "List" && api_version == "v1" {
        // `kubectl get -o yaml` output for several objects.
        let items = match map.get("items") {
            Some(Value::Sequence(items)) => items,
            None | Some(Value::Null) => return Ok(()),
            Some(_) => return Err(doc_error("items: expected a list".into())),
        };
        for item in items {
            decode_document(document, item, default_namespace, out)?;
        }
        return Ok(());
    }
    let name_hint = map
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let Some(kind) = Kind::ALL.into_iter().find(|k| k.as_str() == kind_name) else {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        return Err(ManifestError::UnsupportedKind {
            document,
            api_version,
            kind: kind_name,
            name: name_hint,
            hint: format!("the local mesh supports {}", known.join(", ")),
        });
    };
    if !kind.api_versions().contains(&api_version.as_str()) {
        return Err(ManifestError::UnsupportedKind {
            document,
            api_version,
            kind: kind_name,
            name: name_hint,
            hint: format!("{kind} is served as {}", kind.api_versions().join(", ")),
        });
    }
    // The object's identity, read leniently first so that every later error can name it.
    let meta_value = map.get("metadata");
    let namespace = if kind.is_namespaced() {
        meta_value
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .filter(|ns| !ns.is_empty())
            .unwrap_or(default_namespace)
            .to_owned()
    } else {
        String::new()
    };
    let object = ObjectRef {
        kind,
        namespace,
        name: name_hint.unwrap_or_default(),
    };
    let decoded = decode_object(&object, value).map_err(|e| ManifestError::invalid(&object, e))?;
    out.push(decoded);
    Ok(())
}

fn decode_object(object: &ObjectRef, value: &Value) -> Result<Object, FieldError> {
    let root = Node::root(value).fields()?;
    root.ignore(&["apiVersion", "kind", "status"]);
    let metadata = metadata(&root, object)?;
    let spec = root.get("spec");
    let required_spec = || root.require("spec");
    let decoded = match object.kind {
        Kind::Namespace => {
            // `spec.finalizers` is all a Namespace spec holds.
            root.ignore(&["spec"]);
            Object::Namespace(Namespace { metadata })
        }
        Kind::ServiceAccount => {
            root.ignore(&[
                "automountServiceAccountToken",
                "imagePullSecrets",
                "secrets",
            ]);
            Object::ServiceAccount(ServiceAccount { metadata })
        }
        Kind::Pod => Object::Pod(Pod {
            metadata,
            spec: kube::pod_spec(&required_spec()?)?,
            owner: None,
        }),
        Kind::Deployment => Object::Deployment(Deployment {
            metadata,
            spec: kube::deployment_spec(&required_spec()?)?,
        }),
        Kind::Service => Object::Service(Service {
            metadata,
            spec: kube::service_spec(&required_spec()?)?,
        }),
        Kind::AuthorizationPolicy => Object::AuthorizationPolicy(AuthorizationPolicy {
            metadata,
            spec: istio::authorization_policy_spec(spec)?,
        }),
        Kind::PeerAuthentication => Object::PeerAuthentication(PeerAuthentication {
            metadata,
            spec: istio::peer_authentication_spec(spec)?,
        }),
        Kind::WasmPlugin => Object::WasmPlugin(WasmPlugin {
            metadata,
            spec: istio::wasm_plugin_spec(&required_spec()?)?,
            api: WasmApi::WasmPlugin,
        }),
        Kind::TrafficExtension => Object::WasmPlugin(WasmPlugin {
            metadata,
            spec: traffic_extension::traffic_extension_spec(&required_spec()?)?,
            api: WasmApi::TrafficExtension,
        }),
        Kind::Gateway => Object::Gateway(Gateway {
            metadata,
            spec: gateway::gateway_spec(&required_spec()?)?,
        }),
        Kind::HttpRoute => Object::HttpRoute(HttpRoute {
            metadata,
            spec: gateway::http_route_spec(&required_spec()?)?,
        }),
        Kind::GrpcRoute => Object::GrpcRoute(HttpRoute {
            metadata,
            spec: gateway::grpc_route_spec(&required_spec()?)?,
        }),
    };
    root.finish()?;
    Ok(decoded)
}

/// `metadata`: name, namespace, labels and annotations are read and checked; the rest
/// (uid, resourceVersion, creationTimestamp, managedFields, ownerReferences...) is what a
/// cluster adds and is ignored.
fn metadata(root: &Fields<'_>, object: &ObjectRef) -> Result<Metadata, FieldError> {
    let node = root.require("metadata")?;
    let f = node.fields()?;
    let name = match f.get("name") {
        Some(n) => n.str()?,
        None if f.get("generateName").is_some() => {
            return Err(f.error_at(
                "name",
                "required: generateName is not supported by apply, set a name",
            ))
        }
        None => return Err(f.error_at("name", "required field is missing")),
    };
    object
        .kind
        .validate_name(&name)
        .map_err(|e| f.error_at("name", e))?;
    if object.kind.is_namespaced() {
        if let Some(ns) = f.str("namespace")? {
            names::dns1123_label(&ns).map_err(|e| f.error_at("namespace", e))?;
        }
    }
    let labels = f.string_map("labels")?;
    kube::validate_labels(&labels, &format!("{}.labels", node.path))?;
    let annotations = f.string_map("annotations")?;
    kube::validate_annotations(&annotations, &format!("{}.annotations", node.path))?;
    Ok(Metadata {
        name,
        namespace: object.namespace.clone(),
        labels,
        annotations,
    })
}

/// Checks a label key and (when setting) value, as `kubectl label` would.
pub fn validate_label(key: &str, value: Option<&str>) -> Result<(), String> {
    names::qualified_name(key)?;
    if let Some(v) = value {
        names::label_value(v)?;
    }
    Ok(())
}

/// Parses one `kubectl label` argument: `key=value` sets, `key-` removes.
pub fn parse_label_arg(arg: &str) -> Result<(String, Option<String>), String> {
    let parsed = if let Some((k, v)) = arg.split_once('=') {
        (k.to_owned(), Some(v.to_owned()))
    } else if let Some(k) = arg.strip_suffix('-') {
        (k.to_owned(), None)
    } else {
        return Err(format!(
            "{arg:?}: expected key=value to set a label or key- to remove it"
        ));
    };
    validate_label(&parsed.0, parsed.1.as_deref())?;
    Ok(parsed)
}

#[cfg(test)]
mod tests;
