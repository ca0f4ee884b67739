//! The ext-authz filter's `.wasm` in Ambit's Wasm host, its check answered by the test.

use std::time::Duration;

use ambit_filter_test::{Filter, HttpCallResponse};
use serde_json::json;

const AUTHZ: &str = "authz.default.svc.cluster.local:8000";

fn authz(extra: serde_json::Value) -> ambit_filter_test::FilterBuilder {
    let mut config = json!({
        "upstream": AUTHZ, "path_prefix": "/check", "timeout_ms": 100,
        "allowed_request_headers": ["authorization"],
        "allowed_upstream_headers": ["x-user-id"],
        "allowed_client_headers": ["www-authenticate"],
    });
    config
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    Filter::package("ambit-filter-ext-authz").config_json(&config)
}

fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> HttpCallResponse {
    let mut response = HttpCallResponse::new(status, body);
    for (k, v) in headers {
        response
            .headers
            .push(((*k).to_owned(), v.as_bytes().to_vec()));
    }
    response
}

#[test]
fn allowed_requests_go_on_with_the_copied_headers() {
    let filter = authz(json!({}))
        .http_calls(|_| {
            Some(answer(
                200,
                &[("x-user-id", "alice"), ("x-internal", "secret")],
                "",
            ))
        })
        .load()
        .unwrap();
    let outcome = filter
        .request()
        .method("POST")
        .path("/orders?id=7")
        .authority("shop.example")
        .header("authorization", "Bearer abc")
        .header("cookie", "session=1")
        .body("{}")
        .run();
    assert!(outcome.passed(), "{outcome}");
    assert_eq!(outcome.upstream_header("x-user-id"), Some("alice"));
    assert_eq!(outcome.upstream_header("x-internal"), None);
    assert_eq!(outcome.upstream.as_ref().unwrap().body, b"{}");
    // The check the service got.
    let [check] = outcome.calls.as_slice() else {
        panic!("{:?}", outcome.calls)
    };
    assert_eq!(check.upstream, AUTHZ);
    assert_eq!(check.header(":method"), Some("POST"));
    assert_eq!(check.header(":path"), Some("/check/orders?id=7"));
    assert_eq!(check.header(":authority"), Some(AUTHZ));
    assert_eq!(check.header("x-forwarded-host"), Some("shop.example"));
    assert_eq!(check.header("authorization"), Some("Bearer abc"));
    assert_eq!(check.header("cookie"), None);
    assert_eq!(check.timeout, Duration::from_millis(100));
}

#[test]
fn denials_pass_the_status_body_and_allowed_headers_to_the_client() {
    let filter = authz(json!({})).load().unwrap();
    filter.answer_calls(|_| {
        Some(answer(
            403,
            &[
                ("content-type", "text/plain"),
                ("www-authenticate", "Basic realm=\"shop\""),
                ("x-internal", "secret"),
            ],
            "denied by policy",
        ))
    });
    let outcome = filter.request().run();
    assert_eq!(outcome.status(), 403, "{outcome}");
    assert!(outcome.upstream.is_none());
    assert_eq!(outcome.response.body_str(), "denied by policy");
    assert_eq!(outcome.header("content-type"), Some("text/plain"));
    assert_eq!(
        outcome.header("www-authenticate"),
        Some("Basic realm=\"shop\"")
    );
    assert_eq!(outcome.header("x-internal"), None);
    filter.answer_calls(|_| Some(answer(401, &[], "")));
    assert_eq!(filter.request().run().status(), 401);
}

#[test]
fn a_failed_callout_fails_closed_by_default() {
    // No answer configured: the call fails.
    let filter = authz(json!({"status_on_error": 503})).load().unwrap();
    let outcome = filter.request().run();
    assert_eq!(outcome.status(), 503, "{outcome}");
    assert!(outcome.upstream.is_none());
    assert_eq!(outcome.response.json()["error"], "authz_unavailable");
    assert_eq!(outcome.calls.len(), 1);
    // A service slower than timeout_ms is a failure too.
    filter.answer_calls(|_| Some(answer(200, &[], "")));
    filter.delay_calls(Duration::from_millis(500));
    assert_eq!(filter.request().run().status(), 503);
}

#[test]
fn a_failed_callout_fails_open_with_failure_mode_allow() {
    let filter = authz(json!({"failure_mode_allow": true})).load().unwrap();
    let outcome = filter.request().header("x-user-id", "forged").run();
    assert!(outcome.passed(), "{outcome}");
    assert_eq!(
        outcome.upstream_header("x-ambit-ext-authz-failure-mode-allowed"),
        Some("true")
    );
}
