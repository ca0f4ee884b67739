//! Cost of the Wasm host per request and per instance, beside the same request with no filter.
//!
//! Run: `cargo bench -p ambit-wasm-host --features testing --bench wasm`.
//!
//! A "request" here is what the waypoint does for every request with a filter chain: create the
//! request's context in each plugin, run request headers and response headers through the chain
//! (real header maps with pseudo-headers, 10 headers each way), `proxy_on_log`, then finish the
//! context (`proxy_on_done`, `proxy_on_delete`). Filters:
//!
//! - **no filter**: an empty chain, the baseline;
//! - **raw no-op**: a hand-written module whose callbacks return Continue at once (ABI cost only);
//! - **SDK no-op**: the `headers` example (proxy-wasm Rust SDK) with an empty configuration;
//! - **header rewrite**: the same filter removing, setting and adding headers both ways;
//! - **chain of three**: three header-rewriting plugins in a row.
//!
//! Then: compiling a module (`Plugin::load`, once) and starting one more instance of it (the
//! pooling allocator's copy-on-write path: instantiate, `_initialize`, root context,
//! `on_vm_start`, `on_configure`).
//!
//! Environment:
//! - `AMBIT_BENCH_REQUESTS` (default 20000): requests per measurement.
//! - `AMBIT_BENCH_ONLY`: one row only (`none`, `raw`, `sdk`, `rewrite` or `chain`), and no
//!   instance-start rows: with two runs of different `AMBIT_BENCH_REQUESTS` under
//!   `valgrind --tool=callgrind`, the difference in instructions over the difference in requests
//!   is that row's instructions per request, start-up and compilation cancelled out.
//! - `AMBIT_BENCH_MAX_INSTANCES` (default the runtime's 128): instances the pooling allocator
//!   reserves. Each reserves a linear memory's whole address range, more than valgrind can map at
//!   128; 8 is enough for this bench.
//! - `AMBIT_BENCH_FIBERS=1`: every plugin's callbacks run on fibers that yield at each epoch tick,
//!   as a plugin's do once it has proved slow (the cost of running every call that way).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_wasm_host::testing::build_filter;
use ambit_wasm_host::{
    FilterChain, Pairs, Plugin, PluginConfig, PluginHooks, Runtime, RuntimeConfig, StreamInfo,
};

const NOOP_WAT: &str = r#"(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32)
    (local $p i32) (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get 0))) (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32)))"#;

const REWRITE: &str = r#"{"request": {"remove": ["x-debug"], "set": {"x-env": "prod"}, "add": {"x-via": "ambit"}},
    "response": {"remove": ["server"], "set": {"x-frame-options": "DENY"}}}"#;

fn headers(first: &[(&str, &str)]) -> Pairs {
    let mut pairs: Pairs = first
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
    while pairs.len() < 10 {
        pairs.push((format!("x-header-{}", pairs.len()), b"some value".to_vec()));
    }
    pairs
}

fn plugin(runtime: &Runtime, wasm: &[u8], name: &str, config: &str) -> Arc<Plugin> {
    let mut plugin = PluginConfig::new(name);
    plugin.configuration = config.as_bytes().to_vec();
    Plugin::load(runtime, wasm, plugin, PluginHooks::default()).expect("bench plugin loads")
}

/// Mean time per request through `plugins`.
async fn per_request(plugins: &[Arc<Plugin>], requests: usize) -> Duration {
    let request = headers(&[
        (":method", "GET"),
        (":path", "/api/v1/items?page=2"),
        (":authority", "echo.default.svc.cluster.local"),
        (":scheme", "http"),
        ("x-debug", "1"),
    ]);
    let response = headers(&[(":status", "200"), ("server", "envoy")]);
    let info = Arc::new(StreamInfo::default());
    let run = |n: usize| {
        let info = info.clone();
        let (request, response) = (request.clone(), response.clone());
        async move {
            let started = Instant::now();
            for _ in 0..n {
                let mut chain = FilterChain::new(plugins, info.clone());
                let mut req = request.clone();
                chain.request_headers(&mut req, true).await;
                let mut resp = response.clone();
                chain.response_headers(&mut resp, false).await;
                chain.log().await;
            }
            started.elapsed()
        }
    };
    run(requests / 10).await;
    run(requests).await / requests as u32
}

fn env_number(name: &str) -> Option<usize> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
    })
}

fn main() {
    let requests = env_number("AMBIT_BENCH_REQUESTS").unwrap_or(20_000);
    let only = std::env::var("AMBIT_BENCH_ONLY").ok();
    let fibers = std::env::var("AMBIT_BENCH_FIBERS").is_ok_and(|v| v == "1");
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let defaults = RuntimeConfig::default();
    let runtime = Runtime::new(RuntimeConfig {
        vms_per_plugin: 1,
        max_instances: env_number("AMBIT_BENCH_MAX_INSTANCES")
            .map_or(defaults.max_instances, |n| n as u32),
        ..defaults
    })
    .unwrap();
    let sdk_wasm = std::fs::read(build_filter("ambit-filter-headers")).unwrap();
    let noop_wasm = wat::parse_str(NOOP_WAT).unwrap();
    // Each row's plugins: (key, name, SDK filter configurations or `None` for the raw no-op).
    let rows: [(&str, &str, &[Option<&str>]); 5] = [
        ("none", "none (baseline)", &[]),
        ("raw", "raw no-op (hand-written)", &[None]),
        ("sdk", "SDK no-op (headers, {})", &[Some("{}")]),
        ("rewrite", "header rewrite (SDK)", &[Some(REWRITE)]),
        ("chain", "chain of three rewrites", &[Some(REWRITE); 3]),
    ];
    // Compiling is slow under valgrind: a one-row run loads only that row's plugins.
    let load = |key: &str, configs: &[Option<&str>]| -> Vec<Arc<Plugin>> {
        let plugins: Vec<_> = configs
            .iter()
            .enumerate()
            .map(|(i, config)| {
                let name = format!("{key}-{i}");
                match config {
                    Some(config) => plugin(&runtime, &sdk_wasm, &name, config),
                    None => plugin(&runtime, &noop_wasm, &name, ""),
                }
            })
            .collect();
        if fibers {
            for plugin in &plugins {
                plugin.run_on_fibers_for_bench();
            }
        }
        plugins
    };

    println!(
        "wasm host, {requests} requests per row (headers both ways, on_log, context done){}",
        if fibers {
            "; every call on a yielding fiber"
        } else {
            ""
        }
    );
    println!("{:<28} {:>12} {:>14}", "filters", "ns/request", "added ns");
    if let Some(only) = only {
        let (key, name, configs) = rows
            .iter()
            .find(|(key, ..)| *key == only)
            .unwrap_or_else(|| panic!("AMBIT_BENCH_ONLY={only}: none, raw, sdk, rewrite or chain"));
        let took = tokio.block_on(per_request(&load(key, configs), requests));
        println!("{name:<28} {:>12} {:>14}", took.as_nanos(), "?");
        return;
    }
    let started = Instant::now();
    let sdk_noop = plugin(&runtime, &sdk_wasm, "sdk-noop", "{}");
    let load_time = started.elapsed();
    let baseline = tokio.block_on(per_request(&[], requests));
    println!(
        "{:<28} {:>12} {:>14}",
        "none (baseline)",
        baseline.as_nanos(),
        "-"
    );
    for (key, name, configs) in rows.into_iter().skip(1) {
        let took = tokio.block_on(per_request(&load(key, configs), requests));
        println!(
            "{:<28} {:>12} {:>14}",
            name,
            took.as_nanos(),
            took.as_nanos().saturating_sub(baseline.as_nanos())
        );
    }
    let mut starts: Vec<Duration> = (0..200)
        .map(|_| {
            sdk_noop
                .start_instance_for_bench()
                .expect("instance starts")
        })
        .collect();
    starts.sort();
    println!(
        "module compile + first instance (Plugin::load, SDK filter, {} KiB): {:.1} ms",
        sdk_wasm.len() / 1024,
        load_time.as_secs_f64() * 1e3
    );
    println!(
        "instance start (instantiate + _initialize + vm_start + configure): p50 {} µs, p99 {} µs",
        starts[starts.len() / 2].as_micros(),
        starts[starts.len() * 99 / 100].as_micros()
    );
}
