//! A loaded filter: its plugin in the process-wide host runtime, with its log lines and HTTP
//! calls captured.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ambit_wasm_host::{
    FailStrategy, HttpCallRequest, HttpCallResponse, LogLevel, Plugin, PluginConfig, PluginHooks,
    Runtime, RuntimeConfig,
};

use crate::calls::{Answer, TestCaller};
use crate::metrics::Metrics;
use crate::module;
use crate::outcome::LogEntry;
use crate::request::Request;
use crate::HarnessError;

/// The host runtime of the test process: one engine and linker for every filter of every test.
pub(crate) fn runtime() -> Result<&'static Runtime, HarnessError> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            Runtime::new(RuntimeConfig {
                // Two VMs per plugin whatever the machine: requests alternate between them, so
                // state kept in one VM's memory instead of shared data shows up in tests.
                vms_per_plugin: 2,
                ..RuntimeConfig::default()
            })
            .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| HarnessError::Runtime(e.clone()))
}

/// A Tokio runtime for work that outlives one test's runtime (ticks, root-context calls of
/// plugins loaded outside any runtime) and for [`Request::run`].
pub(crate) fn background() -> &'static tokio::runtime::Runtime {
    static TOKIO: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    TOKIO.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ambit-filter-test")
            .enable_all()
            .build()
            .expect("starting the harness's Tokio runtime")
    })
}

enum Source {
    File(PathBuf),
    Package(String),
    Crate(PathBuf),
    Bytes(Arc<Vec<u8>>),
}

/// How to load a filter; [`FilterBuilder::load`] does it.
pub struct FilterBuilder {
    source: Source,
    name: Option<String>,
    root_id: Option<String>,
    vm_id: Option<String>,
    configuration: Vec<u8>,
    vm_configuration: Vec<u8>,
    environment: Vec<(String, String)>,
    fail_strategy: FailStrategy,
    log_level: LogLevel,
    answer: Answer,
    call_delay: Duration,
}

impl FilterBuilder {
    fn new(source: Source) -> Self {
        FilterBuilder {
            source,
            name: None,
            root_id: None,
            vm_id: None,
            configuration: Vec::new(),
            vm_configuration: Vec::new(),
            environment: Vec::new(),
            fail_strategy: FailStrategy::FailClose,
            log_level: LogLevel::Trace,
            // No answer configured: every call fails, as with a proxy that has no such upstream.
            answer: Arc::new(|_| None),
            call_delay: Duration::ZERO,
        }
    }

    /// The plugin configuration (`pluginConfig`), as JSON text.
    pub fn config(mut self, json: impl Into<String>) -> Self {
        self.configuration = json.into().into_bytes();
        self
    }

    /// The plugin configuration from a JSON value (e.g. `serde_json::json!({...})`).
    pub fn config_json(self, json: &serde_json::Value) -> Self {
        self.config(json.to_string())
    }

    /// The VM configuration (`vmConfig`), handed to `on_vm_start`.
    pub fn vm_config(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.vm_configuration = bytes.into();
        self
    }

    /// One variable of the module's WASI environment (`vmConfig.env`).
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.environment.push((name.into(), value.into()));
        self
    }

    /// What happens to requests when the filter fails (default: fail closed, 500).
    pub fn fail_strategy(mut self, strategy: FailStrategy) -> Self {
        self.fail_strategy = strategy;
        self
    }

    /// The plugin's name (default: the package or file name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The root id (`pluginName`) the module's SDK dispatches on (default: the name).
    pub fn root_id(mut self, root_id: impl Into<String>) -> Self {
        self.root_id = Some(root_id.into());
        self
    }

    /// The VM id: filters with the same one share data and queues. By default each filter
    /// gets its own, so tests running side by side stay apart.
    pub fn vm_id(mut self, vm_id: impl Into<String>) -> Self {
        self.vm_id = Some(vm_id.into());
        self
    }

    /// Log messages below this level are dropped by the host (default: everything is kept).
    pub fn log_level(mut self, level: LogLevel) -> Self {
        self.log_level = level;
        self
    }

    /// Answers the filter's HTTP calls: `None` is a failed call (no upstream, reset, timeout).
    pub fn http_calls(
        mut self,
        answer: impl Fn(&HttpCallRequest) -> Option<HttpCallResponse> + Send + Sync + 'static,
    ) -> Self {
        self.answer = Arc::new(answer);
        self
    }

    /// Answers calls by upstream name from a table; other upstreams fail.
    pub fn http_call_table(
        self,
        table: impl IntoIterator<Item = (String, HttpCallResponse)>,
    ) -> Self {
        let table: std::collections::HashMap<String, HttpCallResponse> =
            table.into_iter().collect();
        self.http_calls(move |request| table.get(&request.upstream).cloned())
    }

    /// Answers come this long after the call (the host still applies the call's timeout).
    pub fn http_call_delay(mut self, delay: Duration) -> Self {
        self.call_delay = delay;
        self
    }

    /// Reads or builds the module and loads it: compiled, started and configured
    /// (`on_vm_start`, `on_configure`), so a configuration the filter refuses fails here.
    pub fn load(self) -> Result<Filter, HarnessError> {
        let (wasm, default_name) = match &self.source {
            Source::File(path) => (module::read(path)?, file_name(path)),
            Source::Package(package) => (
                module::read(&module::workspace_package(package))?,
                package.clone(),
            ),
            Source::Crate(dir) => {
                let built = module::build_crate(dir)?;
                (module::read(&built.path)?, file_name(&built.path))
            }
            Source::Bytes(bytes) => (bytes.clone(), "filter".to_owned()),
        };
        static NEXT_VM: AtomicU64 = AtomicU64::new(1);
        let name = self.name.unwrap_or(default_name);
        let mut config = PluginConfig::new(name.clone());
        config.root_id = self.root_id.unwrap_or(name);
        config.vm_id = self.vm_id.unwrap_or_else(|| {
            format!(
                "ambit-filter-test/{}",
                NEXT_VM.fetch_add(1, Ordering::Relaxed)
            )
        });
        config.configuration = self.configuration;
        config.vm_configuration = self.vm_configuration;
        config.environment = self.environment;
        config.fail_strategy = self.fail_strategy;
        config.log_level = self.log_level;
        let logs: Arc<Mutex<Vec<LogEntry>>> = Arc::default();
        let sink = logs.clone();
        let caller = Arc::new(TestCaller::new(self.answer, self.call_delay));
        let hooks = PluginHooks {
            http: caller.clone(),
            log: Some(Arc::new(move |level, message: &str| {
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(LogEntry {
                        level,
                        message: message.to_owned(),
                    })
            })),
        };
        let runtime = runtime()?;
        // Background work the first VM starts (ticks, calls from on_configure) needs a Tokio
        // runtime that outlives whichever test loaded the filter.
        let _enter = background().enter();
        let plugin = Plugin::load(runtime, &wasm, config, hooks)?;
        Ok(Filter {
            plugin,
            logs,
            caller,
        })
    }
}

fn file_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "filter".into())
}

/// A filter loaded in the host, ready for requests. Cheap to share between tasks by reference.
pub struct Filter {
    pub(crate) plugin: Arc<Plugin>,
    pub(crate) logs: Arc<Mutex<Vec<LogEntry>>>,
    pub(crate) caller: Arc<TestCaller>,
}

impl Filter {
    /// A `.wasm` file.
    pub fn wasm(path: impl Into<PathBuf>) -> FilterBuilder {
        FilterBuilder::new(Source::File(path.into()))
    }

    /// A package of the Ambit workspace, built with `cargo build --profile wasm --target
    /// wasm32-wasip1` once per test process (panics with cargo's output if that fails).
    pub fn package(name: impl Into<String>) -> FilterBuilder {
        FilterBuilder::new(Source::Package(name.into()))
    }

    /// The filter crate in `dir` (usually `env!("CARGO_MANIFEST_DIR")`), built like `ambit
    /// filter build` does, once per test process; works inside and outside the workspace.
    pub fn crate_dir(dir: impl Into<PathBuf>) -> FilterBuilder {
        FilterBuilder::new(Source::Crate(dir.into()))
    }

    /// Module bytes already in memory.
    pub fn bytes(wasm: impl Into<Vec<u8>>) -> FilterBuilder {
        FilterBuilder::new(Source::Bytes(Arc::new(wasm.into())))
    }

    /// A request to send through the filter.
    pub fn request(&self) -> Request<'_> {
        Request::new(self)
    }

    /// The host's plugin (for what the harness does not cover).
    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    /// Every message logged since the filter was loaded (on_vm_start and on_configure too).
    pub fn logs(&self) -> Vec<LogEntry> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every HTTP call the filter made since it was loaded.
    pub fn calls(&self) -> Vec<HttpCallRequest> {
        self.caller.since(0)
    }

    /// Changes how the filter's HTTP calls are answered, from the next call on.
    pub fn answer_calls(
        &self,
        answer: impl Fn(&HttpCallRequest) -> Option<HttpCallResponse> + Send + Sync + 'static,
    ) {
        self.caller.set_answer(Arc::new(answer));
    }

    /// Delays the answers to the filter's next HTTP calls.
    pub fn delay_calls(&self, delay: Duration) {
        self.caller.set_delay(delay);
    }

    /// The host's metrics now (process-wide).
    pub fn metrics(&self) -> Metrics {
        Metrics::parse(&runtime().map(|r| r.render_metrics()).unwrap_or_default())
    }

    /// VM failures (traps, limits) since the filter was loaded.
    pub fn failures(&self) -> u64 {
        self.plugin.failures()
    }
}
