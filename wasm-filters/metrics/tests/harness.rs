//! The metrics filter's `.wasm` in Ambit's Wasm host: its counters and histograms as the host
//! renders them for `/metrics`. Metrics are process-wide, so each test uses its own prefix.

use ambit_filter_test::{Filter, Response};
use serde_json::json;

fn filter(prefix: &str) -> Filter {
    Filter::package("ambit-filter-metrics")
        .config_json(&json!({
            "routes": [{"name": "orders", "prefix": "/orders"}, {"name": "api", "prefix": "/api"}],
            "default_route": "other",
            "metric_prefix": prefix,
        }))
        .load()
        .unwrap()
}

#[test]
fn requests_are_counted_by_route_method_and_status_with_labels() {
    let filter = filter("t1_");
    for _ in 0..2 {
        filter.request().path("/orders/17?x=1").run();
    }
    filter
        .request()
        .method("POST")
        .path("/api/v1")
        .response(Response::new(503))
        .run();
    let outcome = filter.request().method("BREW").path("/tea").run();
    let m = &outcome.metrics;
    let requests = |route, method, code| {
        m.get(
            "t1_requests_total",
            &[
                ("route", route),
                ("method", method),
                ("response_code", code),
            ],
        )
    };
    assert_eq!(requests("orders", "GET", "200"), Some(2.0), "{}", m.text);
    assert_eq!(requests("api", "POST", "503"), Some(1.0), "{}", m.text);
    assert_eq!(requests("other", "OTHER", "200"), Some(1.0), "{}", m.text);
    assert!(
        m.text.contains("# TYPE t1_requests_total counter"),
        "{}",
        m.text
    );
    // Histogram: one observation per request, in milliseconds.
    let duration = "t1_request_duration_milliseconds";
    assert!(
        m.text.contains(&format!("# TYPE {duration} histogram")),
        "{}",
        m.text
    );
    let orders = [("route", "orders"), ("method", "GET")];
    assert_eq!(
        m.get(&format!("{duration}_count"), &orders),
        Some(2.0),
        "{}",
        m.text
    );
    let mut le_inf = orders.to_vec();
    le_inf.push(("le", "+Inf"));
    assert_eq!(m.get(&format!("{duration}_bucket"), &le_inf), Some(2.0));
}

#[test]
fn local_replies_are_counted_with_their_status() {
    // Recorded in on_log, so a request answered before the upstream counts too: here the
    // upstream never answers 200, the client sees the filter-free 404 of the upstream.
    let filter = filter("t2_");
    let outcome = filter
        .request()
        .method("DELETE")
        .path("/orders/1")
        .response(Response::new(404).body("gone"))
        .run();
    assert_eq!(
        outcome.metrics.get(
            "t2_requests_total",
            &[
                ("route", "orders"),
                ("method", "DELETE"),
                ("response_code", "404")
            ]
        ),
        Some(1.0),
        "{}",
        outcome.metrics.text
    );
}
