//! A loaded filter: a plugin in the test process's `ambit filter serve`, with its HTTP calls
//! answered here.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::calls::{Answer, HttpCallRequest, HttpCallResponse};
use crate::client::Client;
use crate::metrics::Metrics;
use crate::module;
use crate::outcome::LogEntry;
use crate::protocol::{FailStrategy, FilterState, LoadSpec, LogLevel};
use crate::request::Request;
use crate::HarnessError;

enum Source {
    File(PathBuf),
    Package(String),
    Crate(PathBuf),
    Bytes(Vec<u8>),
}

/// How to load a filter; [`FilterBuilder::load`] does it.
pub struct FilterBuilder {
    source: Source,
    name: Option<String>,
    root_id: Option<String>,
    spec: LoadSpec,
    answer: Answer,
    delay: Duration,
}

impl FilterBuilder {
    fn new(source: Source) -> Self {
        FilterBuilder {
            source,
            name: None,
            root_id: None,
            spec: LoadSpec::default(),
            // No answer configured: every call fails, as with a proxy that has no such upstream.
            answer: Arc::new(|_| None),
            delay: Duration::ZERO,
        }
    }

    /// The plugin configuration (`pluginConfig`), as JSON text.
    pub fn config(mut self, json: impl Into<String>) -> Self {
        self.spec.configuration = json.into().into_bytes();
        self
    }

    /// The plugin configuration from a JSON value (e.g. `serde_json::json!({...})`).
    pub fn config_json(self, json: &serde_json::Value) -> Self {
        self.config(json.to_string())
    }

    /// The VM configuration (`vmConfig`), handed to `on_vm_start`.
    pub fn vm_config(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.spec.vm_configuration = bytes.into();
        self
    }

    /// One variable of the module's WASI environment (`vmConfig.env`).
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.spec.environment.push((name.into(), value.into()));
        self
    }

    /// What happens to requests when the filter fails (default: fail closed, 500).
    pub fn fail_strategy(mut self, strategy: FailStrategy) -> Self {
        self.spec.fail_strategy = strategy;
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
        self.spec.vm_id = vm_id.into();
        self
    }

    /// Log messages below this level are dropped by the host (default: everything is kept).
    pub fn log_level(mut self, level: LogLevel) -> Self {
        self.spec.log_level = level;
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
        self.delay = delay;
        self
    }

    /// Reads or builds the module and loads it: compiled, started and configured
    /// (`on_vm_start`, `on_configure`), so a configuration the filter refuses fails here.
    pub fn load(self) -> Result<Filter, HarnessError> {
        let (module, default_name) = match self.source {
            Source::File(path) => {
                let name = file_name(&path);
                (path, name)
            }
            Source::Package(package) => (module::workspace_package(&package)?, package),
            Source::Crate(dir) => {
                let built = module::build_crate(&dir)?;
                let name = file_name(&built.path);
                (built.path, name)
            }
            Source::Bytes(bytes) => (module::temporary(&bytes)?, "filter".to_owned()),
        };
        let mut spec = self.spec;
        spec.module = module;
        spec.name = self.name.unwrap_or(default_name);
        spec.root_id = self.root_id.unwrap_or_else(|| spec.name.clone());
        let client = Client::get()?;
        let id = client.load(spec, self.answer, self.delay)?;
        Ok(Filter { id, client })
    }
}

fn file_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "filter".into())
}

/// A filter loaded in the host, ready for requests. Share it between threads by reference.
pub struct Filter {
    pub(crate) id: u64,
    pub(crate) client: &'static Client,
}

impl Filter {
    /// A `.wasm` file.
    pub fn wasm(path: impl Into<PathBuf>) -> FilterBuilder {
        FilterBuilder::new(Source::File(path.into()))
    }

    /// A package of the Cargo workspace the test runs in, built with `cargo build --profile
    /// wasm --target wasm32-wasip1` once per test process (Ambit's workspace defines that
    /// profile).
    pub fn package(name: impl Into<String>) -> FilterBuilder {
        FilterBuilder::new(Source::Package(name.into()))
    }

    /// The filter crate in `dir` (usually `env!("CARGO_MANIFEST_DIR")`), built like `ambit
    /// filter build` does, once per test process; works inside and outside a workspace. Under
    /// `ambit filter test` the module it just built is used as is.
    pub fn crate_dir(dir: impl Into<PathBuf>) -> FilterBuilder {
        FilterBuilder::new(Source::Crate(dir.into()))
    }

    /// Module bytes already in memory.
    pub fn bytes(wasm: impl Into<Vec<u8>>) -> FilterBuilder {
        FilterBuilder::new(Source::Bytes(wasm.into()))
    }

    /// A request to send through the filter.
    pub fn request(&self) -> Request<'_> {
        Request::new(self)
    }

    fn state(&self) -> FilterState {
        self.client
            .inspect(self.id)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Every message logged since the filter was loaded (on_vm_start and on_configure too).
    pub fn logs(&self) -> Vec<LogEntry> {
        self.state().logs
    }

    /// Every HTTP call the filter made since it was loaded.
    pub fn calls(&self) -> Vec<HttpCallRequest> {
        self.state().calls
    }

    /// Changes how the filter's HTTP calls are answered, from the next call on.
    pub fn answer_calls(
        &self,
        answer: impl Fn(&HttpCallRequest) -> Option<HttpCallResponse> + Send + Sync + 'static,
    ) {
        self.client.set_answer(self.id, Arc::new(answer));
    }

    /// Delays the answers to the filter's next HTTP calls.
    pub fn delay_calls(&self, delay: Duration) {
        self.client.set_delay(self.id, delay);
    }

    /// The host's metrics now (process-wide).
    pub fn metrics(&self) -> Metrics {
        Metrics::parse(&self.state().metrics)
    }

    /// VM failures (traps, limits) since the filter was loaded.
    pub fn failures(&self) -> u64 {
        self.state().failures
    }
}

impl Drop for Filter {
    fn drop(&mut self) {
        self.client.unload(self.id);
    }
}
