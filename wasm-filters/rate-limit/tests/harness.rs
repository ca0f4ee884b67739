//! The rate-limit filter's `.wasm` in Ambit's Wasm host: bursts per key, 429 with `retry-after`,
//! buckets shared through shared data by plugins with the same VM id.

use ambit_filter_test::{peer, Filter};
use serde_json::json;

/// A bucket of `burst` tokens that refills one token an hour: nothing refills during a test.
fn limiter(burst: u64, key: serde_json::Value, vm_id: Option<&str>) -> Filter {
    let mut builder = Filter::package("ambit-filter-rate-limit").config_json(&json!({
        "key": key, "max_tokens": burst, "tokens_per_fill": 1, "fill_interval_ms": 3_600_000,
    }));
    if let Some(vm_id) = vm_id {
        builder = builder.vm_id(vm_id);
    }
    builder.load().unwrap()
}

fn status(filter: &Filter, api_key: &str) -> u16 {
    filter.request().header("x-api-key", api_key).run().status()
}

#[test]
fn burst_then_429_with_retry_after_per_key() {
    let filter = limiter(3, json!({"header": "x-api-key"}), None);
    for n in 0..3 {
        let outcome = filter.request().header("x-api-key", "alice").run();
        assert!(outcome.passed(), "request {n}: {outcome}");
    }
    let limited = filter.request().header("x-api-key", "alice").run();
    assert_eq!(limited.status(), 429, "{limited}");
    assert!(limited.upstream.is_none());
    let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=3600).contains(&retry_after), "{retry_after}");
    assert_eq!(limited.response.json()["error"], "rate_limited");
    // Another key has its own bucket; key-less requests share one.
    assert_eq!(status(&filter, "bob"), 200);
    for _ in 0..3 {
        assert_eq!(filter.request().run().status(), 200);
    }
    assert_eq!(filter.request().run().status(), 429);
}

#[test]
fn plugins_with_the_same_vm_id_share_buckets() {
    // Two plugins (e.g. two workers, or the same filter on two routes) in one VM id draw from
    // the same shared-data bucket; a plugin in another VM id does not.
    let first = limiter(2, json!({"header": "x-api-key"}), Some("rate-limit-shared"));
    let second = limiter(2, json!({"header": "x-api-key"}), Some("rate-limit-shared"));
    let apart = limiter(2, json!({"header": "x-api-key"}), None);
    assert_eq!(status(&first, "k"), 200);
    assert_eq!(status(&second, "k"), 200);
    assert_eq!(status(&first, "k"), 429);
    assert_eq!(status(&second, "k"), 429);
    assert_eq!(status(&apart, "k"), 200);
}

#[test]
fn the_default_key_is_the_peer_identity() {
    let filter = limiter(
        1,
        json!({"property": ["connection", "uri_san_peer_certificate"]}),
        None,
    );
    let alice = || filter.request().stream_info(peer("shop", "alice")).run();
    let bob = || filter.request().stream_info(peer("shop", "bob")).run();
    assert_eq!(alice().status(), 200);
    assert_eq!(alice().status(), 429);
    assert_eq!(bob().status(), 200);
}

#[test]
fn missing_key_deny_refuses_keyless_requests() {
    let filter = Filter::package("ambit-filter-rate-limit")
        .config_json(
            &json!({"key": {"header": "x-api-key"}, "missing_key": "deny",
                             "max_tokens": 5, "tokens_per_fill": 1, "fill_interval_ms": 1000}),
        )
        .load()
        .unwrap();
    assert_eq!(filter.request().run().status(), 429);
    assert_eq!(status(&filter, "k"), 200);
}
