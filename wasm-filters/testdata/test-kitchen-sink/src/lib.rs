//! `test-kitchen-sink`: one filter that calls every host function the proxy-wasm crate
//! exposes (gRPC aside) and reports what it observed as response headers `x-ks-*`, so the
//! host's tests can assert on one response.
//!
//! Plugin configuration (all optional):
//! `{"upstream": "echo.default.svc.cluster.local:80", "tick_ms": 10, "foreign_function": "name",
//! "callout_timeout_ms": 5000}`.
//!
//! Root context:
//! - `on_vm_start`: reads the VM configuration (its size goes to shared data `ks.vm_config_size`),
//!   registers queue `ks-queue`, defines metrics `ks_counter` (counter), `ks_gauge` (gauge),
//!   `ks_histogram` (histogram) and `ks=.=1;.;ks_tagged_total` (counter with a tag).
//! - `on_configure`: parses the configuration, `set_tick_period(tick_ms)` (default 10 ms), sets
//!   property `ks.root` to `r` from the root context and reads it back (`x-ks-root-prop`).
//! - `on_tick`: adds 1 to shared `ks.ticks` (CAS loop) and enqueues `tick-<n>`; after 3 ticks
//!   sets the period to 0 (stop).
//! - `on_queue_ready`: dequeues everything, adds the count to shared `ks.queue.count` and
//!   stores the last item in `ks.queue.last`; logs `ks: queue ready <count>` (info), so a test
//!   can tell which plugin's VM was notified.
//!
//! HTTP context, request headers (request header switches: `x-ks-local`: answer locally with
//! 200 and the observations; `x-ks-rewrite-body`: rewrite the request and response bodies;
//! `x-ks-no-callout`: skip the callout; `x-ks-stream-calls`: also call `resume_downstream`,
//! `resume_upstream` and `close_upstream`, which an HTTP host answers `Ok` as no-ops):
//! - headers: get all, get one, set, add twice, remove, replace the whole map (`x-ks-pairs`);
//! - properties: `request.path`, `request.method`, `source.address`, `connection.mtls` (`true`/
//!   `false`), `node.metadata.NAMESPACE`, `plugin_name`, `plugin_vm_id`, set `ks.prop` and read
//!   it back;
//! - empty buffers: the request body before any body (`x-ks-empty-body`: `none`) and the
//!   callout response body outside a callout (`x-ks-no-call-body`: `none`), which must not trap;
//! - shared data: `ks.counter` set with its CAS, then again with the stale CAS (expects
//!   `CasMismatch`);
//! - queues: resolve `ks-queue` by the VM id, enqueue `from-http`;
//! - metrics: increment, record gauge 42 and histogram 7, read counter and gauge back;
//! - time, log level, `proxy_log` (directly and through `log`), WASI `random_get` (through
//!   std's `RandomState`), an optional foreign function;
//! - with an `upstream`: `dispatch_http_call` (GET `/ks`, body `ping`, trailer `x-ks-trailer: t`),
//!   pause, and in `on_http_call_response` read the answer's headers, body and trailers, then
//!   `resume_http_request`.
//!
//! Then request body (logs `ks: request body <size> <eos>` at info on every call)/trailers,
//! response headers (where the report is written; also sets `x-ks-resp-set: 1`, replaces
//! `x-ks-resp-replace` with `new`, and removes `x-ks-upstream-remove-me`), response
//! body/trailers, and `on_log` (adds 1 to shared `ks.logged`, increments `ks_counter`).
//!
//! Report headers (every value is text): `x-ks-req-headers` (count), `x-ks-path`,
//! `x-ks-removed` (`true` once removed), `x-ks-added` (values of the added header),
//! `x-ks-method`, `x-ks-source-address`, `x-ks-mtls`, `x-ks-node-namespace`, `x-ks-root-prop`,
//! `x-ks-empty-body`, `x-ks-no-call-body`, `x-ks-stream-calls`,
//! `x-ks-pairs` (`ok` when the replaced map kept the marker), `x-ks-prop-path`,
//! `x-ks-plugin-name`, `x-ks-vm-id`, `x-ks-prop-roundtrip`, `x-ks-shared-counter`,
//! `x-ks-cas-mismatch`, `x-ks-queue-resolved`, `x-ks-enqueue`, `x-ks-metric-counter`,
//! `x-ks-metric-gauge`, `x-ks-metrics` (`ok` or the first error), `x-ks-time-ok`,
//! `x-ks-log-level`, `x-ks-random`, `x-ks-foreign`, `x-ks-callout-status`,
//! `x-ks-callout-body`, `x-ks-callout-headers`, `x-ks-callout-trailers`, `x-ks-callout-error`,
//! `x-ks-req-body-size`, `x-ks-req-trailers`, `x-ks-resp-status`, `x-ks-resp-headers`,
//! `x-ks-ticks`, `x-ks-queue-count`, `x-ks-queue-last`, `x-ks-logged` (streams logged before
//! this one), `x-ks-vm-config-size`. The response body, when rewritten, becomes
//! `ks:<original>`; response trailers get `x-ks-resp-trailer: 1` when there are any.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MetricType, Status};
use serde::Deserialize;

/// The plugin configuration.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Config {
    pub upstream: Option<String>,
    pub tick_ms: Option<u64>,
    pub foreign_function: Option<String>,
    pub callout_timeout_ms: Option<u64>,
}

impl Config {
    pub fn parse(bytes: Option<&[u8]>) -> Config {
        bytes
            .filter(|b| !b.is_empty())
            .and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or_default()
    }
}

/// Metric ids defined by the root context.
#[derive(Clone, Copy, Debug, Default)]
struct Metrics {
    counter: u32,
    gauge: u32,
    histogram: u32,
    tagged: u32,
}

const QUEUE: &str = "ks-queue";

/// Reads a decimal counter from shared data.
fn shared_number(key: &str) -> u64 {
    match hostcalls::get_shared_data(key) {
        Ok((Some(v), _)) => String::from_utf8_lossy(&v).parse().unwrap_or(0),
        _ => 0,
    }
}

/// Adds `delta` to a decimal counter in shared data, retrying on `CasMismatch`.
fn shared_add(key: &str, delta: u64) -> u64 {
    for _ in 0..16 {
        let (value, cas) = hostcalls::get_shared_data(key).unwrap_or((None, None));
        let n = value
            .map(|v| String::from_utf8_lossy(&v).parse::<u64>().unwrap_or(0))
            .unwrap_or(0)
            + delta;
        match hostcalls::set_shared_data(key, Some(n.to_string().as_bytes()), cas) {
            Ok(()) => return n,
            Err(Status::CasMismatch) => continue,
            Err(_) => return 0,
        }
    }
    0
}

fn log(message: &str) {
    let _ = hostcalls::log(LogLevel::Info, message);
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| Box::new(SinkRoot::default()));
}}

#[derive(Default)]
struct SinkRoot {
    config: Rc<Config>,
    root_prop: Rc<String>,
    metrics: Metrics,
    queue: u32,
    ticks: u64,
}

impl Context for SinkRoot {}

impl RootContext for SinkRoot {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        log("ks: vm start");
        let vm_config = self.get_vm_configuration().unwrap_or_default();
        let _ = hostcalls::set_shared_data(
            "ks.vm_config_size",
            Some(vm_config.len().to_string().as_bytes()),
            None,
        );
        self.queue = self.register_shared_queue(QUEUE);
        let define = |kind, name| hostcalls::define_metric(kind, name).unwrap_or(0);
        self.metrics = Metrics {
            counter: define(MetricType::Counter, "ks_counter"),
            gauge: define(MetricType::Gauge, "ks_gauge"),
            histogram: define(MetricType::Histogram, "ks_histogram"),
            tagged: define(MetricType::Counter, "ks=.=1;.;ks_tagged_total"),
        };
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        self.config = Rc::new(Config::parse(self.get_plugin_configuration().as_deref()));
        let tick = self.config.tick_ms.unwrap_or(10);
        if tick > 0 {
            self.set_tick_period(Duration::from_millis(tick));
        }
        // From the root context: no request to attach it to, still `Ok` (the SDK traps on
        // anything else).
        self.set_property(vec!["ks", "root"], Some(b"r"));
        let back = self
            .get_property(vec!["ks", "root"])
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        self.root_prop = Rc::new(back);
        log("ks: configured");
        true
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        shared_add("ks.ticks", 1);
        let item = format!("tick-{}", self.ticks);
        let _ = self.enqueue_shared_queue(self.queue, Some(item.as_bytes()));
        if self.ticks >= 3 {
            self.set_tick_period(Duration::ZERO);
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        let mut count = 0;
        let mut last = None;
        while let Ok(Some(item)) = self.dequeue_shared_queue(queue_id) {
            count += 1;
            last = Some(item);
        }
        log(&format!("ks: queue ready {count}"));
        shared_add("ks.queue.count", count);
        if let Some(last) = last {
            let _ = hostcalls::set_shared_data("ks.queue.last", Some(&last), None);
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(SinkStream {
            config: self.config.clone(),
            root_prop: self.root_prop.clone(),
            metrics: self.metrics,
            queue: self.queue,
            report: Vec::new(),
            rewrite_body: false,
            callout: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct SinkStream {
    config: Rc<Config>,
    root_prop: Rc<String>,
    metrics: Metrics,
    queue: u32,
    report: Vec<(String, String)>,
    rewrite_body: bool,
    callout: Option<u32>,
}

impl SinkStream {
    fn note(&mut self, name: &str, value: impl ToString) {
        self.report
            .push((format!("x-ks-{name}"), value.to_string()));
    }

    fn headers_phase(&mut self) {
        let headers = self.get_http_request_headers();
        self.note("req-headers", headers.len());
        let path = self.get_http_request_header(":path").unwrap_or_default();
        self.note("path", path);

        self.set_http_request_header("x-ks-set", Some("1"));
        self.add_http_request_header("x-ks-added", "a");
        self.add_http_request_header("x-ks-added", "b");
        self.remove_http_request_header("x-ks-remove-me");
        let removed = self.get_http_request_header("x-ks-remove-me").is_none();
        self.note("removed", removed);
        let added = self
            .get_http_request_headers()
            .into_iter()
            .filter(|(k, _)| k == "x-ks-added")
            .map(|(_, v)| v)
            .collect::<Vec<_>>()
            .join(",");
        self.note("added", added);
        let mut pairs = self.get_http_request_headers();
        pairs.push(("x-ks-pairs".into(), "1".into()));
        self.set_http_request_headers(
            pairs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
        );
        let pairs_ok = self.get_http_request_header("x-ks-pairs").as_deref() == Some("1");
        self.note("pairs", if pairs_ok { "ok" } else { "lost" });
    }

    fn properties_phase(&mut self) {
        let text = |v: Option<Vec<u8>>| {
            v.map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        let path = text(self.get_property(vec!["request", "path"]));
        self.note("prop-path", path);
        let name = text(self.get_property(vec!["plugin_name"]));
        self.note("plugin-name", name);
        let vm_id = text(self.get_property(vec!["plugin_vm_id"]));
        self.note("vm-id", &vm_id);
        let method = text(self.get_property(vec!["request", "method"]));
        self.note("method", method);
        let source = text(self.get_property(vec!["source", "address"]));
        self.note("source-address", source);
        let mtls = self
            .get_property(vec!["connection", "mtls"])
            .map(|v| v.first() == Some(&1));
        self.note("mtls", mtls.map_or("absent".into(), |m| m.to_string()));
        let namespace = text(self.get_property(vec!["node", "metadata", "NAMESPACE"]));
        self.note("node-namespace", namespace);
        let root_prop = self.root_prop.to_string();
        self.note("root-prop", root_prop);
        let body = self.get_http_request_body(0, 10);
        self.note("empty-body", if body.is_none() { "none" } else { "some" });
        let call_body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, 10);
        self.note(
            "no-call-body",
            match call_body {
                Ok(None) => "none".to_string(),
                Ok(Some(b)) => format!("{} bytes", b.len()),
                Err(s) => format!("{s:?}"),
            },
        );
        self.set_property(vec!["ks", "prop"], Some(b"v"));
        let back = text(self.get_property(vec!["ks", "prop"]));
        self.note("prop-roundtrip", back);

        let resolved = self.resolve_shared_queue(&vm_id, QUEUE);
        self.note("queue-resolved", resolved == Some(self.queue));
        let enqueued = self.enqueue_shared_queue(self.queue, Some(b"from-http"));
        self.note("enqueue", status_text(enqueued));
    }

    fn shared_phase(&mut self) {
        let (value, cas) = self.get_shared_data("ks.counter");
        let n = value
            .map(|v| String::from_utf8_lossy(&v).parse::<u64>().unwrap_or(0))
            .unwrap_or(0)
            + 1;
        let first = self.set_shared_data("ks.counter", Some(n.to_string().as_bytes()), cas);
        self.note(
            "shared-counter",
            if first.is_ok() {
                n.to_string()
            } else {
                status_text(first)
            },
        );
        // The CAS just used is stale now: only a key that existed has one to go stale.
        let again = self.set_shared_data("ks.counter", Some(b"stale"), cas.or(Some(u32::MAX)));
        self.note("cas-mismatch", again == Err(Status::CasMismatch));
    }

    fn metrics_phase(&mut self) {
        let m = self.metrics;
        let results = [
            hostcalls::increment_metric(m.counter, 1),
            hostcalls::record_metric(m.gauge, 42),
            hostcalls::record_metric(m.histogram, 7),
            hostcalls::increment_metric(m.tagged, 2),
        ];
        let first_err = results.iter().find_map(|r| r.err());
        self.note(
            "metrics",
            first_err
                .map(|s| format!("{s:?}"))
                .unwrap_or_else(|| "ok".into()),
        );
        let counter = hostcalls::get_metric(m.counter);
        self.note(
            "metric-counter",
            counter
                .map(|v| v.to_string())
                .unwrap_or_else(|s| format!("{s:?}")),
        );
        let gauge = hostcalls::get_metric(m.gauge);
        self.note(
            "metric-gauge",
            gauge
                .map(|v| v.to_string())
                .unwrap_or_else(|s| format!("{s:?}")),
        );
    }

    fn misc_phase(&mut self) {
        let now = self.get_current_time();
        // After 2020-01-01: a real wall clock, not zero.
        let ok = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() > 1_577_836_800)
            .unwrap_or(false);
        self.note("time-ok", ok);
        let level = hostcalls::get_log_level()
            .map(|l| format!("{l:?}"))
            .unwrap_or_default();
        self.note("log-level", level);
        log("ks: request headers");
        // Through the `log` facade and the logger proxy-wasm installs (Debug passes at Trace).
        log::debug!("ks: debug line");
        // std's RandomState seeds from WASI random_get.
        let mut h = RandomState::new().build_hasher();
        h.write_u8(1);
        self.note("random", h.finish() != 0);
        if let Some(name) = self.config.foreign_function.clone() {
            let result = self.call_foreign_function(&name, Some(b"ks"));
            let text = match result {
                Ok(v) => format!("ok:{}", v.map(|b| b.len()).unwrap_or(0)),
                Err(s) => format!("{s:?}"),
            };
            self.note("foreign", text);
        }
    }
}

fn status_text(r: Result<(), Status>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(s) => format!("{s:?}"),
    }
}

impl Context for SinkStream {
    fn on_http_call_response(
        &mut self,
        token: u32,
        n_headers: usize,
        body_size: usize,
        n_trailers: usize,
    ) {
        if self.callout != Some(token) {
            return;
        }
        self.callout = None;
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_default();
        self.note("callout-status", status);
        self.note("callout-headers", n_headers);
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        self.note("callout-body", String::from_utf8_lossy(&body));
        self.note("callout-trailers", n_trailers);
        let _ = self.get_http_call_response_trailers();
        self.resume_http_request();
    }
}

impl HttpContext for SinkStream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.rewrite_body = self.get_http_request_header("x-ks-rewrite-body").is_some();
        self.headers_phase();
        self.properties_phase();
        self.shared_phase();
        self.metrics_phase();
        self.misc_phase();
        self.note("logged", shared_number("ks.logged"));

        if self.get_http_request_header("x-ks-local").is_some() {
            let headers: Vec<(&str, &str)> = self
                .report
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            self.send_http_response(200, headers, Some(b"kitchen-sink local"));
            return Action::Pause;
        }
        if self.rewrite_body {
            self.remove_http_request_header("content-length");
        }
        if self.get_http_request_header("x-ks-stream-calls").is_some() {
            let results = [
                hostcalls::resume_downstream(),
                hostcalls::resume_upstream(),
                hostcalls::close_upstream(),
            ];
            self.add_http_request_header("x-ks-stream-calls-seen", "1");
            self.note("stream-calls", results.iter().all(|r| r.is_ok()));
        }
        let skip = self.get_http_request_header("x-ks-no-callout").is_some();
        if let (Some(upstream), false) = (self.config.upstream.clone(), skip) {
            let result = self.dispatch_http_call(
                &upstream,
                vec![
                    (":method", "GET"),
                    (":path", "/ks"),
                    (":authority", &upstream),
                ],
                Some(b"ping"),
                vec![("x-ks-trailer", "t")],
                Duration::from_millis(self.config.callout_timeout_ms.unwrap_or(5000)),
            );
            match result {
                Ok(token) => {
                    self.callout = Some(token);
                    return Action::Pause;
                }
                Err(s) => self.note("callout-error", format!("{s:?}")),
            }
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, eos: bool) -> Action {
        log(&format!("ks: request body {body_size} {eos}"));
        if self.rewrite_body && !eos {
            return Action::Pause;
        }
        self.report.retain(|(k, _)| k != "x-ks-req-body-size");
        self.note("req-body-size", body_size);
        if self.rewrite_body {
            let body = self.get_http_request_body(0, body_size).unwrap_or_default();
            let mut new = b"rewritten:".to_vec();
            new.extend_from_slice(&body);
            self.set_http_request_body(0, body_size, &new);
        }
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _n: usize) -> Action {
        let trailers = self.get_http_request_trailers();
        self.note("req-trailers", trailers.len());
        self.add_http_request_trailer("x-ks-trailer-added", "1");
        self.set_http_request_trailer("x-ks-trailer-set", Some("1"));
        self.remove_http_request_trailer("x-ks-trailer-remove");
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let status = self.get_http_response_header(":status").unwrap_or_default();
        self.note("resp-status", status);
        let count = self.get_http_response_headers().len();
        self.note("resp-headers", count);
        self.note("ticks", shared_number("ks.ticks"));
        self.note("queue-count", shared_number("ks.queue.count"));
        let last = match self.get_shared_data("ks.queue.last") {
            (Some(v), _) => String::from_utf8_lossy(&v).into_owned(),
            _ => String::new(),
        };
        self.note("queue-last", last);
        self.note("vm-config-size", shared_number("ks.vm_config_size"));
        self.remove_http_response_header("x-ks-upstream-remove-me");
        self.set_http_response_header("x-ks-resp-set", Some("1"));
        if self.get_http_response_header("x-ks-resp-replace").is_some() {
            self.set_http_response_header("x-ks-resp-replace", Some("new"));
        }
        if self.rewrite_body {
            self.remove_http_response_header("content-length");
        }
        for (name, value) in std::mem::take(&mut self.report) {
            self.add_http_response_header(&name, &value);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, eos: bool) -> Action {
        if !self.rewrite_body {
            return Action::Continue;
        }
        if !eos {
            return Action::Pause;
        }
        let body = self
            .get_http_response_body(0, body_size)
            .unwrap_or_default();
        let mut new = b"ks:".to_vec();
        new.extend_from_slice(&body);
        self.set_http_response_body(0, body_size, &new);
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _n: usize) -> Action {
        self.add_http_response_trailer("x-ks-resp-trailer", "1");
        Action::Continue
    }

    fn on_log(&mut self) {
        shared_add("ks.logged", 1);
        let _ = hostcalls::increment_metric(self.metrics.counter, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_leniently() {
        let c = Config::parse(Some(br#"{"upstream": "echo:80", "tick_ms": 0}"#));
        assert_eq!(c.upstream.as_deref(), Some("echo:80"));
        assert_eq!(c.tick_ms, Some(0));
        assert_eq!(Config::parse(Some(b"nope")), Config::default());
        assert_eq!(Config::parse(None), Config::default());
    }
}
