//! Istio's telemetry conventions shared by ztunnel and the waypoint: how a workload becomes the
//! `*_workload`, `*_canonical_service`, ... label values of Istio's standard metrics, and the
//! label set of its TCP metrics (`istio_tcp_*`).

use std::sync::Arc;

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

    /// These as the `source_*` labels, with the client's principal, in the order every Istio
    /// metric (TCP and HTTP alike) lists them.
    pub fn source_pairs(self, source_principal: Option<&Identity>) -> [(&'static str, String); 8] {
        [
            ("source_workload", self.workload),
            ("source_canonical_service", self.canonical_service),
            ("source_canonical_revision", self.canonical_revision),
            ("source_workload_namespace", self.namespace),
            ("source_principal", principal(source_principal)),
            ("source_app", self.app),
            ("source_version", self.version),
            ("source_cluster", self.cluster),
        ]
    }
}

/// Which side of a connection reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
    /// A waypoint proxying a connection at L4.
    Waypoint,
}

/// Istio's `CommonTrafficLabels` for one connection. Unknown values render as `unknown`.
#[derive(Clone, Debug)]
pub struct TrafficLabels {
    pub reporter: Reporter,
    pub source: Option<Arc<Workload>>,
    pub source_principal: Option<Identity>,
    pub destination: Option<Arc<Workload>>,
    pub destination_principal: Option<Identity>,
    /// Hostname of the service the client addressed, if it addressed one.
    pub destination_service: Option<(String, String, String)>,
    /// True on HBONE (`mutual_tls`), false on plaintext (`unknown`).
    pub mutual_tls: bool,
    pub response_flags: &'static str,
}

impl TrafficLabels {
    /// Label names and values in Istio's order.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let d = WorkloadLabels::of(self.destination.as_deref());
        let (svc_host, svc_namespace, svc_name) = match &self.destination_service {
            Some((host, namespace, name)) => (host.clone(), namespace.clone(), name.clone()),
            None => (
                "unknown".to_owned(),
                "unknown".to_owned(),
                "unknown".to_owned(),
            ),
        };
        let mut pairs = vec![(
            "reporter",
            match self.reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
                Reporter::Waypoint => "waypoint",
            }
            .to_owned(),
        )];
        pairs.extend(
            WorkloadLabels::of(self.source.as_deref()).source_pairs(self.source_principal.as_ref()),
        );
        pairs.extend([
            ("destination_service", svc_host),
            ("destination_service_namespace", svc_namespace),
            ("destination_service_name", svc_name),
            ("destination_workload", d.workload),
            ("destination_canonical_service", d.canonical_service),
            ("destination_canonical_revision", d.canonical_revision),
            ("destination_workload_namespace", d.namespace),
            (
                "destination_principal",
                principal(self.destination_principal.as_ref()),
            ),
            ("destination_app", d.app),
            ("destination_version", d.version),
            ("destination_cluster", d.cluster),
            ("request_protocol", "tcp".to_owned()),
            ("response_flags", self.response_flags.to_owned()),
            (
                "connection_security_policy",
                if self.mutual_tls {
                    "mutual_tls"
                } else {
                    "unknown"
                }
                .to_owned(),
            ),
        ]);
        pairs
    }
}
