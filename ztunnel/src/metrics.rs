//! Istio's TCP metrics (`istio_tcp_*`), with Istio's label set, and its DNS proxy metrics
//! (`istio_dns_*`), rendered for Prometheus on 15020.
//!
//! Each ztunnel instance has its own recorder (not the process-global one), so several instances
//! in one process, as in tests, keep separate counts.

use std::sync::Arc;
use std::time::Duration;

use ambit_mesh::identity::Identity;
use ambit_mesh::state::Workload;
use ambit_mesh::telemetry::{principal, WorkloadLabels};
use metrics::{Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

const OPENED: &str = "istio_tcp_connections_opened_total";
const CLOSED: &str = "istio_tcp_connections_closed_total";
const RECEIVED: &str = "istio_tcp_received_bytes_total";
const SENT: &str = "istio_tcp_sent_bytes_total";
const DNS_REQUESTS: &str = "istio_dns_requests_total";
const DNS_UPSTREAM_REQUESTS: &str = "istio_dns_upstream_requests_total";
const DNS_UPSTREAM_FAILURES: &str = "istio_dns_upstream_failures_total";
const DNS_UPSTREAM_DURATION: &str = "istio_dns_upstream_request_duration_seconds";
/// Istio's buckets for the upstream DNS duration: a cache hit, a LAN resolver, the internet, a
/// retry, a timeout.
const DNS_UPSTREAM_BUCKETS: [f64; 6] = [0.0005, 0.001, 0.01, 0.1, 1.0, 5.0];

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
        // Without buckets the exporter renders histograms as summaries; Istio's is a histogram.
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(DNS_UPSTREAM_DURATION.to_owned()),
                &DNS_UPSTREAM_BUCKETS,
            )
            .expect("the DNS buckets are a non-empty constant")
            .build_recorder();
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

/// Labels of Istio's DNS metrics (`DnsLabels` in Istio's ztunnel): the query type and transport in
/// lower case (`a`, `udp`), and the querying pod's canonical service and revision.
#[derive(Clone, Debug)]
pub struct DnsLabels {
    /// `A`, `AAAA`, ... as hickory names them; rendered in lower case as Istio does.
    pub query_type: String,
    /// `udp` or `tcp`.
    pub protocol: &'static str,
    /// The pod that asked, if the state knows it.
    pub source: Option<Arc<Workload>>,
}

impl Metrics {
    /// A query the DNS proxy answered or forwarded (parsed queries only; garbage is not counted).
    pub fn dns_request(&self, labels: &DnsLabels) {
        self.dns_counter(DNS_REQUESTS, labels);
    }

    /// A query the DNS proxy sent upstream.
    pub fn dns_upstream_request(&self, labels: &DnsLabels) {
        self.dns_counter(DNS_UPSTREAM_REQUESTS, labels);
    }

    /// A forwarded query that got no usable answer (timeout, unreachable, upstream error code).
    pub fn dns_upstream_failure(&self, labels: &DnsLabels) {
        self.dns_counter(DNS_UPSTREAM_FAILURES, labels);
    }

    /// How long a forwarded query took, answered or not.
    pub fn dns_upstream_duration(&self, labels: &DnsLabels, elapsed: Duration) {
        let key = Key::from_parts(DNS_UPSTREAM_DURATION, labels.to_labels());
        self.recorder
            .register_histogram(&key, &DNS_METADATA)
            .record(elapsed.as_secs_f64());
    }

    fn dns_counter(&self, name: &'static str, labels: &DnsLabels) {
        let key = Key::from_parts(name, labels.to_labels());
        self.recorder
            .register_counter(&key, &DNS_METADATA)
            .increment(1);
    }
}

static DNS_METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

impl DnsLabels {
    /// Labels in Istio's order.
    fn to_labels(&self) -> Vec<Label> {
        let source = WorkloadLabels::of(self.source.as_deref());
        let (service, revision) = (source.canonical_service, source.canonical_revision);
        vec![
            Label::new("request_query_type", self.query_type.to_lowercase()),
            Label::new("request_protocol", self.protocol),
            Label::new("source_canonical_service", service),
            Label::new("source_canonical_revision", revision),
        ]
    }
}

impl TrafficLabels {
    /// Labels in Istio's order.
    fn to_labels(&self) -> Vec<Label> {
        let s = WorkloadLabels::of(self.source.as_deref());
        let d = WorkloadLabels::of(self.destination.as_deref());
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
            ("source_workload", s.workload),
            ("source_canonical_service", s.canonical_service),
            ("source_canonical_revision", s.canonical_revision),
            ("source_workload_namespace", s.namespace),
            (
                "source_principal",
                principal(self.source_principal.as_ref()),
            ),
            ("source_app", s.app),
            ("source_version", s.version),
            ("source_cluster", s.cluster),
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
        ];
        pairs
            .into_iter()
            .map(|(key, value)| Label::new(key, value))
            .collect()
    }
}
