//! The harness itself, on the workspace's headers filter and test modules: phases, defaults,
//! captured logs, fail strategies, module sources.

use std::time::Instant;

use ambit_filter_test::{FailStrategy, Filter, HarnessError, Response};

#[tokio::test]
async fn headers_filter_both_directions_and_defaults() {
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
        .send()
        .await;
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
    assert!(matches!(error, HarnessError::Load(_)), "{error}");
    assert!(error.to_string().contains("on_configure"), "{error}");
}

#[tokio::test]
async fn traps_follow_the_fail_strategy_and_logs_are_captured() {
    let closed = Filter::package("test-hostile")
        .config(r#"{"mode": "trap"}"#)
        .load()
        .unwrap();
    let outcome = closed.request().send().await;
    assert_eq!(outcome.status(), 500, "{outcome}");
    assert!(outcome.upstream.is_none());
    assert!(outcome.logged("test-hostile: trap"), "{:?}", outcome.logs);
    let open = Filter::package("test-hostile")
        .config(r#"{"mode": "trap"}"#)
        .fail_strategy(FailStrategy::FailOpen)
        .load()
        .unwrap();
    let outcome = open.request().send().await;
    assert!(outcome.passed(), "{outcome}");
    assert_eq!(open.failures(), 1);
}
