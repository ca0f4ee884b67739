//! proxy-wasm interop with a filter from another SDK: `tests/interop/assemblyscript/`, an
//! AssemblyScript filter (our own small source) on solo.io's `@solo-io/proxy-runtime` 0.1.8 with
//! `assemblyscript` 0.14.13 from npm, which targets proxy-wasm ABI **0.2.0** (it exports
//! `proxy_abi_version_0_2_0` and `malloc`, imports `wasi_unstable.proc_exit`).
//!
//! The test setup copies the sources to `target/interop/assemblyscript/`, runs `npm ci` there (the
//! committed `package-lock.json` pins both packages) and `asc ... --use abort=abort_proc_exit
//! --optimize`, once per test process. The module then runs in this host through an
//! [`HttpStream`], as the waypoint drives it: the filter adds a request header, adds a response
//! header taken from its configuration, and answers requests for `/admin` with its own 403.
//!
//! The filter's main root (`ambit_as_interop`) reads its configuration with the SDK's
//! `get_buffer_bytes` helper, because the SDK's own `RootContext.onConfigure` (0.1.8) passes the
//! configuration size as the size out-pointer. A second root (`ambit_as_stock`) keeps that stock
//! `onConfigure` and is loaded with an empty configuration, where it hands the host a size
//! out-pointer of 0: proxy-wasm-cpp-host (Envoy, Istio) writes the size to guest address 0 and
//! answers Ok (`WasmBase::copyToPointerSize` → `setWord`), so that filter loads in Envoy.
//!
//! Needs `node` and `npm` (and the npm registry, or a warm npm cache).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use ambit_wasm_host::{
    AbiVersion, LocalResponse, LogLevel, Pairs, Plugin, PluginConfig, PluginHooks, Runtime,
    RuntimeConfig, Step, StreamInfo,
};

/// The peer, as failure messages name it.
const PEER: &str = "AssemblyScript filter (@solo-io/proxy-runtime 0.1.8, ABI 0.2.0)";
/// The root ids the filter registers (`registerRootContext(..., "ambit_as_interop")`); the SDK
/// reads the plugin's back through `proxy_get_property("plugin_root_id")`.
const ROOT_ID: &str = "ambit_as_interop";
const STOCK_ROOT_ID: &str = "ambit_as_stock";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("wasm-host sits in the workspace")
        .to_owned()
}

fn run(step: &str, dir: &Path, program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{PEER}: {step}: `{program}` does not run ({e}); install node and npm")
        });
    assert!(
        output.status.success(),
        "{PEER}: {step}: `{program} {}` failed ({}):\n{}\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `npm ci` + `asc`, once per process; returns the module's bytes and its imports as
/// `module.name` (listed by node, so a link failure can be matched to what the module needs).
fn build() -> &'static (Vec<u8>, Vec<String>) {
    static BUILT: OnceLock<(Vec<u8>, Vec<String>)> = OnceLock::new();
    BUILT.get_or_init(|| {
        let source = workspace_root().join("tests/interop/assemblyscript");
        let dir = workspace_root().join("target/interop/assemblyscript");
        std::fs::create_dir_all(dir.join("assembly")).unwrap();
        for file in ["package.json", "package-lock.json", "assembly/index.ts"] {
            std::fs::copy(source.join(file), dir.join(file))
                .unwrap_or_else(|e| panic!("{PEER}: copying {file} to {}: {e}", dir.display()));
        }
        run(
            "npm ci (assemblyscript 0.14.13, @solo-io/proxy-runtime 0.1.8)",
            &dir,
            "npm",
            &["ci", "--no-audit", "--no-fund", "--prefer-offline"],
        );
        let _ = std::fs::remove_file(dir.join("build/filter.wasm"));
        run(
            "compiling with asc",
            &dir,
            "node",
            &[
                "node_modules/assemblyscript/bin/asc",
                "assembly/index.ts",
                "-b",
                "build/filter.wasm",
                "--use",
                "abort=abort_proc_exit",
                "--optimize",
            ],
        );
        let wasm = std::fs::read(dir.join("build/filter.wasm"))
            .unwrap_or_else(|e| panic!("{PEER}: asc ran but build/filter.wasm is missing: {e}"));
        let imports = run(
            "listing the module's imports with node",
            &dir,
            "node",
            &[
                "-e",
                "const m = new WebAssembly.Module(require('fs').readFileSync('build/filter.wasm'));\
                 for (const i of WebAssembly.Module.imports(m)) console.log(i.module + '.' + i.name);",
            ],
        );
        (wasm, imports.lines().map(str::to_owned).collect())
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

type Logs = Arc<Mutex<Vec<(LogLevel, String)>>>;

/// Loads the module as a WasmPlugin with `pluginName: ambit_as_interop` would; a load failure
/// names the module's imports, so a host function the AssemblyScript runtime needs and the host
/// lacks (`env.abort`, `env.seed`, `env.trace`, ...) shows up by name.
fn load(runtime: &Runtime, configuration: &str) -> (Arc<Plugin>, Logs) {
    try_load(runtime, ROOT_ID, configuration).unwrap_or_else(|(e, logs)| {
        let (_, imports) = build();
        panic!(
            "{PEER}: Plugin::load (instantiate, proxy_on_vm_start, proxy_on_configure) failed: \
             {e}\n(a host import missing? the module imports: {imports:?})\nguest log: {logs:?}"
        )
    })
}

/// Why a load failed, with what the guest logged.
type LoadFailure = (String, Vec<(LogLevel, String)>);

fn try_load(
    runtime: &Runtime,
    root_id: &str,
    configuration: &str,
) -> Result<(Arc<Plugin>, Logs), LoadFailure> {
    let (wasm, _) = build();
    let mut config = PluginConfig::new("as-interop");
    config.root_id = root_id.into();
    config.configuration = configuration.as_bytes().to_vec();
    config.log_level = LogLevel::Trace;
    let logs: Logs = Arc::default();
    let sink = logs.clone();
    let hooks = PluginHooks {
        log: Some(Arc::new(move |level, message: &str| {
            sink.lock().unwrap().push((level, message.to_owned()))
        })),
        ..Default::default()
    };
    match Plugin::load(runtime, wasm, config, hooks) {
        Ok(plugin) => Ok((plugin, logs)),
        Err(e) => Err((e.to_string(), logs.lock().unwrap().clone())),
    }
}

#[test]
fn the_assemblyscript_module_targets_abi_0_2_0_and_imports_only_what_the_host_defines() {
    let (wasm, imports) = build();
    assert!(
        wasm.starts_with(b"\0asm"),
        "{PEER}: asc output is not a wasm module"
    );
    // What the host must provide for this SDK; each is defined by ambit-wasm-host today. A new
    // import here that the host lacks fails the load below with its name.
    for import in imports {
        assert!(
            import.starts_with("env.proxy_") || import == "wasi_unstable.proc_exit",
            "{PEER}: unexpected import {import} (all: {imports:?})"
        );
    }
    let runtime = Runtime::new(RuntimeConfig::default()).unwrap();
    let (plugin, _) = load(&runtime, "");
    assert_eq!(
        plugin.abi(),
        AbiVersion::V0_2_0,
        "{PEER}: Plugin::load: ABI detected from the exports"
    );
}

#[tokio::test]
async fn the_assemblyscript_filter_adds_headers_through_an_http_stream() {
    let runtime = Runtime::new(RuntimeConfig::default()).unwrap();
    let (plugin, logs) = load(&runtime, "from-ambit-config");
    for round in 0..8 {
        // Several streams on the same VM: the SDK's context map keeps working.
        let mut stream = plugin.http_stream(Arc::new(StreamInfo::default()));
        let mut request = pairs(&[
            (":method", "GET"),
            (":path", "/productpage"),
            (":authority", "bookinfo"),
            (":scheme", "http"),
        ]);
        let step = stream.request_headers(&mut request, true).await;
        assert_eq!(
            step,
            Step::Continue,
            "{PEER}: request {round}: proxy_on_request_headers for /productpage; guest log: {:?}",
            logs.lock().unwrap()
        );
        assert_eq!(
            get(&request, "x-as-seen"),
            Some("/productpage"),
            "{PEER}: request {round}: proxy_get_header_map_value(:path) + proxy_add_header_map_value \
             on the request; headers: {request:?}"
        );
        assert_eq!(get(&request, ":path"), Some("/productpage"));

        let mut response = pairs(&[(":status", "200"), ("content-type", "text/html")]);
        let step = stream.response_headers(&mut response, false).await;
        assert_eq!(
            step,
            Step::Continue,
            "{PEER}: request {round}: proxy_on_response_headers; guest log: {:?}",
            logs.lock().unwrap()
        );
        assert_eq!(
            get(&response, "x-as-filter"),
            Some("from-ambit-config"),
            "{PEER}: request {round}: response header from the plugin configuration \
             (proxy_get_buffer_bytes(PluginConfiguration) at proxy_on_configure); headers: {response:?}"
        );
        assert_eq!(get(&response, ":status"), Some("200"));
        assert_eq!(get(&response, "content-type"), Some("text/html"));
        stream.log().await;
    }
    assert_eq!(
        plugin.failures(),
        0,
        "{PEER}: VM failures after eight streams; guest log: {:?}",
        logs.lock().unwrap()
    );
}

#[tokio::test]
async fn the_assemblyscript_filter_answers_403_locally_for_admin() {
    let runtime = Runtime::new(RuntimeConfig::default()).unwrap();
    let (plugin, logs) = load(&runtime, "");
    let mut stream = plugin.http_stream(Arc::new(StreamInfo::default()));
    let mut request = pairs(&[
        (":method", "GET"),
        (":path", "/admin/users"),
        (":authority", "bookinfo"),
        (":scheme", "http"),
    ]);
    let step = stream.request_headers(&mut request, true).await;
    let Step::Respond(response) = step else {
        panic!(
            "{PEER}: GET /admin/users: expected a local response (proxy_send_local_response), got \
             {step:?}; guest log: {:?}",
            logs.lock().unwrap()
        );
    };
    let LocalResponse {
        status,
        details,
        headers,
        body,
        grpc_status,
    } = response;
    assert_eq!(
        status, 403,
        "{PEER}: GET /admin/users: local response status"
    );
    assert_eq!(
        details, "as_filter_denied",
        "{PEER}: GET /admin/users: local response details"
    );
    assert_eq!(
        String::from_utf8_lossy(&body),
        "denied by the AssemblyScript filter\n",
        "{PEER}: GET /admin/users: local response body"
    );
    assert_eq!(
        get(&headers, "x-as-denied"),
        Some("/admin/users"),
        "{PEER}: GET /admin/users: local response headers (the SDK's serialized header pairs): {headers:?}"
    );
    assert_eq!(
        grpc_status, None,
        "{PEER}: GET /admin/users: grpc_status -1 means none"
    );
    stream.log().await;

    // The same VM still serves other paths afterwards, and the empty configuration gives the
    // filter's default response header.
    let mut stream = plugin.http_stream(Arc::new(StreamInfo::default()));
    let mut request = pairs(&[(":method", "GET"), (":path", "/administrator")]);
    assert_eq!(
        stream.request_headers(&mut request, true).await,
        Step::Continue,
        "{PEER}: GET /administrator after a 403 (not under /admin): request headers"
    );
    let mut response = pairs(&[(":status", "204")]);
    assert_eq!(
        stream.response_headers(&mut response, true).await,
        Step::Continue,
        "{PEER}: GET /administrator: response headers"
    );
    assert_eq!(
        get(&response, "x-as-filter"),
        Some("hello"),
        "{PEER}: GET /administrator: response header with an empty configuration: {response:?}"
    );
    assert_eq!(
        plugin.failures(),
        0,
        "{PEER}: VM failures; guest log: {:?}",
        logs.lock().unwrap()
    );
}

/// The SDK's stock `onConfigure` with an empty configuration passes the configuration *size*
/// (0) as the size out-pointer. The host answers as cpp-host does (writes `ptr = 0, size = 0` at
/// guest address 0, Ok); the SDK then frees a stale reference and faults in its own allocator,
/// which would happen in Envoy too. What the host owes is a clean, named refusal at load time and
/// no harm to anything else: the same module under the filter's own root context still serves.
#[tokio::test]
async fn the_stock_sdk_on_configure_bug_is_refused_cleanly_at_load() {
    let runtime = Runtime::new(RuntimeConfig::default()).unwrap();
    let error = match try_load(&runtime, STOCK_ROOT_ID, "") {
        Ok(_) => panic!(
            "{PEER}: the SDK's stock onConfigure with an empty configuration loaded; if the SDK \
             was fixed, make this test expect success"
        ),
        Err((error, _)) => error,
    };
    assert!(
        error.contains("failed to start") && error.contains("proxy_on_configure trapped"),
        "{PEER}: stock onConfigure: expected a start failure naming proxy_on_configure, got {error}"
    );
    let (plugin, logs) = try_load(&runtime, ROOT_ID, "").unwrap_or_else(|(error, logs)| {
        panic!(
            "{PEER}: the filter's own root context after the refusal: {error}; guest log: {logs:?}"
        )
    });
    let mut stream = plugin.http_stream(Arc::new(StreamInfo::default()));
    let mut request = pairs(&[(":method", "GET"), (":path", "/admin")]);
    let step = stream.request_headers(&mut request, true).await;
    assert!(
        matches!(&step, Step::Respond(r) if r.status == 403),
        "{PEER}: GET /admin after the refusal: expected the local 403, got {step:?}; guest log: {:?}",
        logs.lock().unwrap()
    );
}
