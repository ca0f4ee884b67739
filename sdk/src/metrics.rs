//! Metrics defined once per label set, labels encoded in the name as Istio does.
//!
//! The ABI has no labels: `proxy_define_metric(type, name)` returns an id per *name*. Istio's
//! stats filter encodes each label into the name as `label=.=value;.;` before the metric name
//! (`reporter=.=waypoint;.;response_code=.=200;.;istio_requests_total`), and Envoy's stats tag
//! extraction (Istio's bootstrap regexes such as `(response_code=\.=(.+?);\.;)`) turns them back
//! into Prometheus labels. Ambit's host does the same, so labels written this way show up as
//! labels in Ambit, Envoy and Istio alike.
//!
//! A [`MetricFamily`] is one metric name with fixed label names; the first use of a label-value
//! set defines its series through the host, later uses reuse the id. Families belong to the
//! root context (ids are per VM) and are shared with HTTP contexts through `Rc<RefCell<_>>`.
//! Each family caps its number of series ([`MetricFamily::with_max_series`]): past the cap,
//! new label sets are counted under values `overflow`, so a label fed from requests cannot
//! grow the host's stats without bound.

use std::collections::HashMap;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{MetricType, Status};

/// Separates a label from its value.
pub const VALUE_SEPARATOR: &str = "=.=";
/// Ends a label-value pair.
pub const FIELD_SEPARATOR: &str = ";.;";
/// The label value used once a family has reached its series cap.
pub const OVERFLOW_VALUE: &str = "overflow";
/// Series per family unless [`MetricFamily::with_max_series`] says otherwise.
pub const DEFAULT_MAX_SERIES: usize = 1000;

/// Makes a label value safe to embed: `;` and `=` become `_` so a value can never contain a
/// separator and fool the tag extraction.
pub fn sanitize_value(value: &str) -> String {
    value.replace([';', '='], "_")
}

/// `label=.=value;.;...name`: the full metric name for one series.
pub fn tagged_name(name: &str, tags: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (label, value) in tags {
        out.push_str(label);
        out.push_str(VALUE_SEPARATOR);
        out.push_str(&sanitize_value(value));
        out.push_str(FIELD_SEPARATOR);
    }
    out.push_str(name);
    out
}

/// Splits a tagged name back into the metric name and its labels (what a host does).
pub fn parse_tagged_name(full: &str) -> (String, Vec<(String, String)>) {
    let mut tags = Vec::new();
    let mut rest = full;
    while let Some(end) = rest.find(FIELD_SEPARATOR) {
        let field = &rest[..end];
        match field.split_once(VALUE_SEPARATOR) {
            Some((label, value)) => tags.push((label.to_string(), value.to_string())),
            None => break,
        }
        rest = &rest[end + FIELD_SEPARATOR.len()..];
    }
    (rest.to_string(), tags)
}

/// Why a metric could not be updated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetricError {
    #[error("metric {name}: {got} label values given, the family has {expected} labels")]
    LabelCount {
        name: String,
        expected: usize,
        got: usize,
    },
    #[error("metric {name}: the host refused {op}: {status:?}")]
    Host {
        name: String,
        op: &'static str,
        status: Status,
    },
}

/// The host side of metrics; [`HostMetrics`] calls the proxy, tests use a fake.
pub trait MetricSink {
    fn define(&mut self, kind: MetricType, name: &str) -> Result<u32, Status>;
    fn increment(&mut self, id: u32, delta: i64) -> Result<(), Status>;
    fn record(&mut self, id: u32, value: u64) -> Result<(), Status>;
}

/// Metrics through `proxy_define_metric`, `proxy_increment_metric`, `proxy_record_metric`.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostMetrics;

impl MetricSink for HostMetrics {
    fn define(&mut self, kind: MetricType, name: &str) -> Result<u32, Status> {
        hostcalls::define_metric(kind, name)
    }
    fn increment(&mut self, id: u32, delta: i64) -> Result<(), Status> {
        hostcalls::increment_metric(id, delta)
    }
    fn record(&mut self, id: u32, value: u64) -> Result<(), Status> {
        hostcalls::record_metric(id, value)
    }
}

/// One metric name with fixed label names; series defined on first use.
#[derive(Debug)]
pub struct MetricFamily {
    name: String,
    kind: MetricType,
    labels: Vec<String>,
    series: HashMap<Vec<String>, u32>,
    max_series: usize,
}

impl MetricFamily {
    fn new(kind: MetricType, name: &str, labels: &[&str]) -> Self {
        Self {
            name: name.to_string(),
            kind,
            labels: labels.iter().map(|l| l.to_string()).collect(),
            series: HashMap::new(),
            max_series: DEFAULT_MAX_SERIES,
        }
    }

    /// A monotonic counter (`proxy_increment_metric`).
    pub fn counter(name: &str, labels: &[&str]) -> Self {
        Self::new(MetricType::Counter, name, labels)
    }

    /// A gauge (`proxy_record_metric` sets it, `proxy_increment_metric` moves it).
    pub fn gauge(name: &str, labels: &[&str]) -> Self {
        Self::new(MetricType::Gauge, name, labels)
    }

    /// A histogram (`proxy_record_metric` adds an observation).
    pub fn histogram(name: &str, labels: &[&str]) -> Self {
        Self::new(MetricType::Histogram, name, labels)
    }

    /// Caps the number of series (at least 1: the overflow series).
    pub fn with_max_series(mut self, max: usize) -> Self {
        self.max_series = max.max(1);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> MetricType {
        self.kind
    }

    /// Series defined so far.
    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// The full (tagged) name of one series.
    pub fn series_name(&self, values: &[&str]) -> String {
        let tags: Vec<(&str, &str)> = self
            .labels
            .iter()
            .map(String::as_str)
            .zip(values.iter().copied())
            .collect();
        tagged_name(&self.name, &tags)
    }

    /// The host id of a series, defining it on first use.
    pub fn id(&mut self, sink: &mut impl MetricSink, values: &[&str]) -> Result<u32, MetricError> {
        if values.len() != self.labels.len() {
            return Err(MetricError::LabelCount {
                name: self.name.clone(),
                expected: self.labels.len(),
                got: values.len(),
            });
        }
        let mut key: Vec<String> = values.iter().map(|v| sanitize_value(v)).collect();
        if let Some(id) = self.series.get(&key) {
            return Ok(*id);
        }
        if self.series.len() + 1 >= self.max_series {
            // Keep the last slot for the overflow series.
            key = vec![OVERFLOW_VALUE.to_string(); self.labels.len()];
            if let Some(id) = self.series.get(&key) {
                return Ok(*id);
            }
        }
        let refs: Vec<&str> = key.iter().map(String::as_str).collect();
        let full = self.series_name(&refs);
        let id = sink
            .define(self.kind, &full)
            .map_err(|status| self.host_error("define", status))?;
        self.series.insert(key, id);
        Ok(id)
    }

    /// Adds `delta` to a counter or gauge series.
    pub fn increment(
        &mut self,
        sink: &mut impl MetricSink,
        values: &[&str],
        delta: i64,
    ) -> Result<(), MetricError> {
        let id = self.id(sink, values)?;
        sink.increment(id, delta)
            .map_err(|status| self.host_error("increment", status))
    }

    /// Records a histogram observation, or sets a gauge.
    pub fn record(
        &mut self,
        sink: &mut impl MetricSink,
        values: &[&str],
        value: u64,
    ) -> Result<(), MetricError> {
        let id = self.id(sink, values)?;
        sink.record(id, value)
            .map_err(|status| self.host_error("record", status))
    }

    fn host_error(&self, op: &'static str, status: Status) -> MetricError {
        MetricError::Host {
            name: self.name.clone(),
            op,
            status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every host call.
    #[derive(Default)]
    struct FakeSink {
        defined: Vec<(MetricType, String)>,
        increments: Vec<(u32, i64)>,
        records: Vec<(u32, u64)>,
    }

    impl MetricSink for FakeSink {
        fn define(&mut self, kind: MetricType, name: &str) -> Result<u32, Status> {
            self.defined.push((kind, name.to_string()));
            Ok(self.defined.len() as u32 + 100)
        }
        fn increment(&mut self, id: u32, delta: i64) -> Result<(), Status> {
            self.increments.push((id, delta));
            Ok(())
        }
        fn record(&mut self, id: u32, value: u64) -> Result<(), Status> {
            self.records.push((id, value));
            Ok(())
        }
    }

    #[test]
    fn names_follow_istio_encoding() {
        assert_eq!(
            tagged_name(
                "istio_requests_total",
                &[("reporter", "waypoint"), ("response_code", "200")]
            ),
            "reporter=.=waypoint;.;response_code=.=200;.;istio_requests_total"
        );
        assert_eq!(tagged_name("plain", &[]), "plain");
        let (name, tags) =
            parse_tagged_name("reporter=.=waypoint;.;response_code=.=200;.;istio_requests_total");
        assert_eq!(name, "istio_requests_total");
        assert_eq!(
            tags,
            vec![
                ("reporter".into(), "waypoint".into()),
                ("response_code".into(), "200".into())
            ]
        );
    }

    #[test]
    fn values_cannot_inject_separators() {
        let full = tagged_name("m", &[("route", "a;.;evil=.=x")]);
        let (name, tags) = parse_tagged_name(&full);
        assert_eq!(name, "m");
        assert_eq!(tags, vec![("route".into(), "a_._evil_._x".into())]);
    }

    #[test]
    fn series_are_defined_once() {
        let mut sink = FakeSink::default();
        let mut requests = MetricFamily::counter("requests_total", &["method", "code"]);
        requests.increment(&mut sink, &["GET", "200"], 1).unwrap();
        requests.increment(&mut sink, &["GET", "200"], 2).unwrap();
        requests.increment(&mut sink, &["POST", "500"], 1).unwrap();
        assert_eq!(
            sink.defined,
            vec![
                (
                    MetricType::Counter,
                    "method=.=GET;.;code=.=200;.;requests_total".to_string()
                ),
                (
                    MetricType::Counter,
                    "method=.=POST;.;code=.=500;.;requests_total".to_string()
                ),
            ]
        );
        assert_eq!(sink.increments, vec![(101, 1), (101, 2), (102, 1)]);

        let mut latency = MetricFamily::histogram("latency_ms", &["route"]);
        latency.record(&mut sink, &["api"], 12).unwrap();
        assert_eq!(sink.records, vec![(103, 12)]);
        assert_eq!(sink.defined[2].0, MetricType::Histogram);
    }

    #[test]
    fn label_count_is_checked() {
        let mut sink = FakeSink::default();
        let mut f = MetricFamily::counter("c", &["a", "b"]);
        let err = f.increment(&mut sink, &["x"], 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "metric c: 1 label values given, the family has 2 labels"
        );
        assert!(sink.defined.is_empty());
    }

    #[test]
    fn series_cap_folds_into_overflow() {
        let mut sink = FakeSink::default();
        let mut f = MetricFamily::counter("c", &["path"]).with_max_series(3);
        for p in ["/a", "/b", "/c", "/d", "/a"] {
            f.increment(&mut sink, &[p], 1).unwrap();
        }
        let names: Vec<&str> = sink.defined.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names,
            vec!["path=.=/a;.;c", "path=.=/b;.;c", "path=.=overflow;.;c"]
        );
        assert_eq!(f.series_count(), 3);
        // /c and /d both went to the overflow series, /a kept its own.
        assert_eq!(
            sink.increments,
            vec![(101, 1), (102, 1), (103, 1), (103, 1), (101, 1)]
        );
    }

    #[test]
    fn host_errors_name_the_metric() {
        struct Refusing;
        impl MetricSink for Refusing {
            fn define(&mut self, _: MetricType, _: &str) -> Result<u32, Status> {
                Err(Status::BadArgument)
            }
            fn increment(&mut self, _: u32, _: i64) -> Result<(), Status> {
                Ok(())
            }
            fn record(&mut self, _: u32, _: u64) -> Result<(), Status> {
                Ok(())
            }
        }
        let mut f = MetricFamily::gauge("g", &[]);
        assert_eq!(
            f.record(&mut Refusing, &[], 1).unwrap_err().to_string(),
            "metric g: the host refused define: BadArgument"
        );
    }
}
