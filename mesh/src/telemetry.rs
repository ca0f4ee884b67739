//! Istio's telemetry conventions shared by ztunnel and the waypoint: how a workload becomes the
//! `*_workload`, `*_canonical_service`, ... label values of Istio's standard metrics.

use crate::identity::Identity;
use crate::state::Workload;

/// What Istio's metrics say about one side of a connection or request. Missing values are
/// `unknown`, as in Istio.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadLabels {
    pub workload: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
    pub cluster: String,
}

/// The label value Istio writes for an empty or missing value.
pub fn or_unknown(value: &str) -> String {
    if value.is_empty() {
        "unknown".to_owned()
    } else {
        value.to_owned()
    }
}

/// A `*_principal` label value: the SPIFFE id, or `unknown` without one (plaintext).
pub fn principal(identity: Option<&Identity>) -> String {
    identity.map_or_else(|| "unknown".to_owned(), ToString::to_string)
}

impl WorkloadLabels {
    /// As istiod fills them in: the workload name when no canonical name is set, revision
    /// `latest` when none is set; `app`/`version` mirror the canonical service and revision.
    pub fn of(workload: Option<&Workload>) -> Self {
        let Some(w) = workload else {
            let unknown = || "unknown".to_owned();
            return WorkloadLabels {
                workload: unknown(),
                canonical_service: unknown(),
                canonical_revision: unknown(),
                namespace: unknown(),
                app: unknown(),
                version: unknown(),
                cluster: unknown(),
            };
        };
        let name = if w.workload_name.is_empty() {
            &w.name
        } else {
            &w.workload_name
        };
        let service = if w.canonical_name.is_empty() {
            name
        } else {
            &w.canonical_name
        };
        let revision = if w.canonical_revision.is_empty() {
            "latest"
        } else {
            &w.canonical_revision
        };
        WorkloadLabels {
            workload: or_unknown(name),
            canonical_service: or_unknown(service),
            canonical_revision: revision.to_owned(),
            namespace: or_unknown(&w.namespace),
            app: or_unknown(service),
            version: revision.to_owned(),
            cluster: or_unknown(&w.cluster_id),
        }
    }
}
