//! Istio's metrics as a waypoint reports them (`reporter="waypoint"`): for HTTP,
//! `istio_requests_total`, `istio_request_duration_milliseconds`, `istio_request_bytes`,
//! `istio_response_bytes` and, for gRPC, `istio_request_messages_total` and
//! `istio_response_messages_total`; for connections proxied at L4, `istio_tcp_connections_opened_total`,
//! `istio_tcp_connections_closed_total`, `istio_tcp_received_bytes_total` and
//! `istio_tcp_sent_bytes_total`. Istio's label sets in Istio's order, rendered for Prometheus
//! on 15020.
//!
//! Each waypoint instance has its own recorder (not the process-global one), so several
//! instances in one process, as in tests, keep separate counts.

use std::sync::Arc;
use std::time::Duration;

use ambit_mesh::copy::Meter;
use ambit_mesh::identity::Identity;
use ambit_mesh::state::{Service, Workload};
use ambit_mesh::telemetry::{
    unknown_if_empty, LabelValue, SeriesCache, TcpCounters, TcpSeries, TrafficLabels,
    WorkloadNames, METADATA,
};
pub use ambit_mesh::telemetry::{TCP_CLOSED, TCP_OPENED, TCP_RECEIVED, TCP_SENT};
use metrics::{Counter, Histogram, Key, Recorder};

use crate::wasm::WasmFilters;
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

pub const REQUESTS: &str = "istio_requests_total";
pub const DURATION: &str = "istio_request_duration_milliseconds";
pub const REQUEST_BYTES: &str = "istio_request_bytes";
pub const RESPONSE_BYTES: &str = "istio_response_bytes";
pub const REQUEST_MESSAGES: &str = "istio_request_messages_total";
pub const RESPONSE_MESSAGES: &str = "istio_response_messages_total";

/// Istio's default histogram buckets (`sidecar.istio.io/statsHistogramBuckets`), used for the
/// duration (milliseconds) and for both byte histograms.
pub const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Everything Istio labels one HTTP request with. Unknown values render as `unknown`.
#[derive(Clone, Debug, Default)]
pub struct RequestLabels {
    /// The client workload, when the state knows it (found by its address, checked against the
    /// HBONE peer's identity).
    pub source: Option<Arc<Workload>>,
    /// The HBONE peer's verified identity.
    pub source_principal: Option<Identity>,
    /// The endpoint the request went to (the last one tried).
    pub destination: Option<Arc<Workload>>,
    pub destination_principal: Option<Identity>,
    /// The service the client addressed, if it addressed one.
    pub destination_service: Option<Arc<Service>>,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    pub response_code: u16,
    /// The `grpc-status` the response carried (empty for plain HTTP).
    pub grpc_response_status: String,
    /// Envoy's response flags (`-` when none; `UF,URX`, `UH`, `UT`, `NR`, `UC`).
    pub response_flags: String,
}

/// A recorder and its Prometheus view.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Metrics Wasm filters define, once a filter was loaded.
    wasm: Option<Arc<WasmFilters>>,
    tcp: TcpSeries,
    requests: SeriesCache<RequestHandles>,
}

impl Default for Metrics {
    fn default() -> Self {
        // Without buckets the exporter renders histograms as summaries; Istio's are histograms.
        let mut builder = PrometheusBuilder::new();
        for name in [DURATION, REQUEST_BYTES, RESPONSE_BYTES] {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(name.to_owned()), &BUCKETS)
                .expect("the buckets are a non-empty constant");
        }
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        Metrics {
            recorder,
            handle,
            wasm: None,
            tcp: TcpSeries::default(),
            requests: SeriesCache::default(),
        }
    }
}

impl Metrics {
    /// Prometheus text exposition of everything recorded.
    pub fn render(&self) -> String {
        let mut text = self.handle.render();
        if let Some(wasm) = &self.wasm {
            text.push_str(&wasm.render_status());
            if let Some(runtime) = wasm.runtime() {
                text.push_str(&runtime.render_metrics());
            }
        }
        text
    }

    /// Exports the metrics of the waypoint's Wasm filters beside its own.
    pub fn with_wasm(mut self, wasm: Arc<WasmFilters>) -> Self {
        self.wasm = Some(wasm);
        self
    }

    /// One finished request: counted, timed, and its sizes (headers and body, as Envoy's
    /// `request.total_size` / `response.total_size`) recorded; a gRPC call's messages each way
    /// added to the message counters.
    pub fn request(
        &self,
        labels: &RequestLabels,
        duration: Duration,
        request_bytes: u64,
        response_bytes: u64,
        grpc_messages: Option<(u64, u64)>,
    ) {
        let handles = self.requests.get(&labels.values(), |labels| {
            let key = |name: &'static str| Key::from_parts(name, labels.clone());
            RequestHandles {
                requests: self.recorder.register_counter(&key(REQUESTS), &METADATA),
                duration: self.recorder.register_histogram(&key(DURATION), &METADATA),
                request_bytes: self
                    .recorder
                    .register_histogram(&key(REQUEST_BYTES), &METADATA),
                response_bytes: self
                    .recorder
                    .register_histogram(&key(RESPONSE_BYTES), &METADATA),
                // Only gRPC label sets (request_protocol="grpc") carry message counts.
                grpc_messages: grpc_messages.map(|_| {
                    (
                        self.recorder
                            .register_counter(&key(REQUEST_MESSAGES), &METADATA),
                        self.recorder
                            .register_counter(&key(RESPONSE_MESSAGES), &METADATA),
                    )
                }),
            }
        });
        handles.requests.increment(1);
        handles.duration.record(duration.as_secs_f64() * 1000.0);
        handles.request_bytes.record(request_bytes as f64);
        handles.response_bytes.record(response_bytes as f64);
        if let (Some((request, response)), Some((requests, responses))) =
            (grpc_messages, &handles.grpc_messages)
        {
            requests.increment(request);
            responses.increment(response);
        }
    }
}

/// One HTTP label set's handles, found once per label set ([`SeriesCache`]).
struct RequestHandles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
    grpc_messages: Option<(Counter, Counter)>,
}

impl Metrics {
    /// A connection proxied at L4 was opened (or refused: then `labels` carry the flag and it is
    /// dropped at once, which counts it closed). Its bytes are counted into the returned value
    /// as they move (it is the splice's [`ambit_mesh::copy::Meter`]).
    pub fn connection_opened(&self, labels: &TrafficLabels) -> TcpConnection {
        let counters = self.tcp.counters(&self.recorder, labels);
        counters.opened.increment(1);
        TcpConnection(counters)
    }
}

/// A connection counted opened; counted closed when dropped.
pub struct TcpConnection(Arc<TcpCounters>);

impl Meter for TcpConnection {
    fn forward(&self, bytes: u64) {
        self.0.forward(bytes);
    }

    fn backward(&self, bytes: u64) {
        self.0.backward(bytes);
    }
}

impl Drop for TcpConnection {
    fn drop(&mut self) {
        self.0.closed.increment(1);
    }
}

impl RequestLabels {
    /// Labels in the order Istio's waypoint stats use, borrowed.
    fn values(&self) -> [(&'static str, LabelValue<'_>); 25] {
        use LabelValue::{Number, Principal, Str};
        let s = WorkloadNames::of(self.source.as_deref());
        let d = WorkloadNames::of(self.destination.as_deref());

        let (svc_host, svc_name, svc_namespace) = match &self.destination_service {
            Some(s) => (
                unknown_if_empty(&s.hostname),
                unknown_if_empty(&s.name),
                unknown_if_empty(&s.namespace),
            ),
            None => ("unknown", "unknown", "unknown"),
        };
        let protocol = if self.request_protocol.is_empty() {
            "http"
        } else {
            self.request_protocol
        };
        let flags = if self.response_flags.is_empty() {
            "-"
        } else {
            &self.response_flags
        };
        [
            ("reporter", Str("waypoint")),
            ("source_workload", Str(s.workload)),
            ("source_canonical_service", Str(s.canonical_service)),
            ("source_canonical_revision", Str(s.canonical_revision)),
            ("source_workload_namespace", Str(s.namespace)),
            (
                "source_principal",
                Principal(self.source_principal.as_ref()),
            ),
            ("source_app", Str(s.app)),
            ("source_version", Str(s.version)),
            ("source_cluster", Str(s.cluster)),
            ("destination_workload", Str(d.workload)),
            ("destination_workload_namespace", Str(d.namespace)),
            (
                "destination_principal",
                Principal(self.destination_principal.as_ref()),
            ),
            ("destination_app", Str(d.app)),
            ("destination_version", Str(d.version)),
            ("destination_service", Str(svc_host)),
            ("destination_canonical_service", Str(d.canonical_service)),
            ("destination_canonical_revision", Str(d.canonical_revision)),
            ("destination_service_name", Str(svc_name)),
            ("destination_service_namespace", Str(svc_namespace)),
            ("destination_cluster", Str(d.cluster)),
            ("request_protocol", Str(protocol)),
            ("response_code", Number(self.response_code.into())),
            ("grpc_response_status", Str(&self.grpc_response_status)),
            ("response_flags", Str(flags)),
            ("connection_security_policy", Str("mutual_tls")),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_istio_names_labels_and_buckets() {
        let metrics = Metrics::default();
        let labels = RequestLabels {
            response_code: 200,
            request_protocol: "http",
            ..Default::default()
        };
        metrics.request(&labels, Duration::from_millis(3), 10, 20, None);
        let text = metrics.render();
        assert!(
            text.contains("istio_requests_total{reporter=\"waypoint\""),
            "{text}"
        );
        assert!(text.contains("response_code=\"200\""), "{text}");
        assert!(text.contains("response_flags=\"-\""), "{text}");
        assert!(
            text.contains("istio_request_duration_milliseconds_bucket{"),
            "{text}"
        );
        assert!(text.contains("le=\"3600000\""), "{text}");
        assert!(text.contains("istio_request_bytes_sum{"), "{text}");
        assert!(text.contains("istio_response_bytes_count{"), "{text}");
    }
}
