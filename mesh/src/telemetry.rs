//! Istio's telemetry conventions shared by ztunnel and the waypoint: how a workload becomes the
//! `*_workload`, `*_canonical_service`, ... label values of Istio's standard metrics, and the
//! label set of its TCP metrics (`istio_tcp_*`), whose counters each connection finds once
//! ([`TcpSeries`]).

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::hash::{DefaultHasher, Hasher};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Key, Label, Level, Metadata, Recorder, SharedString};

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

/// [`WorkloadLabels`] borrowed from the workload, for building label sets without allocating.
#[derive(Clone, Copy, Debug)]
pub struct WorkloadNames<'a> {
    pub workload: &'a str,
    pub canonical_service: &'a str,
    pub canonical_revision: &'a str,
    pub namespace: &'a str,
    pub app: &'a str,
    pub version: &'a str,
    pub cluster: &'a str,
}

/// `value`, or `unknown` when it is empty (Istio's rendering of a missing value).
pub fn unknown_if_empty(value: &str) -> &str {
    if value.is_empty() {
        "unknown"
    } else {
        value
    }
}

impl<'a> WorkloadNames<'a> {
    /// As istiod fills them in: the workload name when no canonical name is set, revision
    /// `latest` when none is set; `app`/`version` mirror the canonical service and revision.
    pub fn of(workload: Option<&'a Workload>) -> Self {
        let Some(w) = workload else {
            return WorkloadNames {
                workload: "unknown",
                canonical_service: "unknown",
                canonical_revision: "unknown",
                namespace: "unknown",
                app: "unknown",
                version: "unknown",
                cluster: "unknown",
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
        WorkloadNames {
            workload: unknown_if_empty(name),
            canonical_service: unknown_if_empty(service),
            canonical_revision: revision,
            namespace: unknown_if_empty(&w.namespace),
            app: unknown_if_empty(service),
            version: revision,
            cluster: unknown_if_empty(&w.cluster_id),
        }
    }
}

impl WorkloadLabels {
    /// [`WorkloadNames::of`], owned.
    pub fn of(workload: Option<&Workload>) -> Self {
        let n = WorkloadNames::of(workload);
        WorkloadLabels {
            workload: n.workload.to_owned(),
            canonical_service: n.canonical_service.to_owned(),
            canonical_revision: n.canonical_revision.to_owned(),
            namespace: n.namespace.to_owned(),
            app: n.app.to_owned(),
            version: n.version.to_owned(),
            cluster: n.cluster.to_owned(),
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

/// One label value, borrowed from what it describes; rendered by `Display`.
#[derive(Clone, Copy, Debug)]
pub enum LabelValue<'a> {
    Str(&'a str),
    /// A `*_principal`: the SPIFFE id, or `unknown`.
    Principal(Option<&'a Identity>),
    Number(u64),
}

impl fmt::Display for LabelValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabelValue::Str(value) => f.write_str(value),
            LabelValue::Principal(Some(identity)) => identity.fmt(f),
            LabelValue::Principal(None) => f.write_str("unknown"),
            LabelValue::Number(number) => number.fmt(f),
        }
    }
}

/// Labels of Istio's TCP metrics.
pub const TCP_LABELS: usize = 23;

impl TrafficLabels {
    /// Label names and values in Istio's order, borrowed.
    pub fn values(&self) -> [(&'static str, LabelValue<'_>); TCP_LABELS] {
        use LabelValue::{Principal, Str};
        let s = WorkloadNames::of(self.source.as_deref());
        let d = WorkloadNames::of(self.destination.as_deref());
        let (svc_host, svc_namespace, svc_name) = match &self.destination_service {
            Some((host, namespace, name)) => (host.as_str(), namespace.as_str(), name.as_str()),
            None => ("unknown", "unknown", "unknown"),
        };
        let reporter = match self.reporter {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
            Reporter::Waypoint => "waypoint",
        };
        let security = if self.mutual_tls {
            "mutual_tls"
        } else {
            "unknown"
        };
        [
            ("reporter", Str(reporter)),
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
            ("destination_service", Str(svc_host)),
            ("destination_service_namespace", Str(svc_namespace)),
            ("destination_service_name", Str(svc_name)),
            ("destination_workload", Str(d.workload)),
            ("destination_canonical_service", Str(d.canonical_service)),
            ("destination_canonical_revision", Str(d.canonical_revision)),
            ("destination_workload_namespace", Str(d.namespace)),
            (
                "destination_principal",
                Principal(self.destination_principal.as_ref()),
            ),
            ("destination_app", Str(d.app)),
            ("destination_version", Str(d.version)),
            ("destination_cluster", Str(d.cluster)),
            ("request_protocol", Str("tcp")),
            ("response_flags", Str(self.response_flags)),
            ("connection_security_policy", Str(security)),
        ]
    }

    /// Label names and values in Istio's order.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        self.values()
            .iter()
            .map(|(name, value)| (*name, value.to_string()))
            .collect()
    }
}

pub const TCP_OPENED: &str = "istio_tcp_connections_opened_total";
pub const TCP_CLOSED: &str = "istio_tcp_connections_closed_total";
pub const TCP_RECEIVED: &str = "istio_tcp_received_bytes_total";
pub const TCP_SENT: &str = "istio_tcp_sent_bytes_total";

/// Istio's four TCP counters for one label set, shared by every connection with that label set.
pub struct TcpCounters {
    pub opened: Counter,
    pub closed: Counter,
    /// Bytes from the client towards the server.
    pub received: Counter,
    /// Bytes from the server back to the client.
    pub sent: Counter,
}

/// A splice from the client (first stream) to the server (second) counts as it goes.
impl crate::copy::Meter for TcpCounters {
    fn forward(&self, bytes: u64) {
        self.received.increment(bytes);
    }

    fn backward(&self, bytes: u64) {
        self.sent.increment(bytes);
    }
}

/// Metric handles of every label set seen so far. An event finds its handles from borrowed label
/// values without building a label: the values are hashed and compared where they lie, so only a
/// label set's first event renders and registers it. Nothing is evicted: the recorder keeps every
/// series it was given for as long, so this adds a pointer per series.
pub struct SeriesCache<H> {
    known: Mutex<HashMap<u64, Vec<KnownSeries<H>>>>,
}

impl<H> Default for SeriesCache<H> {
    fn default() -> Self {
        SeriesCache {
            known: Mutex::default(),
        }
    }
}

struct KnownSeries<H> {
    values: Box<[Arc<str>]>,
    handles: Arc<H>,
}

/// Metadata for handles registered through a [`SeriesCache`] (the exporters ignore it).
pub static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

impl<H> SeriesCache<H> {
    /// The handles for `values`, made by `register` (from the rendered labels) the first time
    /// they are seen.
    pub fn get(
        &self,
        values: &[(&'static str, LabelValue<'_>)],
        register: impl FnOnce(Vec<Label>) -> H,
    ) -> Arc<H> {
        let mut hasher = DefaultHasher::new();
        for (_, value) in values {
            // Writing into a hasher cannot fail.
            let _ = write!(HashWriter(&mut hasher), "{value}");
            hasher.write_u8(0xff);
        }
        let mut known = self.known.lock().expect("series cache lock");
        let bucket = known.entry(hasher.finish()).or_default();
        let found = bucket.iter().find(|known| {
            known.values.len() == values.len()
                && known
                    .values
                    .iter()
                    .zip(values)
                    .all(|(rendered, (_, value))| renders_as(value, rendered))
        });
        if let Some(known) = found {
            return known.handles.clone();
        }
        let rendered: Box<[Arc<str>]> = values
            .iter()
            .map(|(_, value)| Arc::from(value.to_string()))
            .collect();
        let labels: Vec<Label> = values
            .iter()
            .zip(&rendered)
            .map(|((name, _), value)| Label::new(*name, SharedString::from_shared(value.clone())))
            .collect();
        let handles = Arc::new(register(labels));
        bucket.push(KnownSeries {
            values: rendered,
            handles: handles.clone(),
        });
        handles
    }
}

/// The TCP counters of every label set seen so far.
#[derive(Default)]
pub struct TcpSeries(SeriesCache<TcpCounters>);

impl TcpSeries {
    /// The counters for `labels`, registered with `recorder` the first time they are seen.
    pub fn counters(&self, recorder: &dyn Recorder, labels: &TrafficLabels) -> Arc<TcpCounters> {
        self.0.get(&labels.values(), |labels| {
            let counter = |name: &'static str| {
                recorder.register_counter(&Key::from_parts(name, labels.clone()), &METADATA)
            };
            TcpCounters {
                opened: counter(TCP_OPENED),
                closed: counter(TCP_CLOSED),
                received: counter(TCP_RECEIVED),
                sent: counter(TCP_SENT),
            }
        })
    }
}

/// Feeds formatted text into a hasher.
struct HashWriter<'a>(&'a mut DefaultHasher);

impl fmt::Write for HashWriter<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        self.0.write(text.as_bytes());
        Ok(())
    }
}

/// Whether `value` renders as `expected`, compared as it is formatted, without a String.
fn renders_as(value: &LabelValue<'_>, expected: &str) -> bool {
    struct Rest<'a>(&'a str);
    impl fmt::Write for Rest<'_> {
        fn write_str(&mut self, text: &str) -> fmt::Result {
            self.0 = self.0.strip_prefix(text).ok_or(fmt::Error)?;
            Ok(())
        }
    }
    let mut rest = Rest(expected);
    write!(rest, "{value}").is_ok() && rest.0.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::{Gauge, Histogram, KeyName, Unit};

    /// Remembers the keys registered.
    #[derive(Default)]
    struct Keys(Mutex<Vec<Key>>);

    impl Recorder for Keys {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            self.0.lock().unwrap().push(key.clone());
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    fn labels(principal: &str) -> TrafficLabels {
        TrafficLabels {
            reporter: Reporter::Source,
            source: None,
            source_principal: Some(principal.parse().unwrap()),
            destination: None,
            destination_principal: None,
            destination_service: Some(("echo.default.svc".into(), "default".into(), "echo".into())),
            mutual_tls: true,
            response_flags: "-",
        }
    }

    #[test]
    fn a_label_set_is_registered_once_with_istio_labels() {
        let recorder = Keys::default();
        let series = TcpSeries::default();
        let a = "spiffe://cluster.local/ns/default/sa/a";
        let first = series.counters(&recorder, &labels(a));
        let again = series.counters(&recorder, &labels(a));
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(recorder.0.lock().unwrap().len(), 4);
        // A value that differs only in its last character is another series.
        let other = series.counters(&recorder, &labels("spiffe://cluster.local/ns/default/sa/b"));
        assert!(!Arc::ptr_eq(&first, &other));
        let keys = recorder.0.lock().unwrap();
        assert_eq!(keys.len(), 8);
        assert_eq!(keys[0].name(), TCP_OPENED);
        let rendered: Vec<(String, String)> = keys[0]
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        let expected: Vec<(String, String)> = labels(a)
            .pairs()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(rendered, expected);
        assert_eq!(rendered.len(), TCP_LABELS);
        assert!(rendered.contains(&("source_principal".into(), a.into())));
    }

    #[test]
    fn renders_as_compares_whole_values() {
        let id: Identity = "spiffe://td/ns/n/sa/s".parse().unwrap();
        let value = LabelValue::Principal(Some(&id));
        assert!(renders_as(&value, "spiffe://td/ns/n/sa/s"));
        assert!(!renders_as(&value, "spiffe://td/ns/n/sa/s2"));
        assert!(!renders_as(&value, "spiffe://td/ns/n/sa/"));
        assert!(renders_as(&LabelValue::Principal(None), "unknown"));
    }
}
