//! Hostile and broken modules: each failure fails only its own request, per the plugin's
//! `failStrategy`, and the next request is served by a fresh VM.

use std::sync::Arc;
use std::time::Duration;

use std::sync::Mutex;

use ambit_wasm_host::testing::build_filter;
use ambit_wasm_host::{
    AbiVersion, FailStrategy, Limits, LogLevel, Pairs, Plugin, PluginConfig, PluginError,
    PluginHooks, Runtime, RuntimeConfig, Step, StreamInfo, VmFailure,
};

fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig {
        limits: Limits {
            max_memory: 4 * 1024 * 1024,
            callback_timeout: Duration::from_millis(50),
            ..Limits::default()
        },
        max_instances: 16,
        vms_per_plugin: 1,
        ..RuntimeConfig::default()
    })
    .unwrap()
}

fn hostile(runtime: &Runtime, strategy: FailStrategy) -> Arc<Plugin> {
    let wasm = wat::parse_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/hostile.wat"
    ))
    .unwrap();
    let mut config = PluginConfig::new("hostile");
    config.fail_strategy = strategy;
    Plugin::load(runtime, &wasm, config, PluginHooks::default()).unwrap()
}

/// A request with `count` headers (the module picks its behaviour by the count).
fn headers(count: usize) -> Pairs {
    (0..count)
        .map(|i| (format!("h{i}"), b"v".to_vec()))
        .collect()
}

async fn request(plugin: &Arc<Plugin>, count: usize) -> (Step, Pairs) {
    let mut stream = plugin.http_stream(Arc::new(StreamInfo::default()));
    let mut headers = headers(count);
    let step = stream.request_headers(&mut headers, true).await;
    (step, headers)
}

fn served(headers: &Pairs) -> bool {
    headers.iter().any(|(k, v)| k == "x-served" && v == b"yes")
}

fn assert_500(step: Step) {
    match step {
        Step::Respond(response) => assert_eq!(response.status, 500, "{response:?}"),
        other => panic!("expected a 500 local response, got {other:?}"),
    }
}

#[tokio::test]
async fn each_failure_fails_only_its_request_and_the_next_is_served() {
    let runtime = runtime();
    let plugin = hostile(&runtime, FailStrategy::FailClose);
    let (step, headers) = request(&plugin, 2).await;
    assert_eq!(step, Step::Continue);
    assert!(served(&headers));
    // 3: infinite loop, 4: memory growth past the limit, 7: a trap.
    for mode in [3, 4, 7] {
        let started = std::time::Instant::now();
        let (step, _) = request(&plugin, mode).await;
        assert_500(step);
        let failure = plugin.last_failure();
        match mode {
            3 => assert!(
                matches!(failure, Some(VmFailure::CpuLimit { .. })),
                "{failure:?}"
            ),
            4 => assert!(
                matches!(failure, Some(VmFailure::MemoryLimit { .. })),
                "{failure:?}"
            ),
            _ => assert!(
                matches!(failure, Some(VmFailure::Trap { .. })),
                "{failure:?}"
            ),
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "mode {mode} took {:?}",
            started.elapsed()
        );
        let (step, headers) = request(&plugin, 2).await;
        assert_eq!(step, Step::Continue, "after mode {mode}");
        assert!(served(&headers), "after mode {mode}");
    }
    assert_eq!(plugin.failures(), 3);
}

#[tokio::test]
async fn bad_pointers_and_lying_maps_get_statuses_not_traps() {
    let runtime = runtime();
    let plugin = hostile(&runtime, FailStrategy::FailClose);
    for mode in [5, 6] {
        let (step, headers) = request(&plugin, mode).await;
        assert_eq!(step, Step::Continue, "mode {mode}");
        assert!(served(&headers), "mode {mode}");
    }
    assert_eq!(plugin.failures(), 0);
}

#[tokio::test]
async fn fail_open_skips_the_filter() {
    let runtime = runtime();
    let plugin = hostile(&runtime, FailStrategy::FailOpen);
    let (step, headers) = request(&plugin, 3).await;
    assert_eq!(step, Step::Continue);
    assert!(
        !served(&headers),
        "the failed filter must not have run to the end"
    );
    let (step, headers) = request(&plugin, 2).await;
    assert_eq!(step, Step::Continue);
    assert!(served(&headers));
}

#[test]
fn modules_that_cannot_run_are_refused_with_a_reason() {
    let runtime = runtime();
    let load = |wat: &str| {
        let wasm = wat::parse_str(wat).unwrap();
        Plugin::load(
            &runtime,
            &wasm,
            PluginConfig::new("bad"),
            PluginHooks::default(),
        )
        .map(|_| ())
        .unwrap_err()
    };
    let traps_at_start = load(
        r#"(module (memory (export "memory") 1)
            (func (export "proxy_abi_version_0_2_1"))
            (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 0)
            (func (export "proxy_on_vm_start") (param i32 i32) (result i32) unreachable))"#,
    );
    assert!(
        matches!(traps_at_start, PluginError::Start { .. }),
        "{traps_at_start}"
    );
    assert!(
        traps_at_start
            .to_string()
            .contains("proxy_on_vm_start trapped"),
        "{traps_at_start}"
    );

    let refuses_config = load(
        r#"(module (memory (export "memory") 1)
            (func (export "proxy_abi_version_0_2_0"))
            (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 0)
            (func (export "proxy_on_configure") (param i32 i32) (result i32) i32.const 0))"#,
    );
    assert!(
        refuses_config
            .to_string()
            .contains("proxy_on_configure returned false"),
        "{refuses_config}"
    );

    let old_abi = load(r#"(module (func (export "proxy_abi_version_0_1_0")))"#);
    assert!(old_abi.to_string().contains("ABI 0.1.0"), "{old_abi}");

    let not_a_filter = load(r#"(module (func (export "run")))"#);
    assert!(
        not_a_filter.to_string().contains("not a proxy-wasm filter"),
        "{not_a_filter}"
    );

    let unknown_import = load(
        r#"(module (import "env" "launch_missiles" (func))
            (func (export "proxy_abi_version_0_2_1")))"#,
    );
    assert!(
        unknown_import.to_string().contains("launch_missiles"),
        "{unknown_import}"
    );

    let garbage = Plugin::load(
        &runtime,
        b"\0asm garbage",
        PluginConfig::new("garbage"),
        PluginHooks::default(),
    )
    .unwrap_err();
    assert!(matches!(garbage, PluginError::Compile { .. }), "{garbage}");
}

type Logs = Arc<Mutex<Vec<(LogLevel, String)>>>;

fn hooks_with_logs() -> (PluginHooks, Logs) {
    let logs: Logs = Arc::default();
    let sink = logs.clone();
    let hooks = PluginHooks {
        log: Some(Arc::new(move |level, message: &str| {
            sink.lock().unwrap().push((level, message.to_owned()));
        })),
        ..PluginHooks::default()
    };
    (hooks, logs)
}

/// `test-hostile` in `mode` (plugin configuration `{"mode": ...}`).
fn test_hostile(
    runtime: &Runtime,
    name: &str,
    mode: &str,
    strategy: FailStrategy,
) -> Result<Arc<Plugin>, PluginError> {
    let wasm = std::fs::read(build_filter("test-hostile")).unwrap();
    let mut config = PluginConfig::new(name);
    config.configuration = format!(r#"{{"mode": "{mode}"}}"#).into_bytes();
    config.fail_strategy = strategy;
    Plugin::load(runtime, &wasm, config, PluginHooks::default())
}

fn request_headers() -> Pairs {
    [(":method", "GET"), (":path", "/"), (":authority", "svc")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

/// A whole request without a body: how each phase ended and the response headers.
async fn full_request(plugin: &Arc<Plugin>) -> (Step, Step, Pairs) {
    let mut stream = plugin.http_stream(Arc::new(StreamInfo::default()));
    let mut headers = request_headers();
    let request = stream.request_headers(&mut headers, true).await;
    let mut response = vec![(":status".to_owned(), b"200".to_vec())];
    let step = stream.response_headers(&mut response, true).await;
    stream.log().await;
    (request, step, response)
}

fn mode_header(response: &Pairs) -> Option<&str> {
    response
        .iter()
        .find(|(k, _)| k == "x-hostile-mode")
        .map(|(_, v)| std::str::from_utf8(v).unwrap())
}

#[tokio::test]
async fn sdk_filter_limits_fail_the_request_and_name_the_limit() {
    let runtime = runtime();
    let good = test_hostile(&runtime, "good", "none", FailStrategy::FailClose).unwrap();
    for mode in ["loop", "grow", "trap"] {
        let bad = test_hostile(&runtime, mode, mode, FailStrategy::FailClose).unwrap();
        // A request of the good plugin is mid-flight while the bad one fails.
        let mut good_stream = good.http_stream(Arc::new(StreamInfo::default()));
        let mut headers = request_headers();
        assert_eq!(
            good_stream.request_headers(&mut headers, true).await,
            Step::Continue
        );
        let started = std::time::Instant::now();
        let (request, _, _) = full_request(&bad).await;
        assert_500(request);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{mode}: took {:?}",
            started.elapsed()
        );
        let failure = bad.last_failure().expect("a failure is recorded");
        let limit = match mode {
            "loop" => matches!(failure, VmFailure::CpuLimit { .. }),
            "grow" => matches!(failure, VmFailure::MemoryLimit { .. }),
            _ => matches!(failure, VmFailure::Trap { .. }),
        };
        assert!(limit, "{mode}: {failure}");
        assert!(
            failure.to_string().contains("proxy_on_request_headers"),
            "{mode}: {failure}"
        );
        // The other plugin's request finishes as if nothing happened.
        let mut response = vec![(":status".to_owned(), b"200".to_vec())];
        assert_eq!(
            good_stream.response_headers(&mut response, true).await,
            Step::Continue
        );
        assert_eq!(mode_header(&response), Some("none"), "{mode}");
        good_stream.log().await;
        // The failed plugin serves the next request on a fresh VM (and fails it again).
        let (request, _, _) = full_request(&bad).await;
        assert_500(request);
        assert_eq!(bad.failures(), 2, "{mode}");
    }
    assert_eq!(good.failures(), 0);
    assert_eq!(good.last_failure(), None);
}

#[tokio::test]
async fn a_trap_mid_request_fails_open_or_closed_per_plugin() {
    let runtime = runtime();
    let open = test_hostile(&runtime, "open", "response-trap", FailStrategy::FailOpen).unwrap();
    let closed =
        test_hostile(&runtime, "closed", "response-trap", FailStrategy::FailClose).unwrap();
    for _ in 0..2 {
        let (request, response, headers) = full_request(&open).await;
        assert_eq!(request, Step::Continue);
        assert_eq!(response, Step::Continue, "fail open passes the response on");
        assert_eq!(mode_header(&headers), None);
        let (request, response, _) = full_request(&closed).await;
        assert_eq!(request, Step::Continue, "the request half ran normally");
        assert_500(response);
    }
    assert_eq!(open.failures(), 2);
    assert_eq!(closed.failures(), 2);
    assert!(matches!(
        closed.last_failure(),
        Some(VmFailure::Trap {
            callback: "proxy_on_response_headers",
            ..
        })
    ));
}

#[test]
fn sdk_filters_that_fail_to_start_are_refused_at_load() {
    let runtime = runtime();
    for (mode, expect) in [
        ("start-trap", "proxy_on_vm_start trapped"),
        ("configure-trap", "proxy_on_configure trapped"),
        ("configure-fail", "proxy_on_configure returned false"),
    ] {
        let error = test_hostile(&runtime, mode, mode, FailStrategy::FailOpen).unwrap_err();
        assert!(
            matches!(error, PluginError::Start { .. }),
            "{mode}: {error}"
        );
        assert!(error.to_string().contains(expect), "{mode}: {error}");
    }
}

/// raw-abi.wat: each case makes one bad host call and logs the status it got back.
#[tokio::test]
async fn raw_abi_bad_pointers_and_lying_lengths_get_statuses_and_the_vm_survives() {
    let runtime = runtime();
    let wasm = wat::parse_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../wasm-filters/testdata/raw-abi.wat"
    ))
    .unwrap();
    // 06 InvalidMemoryAccess: any range outside memory, including out-params and a wrapping
    // pointer + size; 02 BadArgument: a map whose count lies, an unknown log level.
    let expected = [
        (1, "06"),
        (2, "06"),
        (3, "02"),
        (4, "06"),
        (5, "06"),
        (6, "06"),
        (7, "02"),
        (8, "02"),
    ];
    for (case, status) in expected {
        let (hooks, logs) = hooks_with_logs();
        let mut config = PluginConfig::new(format!("raw-abi-{case}"));
        config.configuration = vec![b'x'; case];
        let plugin = Plugin::load(&runtime, &wasm, config, hooks).unwrap();
        for _ in 0..2 {
            let mut stream = plugin.http_stream(Arc::new(StreamInfo::default()));
            let mut headers = request_headers();
            assert_eq!(
                stream.request_headers(&mut headers, true).await,
                Step::Continue,
                "case {case}"
            );
            stream.log().await;
        }
        let line = format!("raw-abi case {case} status {status}");
        let logs = logs.lock().unwrap();
        assert_eq!(
            logs.iter().filter(|(_, m)| *m == line).count(),
            2,
            "case {case}: {logs:?}"
        );
        assert_eq!(
            plugin.failures(),
            0,
            "case {case}: {:?}",
            plugin.last_failure()
        );
    }
}

#[tokio::test]
async fn a_replaced_plugin_finishes_its_requests_in_flight() {
    let runtime = runtime();
    let old = test_hostile(&runtime, "filter", "none", FailStrategy::FailClose).unwrap();
    let mut stream = old.http_stream(Arc::new(StreamInfo::default()));
    let mut headers = request_headers();
    assert_eq!(
        stream.request_headers(&mut headers, true).await,
        Step::Continue
    );
    // The waypoint swaps its Arc for the new version; the request keeps the old one.
    let new = test_hostile(&runtime, "filter", "none", FailStrategy::FailClose).unwrap();
    drop(old);
    let (request, response, headers) = full_request(&new).await;
    assert_eq!((request, response), (Step::Continue, Step::Continue));
    assert_eq!(mode_header(&headers), Some("none"));
    let mut response = vec![(":status".to_owned(), b"200".to_vec())];
    assert_eq!(
        stream.response_headers(&mut response, true).await,
        Step::Continue
    );
    assert_eq!(mode_header(&response), Some("none"));
    assert_eq!(stream.plugin().failures(), 0);
    stream.log().await;
}

#[tokio::test]
async fn an_abi_0_2_0_module_is_accepted_and_served() {
    let runtime = runtime();
    let wasm = wat::parse_str(
        r#"(module
          (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (global $heap (mut i32) (i32.const 4096))
          (data (i32.const 16) "x-abi\00020")
          (func (export "proxy_abi_version_0_2_0"))
          (func (export "malloc") (param $size i32) (result i32)
            (local $p i32)
            (local.set $p (global.get $heap))
            (global.set $heap (i32.add (global.get $heap) (local.get $size)))
            (local.get $p))
          (func (export "proxy_on_context_create") (param i32 i32))
          (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
          (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
          (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
            (drop (call $add (i32.const 0) (i32.const 16) (i32.const 5) (i32.const 22) (i32.const 3)))
            (i32.const 0)))"#,
    )
    .unwrap();
    let plugin = Plugin::load(
        &runtime,
        &wasm,
        PluginConfig::new("abi-020"),
        PluginHooks::default(),
    )
    .unwrap();
    assert_eq!(plugin.abi(), AbiVersion::V0_2_0);
    let mut stream = plugin.http_stream(Arc::new(StreamInfo::default()));
    let mut headers = request_headers();
    assert_eq!(
        stream.request_headers(&mut headers, true).await,
        Step::Continue
    );
    assert!(
        headers.iter().any(|(k, v)| k == "x-abi" && v == b"020"),
        "{headers:?}"
    );
    stream.log().await;
}

/// A looping plugin's very first call (the plugin not yet known to be slow, so the call runs on
/// the async worker's own thread) does not stall the other tasks of a one-worker runtime: the
/// worker's tasks move to another thread at the call's first epoch tick, and go on while the
/// call runs to its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_looping_first_call_does_not_stall_a_one_worker_runtime() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    let runtime = Runtime::new(RuntimeConfig {
        limits: Limits {
            callback_timeout: Duration::from_millis(300),
            ..Limits::default()
        },
        max_instances: 4,
        vms_per_plugin: 1,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let looping = test_hostile(&runtime, "loop", "loop", FailStrategy::FailClose).unwrap();
    // Another service's requests: a task waking every millisecond, timing the longest gap.
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut longest = Duration::ZERO;
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(1)).await;
                longest = longest.max(last.elapsed());
                last = Instant::now();
            }
            longest
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let (step, _, _) = tokio::spawn(async move { full_request(&looping).await })
        .await
        .unwrap();
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(20)).await;
    stop.store(true, Ordering::Relaxed);
    let longest = ticker.await.unwrap();
    eprintln!("looping first call: {took:?}; longest gap of the other task: {longest:?}");
    assert_500(step);
    assert!(
        took >= Duration::from_millis(290),
        "the call ran to its budget: {took:?}"
    );
    // Before the hand-off the other task stalled for the whole call. The bound is relative: on a
    // loaded machine ticks and wake-ups come late (an idle one hands off within one 5 ms tick).
    assert!(
        longest < took / 4,
        "the other task stalled for {longest:?} of the first call's {took:?}"
    );
}
