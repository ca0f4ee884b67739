//! Every host call the proxy-wasm Rust SDK exposes, driven through `test-kitchen-sink`
//! (wasm-filters/testdata) in `HttpStream`s and `FilterChain`s the way the waypoint drives them,
//! and checked against what Envoy's host answers: the filter reports what it saw as `x-ks-*`
//! response headers and log lines.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambit_wasm_host::http_call::BoxFuture;
use ambit_wasm_host::testing::build_filter;
use ambit_wasm_host::{
    BodyStep, FilterChain, HttpCallRequest, HttpCallResponse, HttpCaller, Limits, LogLevel, Pairs,
    Plugin, PluginConfig, PluginHooks, Runtime, RuntimeConfig, Step, StreamInfo,
};
use bytes::Bytes;

type Logs = Arc<Mutex<Vec<(LogLevel, String)>>>;

/// Answers callouts by upstream: `echo` → 200 `pong` with a header and a trailer, `fail` → a
/// failed call, `hang` → never (the host's timeout must end it). Records every request.
#[derive(Default)]
struct TestCaller {
    seen: Mutex<Vec<HttpCallRequest>>,
}

impl HttpCaller for TestCaller {
    fn call(&self, request: HttpCallRequest) -> BoxFuture<Option<HttpCallResponse>> {
        let upstream = request.upstream.clone();
        self.seen.lock().unwrap().push(request);
        Box::pin(async move {
            match upstream.as_str() {
                "echo" => {
                    let mut response = HttpCallResponse::new(200, "pong");
                    response.headers.push(("x-echo".into(), b"1".to_vec()));
                    response
                        .trailers
                        .push(("x-echo-trailer".into(), b"t".to_vec()));
                    Some(response)
                }
                "hang" => std::future::pending().await,
                _ => None,
            }
        })
    }
}

fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig {
        limits: Limits::default(),
        max_instances: 32,
        vms_per_plugin: 1,
        ..RuntimeConfig::default()
    })
    .unwrap()
}

fn kitchen_sink() -> Vec<u8> {
    std::fs::read(build_filter("test-kitchen-sink")).unwrap()
}

struct Loaded {
    plugin: Arc<Plugin>,
    logs: Logs,
    caller: Arc<TestCaller>,
}

impl Loaded {
    fn logged(&self, message: &str) -> bool {
        self.logs.lock().unwrap().iter().any(|(_, m)| m == message)
    }
}

fn load(runtime: &Runtime, name: &str, vm_id: &str, config: &str) -> Loaded {
    let mut plugin = PluginConfig::new(name);
    plugin.vm_id = vm_id.to_owned();
    plugin.configuration = config.as_bytes().to_vec();
    plugin.vm_configuration = b"vm-config".to_vec();
    plugin.log_level = LogLevel::Trace;
    plugin.node_metadata = BTreeMap::from([("NAMESPACE".to_owned(), "ambit-ns".to_owned())]);
    let logs: Logs = Arc::default();
    let caller = Arc::new(TestCaller::default());
    let sink = logs.clone();
    let hooks = PluginHooks {
        http: caller.clone(),
        log: Some(Arc::new(move |level, message: &str| {
            sink.lock().unwrap().push((level, message.to_owned()));
        })),
    };
    let plugin = Plugin::load(runtime, &kitchen_sink(), plugin, hooks).unwrap();
    Loaded {
        plugin,
        logs,
        caller,
    }
}

fn info() -> Arc<StreamInfo> {
    Arc::new(StreamInfo {
        source: Some("10.0.0.2:40000".parse::<SocketAddr>().unwrap()),
        destination: Some("10.0.0.9:8080".parse::<SocketAddr>().unwrap()),
        mtls: true,
        ..StreamInfo::default()
    })
}

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

fn all<'a>(headers: &'a Pairs, name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| std::str::from_utf8(v).unwrap())
        .collect()
}

fn request(path: &str, extra: &[(&str, &str)]) -> Pairs {
    let mut headers = pairs(&[
        (":method", "GET"),
        (":path", path),
        (":authority", "echo.default.svc.cluster.local"),
        (":scheme", "http"),
    ]);
    headers.extend(pairs(extra));
    headers
}

/// A request without a body through `plugin`: the response headers, with the report.
async fn simple(plugin: &Arc<Plugin>, extra: &[(&str, &str)]) -> Pairs {
    let mut stream = plugin.http_stream(info());
    let mut req = request("/simple", extra);
    assert_eq!(stream.request_headers(&mut req, true).await, Step::Continue);
    let mut response = pairs(&[(":status", "200")]);
    assert_eq!(
        stream.response_headers(&mut response, true).await,
        Step::Continue
    );
    stream.log().await;
    response
}

/// Polls `check` for up to two seconds while background tasks (ticks, queues) run.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn one_request_exercises_every_host_call_with_envoy_answers() {
    let runtime = runtime();
    let ks = load(&runtime, "ks", "", r#"{"upstream": "echo", "tick_ms": 0}"#);
    let mut stream = ks.plugin.http_stream(info());

    // Request headers: the filter calls out and pauses; the callout's answer resumes it.
    let mut req = request(
        "/ks?x=1",
        &[
            ("x-ks-remove-me", "1"),
            ("x-ks-rewrite-body", "1"),
            ("content-length", "11"),
        ],
    );
    req[0].1 = b"POST".to_vec();
    assert_eq!(
        stream.request_headers(&mut req, false).await,
        Step::Continue
    );
    assert_eq!(get(&req, "x-ks-set"), Some("1"));
    assert_eq!(all(&req, "x-ks-added"), ["a", "b"]);
    assert_eq!(get(&req, "x-ks-pairs"), Some("1"));
    assert_eq!(get(&req, "x-ks-remove-me"), None);
    assert_eq!(get(&req, "content-length"), None);
    assert_eq!(get(&req, ":path"), Some("/ks?x=1"));
    {
        let seen = ks.caller.seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].upstream, "echo");
        assert_eq!(seen[0].header(":path"), Some("/ks"));
        assert_eq!(seen[0].body, b"ping");
        assert_eq!(seen[0].trailers, pairs(&[("x-ks-trailer", "t")]));
        assert_eq!(seen[0].timeout, Duration::from_secs(5));
    }

    // Request body: paused until the end, then rewritten whole; each call saw the cumulative
    // size.
    assert_eq!(
        stream
            .request_body(Bytes::from_static(b"hello"), false)
            .await,
        BodyStep::Buffered
    );
    assert_eq!(
        stream
            .request_body(Bytes::from_static(b" world"), true)
            .await,
        BodyStep::Forward(Bytes::from_static(b"rewritten:hello world"))
    );
    assert!(ks.logged("ks: request body 5 false"), "{:?}", ks.logs);
    assert!(ks.logged("ks: request body 11 true"), "{:?}", ks.logs);

    let mut trailers = pairs(&[("x-ks-trailer-remove", "1"), ("x-up", "1")]);
    assert_eq!(stream.request_trailers(&mut trailers).await, Step::Continue);
    assert_eq!(get(&trailers, "x-ks-trailer-added"), Some("1"));
    assert_eq!(get(&trailers, "x-ks-trailer-set"), Some("1"));
    assert_eq!(get(&trailers, "x-ks-trailer-remove"), None);
    assert_eq!(get(&trailers, "x-up"), Some("1"));

    // Response headers carry the report.
    let mut resp = pairs(&[
        (":status", "201"),
        ("x-ks-upstream-remove-me", "1"),
        ("x-ks-resp-replace", "old"),
        ("content-length", "6"),
    ]);
    assert_eq!(
        stream.response_headers(&mut resp, false).await,
        Step::Continue
    );
    let expect = [
        ("x-ks-req-headers", "7"),
        ("x-ks-path", "/ks?x=1"),
        ("x-ks-removed", "true"),
        ("x-ks-added", "a,b"),
        ("x-ks-pairs", "ok"),
        ("x-ks-prop-path", "/ks?x=1"),
        ("x-ks-plugin-name", "ks"),
        ("x-ks-vm-id", ""),
        ("x-ks-prop-roundtrip", "v"),
        ("x-ks-method", "POST"),
        ("x-ks-source-address", "10.0.0.2:40000"),
        ("x-ks-mtls", "true"),
        ("x-ks-node-namespace", "ambit-ns"),
        ("x-ks-root-prop", "r"),
        ("x-ks-empty-body", "none"),
        ("x-ks-no-call-body", "none"),
        ("x-ks-queue-resolved", "true"),
        ("x-ks-enqueue", "ok"),
        ("x-ks-shared-counter", "1"),
        ("x-ks-cas-mismatch", "true"),
        ("x-ks-metrics", "ok"),
        ("x-ks-metric-counter", "1"),
        ("x-ks-metric-gauge", "42"),
        ("x-ks-time-ok", "true"),
        ("x-ks-log-level", "Trace"),
        ("x-ks-random", "true"),
        ("x-ks-logged", "0"),
        ("x-ks-callout-status", "200"),
        ("x-ks-callout-headers", "2"),
        ("x-ks-callout-body", "pong"),
        ("x-ks-callout-trailers", "1"),
        ("x-ks-req-body-size", "11"),
        ("x-ks-req-trailers", "2"),
        ("x-ks-resp-status", "201"),
        ("x-ks-resp-headers", "4"),
        ("x-ks-vm-config-size", "9"),
        ("x-ks-resp-set", "1"),
        ("x-ks-resp-replace", "new"),
    ];
    for (name, value) in expect {
        assert_eq!(get(&resp, name), Some(value), "{name} in {resp:?}");
    }
    assert_eq!(get(&resp, "x-ks-upstream-remove-me"), None);
    assert_eq!(get(&resp, "x-ks-callout-error"), None);
    assert_eq!(get(&resp, "content-length"), None);

    assert_eq!(
        stream
            .response_body(Bytes::from_static(b"abc"), false)
            .await,
        BodyStep::Buffered
    );
    assert_eq!(
        stream.response_body(Bytes::from_static(b"def"), true).await,
        BodyStep::Forward(Bytes::from_static(b"ks:abcdef"))
    );
    let mut trailers = pairs(&[("x-up", "1")]);
    assert_eq!(
        stream.response_trailers(&mut trailers).await,
        Step::Continue
    );
    assert_eq!(get(&trailers, "x-ks-resp-trailer"), Some("1"));
    stream.log().await;
    drop(stream);

    // Logging: direct proxy_log, the `log` facade at debug (the plugin's level is trace), and
    // the root context's lines.
    for line in [
        "ks: vm start",
        "ks: configured",
        "ks: request headers",
        "ks: debug line",
    ] {
        assert!(ks.logged(line), "{line} not in {:?}", ks.logs);
    }
    assert!(ks
        .logs
        .lock()
        .unwrap()
        .iter()
        .any(|(level, m)| *level == LogLevel::Debug && m == "ks: debug line"));

    // on_log ran: the next request sees it.
    let resp = simple(&ks.plugin, &[("x-ks-no-callout", "1")]).await;
    assert_eq!(get(&resp, "x-ks-logged"), Some("1"));
    assert_eq!(get(&resp, "x-ks-shared-counter"), Some("2"));
    assert_eq!(ks.plugin.failures(), 0, "{:?}", ks.plugin.last_failure());
}

#[tokio::test]
async fn failed_and_timed_out_callouts_answer_with_zero_headers_and_the_request_goes_on() {
    let runtime = runtime();
    for (upstream, timeout) in [("fail", 5000), ("hang", 50)] {
        let ks = load(
            &runtime,
            &format!("ks-{upstream}"),
            "",
            &format!(
                r#"{{"upstream": "{upstream}", "tick_ms": 0, "callout_timeout_ms": {timeout}}}"#
            ),
        );
        let started = Instant::now();
        let resp = simple(&ks.plugin, &[]).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{upstream}: took {:?}",
            started.elapsed()
        );
        assert_eq!(get(&resp, "x-ks-callout-headers"), Some("0"), "{upstream}");
        assert_eq!(get(&resp, "x-ks-callout-status"), Some(""), "{upstream}");
        assert_eq!(get(&resp, "x-ks-callout-body"), Some(""), "{upstream}");
        assert_eq!(ks.caller.seen.lock().unwrap().len(), 1, "{upstream}");
        assert_eq!(ks.plugin.failures(), 0, "{upstream}");
    }
}

#[tokio::test]
async fn send_http_response_answers_locally_with_body_and_headers() {
    let runtime = runtime();
    let ks = load(&runtime, "ks", "", r#"{"tick_ms": 0}"#);
    let mut stream = ks.plugin.http_stream(info());
    let mut req = request("/local", &[("x-ks-local", "1")]);
    match stream.request_headers(&mut req, true).await {
        Step::Respond(response) => {
            assert_eq!(response.status, 200);
            assert_eq!(response.body, b"kitchen-sink local");
            assert_eq!(get(&response.headers, "x-ks-path"), Some("/local"));
            assert_eq!(get(&response.headers, "x-ks-plugin-name"), Some("ks"));
            assert_eq!(response.grpc_status, None);
        }
        other => panic!("expected a local response, got {other:?}"),
    }
    stream.log().await;
    assert_eq!(ks.plugin.failures(), 0);
}

#[tokio::test]
async fn stream_calls_for_tcp_stream_types_are_ok_no_ops() {
    let runtime = runtime();
    let ks = load(&runtime, "ks", "", r#"{"tick_ms": 0}"#);
    let resp = simple(&ks.plugin, &[("x-ks-stream-calls", "1")]).await;
    assert_eq!(get(&resp, "x-ks-stream-calls"), Some("true"));
    assert_eq!(ks.plugin.failures(), 0, "{:?}", ks.plugin.last_failure());
}

#[tokio::test]
async fn shared_data_and_queues_span_plugins_with_one_vm_id() {
    let runtime = runtime();
    let a = load(&runtime, "ks-a", "shared", r#"{"tick_ms": 0}"#);
    // Loaded last: its VM registered `ks-queue` last and so owns it.
    let b = load(&runtime, "ks-b", "shared", r#"{"tick_ms": 0}"#);
    let c = load(&runtime, "ks-c", "other", r#"{"tick_ms": 0}"#);

    let resp = simple(&a.plugin, &[]).await;
    assert_eq!(get(&resp, "x-ks-vm-id"), Some("shared"));
    assert_eq!(get(&resp, "x-ks-shared-counter"), Some("1"));
    assert_eq!(get(&resp, "x-ks-cas-mismatch"), Some("true"));
    assert_eq!(get(&resp, "x-ks-queue-resolved"), Some("true"));
    // A's enqueue is delivered to the registering VM: B's.
    eventually("on_queue_ready on ks-b", || b.logged("ks: queue ready 1")).await;
    assert!(!a.logged("ks: queue ready 1"), "{:?}", a.logs);

    let resp = simple(&b.plugin, &[]).await;
    assert_eq!(get(&resp, "x-ks-shared-counter"), Some("2"));
    assert_eq!(get(&resp, "x-ks-cas-mismatch"), Some("true"));
    assert_eq!(get(&resp, "x-ks-logged"), Some("1"));
    assert_eq!(get(&resp, "x-ks-queue-count"), Some("1"));
    assert_eq!(get(&resp, "x-ks-queue-last"), Some("from-http"));

    // Another VM id: its own keys and queue.
    let resp = simple(&c.plugin, &[]).await;
    assert_eq!(get(&resp, "x-ks-shared-counter"), Some("1"));
    assert_eq!(get(&resp, "x-ks-logged"), Some("0"));
    assert_eq!(get(&resp, "x-ks-queue-count"), Some("0"));
    eventually("on_queue_ready on ks-c", || c.logged("ks: queue ready 1")).await;

    for plugin in [&a.plugin, &b.plugin, &c.plugin] {
        assert_eq!(plugin.failures(), 0, "{:?}", plugin.last_failure());
    }
}

#[tokio::test]
async fn ticks_run_repeatedly_until_the_filter_stops_them() {
    let runtime = runtime();
    let ks = load(&runtime, "ks", "", r#"{"tick_ms": 10}"#);
    // Three ticks, each enqueueing `tick-<n>` to the VM's own queue, then the period is 0.
    eventually("three ticks queued", || {
        ks.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, m)| m.starts_with("ks: queue ready"))
            .count()
            >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let resp = simple(&ks.plugin, &[]).await;
    assert_eq!(get(&resp, "x-ks-ticks"), Some("3"), "{resp:?}");
    assert_eq!(get(&resp, "x-ks-queue-count"), Some("3"), "{resp:?}");
    assert_eq!(get(&resp, "x-ks-queue-last"), Some("tick-3"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let resp = simple(&ks.plugin, &[]).await;
    assert_eq!(get(&resp, "x-ks-ticks"), Some("3"), "ticks did not stop");
    assert_eq!(ks.plugin.failures(), 0);
}

#[tokio::test]
async fn metrics_are_defined_updated_read_back_and_rendered() {
    let runtime = runtime();
    let ks = load(&runtime, "ks", "", r#"{"tick_ms": 0}"#);
    let resp = simple(&ks.plugin, &[]).await;
    assert_eq!(get(&resp, "x-ks-metrics"), Some("ok"));
    assert_eq!(get(&resp, "x-ks-metric-counter"), Some("1"));
    assert_eq!(get(&resp, "x-ks-metric-gauge"), Some("42"));
    let text = runtime.render_metrics();
    for line in [
        "# TYPE ks_counter counter",
        // One increment in request headers, one in on_log.
        "ks_counter 2",
        "# TYPE ks_gauge gauge",
        "ks_gauge 42",
        "# TYPE ks_histogram histogram",
        "ks_histogram_bucket{le=\"5\"} 0",
        "ks_histogram_bucket{le=\"10\"} 1",
        "ks_histogram_sum 7",
        "ks_histogram_count 1",
        "ks_tagged_total{ks=\"1\"} 2",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
    }
    // A second plugin defining the same names shares the series.
    let other = load(&runtime, "ks-2", "", r#"{"tick_ms": 0}"#);
    let resp = simple(&other.plugin, &[]).await;
    assert_eq!(get(&resp, "x-ks-metric-counter"), Some("3"));
    assert!(runtime
        .render_metrics()
        .lines()
        .any(|l| l == "ks_counter 4"));
}

#[tokio::test]
async fn a_chain_runs_requests_first_to_last_and_responses_last_to_first() {
    let runtime = runtime();
    let first = load(&runtime, "ks-1", "", r#"{"tick_ms": 0}"#);
    let second = load(&runtime, "ks-2", "", r#"{"tick_ms": 0}"#);
    let mut chain = FilterChain::new([&first.plugin, &second.plugin], info());
    assert!(!chain.is_empty());
    let mut req = request("/chain", &[]);
    assert_eq!(chain.request_headers(&mut req, true).await, Step::Continue);
    // Each filter added `a` and `b` and saw the previous one's additions.
    assert_eq!(all(&req, "x-ks-added"), ["a", "b", "a", "b"]);
    let mut resp = pairs(&[(":status", "200")]);
    assert_eq!(
        chain.response_headers(&mut resp, true).await,
        Step::Continue
    );
    assert_eq!(all(&resp, "x-ks-plugin-name"), ["ks-2", "ks-1"]);
    // The second filter saw the first one's four additions (`x-ks-set`, `a`, `b`, `x-ks-pairs`).
    assert_eq!(all(&resp, "x-ks-req-headers"), ["8", "4"]);
    chain.log().await;
}

#[tokio::test]
async fn a_body_rewrite_past_the_buffer_limit_is_answered_413_and_the_vm_survives() {
    let runtime = Runtime::new(RuntimeConfig {
        limits: Limits {
            max_buffered_body: 16,
            ..Limits::default()
        },
        max_instances: 8,
        vms_per_plugin: 1,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let ks = load(&runtime, "ks", "", r#"{"tick_ms": 0}"#);
    let mut stream = ks.plugin.http_stream(info());
    let mut req = request("/big", &[("x-ks-rewrite-body", "1")]);
    assert_eq!(
        stream.request_headers(&mut req, false).await,
        Step::Continue
    );
    assert_eq!(
        stream
            .request_body(Bytes::from_static(b"hello"), false)
            .await,
        BodyStep::Buffered
    );
    // 11 bytes fit; "rewritten:" + 11 does not: proxy_set_buffer_bytes still answers Ok (the
    // SDK traps on anything else) and the host answers the request instead.
    match stream
        .request_body(Bytes::from_static(b" world"), true)
        .await
    {
        BodyStep::Respond(response) => assert_eq!(response.status, 413),
        other => panic!("expected 413, got {other:?}"),
    }
    drop(stream);
    assert_eq!(ks.plugin.failures(), 0, "{:?}", ks.plugin.last_failure());
    let resp = simple(&ks.plugin, &[]).await;
    assert_eq!(get(&resp, "x-ks-shared-counter"), Some("2"));
}
