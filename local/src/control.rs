//! The cluster's desired state — the local mesh's "API server" — and its translation into
//! ztunnel configuration ("istiod").
//!
//! [`ClusterState`] holds the applied objects. Changes are all-or-nothing: [`ClusterState::apply`]
//! works on a copy, validates the result as a whole (namespaces exist, service accounts exist,
//! pod names are free, pod specs are not mutated) and only then replaces the state, so a bad
//! manifest leaves everything as it was. Each change returns a [`ChangeSet`] saying what
//! happened to each object (as `kubectl` prints it) and to each pod (what the runner must start,
//! stop, restart or re-check for enrollment).
//!
//! Kubernetes behaviours kept: Deployments own their pods (`<deployment>-<i>`), which follow
//! scaling and template changes, and a deleted owned pod comes back; deleting a Namespace deletes
//! everything in it; `default`, `kube-system`, `kube-public` and the root namespace
//! `istio-system` always exist; labels and annotations set by [`ClusterState::label`] /
//! [`ClusterState::annotate`] survive a re-apply of the object unless the manifest itself
//! manages that key (kubectl's three-way merge, for metadata).

mod authz;
mod waypoints;
mod ztunnel;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

pub use authz::{
    convert_authorization_policy, convert_peer_authentication, static_strict_policy, string_match,
    Conversion, CONVERTED_PEER_AUTHENTICATION_PREFIX, DRY_RUN_ANNOTATION, STATIC_STRICT_POLICY,
};
pub use waypoints::{
    Binding, Route, Traffic, WaypointRef, USE_WAYPOINT, USE_WAYPOINT_NAMESPACE, WAYPOINT_FOR,
};
pub use ztunnel::{
    ztunnel_config, RunningPod, CLUSTER_ID, DOMAIN_SUFFIX, UNREACHABLE_WAYPOINT_DOMAIN,
};

use crate::manifest::{
    validate_label, AuthorizationPolicy, Deployment, Gateway, HttpRoute, Kind, ManifestError,
    Metadata, MtlsMode, Namespace, Object, ObjectRef, PeerAuthentication, Pod, PodSpec, Service,
    ServiceAccount, WasmPlugin,
};

/// Istio's root namespace: namespace-less policies here are mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// Namespaces that always exist and cannot be deleted.
pub const BUILTIN_NAMESPACES: &[&str] = &["default", "kube-public", "kube-system", ROOT_NAMESPACE];

/// The GatewayClass of waypoints.
pub const WAYPOINT_GATEWAY_CLASS: &str = "istio-waypoint";

/// The service account every namespace has without a manifest.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// One stored object.
#[derive(Clone, Debug)]
struct Entry {
    object: Object,
    /// Labels and annotations as last written by a manifest (for the three-way merge).
    applied_labels: BTreeMap<String, String>,
    applied_annotations: BTreeMap<String, String>,
    /// Creation order: the oldest PeerAuthentication wins conflicts, and a pod re-created under
    /// the same name gets a new number (the runner must restart it).
    created: u64,
}

/// The desired state of the local cluster.
#[derive(Clone, Debug)]
pub struct ClusterState {
    objects: BTreeMap<ObjectRef, Entry>,
    next_created: u64,
}

impl Default for ClusterState {
    fn default() -> Self {
        Self::new()
    }
}

/// What happened to one object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeAction {
    Created,
    Configured,
    Unchanged,
    Deleted,
    Labeled,
    Annotated,
}

impl fmt::Display for ChangeAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChangeAction::Created => "created",
            ChangeAction::Configured => "configured",
            ChangeAction::Unchanged => "unchanged",
            ChangeAction::Deleted => "deleted",
            ChangeAction::Labeled => "labeled",
            ChangeAction::Annotated => "annotated",
        })
    }
}

/// A pod, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The outcome of one apply, delete, label or annotate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeSet {
    /// Each object the request named, in request order. Objects removed along with a deleted
    /// Namespace or Deployment are not listed; their pods show in `pods_removed`.
    pub objects: Vec<(ObjectRef, ChangeAction)>,
    /// Pods to start.
    pub pods_added: Vec<PodKey>,
    /// Pods to stop.
    pub pods_removed: Vec<PodKey>,
    /// Pods to restart: re-created under the same name, or their spec (image) changed.
    pub pods_replaced: Vec<PodKey>,
    /// Pods whose labels or annotations, or whose namespace's labels, changed: enrollment and
    /// waypoint use must be re-evaluated.
    pub pods_relabeled: Vec<PodKey>,
    /// What istiod would report in the status of the objects applied (policy parts ztunnel
    /// cannot enforce, and similar).
    pub warnings: Vec<String>,
}

impl ChangeSet {
    /// Whether the state is exactly as before.
    pub fn is_noop(&self) -> bool {
        self.objects
            .iter()
            .all(|(_, a)| *a == ChangeAction::Unchanged)
            && self.pods_added.is_empty()
            && self.pods_removed.is_empty()
            && self.pods_replaced.is_empty()
            && self.pods_relabeled.is_empty()
    }
}

impl fmt::Display for ChangeSet {
    /// kubectl's output: `namespace/demo created`, then `Warning: ...` lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (object, action) in &self.objects {
            writeln!(f, "{}/{} {action}", object.kind.resource(), object.name)?;
        }
        for warning in &self.warnings {
            writeln!(f, "Warning: {warning}")?;
        }
        Ok(())
    }
}

/// `live` after a manifest that used to set `last_applied` now sets `desired`: keys the manifest
/// dropped go, keys it sets win, keys it never managed (set by `label`) stay.
fn merge_metadata_map(
    live: &BTreeMap<String, String>,
    last_applied: &BTreeMap<String, String>,
    desired: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut merged = live.clone();
    for key in last_applied.keys() {
        if !desired.contains_key(key) {
            merged.remove(key);
        }
    }
    merged.extend(desired.iter().map(|(k, v)| (k.clone(), v.clone())));
    merged
}

/// A pod spec with container images blanked: the part Kubernetes does not let an update change.
fn immutable_part(spec: &PodSpec) -> PodSpec {
    let mut spec = spec.clone();
    for c in &mut spec.containers {
        c.image.clear();
    }
    spec
}

macro_rules! typed_accessors {
    ($($(#[$doc:meta])* $all:ident, $one:ident: $kind:ident => $ty:ty;)*) => {
        $(
            $(#[$doc])*
            pub fn $all(&self) -> impl Iterator<Item = &$ty> + '_ {
                self.of_kind(Kind::$kind).filter_map(|o| match o {
                    Object::$kind(x) => Some(x),
                    _ => None,
                })
            }

            pub fn $one(&self, namespace: &str, name: &str) -> Option<&$ty> {
                match self.get(&ObjectRef::new(Kind::$kind, namespace, name)) {
                    Some(Object::$kind(x)) => Some(x),
                    _ => None,
                }
            }
        )*
    };
}

impl ClusterState {
    /// An empty cluster with the built-in namespaces.
    pub fn new() -> Self {
        let mut state = ClusterState {
            objects: BTreeMap::new(),
            next_created: 0,
        };
        for name in BUILTIN_NAMESPACES {
            state.insert(
                Object::Namespace(Namespace {
                    metadata: Metadata {
                        name: (*name).into(),
                        labels: BTreeMap::from([(
                            "kubernetes.io/metadata.name".to_owned(),
                            (*name).to_owned(),
                        )]),
                        ..Metadata::default()
                    },
                }),
                BTreeMap::new(),
                BTreeMap::new(),
            );
        }
        state
    }

    fn insert(
        &mut self,
        object: Object,
        applied_labels: BTreeMap<String, String>,
        applied_annotations: BTreeMap<String, String>,
    ) {
        let created = self.next_created;
        self.next_created += 1;
        self.objects.insert(
            object.object_ref(),
            Entry {
                object,
                applied_labels,
                applied_annotations,
                created,
            },
        );
    }

    /// Every object, ordered by kind, namespace, name (Deployment pods included).
    pub fn objects(&self) -> impl Iterator<Item = &Object> + '_ {
        self.objects.values().map(|e| &e.object)
    }

    pub fn get(&self, object: &ObjectRef) -> Option<&Object> {
        self.objects.get(object).map(|e| &e.object)
    }

    fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Object> + '_ {
        self.objects
            .range(ObjectRef::new(kind, "", "")..)
            .take_while(move |(k, _)| k.kind == kind)
            .map(|(_, e)| &e.object)
    }

    typed_accessors! {
        /// Namespaces, built-in ones included.
        namespaces, namespace_in: Namespace => Namespace;
        service_accounts, service_account: ServiceAccount => ServiceAccount;
        services, service: Service => Service;
        deployments, deployment: Deployment => Deployment;
        /// All pods, applied directly or owned by a Deployment.
        pods, pod: Pod => Pod;
        authorization_policies, authorization_policy: AuthorizationPolicy => AuthorizationPolicy;
        peer_authentications, peer_authentication: PeerAuthentication => PeerAuthentication;
        gateways, gateway: Gateway => Gateway;
        http_routes, http_route: HttpRoute => HttpRoute;
        /// GRPCRoutes, translated to HTTPRoute rules.
        grpc_routes, grpc_route: GrpcRoute => HttpRoute;
    }

    /// WasmPlugins, and TrafficExtensions (their Wasm form, the same object).
    pub fn wasm_plugins(&self) -> impl Iterator<Item = &WasmPlugin> + '_ {
        self.of_kind(Kind::WasmPlugin)
            .chain(self.of_kind(Kind::TrafficExtension))
            .filter_map(|o| match o {
                Object::WasmPlugin(x) => Some(x),
                _ => None,
            })
    }

    /// The namespace `name`.
    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespace_in("", name)
    }

    /// A namespace's labels (enrollment reads `istio.io/dataplane-mode` here).
    pub fn namespace_labels(&self, name: &str) -> Option<&BTreeMap<String, String>> {
        self.namespace(name).map(|n| &n.metadata.labels)
    }

    /// `namespace/name` of the AuthorizationPolicies and PeerAuthentications, for status output.
    pub fn policy_names(&self) -> Vec<String> {
        self.objects
            .keys()
            .filter(|k| matches!(k.kind, Kind::AuthorizationPolicy | Kind::PeerAuthentication))
            .map(|k| format!("{}/{}", k.namespace, k.name))
            .collect()
    }

    /// `namespace/name` of the waypoints: Gateways of class `istio-waypoint`.
    pub fn waypoint_names(&self) -> Vec<String> {
        self.gateways()
            .filter(|g| g.spec.gateway_class_name == WAYPOINT_GATEWAY_CLASS)
            .map(|g| format!("{}/{}", g.metadata.namespace, g.metadata.name))
            .collect()
    }

    /// What the waypoint `namespace/name` enforces at L7: the HTTPRoutes and GRPCRoutes attached (by a Service
    /// `parentRef`) to a Service bound to it with `istio.io/use-waypoint`, and the
    /// AuthorizationPolicies whose `targetRefs` name its Gateway, the `istio-waypoint`
    /// GatewayClass (from the root namespace), or one of those Services, and the WasmPlugins
    /// whose `targetRefs` name its Gateway or one of those Services. In object order.
    pub fn waypoint_l7_objects(&self, namespace: &str, name: &str) -> Vec<ObjectRef> {
        let bound: BTreeSet<(String, String)> = self
            .services()
            .filter(|s| {
                matches!(self.service_binding(s),
                    Some(Binding::Bound(w)) if w.namespace == namespace && w.name == name)
            })
            .map(|s| (s.metadata.namespace.clone(), s.metadata.name.clone()))
            .collect();
        let attached = |r: &&HttpRoute| {
            r.spec.parent_refs.iter().any(|p| {
                (p.group.is_empty() || p.group == "core")
                    && p.kind == "Service"
                    && bound.contains(&(
                        p.namespace
                            .clone()
                            .unwrap_or_else(|| r.metadata.namespace.clone()),
                        p.name.clone(),
                    ))
            })
        };
        let routes = self
            .http_routes()
            .filter(attached)
            .map(|r| (Kind::HttpRoute, r))
            .chain(
                self.grpc_routes()
                    .filter(attached)
                    .map(|r| (Kind::GrpcRoute, r)),
            );
        let policies = self.authorization_policies().filter(|p| {
            let ns = &p.metadata.namespace;
            p.spec.target_refs.iter().any(|t| match t.kind.as_str() {
                "Gateway" => ns == namespace && t.name == name,
                "GatewayClass" => ns == ROOT_NAMESPACE && t.name == WAYPOINT_GATEWAY_CLASS,
                "Service" => bound.contains(&(ns.clone(), t.name.clone())),
                _ => false,
            })
        });
        // WasmPlugins, like policies, name the Gateway or a bound Service (same namespace).
        let plugins = self.wasm_plugins().filter(|p| {
            let ns = &p.metadata.namespace;
            p.spec.target_refs.iter().any(|t| match t.kind.as_str() {
                "Gateway" => ns == namespace && t.name == name,
                "Service" => bound.contains(&(ns.clone(), t.name.clone())),
                _ => false,
            })
        });
        routes
            .map(|(kind, r)| ObjectRef::new(kind, &r.metadata.namespace, &r.metadata.name))
            .chain(policies.map(|p| {
                ObjectRef::new(
                    Kind::AuthorizationPolicy,
                    &p.metadata.namespace,
                    &p.metadata.name,
                )
            }))
            .chain(
                plugins.map(|p| ObjectRef::new(p.kind(), &p.metadata.namespace, &p.metadata.name)),
            )
            .collect()
    }

    /// The Services that send to `pod`.
    pub fn services_for_pod<'a>(&'a self, pod: &'a Pod) -> impl Iterator<Item = &'a Service> + 'a {
        self.services().filter(move |s| s.selects(pod))
    }

    /// PeerAuthentications with their creation order.
    fn aged_peer_authentications(&self) -> Vec<(&PeerAuthentication, u64)> {
        self.objects
            .values()
            .filter_map(|e| match &e.object {
                Object::PeerAuthentication(pa) => Some((pa, e.created)),
                _ => None,
            })
            .collect()
    }

    /// Applies `objects` (create or update) as one change: either all of them take effect or,
    /// on the first problem, none does.
    pub fn apply(&mut self, objects: &[Object]) -> Result<ChangeSet, ManifestError> {
        let mut seen = BTreeSet::new();
        for object in objects {
            let r = object.object_ref();
            if !seen.insert(r.clone()) {
                return Err(ManifestError::Duplicate { object: r });
            }
        }
        let mut next = self.clone();
        let mut actions = Vec::new();
        for object in objects {
            actions.push((object.object_ref(), next.upsert(object)?));
        }
        for object in objects {
            next.check_references(object)?;
        }
        let mut changes = ChangeSet {
            objects: actions,
            ..ChangeSet::default()
        };
        changes.warnings = objects
            .iter()
            .flat_map(|o| {
                let r = o.object_ref();
                apply_warnings(o)
                    .into_iter()
                    .map(move |w| format!("{r}: {w}"))
            })
            .collect();
        diff_pods(self, &next, &mut changes);
        new_waypoint_warnings(self, &next, &mut changes);
        *self = next;
        Ok(changes)
    }

    /// Creates or updates one object in this (candidate) state.
    fn upsert(&mut self, object: &Object) -> Result<ChangeAction, ManifestError> {
        let r = object.object_ref();
        let desired = object.metadata();
        let old = self.objects.get(&r).cloned();
        if let (Object::Pod(new), Some(Object::Pod(live))) =
            (object, old.as_ref().map(|e| &e.object))
        {
            if let Some(owner) = &live.owner {
                return Err(ManifestError::Forbidden {
                    object: r,
                    message: format!(
                        "this pod is managed by Deployment {}/{owner}; change the Deployment \
                         instead",
                        live.metadata.namespace
                    ),
                });
            }
            if immutable_part(&new.spec) != immutable_part(&live.spec) {
                return Err(ManifestError::Forbidden {
                    object: r,
                    message: "spec: pod updates may not change fields other than \
                              spec.containers[*].image; delete the pod and apply it again"
                        .into(),
                });
            }
        }
        let action = match old {
            None => {
                self.insert(
                    object.clone(),
                    desired.labels.clone(),
                    desired.annotations.clone(),
                );
                ChangeAction::Created
            }
            Some(entry) => {
                let mut merged = object.clone();
                let live = entry.object.metadata();
                let m = merged.metadata_mut();
                m.labels = merge_metadata_map(&live.labels, &entry.applied_labels, &desired.labels);
                m.annotations = merge_metadata_map(
                    &live.annotations,
                    &entry.applied_annotations,
                    &desired.annotations,
                );
                let action = if merged == entry.object {
                    ChangeAction::Unchanged
                } else {
                    ChangeAction::Configured
                };
                self.objects.insert(
                    r,
                    Entry {
                        object: merged,
                        applied_labels: desired.labels.clone(),
                        applied_annotations: desired.annotations.clone(),
                        created: entry.created,
                    },
                );
                action
            }
        };
        if let Object::Deployment(deployment) = object {
            self.reconcile_deployment(deployment)?;
        }
        Ok(action)
    }

    /// Brings `deployment`'s pods in line with it: scale up and down, and re-create the pods
    /// whose template changed (same names; the runner restarts them).
    fn reconcile_deployment(&mut self, deployment: &Deployment) -> Result<(), ManifestError> {
        let ns = &deployment.metadata.namespace;
        let name = &deployment.metadata.name;
        let wanted: BTreeSet<String> = (0..deployment.spec.replicas)
            .map(|i| deployment.pod_name(i))
            .collect();
        let owned: Vec<ObjectRef> = self
            .pods()
            .filter(|p| p.metadata.namespace == *ns && p.owner.as_deref() == Some(name))
            .map(|p| ObjectRef::new(Kind::Pod, ns, &p.metadata.name))
            .collect();
        for r in owned {
            if !wanted.contains(&r.name) {
                self.objects.remove(&r);
            }
        }
        for i in 0..deployment.spec.replicas {
            let fresh = deployment.pod(i);
            let r = ObjectRef::new(Kind::Pod, ns, &fresh.metadata.name);
            match self.objects.get(&r) {
                Some(Entry {
                    object: Object::Pod(live),
                    applied_labels,
                    applied_annotations,
                    ..
                }) if live.owner.as_deref() == Some(name) => {
                    // Compared with what the template last stamped (not the live labels, which
                    // `label` may have edited): only a template change re-creates the pod.
                    let stamped = (applied_labels, applied_annotations, &live.spec);
                    let wanted = (
                        &fresh.metadata.labels,
                        &fresh.metadata.annotations,
                        &fresh.spec,
                    );
                    if stamped != wanted {
                        self.objects.remove(&r);
                        self.insert_pod(fresh);
                    }
                }
                Some(_) => {
                    return Err(ManifestError::Forbidden {
                        object: ObjectRef::new(Kind::Deployment, ns, name),
                        message: format!(
                            "its replica {ns}/{} would replace Pod {ns}/{} that it does not own; \
                             rename one of them",
                            fresh.metadata.name, fresh.metadata.name
                        ),
                    })
                }
                None => self.insert_pod(fresh),
            }
        }
        Ok(())
    }

    fn insert_pod(&mut self, pod: Pod) {
        let labels = pod.metadata.labels.clone();
        let annotations = pod.metadata.annotations.clone();
        self.insert(Object::Pod(pod), labels, annotations);
    }

    /// Checks what an applied object refers to: its namespace, and a pod's service account.
    fn check_references(&self, object: &Object) -> Result<(), ManifestError> {
        let r = object.object_ref();
        if r.kind.is_namespaced() && self.namespace(&r.namespace).is_none() {
            return Err(ManifestError::NamespaceNotFound {
                namespace: r.namespace.clone(),
                object: r,
            });
        }
        let (spec, field) = match object {
            Object::Pod(p) => (&p.spec, "spec.serviceAccountName"),
            Object::Deployment(d) => (
                &d.spec.template.spec,
                "spec.template.spec.serviceAccountName",
            ),
            _ => return Ok(()),
        };
        let sa = &spec.service_account_name;
        if sa != DEFAULT_SERVICE_ACCOUNT && self.service_account(&r.namespace, sa).is_none() {
            return Err(ManifestError::Invalid {
                field: field.into(),
                message: format!(
                    "service account {sa:?} not found in namespace {}; apply a ServiceAccount \
                     (in the same apply is fine)",
                    r.namespace
                ),
                object: r,
            });
        }
        Ok(())
    }

    /// Deletes objects as one change (`kubectl delete -f`: only kind, namespace and name count).
    /// Every object must exist beforehand. A Namespace takes its objects along, a Deployment its
    /// pods; a pod owned by a Deployment that stays is re-created, as its ReplicaSet would.
    pub fn delete(&mut self, objects: &[ObjectRef]) -> Result<ChangeSet, ManifestError> {
        let mut seen = BTreeSet::new();
        for r in objects {
            if !seen.insert(r.clone()) {
                return Err(ManifestError::Duplicate { object: r.clone() });
            }
            if !self.objects.contains_key(r) {
                return Err(ManifestError::NotFound { object: r.clone() });
            }
            if r.kind == Kind::Namespace && BUILTIN_NAMESPACES.contains(&r.name.as_str()) {
                return Err(ManifestError::Forbidden {
                    object: r.clone(),
                    message: "this namespace is built in and cannot be deleted".into(),
                });
            }
        }
        let mut next = self.clone();
        let mut actions = Vec::new();
        let mut recreate = Vec::new();
        for r in objects {
            // Already gone with its namespace or Deployment earlier in the same request.
            let Some(entry) = next.objects.remove(r) else {
                actions.push((r.clone(), ChangeAction::Deleted));
                continue;
            };
            actions.push((r.clone(), ChangeAction::Deleted));
            match &entry.object {
                Object::Namespace(ns) => {
                    let name = &ns.metadata.name;
                    next.objects
                        .retain(|k, _| !(k.kind.is_namespaced() && k.namespace == *name));
                }
                Object::Deployment(d) => {
                    let (ns, name) = (&d.metadata.namespace, &d.metadata.name);
                    next.objects.retain(|k, e| match &e.object {
                        Object::Pod(p) => !(k.namespace == *ns && p.owner.as_deref() == Some(name)),
                        _ => true,
                    });
                }
                Object::Pod(p) => {
                    if let Some(owner) = &p.owner {
                        recreate.push((
                            p.metadata.namespace.clone(),
                            owner.clone(),
                            p.metadata.name.clone(),
                        ));
                    }
                }
                _ => {}
            }
        }
        for (ns, owner, pod_name) in recreate {
            let Some(d) = next.deployment(&ns, &owner).cloned() else {
                continue;
            };
            if let Some(i) = (0..d.spec.replicas).find(|&i| d.pod_name(i) == pod_name) {
                next.insert_pod(d.pod(i));
            }
        }
        let mut changes = ChangeSet {
            objects: actions,
            ..ChangeSet::default()
        };
        diff_pods(self, &next, &mut changes);
        new_waypoint_warnings(self, &next, &mut changes);
        *self = next;
        Ok(changes)
    }

    /// [`ClusterState::delete`] for parsed manifests.
    pub fn delete_objects(&mut self, objects: &[Object]) -> Result<ChangeSet, ManifestError> {
        let refs: Vec<ObjectRef> = objects.iter().map(Object::object_ref).collect();
        self.delete(&refs)
    }

    /// `kubectl label`: sets `key` to `value`, or removes it with `None` (`KEY-`). Any kind
    /// can be labeled; `namespace` is ignored for Namespaces. Labeling a Deployment's pod
    /// changes that pod only.
    pub fn label(
        &mut self,
        kind: Kind,
        namespace: &str,
        name: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<ChangeSet, ManifestError> {
        let r = ObjectRef::new(kind, namespace, name);
        validate_label(key, value).map_err(|message| ManifestError::Invalid {
            object: r.clone(),
            field: format!("metadata.labels[{key}]"),
            message,
        })?;
        self.edit_metadata(r, ChangeAction::Labeled, |m| &mut m.labels, key, value)
    }

    /// `kubectl annotate`: like [`ClusterState::label`], for annotations (the runner records
    /// `ambient.istio.io/redirection` this way).
    pub fn annotate(
        &mut self,
        kind: Kind,
        namespace: &str,
        name: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<ChangeSet, ManifestError> {
        let r = ObjectRef::new(kind, namespace, name);
        validate_label(key, None).map_err(|message| ManifestError::Invalid {
            object: r.clone(),
            field: format!("metadata.annotations[{key}]"),
            message,
        })?;
        self.edit_metadata(
            r,
            ChangeAction::Annotated,
            |m| &mut m.annotations,
            key,
            value,
        )
    }

    fn edit_metadata(
        &mut self,
        r: ObjectRef,
        action: ChangeAction,
        map: impl Fn(&mut Metadata) -> &mut BTreeMap<String, String>,
        key: &str,
        value: Option<&str>,
    ) -> Result<ChangeSet, ManifestError> {
        let mut next = self.clone();
        let entry = next
            .objects
            .get_mut(&r)
            .ok_or_else(|| ManifestError::NotFound { object: r.clone() })?;
        let target = map(entry.object.metadata_mut());
        let changed = match value {
            Some(v) => target.insert(key.to_owned(), v.to_owned()).as_deref() != Some(v),
            None => target.remove(key).is_some(),
        };
        let mut changes = ChangeSet {
            objects: vec![(
                r,
                if changed {
                    action
                } else {
                    ChangeAction::Unchanged
                },
            )],
            ..ChangeSet::default()
        };
        diff_pods(self, &next, &mut changes);
        new_waypoint_warnings(self, &next, &mut changes);
        *self = next;
        Ok(changes)
    }

    /// What istiod would put in the status of the objects in the state (AuthorizationPolicy
    /// parts ztunnel cannot enforce, PeerAuthentication modes ambient cannot honor).
    pub fn policy_messages(&self) -> Vec<(ObjectRef, String)> {
        self.objects()
            .flat_map(|o| {
                let r = o.object_ref();
                apply_warnings(o).into_iter().map(move |w| (r.clone(), w))
            })
            .collect()
    }
}

/// Warnings about one applied object (istiod's status messages and validation warnings).
fn apply_warnings(object: &Object) -> Vec<String> {
    let mut out = Vec::new();
    match object {
        Object::AuthorizationPolicy(ap) => {
            if ap.spec.selector.as_ref().is_some_and(|s| s.is_empty()) {
                out.push(
                    "workload selector specified without labels: the policy selects no \
                     workload (remove `selector` to apply it to the whole namespace)"
                        .to_owned(),
                );
            }
            if let Some(message) = convert_authorization_policy(ap, ROOT_NAMESPACE).message {
                out.push(message);
            }
        }
        Object::PeerAuthentication(pa) => {
            let disabled = pa.spec.mtls == MtlsMode::Disable
                || pa
                    .spec
                    .port_level_mtls
                    .values()
                    .any(|m| *m == MtlsMode::Disable);
            if disabled {
                out.push(
                    "DISABLE cannot be honored in ambient mode (HBONE is always mutual TLS); \
                     ztunnel treats it like PERMISSIVE"
                        .to_owned(),
                );
            }
        }
        _ => {}
    }
    out
}

/// Adds the waypoint warnings a change brought (not those that stood before it), judging every
/// waypoint Gateway as running: the runner starts them with the change.
fn new_waypoint_warnings(before: &ClusterState, after: &ClusterState, changes: &mut ChangeSet) {
    let old: BTreeSet<String> = before.waypoint_warnings(&|_| true).into_iter().collect();
    changes.warnings.extend(
        after
            .waypoint_warnings(&|_| true)
            .into_iter()
            .filter(|w| !old.contains(w)),
    );
}

/// Fills the pod-level part of `changes` by comparing the states before and after.
fn diff_pods(before: &ClusterState, after: &ClusterState, changes: &mut ChangeSet) {
    let pods = |s: &ClusterState| -> BTreeMap<PodKey, (u64, Pod)> {
        s.objects
            .iter()
            .filter_map(|(k, e)| match &e.object {
                Object::Pod(p) => Some((
                    PodKey {
                        namespace: k.namespace.clone(),
                        name: k.name.clone(),
                    },
                    (e.created, p.clone()),
                )),
                _ => None,
            })
            .collect()
    };
    let (old, new) = (pods(before), pods(after));
    for (key, (created, pod)) in &new {
        match old.get(key) {
            None => changes.pods_added.push(key.clone()),
            Some((old_created, old_pod)) => {
                if old_created != created || old_pod.spec != pod.spec {
                    changes.pods_replaced.push(key.clone());
                } else if old_pod.metadata != pod.metadata
                    || before.namespace_labels(&key.namespace)
                        != after.namespace_labels(&key.namespace)
                {
                    changes.pods_relabeled.push(key.clone());
                }
            }
        }
    }
    for key in old.keys() {
        if !new.contains_key(key) {
            changes.pods_removed.push(key.clone());
        }
    }
}

#[cfg(test)]
mod tests;
