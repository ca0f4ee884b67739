//! Hostile and broken modules: each failure fails only its own request, per the plugin's
//! `failStrategy`, and the next request is served by a fresh VM.

use std::sync::Arc;
use std::time::Duration;

use ambit_wasm_host::{
    FailStrategy, Limits, Pairs, Plugin, PluginConfig, PluginError, PluginHooks, Runtime,
    RuntimeConfig, Step, StreamInfo,
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
