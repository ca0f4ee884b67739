//! Filters built from this workspace with the `proxy-wasm` Rust SDK, run in the host.

use std::sync::Arc;

use ambit_wasm_host::testing::build_filter;
use ambit_wasm_host::{
    BodyStep, Pairs, Plugin, PluginConfig, PluginHooks, Runtime, RuntimeConfig, Step, StreamInfo,
};

fn pairs(items: &[(&str, &str)]) -> Pairs {
    items
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

fn get<'a>(headers: &'a Pairs, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| std::str::from_utf8(v).unwrap())
}

fn load(runtime: &Runtime, package: &str, config: &str) -> Arc<Plugin> {
    let wasm = std::fs::read(build_filter(package)).unwrap();
    let mut plugin = PluginConfig::new(package);
    plugin.configuration = config.as_bytes().to_vec();
    Plugin::load(runtime, &wasm, plugin, PluginHooks::default()).unwrap()
}

#[tokio::test]
async fn headers_filter_rewrites_both_directions_from_its_configuration() {
    let runtime = Runtime::new(RuntimeConfig::default()).unwrap();
    let plugin = load(
        &runtime,
        "ambit-filter-headers",
        r#"{"request": {"remove": ["x-debug"], "set": {"x-env": "prod"}, "add": {"x-via": "ambit"}},
            "response": {"remove": ["server"], "set": {"x-frame-options": "DENY"}}}"#,
    );
    let mut stream = plugin.http_stream(Arc::new(StreamInfo::default()));
    let mut request = pairs(&[
        (":method", "GET"),
        (":path", "/"),
        (":authority", "echo"),
        ("x-debug", "1"),
        ("x-env", "dev"),
    ]);
    assert_eq!(
        stream.request_headers(&mut request, true).await,
        Step::Continue
    );
    assert_eq!(get(&request, "x-debug"), None);
    assert_eq!(get(&request, "x-env"), Some("prod"));
    assert_eq!(get(&request, "x-via"), Some("ambit"));
    assert_eq!(get(&request, ":path"), Some("/"));
    let mut response = pairs(&[(":status", "200"), ("server", "secret/1.0")]);
    assert_eq!(
        stream.response_headers(&mut response, false).await,
        Step::Continue
    );
    assert_eq!(get(&response, "server"), None);
    assert_eq!(get(&response, "x-frame-options"), Some("DENY"));
    stream.log().await;
}

#[test]
fn a_configuration_the_filter_refuses_fails_the_load() {
    let runtime = Runtime::new(RuntimeConfig::default()).unwrap();
    let wasm = std::fs::read(build_filter("ambit-filter-headers")).unwrap();
    let mut config = PluginConfig::new("headers");
    config.configuration = br#"{"request": {"sett": {}}}"#.to_vec();
    let error = Plugin::load(&runtime, &wasm, config, PluginHooks::default()).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("proxy_on_configure returned false"),
        "{error}"
    );
}

/// A local response sent from a body callback that returns `Pause` before the end of the stream
/// is acted on at once: the client gets the 413 without the rest of the upload being buffered.
#[tokio::test]
async fn a_local_response_from_a_paused_body_callback_is_acted_on_at_once() {
    let runtime = Runtime::new(RuntimeConfig::default()).unwrap();
    let plugin = load(
        &runtime,
        "ambit-filter-body-transform",
        r#"{"request": {"redact": ["password"]}, "max_body_bytes": 64}"#,
    );
    let mut stream = plugin.http_stream(Arc::new(StreamInfo::default()));
    let mut headers = pairs(&[
        (":method", "POST"),
        (":path", "/"),
        (":authority", "example.com"),
        ("content-type", "application/json"),
    ]);
    stream.request_headers(&mut headers, false).await;
    // 100 bytes > 64: the filter sends 413 and returns Pause, end_of_stream = false.
    let step = stream.request_body(vec![b' '; 100].into(), false).await;
    match step {
        BodyStep::Respond(response) => assert_eq!(response.status, 413),
        other => panic!("expected the filter's 413 at once, got {other:?}"),
    }
}
