//! Istio's TCP metrics (`istio_tcp_*`), with Istio's label set, rendered for Prometheus on 15020.
//!
//! Each ztunnel instance has its own recorder (not the process-global one), so several instances
//! in one process, as in tests, keep separate counts.

use std::sync::Arc;

use ambit_mesh::identity::Identity;
use ambit_mesh::state::Workload;
use metrics::{Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

const OPENED: &str = "istio_tcp_connections_opened_total";
const CLOSED: &str = "istio_tcp_connections_closed_total";
const RECEIVED: &str = "istio_tcp_received_bytes_total";
const SENT: &str = "istio_tcp_sent_bytes_total";

/// Which side of a connection reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
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

/// A recorder and its Prometheus view.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Default for Metrics {
    fn default() -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        Metrics { recorder, handle }
    }
}

impl Metrics {
    /// Prometheus text exposition of everything recorded.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    pub fn connection_opened(&self, labels: &TrafficLabels) {
        self.counter(OPENED, labels, 1);
    }

    /// `received`: bytes from the client towards the server; `sent`: bytes back to the client.
    pub fn connection_closed(&self, labels: &TrafficLabels, received: u64, sent: u64) {
        self.counter(CLOSED, labels, 1);
        self.counter(RECEIVED, labels, received);
        self.counter(SENT, labels, sent);
    }

    fn counter(&self, name: &'static str, labels: &TrafficLabels, value: u64) {
        static METADATA: Metadata<'static> =
            Metadata::new(module_path!(), Level::INFO, Some(module_path!()));
        let key = Key::from_parts(name, labels.to_labels());
        self.recorder
            .register_counter(&key, &METADATA)
            .increment(value);
    }
}

fn or_unknown(value: Option<&str>) -> String {
    match value {
        Some(v) if !v.is_empty() => v.to_owned(),
        _ => "unknown".to_owned(),
    }
}

fn principal(identity: &Option<Identity>) -> String {
    identity
        .as_ref()
        .map_or_else(|| "unknown".to_owned(), ToString::to_string)
}

impl TrafficLabels {
    /// Labels in Istio's order.
    fn to_labels(&self) -> Vec<Label> {
        let workload = |w: &Option<Arc<Workload>>| -> [String; 7] {
            match w {
                Some(w) => {
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
                    [
                        name.clone(),
                        service.clone(),
                        revision.to_owned(),
                        w.namespace.clone(),
                        service.clone(),
                        revision.to_owned(),
                        or_unknown(Some(&w.cluster_id)),
                    ]
                }
                None => std::array::from_fn(|_| "unknown".to_owned()),
            }
        };
        let [s_workload, s_service, s_revision, s_namespace, s_app, s_version, s_cluster] =
            workload(&self.source);
        let [d_workload, d_service, d_revision, d_namespace, d_app, d_version, d_cluster] =
            workload(&self.destination);
        let (svc_host, svc_namespace, svc_name) = match &self.destination_service {
            Some((host, namespace, name)) => (host.clone(), namespace.clone(), name.clone()),
            None => (
                "unknown".to_owned(),
                "unknown".to_owned(),
                "unknown".to_owned(),
            ),
        };
        let pairs: [(&'static str, String); 23] = [
            (
                "reporter",
                match self.reporter {
                    Reporter::Source => "source",
                    Reporter::Destination => "destination",
                }
                .to_owned(),
            ),
            ("source_workload", s_workload),
            ("source_canonical_service", s_service),
            ("source_canonical_revision", s_revision),
            ("source_workload_namespace", s_namespace),
            ("source_principal", principal(&self.source_principal)),
            ("source_app", s_app),
            ("source_version", s_version),
            ("source_cluster", s_cluster),
            ("destination_service", svc_host),
            ("destination_service_namespace", svc_namespace),
            ("destination_service_name", svc_name),
            ("destination_workload", d_workload),
            ("destination_canonical_service", d_service),
            ("destination_canonical_revision", d_revision),
            ("destination_workload_namespace", d_namespace),
            (
                "destination_principal",
                principal(&self.destination_principal),
            ),
            ("destination_app", d_app),
            ("destination_version", d_version),
            ("destination_cluster", d_cluster),
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
        ];
        pairs
            .into_iter()
            .map(|(key, value)| Label::new(key, value))
            .collect()
    }
}
