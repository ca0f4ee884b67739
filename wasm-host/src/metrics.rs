//! Metrics that filters define (`proxy_define_metric`): counters, gauges and histograms shared by
//! every VM of the process, readable back by filters and rendered in Prometheus text for the
//! proxy's `/metrics`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::abi::{MetricType, Status};

/// Envoy's default histogram buckets (milliseconds, as Envoy's histograms usually are).
const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// A process can't be flooded with series by a filter minting names per request.
const MAX_METRICS: usize = 10_000;

struct Metric {
    /// The Prometheus metric family, and its labels rendered (`k="v",...`, or empty).
    family: String,
    labels: String,
    kind: MetricType,
    value: AtomicI64,
    buckets: [AtomicU64; BUCKETS.len()],
    sum: AtomicU64,
}

/// The process-wide registry; ids handed to guests are indexes + 1.
#[derive(Default)]
pub struct WasmMetrics {
    by_name: Mutex<HashMap<(String, MetricType), u32>>,
    metrics: RwLock<Vec<Arc<Metric>>>,
}

impl WasmMetrics {
    /// Defining a name twice with the same type returns the same metric.
    pub(crate) fn define(&self, kind: MetricType, name: &str) -> Result<u32, Status> {
        let mut by_name = self.by_name.lock().expect("metrics lock");
        if let Some(&id) = by_name.get(&(name.to_owned(), kind)) {
            return Ok(id);
        }
        let mut metrics = self.metrics.write().expect("metrics lock");
        if metrics.len() >= MAX_METRICS {
            return Err(Status::InternalFailure);
        }
        let (family, labels) = split_tags(name);
        metrics.push(Arc::new(Metric {
            family,
            labels,
            kind,
            value: AtomicI64::new(0),
            buckets: Default::default(),
            sum: AtomicU64::new(0),
        }));
        let id = metrics.len() as u32;
        by_name.insert((name.to_owned(), kind), id);
        Ok(id)
    }

    fn get(&self, id: u32) -> Result<Arc<Metric>, Status> {
        let metrics = self.metrics.read().expect("metrics lock");
        metrics
            .get((id as usize).wrapping_sub(1))
            .cloned()
            .ok_or(Status::NotFound)
    }

    /// Counters only go up; gauges move both ways.
    pub(crate) fn increment(&self, id: u32, delta: i64) -> Result<(), Status> {
        let metric = self.get(id)?;
        match metric.kind {
            MetricType::Counter if delta < 0 => Err(Status::BadArgument),
            MetricType::Counter | MetricType::Gauge => {
                metric.value.fetch_add(delta, Ordering::Relaxed);
                Ok(())
            }
            MetricType::Histogram => Err(Status::BadArgument),
        }
    }

    /// Sets a gauge or counter, or adds an observation to a histogram.
    pub(crate) fn record(&self, id: u32, value: u64) -> Result<(), Status> {
        let metric = self.get(id)?;
        match metric.kind {
            MetricType::Counter | MetricType::Gauge => {
                metric.value.store(value as i64, Ordering::Relaxed)
            }
            MetricType::Histogram => {
                metric.value.fetch_add(1, Ordering::Relaxed);
                metric.sum.fetch_add(value, Ordering::Relaxed);
                for (bound, bucket) in BUCKETS.iter().zip(&metric.buckets) {
                    if value as f64 <= *bound {
                        bucket.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        Ok(())
    }

    /// A counter's or gauge's value; a histogram's observation count.
    pub(crate) fn value(&self, id: u32) -> Result<u64, Status> {
        Ok(self.get(id)?.value.load(Ordering::Relaxed) as u64)
    }

    /// Prometheus text exposition of every defined metric, one `# TYPE` line per family.
    pub fn render(&self) -> String {
        let mut metrics: Vec<Arc<Metric>> = self.metrics.read().expect("metrics lock").clone();
        metrics.sort_by(|a, b| (&a.family, &a.labels).cmp(&(&b.family, &b.labels)));
        let mut out = String::new();
        let mut family: Option<&str> = None;
        for metric in &metrics {
            let name = &metric.family;
            if family != Some(name.as_str()) {
                let kind = match metric.kind {
                    MetricType::Counter => "counter",
                    MetricType::Gauge => "gauge",
                    MetricType::Histogram => "histogram",
                };
                let _ = writeln!(out, "# TYPE {name} {kind}");
                family = Some(name);
            }
            let labels = &metric.labels;
            let value = metric.value.load(Ordering::Relaxed);
            let braces = |extra: &str| match (labels.is_empty(), extra.is_empty()) {
                (true, true) => String::new(),
                (true, false) => format!("{{{extra}}}"),
                (false, true) => format!("{{{labels}}}"),
                (false, false) => format!("{{{labels},{extra}}}"),
            };
            match metric.kind {
                MetricType::Counter | MetricType::Gauge => {
                    let _ = writeln!(out, "{name}{} {value}", braces(""));
                }
                MetricType::Histogram => {
                    for (bound, bucket) in BUCKETS.iter().zip(&metric.buckets) {
                        let count = bucket.load(Ordering::Relaxed);
                        let le = format!("le=\"{bound}\"");
                        let _ = writeln!(out, "{name}_bucket{} {count}", braces(&le));
                    }
                    let sum = metric.sum.load(Ordering::Relaxed);
                    let _ = writeln!(out, "{name}_bucket{} {value}", braces("le=\"+Inf\""));
                    let _ = writeln!(out, "{name}_sum{} {sum}", braces(""));
                    let _ = writeln!(out, "{name}_count{} {value}", braces(""));
                }
            }
        }
        out
    }
}

/// Reads Istio's tag encoding in a stat name (`route=.=orders;.;method=.=GET;.;requests_total`:
/// tags `key=.=value` joined by `;.;`, the metric name last), as Istio's stats configuration
/// extracts it, into a family name and rendered labels.
fn split_tags(name: &str) -> (String, String) {
    let mut parts: Vec<&str> = name.split(";.;").collect();
    let family = prometheus_name(parts.pop().unwrap_or_default());
    let labels = parts
        .iter()
        .filter_map(|tag| tag.split_once("=.="))
        .map(|(key, value)| {
            let value = value
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{}=\"{value}\"", prometheus_name(key))
        })
        .collect::<Vec<_>>()
        .join(",");
    (family, labels)
}

/// Envoy stat names use dots and other characters Prometheus refuses; they become `_`.
fn prometheus_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_count_and_render() {
        let metrics = WasmMetrics::default();
        let counter = metrics.define(MetricType::Counter, "my.requests").unwrap();
        assert_eq!(
            metrics.define(MetricType::Counter, "my.requests").unwrap(),
            counter
        );
        metrics.increment(counter, 2).unwrap();
        assert_eq!(metrics.increment(counter, -1), Err(Status::BadArgument));
        let histogram = metrics.define(MetricType::Histogram, "latency").unwrap();
        metrics.record(histogram, 7).unwrap();
        assert_eq!(metrics.value(counter).unwrap(), 2);
        assert_eq!(metrics.value(99), Err(Status::NotFound));
        let text = metrics.render();
        assert!(text.contains("my_requests 2"), "{text}");
        assert!(text.contains("latency_bucket{le=\"10\"} 1"), "{text}");
        assert!(text.contains("latency_bucket{le=\"5\"} 0"), "{text}");
        assert!(text.contains("latency_count 1"), "{text}");
        assert_eq!(text.matches("# TYPE my_requests").count(), 1);
    }

    #[test]
    fn istio_tag_encoding_becomes_labels() {
        let metrics = WasmMetrics::default();
        let get = metrics
            .define(
                MetricType::Counter,
                "route=.=orders;.;method=.=GET;.;app_requests_total",
            )
            .unwrap();
        let post = metrics
            .define(
                MetricType::Counter,
                "route=.=orders;.;method=.=POST;.;app_requests_total",
            )
            .unwrap();
        metrics.increment(get, 3).unwrap();
        metrics.increment(post, 1).unwrap();
        let text = metrics.render();
        assert!(
            text.contains("app_requests_total{route=\"orders\",method=\"GET\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("app_requests_total{route=\"orders\",method=\"POST\"} 1"),
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE app_requests_total counter").count(),
            1,
            "{text}"
        );
    }
}
