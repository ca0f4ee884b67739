//! The body-transform filter's `.wasm` in Ambit's Wasm host: bodies paused until the end of
//! the stream, redacted, and refused over the size limit.

use ambit_filter_test::{Filter, Response};
use serde_json::json;

fn filter(max_body_bytes: usize) -> Filter {
    Filter::package("ambit-filter-body-transform")
        .config_json(&json!({
            "request": {"redact": ["password", "card.number"]},
            "response": {"redact": ["ssn", "items.cost"]},
            "max_body_bytes": max_body_bytes,
        }))
        .load()
        .unwrap()
}

#[test]
fn request_json_is_redacted_after_the_whole_body_arrived() {
    let filter = filter(4096);
    let outcome = filter
        .request()
        .method("POST")
        .header("content-type", "application/json; charset=utf-8")
        .header("content-length", "64")
        // Three chunks: the filter pauses on the first two and sees the whole JSON at the end.
        .body(r#"{"user": "alice", "pass"#)
        .body(r#"word": "hunter2", "card": {"number": "4111", "#)
        .body(r#""exp": "12/30"}}"#)
        .run();
    assert!(outcome.passed(), "{outcome}");
    let upstream = outcome.upstream.as_ref().unwrap();
    assert_eq!(upstream.headers.get("content-length"), None);
    let body: serde_json::Value = serde_json::from_slice(&upstream.body).unwrap();
    assert_eq!(
        body,
        json!({"user": "alice", "password": "[REDACTED]",
               "card": {"number": "[REDACTED]", "exp": "12/30"}})
    );
}

#[test]
fn response_json_is_redacted_and_other_bodies_pass_untouched() {
    let filter = filter(4096);
    let outcome = filter
        .request()
        .response(
            Response::new(200)
                .header("content-type", "application/json")
                .header("content-length", "60")
                .body(r#"{"ssn": "123-45", "items": [{"cost": 3, "name": "a"}, "#)
                .body(r#"{"cost": 4, "name": "b"}]}"#),
        )
        .run();
    assert_eq!(outcome.status(), 200);
    assert_eq!(outcome.header("content-length"), None);
    assert_eq!(
        outcome.response.json(),
        json!({"ssn": "[REDACTED]", "items": [{"cost": "[REDACTED]", "name": "a"},
                                              {"cost": "[REDACTED]", "name": "b"}]})
    );
    // Not JSON by content-type, or not parseable: byte for byte.
    let text = r#"{"password": "x"}"#;
    let outcome = filter
        .request()
        .method("POST")
        .header("content-type", "text/plain")
        .body(text)
        .run();
    assert_eq!(outcome.upstream.as_ref().unwrap().body, text.as_bytes());
    let outcome = filter
        .request()
        .method("POST")
        .header("content-type", "application/json")
        .body("{not json")
        .run();
    assert_eq!(outcome.upstream.as_ref().unwrap().body, b"{not json");
}

#[test]
fn oversized_bodies_get_413_for_requests_and_500_for_responses() {
    let filter = filter(64);
    let big = format!(r#"{{"password": "{}"}}"#, "x".repeat(100));
    // Announced by content-length: refused at the headers.
    let outcome = filter
        .request()
        .method("POST")
        .header("content-type", "application/json")
        .header("content-length", &big.len().to_string())
        .body(big.clone())
        .run();
    assert_eq!(outcome.status(), 413, "{outcome}");
    assert!(outcome.upstream.is_none());
    assert_eq!(outcome.response.json()["error"], "payload_too_large");
    // Streamed without a length: refused once the buffered body passes the limit.
    let outcome = filter
        .request()
        .method("POST")
        .header("content-type", "application/json")
        .body(big[..50].to_owned())
        .body(big[50..].to_owned())
        .run();
    assert_eq!(outcome.status(), 413, "{outcome}");
    assert!(!outcome.upstream.as_ref().unwrap().complete);
    let outcome = filter
        .request()
        .response(
            Response::new(200)
                .header("content-type", "application/json")
                .body(big),
        )
        .run();
    assert_eq!(outcome.status(), 500, "{outcome}");
    assert_eq!(outcome.response.json()["error"], "response_too_large");
}

/// With trailers, no body callback sees `end_of_stream`, so the filter pauses every chunk; once
/// its trailers callback continues, the host releases the held body (unchanged: the filter never
/// saw the end) before the trailers, as Envoy does.
#[test]
fn host_forwards_a_paused_body_when_trailers_end_the_stream() {
    let filter = filter(4096);
    let outcome = filter
        .request()
        .method("POST")
        .header("content-type", "application/json")
        .body(r#"{"password": "x"}"#)
        .trailer("x-checksum", "1")
        .run();
    assert_eq!(
        outcome
            .upstream
            .as_ref()
            .unwrap()
            .trailers
            .get("x-checksum"),
        Some("1")
    );
    assert!(
        !outcome.upstream.as_ref().unwrap().body.is_empty(),
        "{outcome}"
    );
}
