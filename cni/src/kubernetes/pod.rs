//! What the controller reads from a Kubernetes pod: its key, the facts [`enrollment`] decides on,
//! its addresses, and whether it still runs.
//!
//! [`enrollment`]: crate::agent::enrollment

use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;

use crate::agent::{PodMeta, REDIRECTION_ANNOTATION, REDIRECTION_ENABLED};

/// `namespace/name`: how pods are tracked (a pod recreated under the same name gets a new uid,
/// which the controller notices).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl PodKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        PodKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    pub fn of(pod: &Pod) -> Self {
        PodKey {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The facts of `pod` that the enrollment decision needs.
pub fn meta(pod: &Pod) -> PodMeta {
    PodMeta {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        annotations: pod.metadata.annotations.clone().unwrap_or_default(),
        host_network: pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false),
    }
}

pub fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

/// `spec.serviceAccountName`, `default` when unset (as the API server defaults it).
pub fn service_account(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

/// `status.podIPs` (or `status.podIP`), parsed.
pub fn ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.ip.parse().ok())
        .collect();
    if let Some(ip) = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok()) {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips
}

/// Succeeded or Failed: its containers are gone for good, so it leaves the mesh (Istio does the
/// same); a pod being deleted but still running stays in until it is gone.
pub fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// True if the pod carries `ambient.istio.io/redirection: enabled`.
pub fn is_annotated(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REDIRECTION_ANNOTATION))
        .is_some_and(|v| v == REDIRECTION_ENABLED)
}
