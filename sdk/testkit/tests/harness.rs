//! The test kit itself, on the workspace's filters and test modules, through `ambit filter
//! serve` (the `ambit` that `cargo test --workspace` built, or `AMBIT_BIN`): phases, defaults,
//! captured logs, fail strategies, module sources, chains, calls, binary bodies.

use std::time::Instant;

use ambit_filter_test::{FailStrategy, Filter, HarnessError, HttpCallResponse, Response};

#[test]
fn headers_filter_both_directions_and_defaults() {
    let started = Instant::now();
    let filter = Filter::package("ambit-filter-headers")
        .config(
            r#"{"request": {"set": {"x-env": "prod"}, "remove": ["x-debug"]},
                   "response": {"remove": ["server"], "set": {"x-frame-options": "DENY"}}}"#,
        )
        .load()
        .unwrap();
    eprintln!("load: {:?}", started.elapsed());
    let started = Instant::now();
    let outcome = filter
        .request()
        .method("POST")
        .path("/orders?id=1")
        .header("x-debug", "1")
        .body("a")
        .body("b")
        .trailer("x-checksum", "ab")
        .response(Response::new(201).header("server", "envoy").body("ok"))
        .run();
    eprintln!("request: {:?}", started.elapsed());
    assert!(outcome.passed(), "{outcome}");
    let upstream = outcome.upstream.as_ref().unwrap();
    assert_eq!(upstream.method(), "POST");
    assert_eq!(upstream.path(), "/orders?id=1");
    assert_eq!(upstream.headers.get(":authority"), Some("example.com"));
    assert_eq!(upstream.headers.get("x-env"), Some("prod"));
    assert_eq!(upstream.headers.get("x-debug"), None);
    assert_eq!(upstream.body, b"ab");
    assert_eq!(upstream.trailers.get("x-checksum"), Some("ab"));
    assert_eq!(outcome.status(), 201);
    assert_eq!(outcome.header("server"), None);
    assert_eq!(outcome.header("x-frame-options"), Some("DENY"));
    assert_eq!(outcome.response.body_str(), "ok");
}

#[test]
fn blocking_run_and_refused_configuration() {
    let filter = Filter::package("ambit-filter-headers").load().unwrap();
    let outcome = filter.request().echo().run();
    assert!(
        outcome.response.body_str().starts_with("GET / HTTP/1.1"),
        "{outcome}"
    );
    let error = Filter::package("ambit-filter-headers")
        .config(r#"{"request": {"sett": {}}}"#)
        .load()
        .err()
        .unwrap();
    assert!(matches!(error, HarnessError::Load { .. }), "{error}");
    assert!(error.to_string().contains("on_configure"), "{error}");
}

#[test]
fn traps_follow_the_fail_strategy_and_logs_are_captured() {
    let closed = Filter::package("test-hostile")
        .config(r#"{"mode": "trap"}"#)
        .load()
        .unwrap();
    let outcome = closed.request().run();
    assert_eq!(outcome.status(), 500, "{outcome}");
    assert!(outcome.upstream.is_none());
    assert!(outcome.logged("test-hostile: trap"), "{:?}", outcome.logs);
    let open = Filter::package("test-hostile")
        .config(r#"{"mode": "trap"}"#)
        .fail_strategy(FailStrategy::FailOpen)
        .load()
        .unwrap();
    let outcome = open.request().run();
    assert!(outcome.passed(), "{outcome}");
    assert_eq!(open.failures(), 1);
}

#[test]
fn a_chain_runs_requests_in_order_and_responses_in_reverse() {
    let first = Filter::package("ambit-filter-headers")
        .config(r#"{"request": {"set": {"x-order": "first"}}, "response": {"set": {"x-last": "first"}}}"#)
        .load()
        .unwrap();
    let second = Filter::package("ambit-filter-headers")
        .config(r#"{"request": {"set": {"x-order": "second"}}, "response": {"set": {"x-last": "second"}}}"#)
        .load()
        .unwrap();
    let outcome = first.request().then(&second).run();
    // The second filter's request edit lands last; the first filter's response edit does.
    outcome
        .assert_upstream_header("x-order", Some("second"))
        .assert_header("x-last", Some("first"));
}

#[test]
fn calls_are_answered_by_the_test_and_binary_bodies_survive() {
    let filter = Filter::package("ambit-filter-ext-authz")
        .config(r#"{"upstream": "authz", "timeout_ms": 1000}"#)
        .http_calls(|call| {
            (call.upstream == "authz").then(|| HttpCallResponse::new(403, vec![0xff, 0x00, 0x80]))
        })
        .load()
        .unwrap();
    let outcome = filter.request().body(vec![0xfe, 0x01]).run();
    outcome.assert_status(403);
    assert_eq!(outcome.response.body, [0xff, 0x00, 0x80]);
    assert_eq!(outcome.request.body, [0xfe, 0x01]);
    assert_eq!(outcome.calls.len(), 1);
    assert_eq!(filter.calls().len(), 1);
}

#[test]
fn a_failed_assertion_shows_the_request_the_logs_and_what_differed() {
    let filter = Filter::package("ambit-filter-headers")
        .config(r#"{"request": {"set": {"x-env": "prod"}}}"#)
        .load()
        .unwrap();
    let outcome = filter
        .request()
        .path("/orders")
        .header("x-user", "alice")
        .run();
    let message = std::panic::catch_unwind(|| {
        outcome.assert_upstream_header("x-env", Some("dev"));
    })
    .unwrap_err();
    let message = message.downcast_ref::<String>().unwrap();
    assert!(
        message.starts_with(r#"upstream header "x-env": expected Some("dev"), got Some("prod")"#),
        "{message}"
    );
    assert!(message.contains("} :path: /orders"), "{message}");
    assert!(message.contains("} x-user: alice"), "{message}");
    assert!(message.contains("> x-env: prod"), "{message}");
    assert!(
        message.contains("* filter log") || message.contains("logged nothing"),
        "{message}"
    );
}

#[test]
fn a_file_that_is_not_wasm_is_refused_in_one_line() {
    let error = Filter::bytes(b"not a module at all".to_vec())
        .load()
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("is not a Wasm module"), "{error}");
    assert_eq!(error.lines().count(), 1, "{error}");
}
