//! `metrics`: custom request metrics by route, method and status.
//!
//! Configuration:
//!
//! ```json
//! {
//!   "routes": [{"name": "orders", "prefix": "/orders"}, {"name": "api", "prefix": "/api"}],
//!   "default_route": "other",
//!   "metric_prefix": "ambit_filter_"
//! }
//! ```
//!
//! Two metrics, defined through `proxy_define_metric` on first use of each label set and
//! recorded in `on_log` (so local replies and resets are counted too):
//!
//! - counter `<prefix>requests_total{route, method, response_code}`;
//! - histogram `<prefix>request_duration_milliseconds{route, method}`, from request headers
//!   to the end of the stream.
//!
//! Labels are encoded in the name Istio's way (`route=.=orders;.;...;.;ambit_filter_requests_total`),
//! see [`ambit_sdk::metrics`]. The route is the longest configured `prefix` of the path
//! (query excluded), else `default_route`; methods outside the standard set count as `OTHER`;
//! the status is the `response.code` property, else the response `:status`, else `0`. So every
//! label has a bounded set of values.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::SystemTime;

use ambit_sdk::metrics::MetricFamily;
use ambit_sdk::prelude::*;
use ambit_sdk::proxy_wasm;
use serde::Deserialize;

/// One named route.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    pub prefix: String,
}

/// The plugin configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub routes: Vec<Route>,
    pub default_route: String,
    pub metric_prefix: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            default_route: "other".into(),
            metric_prefix: "ambit_filter_".into(),
        }
    }
}

impl PluginConfig for Config {
    fn validate(&mut self) -> Result<(), String> {
        for r in &self.routes {
            if r.name.is_empty() || !r.prefix.starts_with('/') {
                return Err(format!(
                    "routes: {:?} needs a name and a prefix starting with /",
                    r.name
                ));
            }
        }
        let name_ok = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name_ok(&self.metric_prefix) {
            return Err("metric_prefix may only hold letters, digits and _".into());
        }
        // Longest prefix first, so the first match is the most specific.
        self.routes
            .sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Ok(())
    }
}

impl Config {
    /// The route label for a request path.
    pub fn route_of<'a>(&'a self, path: &str) -> &'a str {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        self.routes
            .iter()
            .find(|r| path.starts_with(&r.prefix))
            .map(|r| r.name.as_str())
            .unwrap_or(&self.default_route)
    }
}

/// The method label: a standard method, else `OTHER`.
pub fn method_label(method: &str) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    KNOWN.into_iter().find(|m| *m == method).unwrap_or("OTHER")
}

/// The metric families of one plugin.
pub struct Families {
    pub requests: MetricFamily,
    pub duration: MetricFamily,
}

impl Families {
    pub fn new(prefix: &str) -> Self {
        Self {
            requests: MetricFamily::counter(
                &format!("{prefix}requests_total"),
                &["route", "method", "response_code"],
            ),
            duration: MetricFamily::histogram(
                &format!("{prefix}request_duration_milliseconds"),
                &["route", "method"],
            ),
        }
    }

    /// Records one finished request.
    pub fn record(
        &mut self,
        sink: &mut impl ambit_sdk::metrics::MetricSink,
        route: &str,
        method: &str,
        code: u32,
        duration_ms: u64,
    ) -> Result<(), ambit_sdk::metrics::MetricError> {
        let code = code.to_string();
        self.requests.increment(sink, &[route, method, &code], 1)?;
        self.duration.record(sink, &[route, method], duration_ms)
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(MetricsRoot { state: None }));
}}

struct State {
    config: Config,
    families: RefCell<Families>,
}

struct MetricsRoot {
    state: Option<Rc<State>>,
}

impl Context for MetricsRoot {}

impl RootContext for MetricsRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(config) = Config::load("metrics") else {
            return false;
        };
        let families = RefCell::new(Families::new(&config.metric_prefix));
        self.state = Some(Rc::new(State { config, families }));
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(MetricsStream {
            state: self.state.clone(),
            route: String::new(),
            method: "OTHER",
            status: None,
            start: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct MetricsStream {
    state: Option<Rc<State>>,
    route: String,
    method: &'static str,
    status: Option<u32>,
    start: Option<SystemTime>,
}

impl Context for MetricsStream {}

impl HttpContext for MetricsStream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if let Some(state) = &self.state {
            self.start = Some(self.get_current_time());
            let path = self.header(Direction::Request, ":path").unwrap_or_default();
            self.route = state.config.route_of(&path).to_string();
            let method = self
                .header(Direction::Request, ":method")
                .unwrap_or_default();
            self.method = method_label(&method);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.status = self
            .header(Direction::Response, ":status")
            .and_then(|s| s.parse().ok());
        Action::Continue
    }

    fn on_log(&mut self) {
        let Some(state) = &self.state else {
            return;
        };
        if self.start.is_none() {
            // The stream never reached request headers (reset early): nothing to label it by.
            return;
        }
        let code = ambit_sdk::properties::get_i64(&["response", "code"])
            .and_then(|c| u32::try_from(c).ok())
            .or(self.status)
            .unwrap_or(0);
        let duration_ms = self
            .start
            .and_then(|start| self.get_current_time().duration_since(start).ok())
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let result = state.families.borrow_mut().record(
            &mut ambit_sdk::metrics::HostMetrics,
            &self.route,
            self.method,
            code,
            duration_ms,
        );
        if let Err(e) = result {
            ambit_sdk::log::warn!("metrics: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_sdk::metrics::MetricSink;
    use ambit_sdk::proxy_wasm::types::{MetricType, Status};

    #[derive(Default)]
    struct Sink {
        defined: Vec<String>,
        calls: Vec<(u32, i64)>,
    }

    impl MetricSink for Sink {
        fn define(&mut self, _: MetricType, name: &str) -> Result<u32, Status> {
            self.defined.push(name.into());
            Ok(self.defined.len() as u32)
        }
        fn increment(&mut self, id: u32, delta: i64) -> Result<(), Status> {
            self.calls.push((id, delta));
            Ok(())
        }
        fn record(&mut self, id: u32, value: u64) -> Result<(), Status> {
            self.calls.push((id, value as i64));
            Ok(())
        }
    }

    fn config() -> Config {
        Config::parse(Some(
            br#"{"routes": [{"name": "api", "prefix": "/api"}, {"name": "orders", "prefix": "/api/orders"}]}"#,
        ))
        .unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let c = config();
        assert_eq!(c.route_of("/api/orders/7"), "orders");
        assert_eq!(c.route_of("/api/users"), "api");
        assert_eq!(c.route_of("/apiary"), "api");
        assert_eq!(c.route_of("/health?x=/api"), "other");
        assert_eq!(c.route_of("/api?x"), "api");
    }

    #[test]
    fn methods_are_bounded() {
        assert_eq!(method_label("GET"), "GET");
        assert_eq!(method_label("get"), "OTHER");
        assert_eq!(method_label("PURGE"), "OTHER");
    }

    #[test]
    fn records_define_each_series_once() {
        let c = config();
        let mut f = Families::new(&c.metric_prefix);
        let mut sink = Sink::default();
        f.record(&mut sink, "api", "GET", 200, 12).unwrap();
        f.record(&mut sink, "api", "GET", 200, 30).unwrap();
        f.record(&mut sink, "api", "GET", 503, 5).unwrap();
        assert_eq!(
            sink.defined,
            vec![
                "route=.=api;.;method=.=GET;.;response_code=.=200;.;ambit_filter_requests_total",
                "route=.=api;.;method=.=GET;.;ambit_filter_request_duration_milliseconds",
                "route=.=api;.;method=.=GET;.;response_code=.=503;.;ambit_filter_requests_total",
            ]
        );
        assert_eq!(
            sink.calls,
            vec![(1, 1), (2, 12), (1, 1), (2, 30), (3, 1), (2, 5)]
        );
    }

    #[test]
    fn config_errors() {
        for bad in [
            r#"{"routes": [{"name": "", "prefix": "/a"}]}"#,
            r#"{"routes": [{"name": "a", "prefix": "a"}]}"#,
            r#"{"metric_prefix": "bad-prefix"}"#,
            r#"{"route": []}"#,
        ] {
            assert!(Config::parse(Some(bad.as_bytes())).is_err(), "{bad}");
        }
        assert_eq!(Config::parse(None).unwrap(), Config::default());
    }
}
