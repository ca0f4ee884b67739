//! The headers filter's `.wasm` in Ambit's Wasm host, through `ambit-filter-test`.

use ambit_filter_test::{Filter, Response};

const CONFIG: &str = r#"{
  "request":  {"remove": ["x-debug"], "rename": {"x-old": "x-new"},
               "set": {":path": "/v2/api", "x-env": "prod"},
               "add": [{"name": "x-via", "value": "ambit"}, {"name": "x-via", "value": "mesh"}]},
  "response": {"remove": ["server"], "set": {"x-frame-options": "DENY"}, "add": {"x-served-by": "waypoint"}}
}"#;

#[test]
fn request_mutations_in_order_and_path_rewrite() {
    let filter = Filter::package("ambit-filter-headers")
        .config(CONFIG)
        .load()
        .unwrap();
    let outcome = filter
        .request()
        .path("/v1/api?x=1")
        .header("X-Debug", "1")
        .header("x-old", "a")
        .header("x-old", "b")
        .header("x-new", "lost")
        .header("x-env", "dev")
        .header("x-via", "client")
        .run();
    assert!(outcome.passed(), "{outcome}");
    let upstream = outcome.upstream.as_ref().unwrap();
    assert_eq!(upstream.path(), "/v2/api");
    assert!(!upstream.headers.contains("x-debug"));
    assert!(!upstream.headers.contains("x-old"));
    assert_eq!(upstream.headers.get_all("x-new"), vec!["a", "b"]);
    assert_eq!(upstream.headers.get_all("x-env"), vec!["prod"]);
    assert_eq!(
        upstream.headers.get_all("x-via"),
        vec!["client", "ambit", "mesh"]
    );
    assert_eq!(upstream.headers.get(":authority"), Some("example.com"));
}

#[test]
fn response_mutations_reach_the_client() {
    let filter = Filter::package("ambit-filter-headers")
        .config(CONFIG)
        .load()
        .unwrap();
    let outcome = filter
        .request()
        .response(
            Response::new(404)
                .header("server", "envoy")
                .header("x-frame-options", "SAMEORIGIN")
                .body("not here"),
        )
        .run();
    assert_eq!(outcome.status(), 404);
    assert_eq!(outcome.header("server"), None);
    assert_eq!(outcome.header("x-frame-options"), Some("DENY"));
    assert_eq!(outcome.header("x-served-by"), Some("waypoint"));
    assert_eq!(outcome.response.body_str(), "not here");
}

#[test]
fn refused_configurations_fail_the_load_with_the_reason_logged() {
    for bad in [
        r#"{"request": {"sett": {}}}"#,
        r#"{"response": {"remove": [":status"]}}"#,
        r#"{"request": {"set": {"x-a": "line\nbreak"}}}"#,
    ] {
        let error = Filter::package("ambit-filter-headers")
            .config(bad)
            .load()
            .err()
            .unwrap_or_else(|| panic!("{bad} was accepted"));
        assert!(error.to_string().contains("on_configure"), "{bad}: {error}");
    }
}

#[test]
fn an_empty_configuration_passes_everything_through() {
    let filter = Filter::package("ambit-filter-headers").load().unwrap();
    let outcome = filter
        .request()
        .method("PUT")
        .header("x-a", "1")
        .body("payload")
        .echo()
        .run();
    assert!(outcome.passed(), "{outcome}");
    assert_eq!(outcome.upstream_header("x-a"), Some("1"));
    assert!(
        outcome.response.body_str().ends_with("\n\npayload"),
        "{outcome}"
    );
}
