//! Which waypoint a Service or pod uses, as istiod decides it
//! (`pilot/pkg/serviceregistry/ambient/waypoints.go`), and where Ambit departs from it: traffic
//! that L7 policy protects is refused, not sent around a waypoint that is missing or not running.
//!
//! istiod's rules, kept exactly:
//! - the object's own `istio.io/use-waypoint` label wins (`none` opts out); only without one does
//!   its namespace's label count. `istio.io/use-waypoint-namespace` is read from the same object
//!   as the name it qualifies (default: the object's namespace);
//! - a name that resolves to no waypoint Gateway binds nothing (istiod's status reason
//!   `WaypointIsNotReady`); there is no fallback to the namespace's waypoint;
//! - the Gateway's `istio.io/waypoint-for` (default `service`) says what it takes: Services bind
//!   to `service` or `all`, pods (traffic addressed to a pod IP) to `workload` or `all`, nothing to
//!   `none`. A mismatch binds nothing (`UnsupportedTrafficType`), except that a pod which only
//!   inherits its namespace's waypoint is silently left without one.
//!
//! Where Ambit differs: istiod drops the binding of a Service whose waypoint Gateway is missing
//! (and Istio's ztunnel then sends its traffic straight to the pods, skipping every L7 policy).
//! Here, when AuthorizationPolicies (other than AUDIT) or WasmPlugins (other than `FAIL_OPEN`)
//! would apply at that waypoint to that traffic, the binding stays, pointing at a waypoint no
//! ztunnel can reach, so the traffic is refused until the waypoint runs. A pod that only inherits
//! a missing namespace waypoint is left alone: without the Gateway its `waypoint-for` is unknown,
//! and a namespace waypoint is a service waypoint by default.

use std::fmt;

use super::ztunnel::PlaintextCheck;
use super::{ClusterState, ROOT_NAMESPACE, WAYPOINT_GATEWAY_CLASS};
use crate::manifest::{
    AuthorizationAction, FailStrategy, Kind, Metadata, ObjectRef, Pod, PolicyTargetRef, Service,
};

/// Istio's labels for waypoint use.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";

/// A waypoint Gateway, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WaypointRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for WaypointRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Which kind of traffic a binding is for (`istio.io/waypoint-for`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    /// Addressed to a Service.
    Service,
    /// Addressed to a pod IP.
    Workload,
}

impl Traffic {
    fn label(self) -> &'static str {
        match self {
            Traffic::Service => "service",
            Traffic::Workload => "workload",
        }
    }
}

/// What `istio.io/use-waypoint` resolves to for one Service or pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Binding {
    /// The Gateway exists, is a waypoint, and takes this kind of traffic.
    Bound(WaypointRef),
    /// No `istio-waypoint` Gateway has that name. `inherited`: named by the namespace only.
    Missing {
        waypoint: WaypointRef,
        inherited: bool,
    },
    /// The waypoint's `istio.io/waypoint-for` excludes this kind of traffic.
    UnsupportedTraffic {
        waypoint: WaypointRef,
        waypoint_for: String,
    },
}

/// Where a Service's or pod's traffic goes, given its binding, whether its waypoint is running,
/// and the L7 policy that would apply there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Through its running waypoint.
    Waypoint(WaypointRef),
    /// Refused: its waypoint is missing or not running, and L7 policy would apply there.
    Refused {
        waypoint: WaypointRef,
        reason: String,
        policy: Vec<ObjectRef>,
    },
    /// Straight to the pods, as Istio sends it: the binding failed and no L7 policy is lost.
    Direct {
        waypoint: WaypointRef,
        reason: String,
    },
}

impl Route {
    /// The operator-facing sentence for a route that is not through a running waypoint.
    pub fn problem(&self, subject: &str) -> Option<String> {
        match self {
            Route::Waypoint(_) => None,
            Route::Refused {
                waypoint,
                reason,
                policy,
            } => Some(format!(
                "{subject} uses waypoint {waypoint}, which {reason}: its traffic is refused \
                 rather than sent around the L7 policy that targets it ({}); Istio would send it \
                 straight to the pods",
                names(policy)
            )),
            Route::Direct { waypoint, reason } => Some(format!(
                "{subject} uses waypoint {waypoint}, which {reason}: its traffic goes straight to \
                 the pods, as in Istio"
            )),
        }
    }
}

/// `AuthorizationPolicy demo/a, WasmPlugin demo/b`.
pub fn names(objects: &[ObjectRef]) -> String {
    objects
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl ClusterState {
    /// The waypoint a Service's traffic is bound to (module docs), or `None`.
    pub fn service_binding(&self, service: &Service) -> Option<Binding> {
        let binding = self.binding(&service.metadata, Traffic::Service)?;
        // A waypoint's own Service never goes through a waypoint (istiod skips Services it
        // manages for waypoints).
        let own = |w: &WaypointRef| {
            w.namespace == service.metadata.namespace && w.name == service.metadata.name
        };
        match &binding {
            Binding::Bound(w) if own(w) => None,
            _ => Some(binding),
        }
    }

    /// The waypoint traffic addressed to `pod`'s IP is bound to (module docs), or `None`.
    pub fn pod_binding(&self, pod: &Pod) -> Option<Binding> {
        self.binding(&pod.metadata, Traffic::Workload)
    }

    fn binding(&self, meta: &Metadata, traffic: Traffic) -> Option<Binding> {
        let named = |labels: &std::collections::BTreeMap<String, String>| {
            let name = labels.get(USE_WAYPOINT)?;
            let namespace = labels
                .get(USE_WAYPOINT_NAMESPACE)
                .unwrap_or(&meta.namespace);
            Some(WaypointRef {
                namespace: namespace.clone(),
                name: name.clone(),
            })
        };
        let (waypoint, inherited) = match named(&meta.labels) {
            Some(w) => (w, false),
            None => (named(self.namespace_labels(&meta.namespace)?)?, true),
        };
        if waypoint.name == "none" {
            return None;
        }
        let Some(gateway) = self
            .gateway(&waypoint.namespace, &waypoint.name)
            .filter(|g| g.spec.gateway_class_name == WAYPOINT_GATEWAY_CLASS)
        else {
            return Some(Binding::Missing {
                waypoint,
                inherited,
            });
        };
        let waypoint_for = gateway
            .metadata
            .labels
            .get(WAYPOINT_FOR)
            .map_or("service", String::as_str);
        if waypoint_for == "all" || waypoint_for == traffic.label() {
            return Some(Binding::Bound(waypoint));
        }
        if traffic == Traffic::Workload && inherited {
            return None;
        }
        Some(Binding::UnsupportedTraffic {
            waypoint,
            waypoint_for: waypoint_for.to_owned(),
        })
    }

    /// The L7 policy that would apply at `waypoint` to traffic for `service` (or, without one,
    /// to any traffic it takes): AuthorizationPolicies other than AUDIT and WasmPlugins other
    /// than `FAIL_OPEN` whose `targetRefs` name its Gateway, the `istio-waypoint` GatewayClass
    /// (from the root namespace), or `service`. In object order.
    pub fn waypoint_policy(
        &self,
        waypoint: &WaypointRef,
        service: Option<&Service>,
    ) -> Vec<ObjectRef> {
        let targets = |namespace: &str, refs: &[PolicyTargetRef], class_ok: bool| {
            refs.iter().any(|t| match t.kind.as_str() {
                "Gateway" => namespace == waypoint.namespace && t.name == waypoint.name,
                "GatewayClass" => {
                    class_ok && namespace == ROOT_NAMESPACE && t.name == WAYPOINT_GATEWAY_CLASS
                }
                "Service" => service.is_some_and(|s| {
                    s.metadata.namespace == namespace && s.metadata.name == t.name
                }),
                _ => false,
            })
        };
        let policies = self
            .authorization_policies()
            .filter(|p| p.spec.action != AuthorizationAction::Audit)
            .filter(|p| targets(&p.metadata.namespace, &p.spec.target_refs, true))
            .map(|p| {
                ObjectRef::new(
                    Kind::AuthorizationPolicy,
                    &p.metadata.namespace,
                    &p.metadata.name,
                )
            });
        let plugins = self
            .wasm_plugins()
            .filter(|p| p.spec.fail_strategy != FailStrategy::FailOpen)
            .filter(|p| targets(&p.metadata.namespace, &p.spec.target_refs, false))
            .map(|p| ObjectRef::new(p.kind(), &p.metadata.namespace, &p.metadata.name));
        policies.chain(plugins).collect()
    }

    /// Where the traffic of a binding goes (module docs): `running` says whether a waypoint's
    /// pod is up; `service` is the Service bound, `None` for a pod's binding.
    pub fn route(
        &self,
        binding: &Binding,
        service: Option<&Service>,
        running: &dyn Fn(&WaypointRef) -> bool,
    ) -> Route {
        let (waypoint, reason) = match binding {
            Binding::Bound(w) if running(w) => return Route::Waypoint(w.clone()),
            Binding::Bound(w) => (w, "is not running".to_owned()),
            Binding::Missing {
                waypoint,
                inherited,
            } => {
                let reason = "does not exist (no Gateway of class istio-waypoint has that name)";
                if *inherited && service.is_none() {
                    return Route::Direct {
                        waypoint: waypoint.clone(),
                        reason: reason.to_owned(),
                    };
                }
                (waypoint, reason.to_owned())
            }
            Binding::UnsupportedTraffic {
                waypoint,
                waypoint_for,
            } => {
                let kind = if service.is_some() {
                    "service"
                } else {
                    "workload"
                };
                return Route::Direct {
                    waypoint: waypoint.clone(),
                    reason: format!("takes no {kind} traffic ({WAYPOINT_FOR}: {waypoint_for})"),
                };
            }
        };
        let policy = self.waypoint_policy(waypoint, service);
        if policy.is_empty() {
            Route::Direct {
                waypoint: waypoint.clone(),
                reason: format!("{reason}, and no L7 policy targets it"),
            }
        } else {
            Route::Refused {
                waypoint: waypoint.clone(),
                reason,
                policy,
            }
        }
    }

    /// What an operator must know about waypoints in this state, one sentence each: Services
    /// and pods whose traffic is refused or goes direct although they name a waypoint, and
    /// workloads behind L7 policy that clients without a mesh identity still reach directly.
    /// `running` says whether a waypoint's pod is up.
    pub fn waypoint_warnings(&self, running: &dyn Fn(&WaypointRef) -> bool) -> Vec<String> {
        let check = PlaintextCheck::new(self);
        let mut out = Vec::new();
        for service in self.services() {
            let Some(binding) = self.service_binding(service) else {
                continue;
            };
            let (namespace, name) = (&service.metadata.namespace, &service.metadata.name);
            let route = self.route(&binding, Some(service), running);
            out.extend(route.problem(&format!("Service {namespace}/{name}")));
            let (waypoint, policy) = match route {
                Route::Waypoint(w) => {
                    let policy = self.waypoint_policy(&w, Some(service));
                    (w, policy)
                }
                Route::Refused {
                    waypoint, policy, ..
                } => (waypoint, policy),
                Route::Direct { .. } => continue,
            };
            if policy.is_empty() {
                continue;
            }
            let open: Vec<String> = self
                .pods_behind(service)
                .filter_map(|pod| {
                    let ports = check.open_ports(service, pod);
                    (!ports.is_empty()).then(|| {
                        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
                        format!(
                            "{}/{} on {}",
                            pod.metadata.namespace,
                            pod.metadata.name,
                            ports.join(", ")
                        )
                    })
                })
                .collect();
            if !open.is_empty() {
                out.push(format!(
                    "Service {namespace}/{name}: L7 policy at waypoint {waypoint} ({}) protects \
                     pods that still accept plaintext ({}): clients outside the mesh reach them \
                     without passing the waypoint; apply a STRICT PeerAuthentication to them",
                    names(&policy),
                    open.join("; ")
                ));
            }
        }
        for pod in self.pods() {
            // A namespace waypoint that is missing concerns its Services, reported above.
            if let Some(binding) = self.pod_binding(pod).filter(|b| {
                !matches!(
                    b,
                    Binding::Missing {
                        inherited: true,
                        ..
                    }
                )
            }) {
                let subject = format!("Pod {}/{}", pod.metadata.namespace, pod.metadata.name);
                out.extend(self.route(&binding, None, running).problem(&subject));
            }
        }
        out
    }

    fn pods_behind<'a>(&'a self, service: &'a Service) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods().filter(move |p| service.selects(p))
    }
}
