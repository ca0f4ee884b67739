//! Istio's TCP metrics (`istio_tcp_*`), with Istio's label set, and its DNS proxy metrics
//! (`istio_dns_*`), rendered for Prometheus on 15020.
//!
//! Each ztunnel instance has its own recorder (not the process-global one), so several instances
//! in one process, as in tests, keep separate counts.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ambit_mesh::copy::Meter;
use ambit_mesh::state::Workload;
pub use ambit_mesh::telemetry::{Reporter, TrafficLabels};
use ambit_mesh::telemetry::{TcpCounters, TcpSeries, WorkloadLabels};
use metrics::{Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const DNS_REQUESTS: &str = "istio_dns_requests_total";
const DNS_UPSTREAM_REQUESTS: &str = "istio_dns_upstream_requests_total";
const DNS_UPSTREAM_FAILURES: &str = "istio_dns_upstream_failures_total";
const DNS_UPSTREAM_DURATION: &str = "istio_dns_upstream_request_duration_seconds";
/// Istio's buckets for the upstream DNS duration: a cache hit, a LAN resolver, the internet, a
/// retry, a timeout.
const DNS_UPSTREAM_BUCKETS: [f64; 6] = [0.0005, 0.001, 0.01, 0.1, 1.0, 5.0];

/// A recorder and its Prometheus view.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    tcp: TcpSeries,
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
        Metrics {
            recorder,
            handle,
            tcp: TcpSeries::default(),
        }
    }
}

impl Metrics {
    /// Prometheus text exposition of everything recorded.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Counts a connection opened; it is counted closed when the returned value is dropped.
    /// Its counters are found once, here; bytes are added to them as they move.
    pub fn connection_opened(&self, labels: TrafficLabels) -> OpenConnection {
        let counters = self.tcp.counters(&self.recorder, &labels);
        counters.opened.increment(1);
        OpenConnection { counters, labels }
    }
}

/// A connection counted in `istio_tcp_connections_opened_total`. Dropping it counts it in
/// `istio_tcp_connections_closed_total`, whatever ended the connection: both sides closing, a
/// stream reset before the tunnel's 200 went out, or its task aborted (a pod leaving, the drain
/// deadline). Counting on drop keeps opened and closed equal once the mesh idles. Bytes are
/// counted as they move ([`Meter`], [`Counted`]), so an open connection shows its traffic.
pub struct OpenConnection {
    counters: Arc<TcpCounters>,
    labels: TrafficLabels,
}

impl OpenConnection {
    pub fn labels(&self) -> &TrafficLabels {
        &self.labels
    }

    /// Adds bytes moved: `received` from the client towards the server, `sent` back to it.
    pub fn add_bytes(&self, received: u64, sent: u64) {
        self.counters.forward(received);
        self.counters.backward(sent);
    }
}

/// A splice from the client (first) to the server (second).
impl Meter for OpenConnection {
    fn forward(&self, bytes: u64) {
        self.counters.forward(bytes);
    }

    fn backward(&self, bytes: u64) {
        self.counters.backward(bytes);
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.counters.closed.increment(1);
    }
}

/// An upstream stream that counts what crosses it into its [`OpenConnection`]: writes are bytes
/// received from the client, reads are bytes sent back. For tunnels whose splice runs elsewhere
/// (the HBONE server), so the counts survive however the splice ends.
pub struct Counted<S> {
    inner: S,
    open: OpenConnection,
}

impl<S> Counted<S> {
    pub fn new(inner: S, open: OpenConnection) -> Self {
        Counted { inner, open }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        self.open.add_bytes(0, read);
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(written)) = result {
            self.open.add_bytes(written as u64, 0);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
