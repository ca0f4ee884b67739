//! Filters in the host the waypoint runs, for `ambit filter serve` and `ambit filter run`: load a
//! module as the test process describes it ([`LoadSpec`]), run one request through a chain of
//! loaded filters in the waypoint's phase order ([`run`]), and say what became of it in the
//! test kit's terms ([`Outcome`]).

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};

use ambit_filter_test::protocol::{LoadSpec, RunSpec};
use ambit_filter_test::{
    ClientResponse, FailStrategy, Headers, HttpCallRequest, HttpCallResponse, LocalResponse,
    LogEntry, LogLevel, Metrics, Outcome, Phase, Response, Upstream,
};
use ambit_wasm_host as host;
use ambit_wasm_host::http_call::BoxFuture;
use ambit_wasm_host::{BodyStep, FilterChain, Plugin, PluginConfig, PluginHooks, Runtime, Step};
use bytes::Bytes;

/// Why a filter could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("reading {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a Wasm module (it does not start with \"\\0asm\"): pass the .wasm that `ambit filter build` printed")]
    NotWasm { path: std::path::PathBuf },
    #[error("the Wasm runtime could not start: {0}")]
    Runtime(String),
    /// `logs`: what the filter logged while it loaded (why it refused its configuration).
    #[error("{source}{logs}")]
    Load {
        source: host::PluginError,
        logs: String,
    },
}

/// The host runtime of this process: one engine and linker for every filter.
pub fn runtime() -> Result<&'static Runtime, HostError> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            Runtime::new(host::RuntimeConfig {
                // Two VMs per plugin whatever the machine: requests alternate between them, so
                // state kept in one VM's memory instead of shared data shows up in tests.
                vms_per_plugin: 2,
                ..host::RuntimeConfig::default()
            })
            .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| HostError::Runtime(e.clone()))
}

/// Where a filter's HTTP calls go: answered by whoever embeds the filter.
pub type Answerer =
    Arc<dyn Fn(HttpCallRequest) -> BoxFuture<Option<HttpCallResponse>> + Send + Sync>;

/// A loaded filter, with what it logged and the calls it made since it was loaded.
pub struct Loaded {
    plugin: Arc<Plugin>,
    logs: Arc<Mutex<Vec<LogEntry>>>,
    calls: Arc<Recorder>,
}

/// Records each call and hands it to the [`Answerer`].
struct Recorder {
    made: Mutex<Vec<HttpCallRequest>>,
    answer: Answerer,
}

impl host::HttpCaller for Recorder {
    fn call(&self, request: host::HttpCallRequest) -> BoxFuture<Option<host::HttpCallResponse>> {
        let request = HttpCallRequest {
            upstream: request.upstream,
            headers: request.headers,
            body: request.body,
            trailers: request.trailers,
            timeout: request.timeout,
        };
        lock(&self.made).push(request.clone());
        let answer = (self.answer)(request);
        Box::pin(async move {
            answer.await.map(|r| host::HttpCallResponse {
                headers: r.headers,
                body: r.body,
                trailers: r.trailers,
            })
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Loaded {
    /// Reads, compiles, starts and configures the module (`on_vm_start`, `on_configure`), so
    /// a configuration the filter refuses fails here. Needs a Tokio runtime (the plugin's
    /// background work runs on it).
    pub fn load(spec: &LoadSpec, vm_id: String, answer: Answerer) -> Result<Loaded, HostError> {
        let wasm = std::fs::read(&spec.module).map_err(|source| HostError::Read {
            path: spec.module.clone(),
            source,
        })?;
        if !wasm.starts_with(b"\0asm") {
            return Err(HostError::NotWasm {
                path: spec.module.clone(),
            });
        }
        let mut config = PluginConfig::new(spec.name.clone());
        config.root_id = spec.root_id.clone();
        config.vm_id = if spec.vm_id.is_empty() {
            vm_id
        } else {
            spec.vm_id.clone()
        };
        config.configuration = spec.configuration.clone();
        config.vm_configuration = spec.vm_configuration.clone();
        config.environment = spec.environment.clone();
        config.fail_strategy = match spec.fail_strategy {
            FailStrategy::FailClose => host::FailStrategy::FailClose,
            FailStrategy::FailOpen => host::FailStrategy::FailOpen,
        };
        config.log_level = match spec.log_level {
            LogLevel::Trace => host::LogLevel::Trace,
            LogLevel::Debug => host::LogLevel::Debug,
            LogLevel::Info => host::LogLevel::Info,
            LogLevel::Warn => host::LogLevel::Warn,
            LogLevel::Error => host::LogLevel::Error,
            LogLevel::Critical => host::LogLevel::Critical,
        };
        let logs: Arc<Mutex<Vec<LogEntry>>> = Arc::default();
        let sink = logs.clone();
        let calls = Arc::new(Recorder {
            made: Mutex::default(),
            answer,
        });
        let hooks = PluginHooks {
            http: calls.clone(),
            log: Some(Arc::new(move |level, message: &str| {
                lock(&sink).push(LogEntry {
                    level: log_level(level),
                    message: message.to_owned(),
                })
            })),
        };
        let plugin = Plugin::load(runtime()?, &wasm, config, hooks).map_err(|source| {
            let logs: String = lock(&logs)
                .iter()
                .map(|l| format!("\n  filter log [{:?}] {}", l.level, l.message))
                .collect();
            HostError::Load { source, logs }
        })?;
        Ok(Loaded {
            plugin,
            logs,
            calls,
        })
    }

    pub fn logs(&self) -> Vec<LogEntry> {
        lock(&self.logs).clone()
    }

    pub fn calls(&self) -> Vec<HttpCallRequest> {
        lock(&self.calls.made).clone()
    }

    pub fn failures(&self) -> u64 {
        self.plugin.failures()
    }
}

fn log_level(level: host::LogLevel) -> LogLevel {
    match level {
        host::LogLevel::Trace => LogLevel::Trace,
        host::LogLevel::Debug => LogLevel::Debug,
        host::LogLevel::Info => LogLevel::Info,
        host::LogLevel::Warn => LogLevel::Warn,
        host::LogLevel::Error => LogLevel::Error,
        host::LogLevel::Critical => LogLevel::Critical,
    }
}

/// The host's metrics now (process-wide), as Prometheus text.
pub fn metrics() -> String {
    runtime().map(|r| r.render_metrics()).unwrap_or_default()
}

/// Runs one request through `filters` (a chain, in order): request headers, body chunks and
/// trailers; the upstream's answer to what reached it; response headers, body chunks and
/// trailers; then `proxy_on_log`. A local response or reset ends the request where it happens.
pub async fn run<F: Future<Output = Response>>(
    filters: &[Arc<Loaded>],
    spec: RunSpec,
    upstream: impl FnOnce(Upstream) -> F,
) -> Outcome {
    let marks: Vec<(usize, usize)> = filters
        .iter()
        .map(|f| (lock(&f.logs).len(), lock(&f.calls.made).len()))
        .collect();
    let info = spec.info;
    let info = host::StreamInfo {
        connection_id: info.connection_id,
        source: info.source,
        destination: info.destination,
        mtls: info.mtls,
        source_principal: info.source_principal,
        local_principal: info.local_principal,
        source_namespace: info.source_namespace,
        source_workload: info.source_workload,
        destination_service: info.destination_service,
        started: Some(std::time::SystemTime::now()),
    };
    let mut chain = FilterChain::new(filters.iter().map(|f| &f.plugin), Arc::new(info));
    let mut exchange = Exchange::default();
    if exchange
        .request(&mut chain, spec.headers, spec.body, spec.trailers)
        .await
        .is_ok()
    {
        let sent = exchange.upstream.clone().unwrap_or_default();
        let response = upstream(sent).await;
        let _ = exchange.response(&mut chain, response).await;
    }
    chain.log().await;
    drop(chain);
    let mut outcome = Outcome {
        upstream: exchange.upstream,
        response: exchange.response,
        local_response: exchange.local_response,
        reset: exchange.reset,
        metrics: Metrics::parse(&metrics()),
        ..Outcome::default()
    };
    for (filter, (logs, calls)) in filters.iter().zip(marks) {
        outcome.logs.extend_from_slice(&lock(&filter.logs)[logs..]);
        outcome
            .calls
            .extend_from_slice(&lock(&filter.calls.made)[calls..]);
    }
    outcome
}

/// Where one request got to.
#[derive(Default)]
struct Exchange {
    upstream: Option<Upstream>,
    response: ClientResponse,
    local_response: Option<(Phase, LocalResponse)>,
    reset: Option<Phase>,
}

/// How a phase ended: go on, or stop (the client's answer is set).
type Flow = Result<(), ()>;

impl Exchange {
    async fn request(
        &mut self,
        chain: &mut FilterChain,
        headers: Headers,
        body: Vec<Vec<u8>>,
        trailers: Headers,
    ) -> Flow {
        let mut pairs = headers.0;
        let end = body.is_empty() && trailers.is_empty();
        let step = chain.request_headers(&mut pairs, end).await;
        self.step(step, Phase::RequestHeaders)?;
        self.upstream = Some(Upstream {
            headers: Headers(pairs),
            ..Upstream::default()
        });
        let chunks = body.len();
        for (index, chunk) in body.into_iter().enumerate() {
            let end = index + 1 == chunks && trailers.is_empty();
            let step = chain.request_body(Bytes::from(chunk), end).await;
            let out = self.body_step(step, Phase::RequestBody)?;
            self.upstream_mut().body.extend_from_slice(&out);
        }
        if !trailers.is_empty() {
            let mut pairs = trailers.0;
            let step = chain.request_trailers(&mut pairs).await;
            self.step(step, Phase::RequestTrailers)?;
            let held = chain.take_released_body();
            let upstream = self.upstream_mut();
            upstream.body.extend_from_slice(&held);
            upstream.trailers = Headers(pairs);
        }
        self.upstream_mut().complete = true;
        Ok(())
    }

    async fn response(&mut self, chain: &mut FilterChain, response: Response) -> Flow {
        let mut pairs = vec![(
            ":status".to_owned(),
            response.status.to_string().into_bytes(),
        )];
        pairs.extend(response.headers.0);
        let end = response.body.is_empty() && response.trailers.is_empty();
        let step = chain.response_headers(&mut pairs, end).await;
        self.step(step, Phase::ResponseHeaders)?;
        let status = pairs
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
            .unwrap_or(response.status);
        pairs.retain(|(k, _)| !k.starts_with(':'));
        self.response = ClientResponse {
            status,
            headers: Headers(pairs),
            ..ClientResponse::default()
        };
        let chunks = response.body.len();
        for (index, chunk) in response.body.into_iter().enumerate() {
            let end = index + 1 == chunks && response.trailers.is_empty();
            let step = chain.response_body(Bytes::from(chunk), end).await;
            let out = self.body_step(step, Phase::ResponseBody)?;
            self.response.body.extend_from_slice(&out);
        }
        if !response.trailers.is_empty() {
            let mut pairs = response.trailers.0;
            let step = chain.response_trailers(&mut pairs).await;
            self.step(step, Phase::ResponseTrailers)?;
            let held = chain.take_released_body();
            self.response.body.extend_from_slice(&held);
            self.response.trailers = Headers(pairs);
        }
        Ok(())
    }

    fn upstream_mut(&mut self) -> &mut Upstream {
        self.upstream
            .as_mut()
            .expect("request headers went upstream")
    }

    fn step(&mut self, step: Step, phase: Phase) -> Flow {
        match step {
            Step::Continue => Ok(()),
            Step::Respond(local) => {
                self.answer(phase, local);
                Err(())
            }
            Step::Reset => {
                self.reset(phase);
                Err(())
            }
        }
    }

    fn body_step(&mut self, step: BodyStep, phase: Phase) -> Result<Bytes, ()> {
        match step {
            BodyStep::Forward(bytes) => Ok(bytes),
            BodyStep::Buffered => Ok(Bytes::new()),
            BodyStep::Respond(local) => {
                self.answer(phase, local);
                Err(())
            }
            BodyStep::Reset => {
                self.reset(phase);
                Err(())
            }
        }
    }

    /// The client gets the filter's response as is (the waypoint does not run response
    /// callbacks on it).
    fn answer(&mut self, phase: Phase, local: host::LocalResponse) {
        let mut headers = Headers(local.headers.clone());
        if let Some(grpc) = local.grpc_status {
            headers.set("grpc-status", grpc.to_string());
        }
        self.response = ClientResponse {
            status: local.status,
            headers,
            body: local.body.clone(),
            trailers: Headers::new(),
        };
        let local = LocalResponse {
            status: local.status,
            details: local.details,
            headers: Headers(local.headers),
            body: local.body,
            grpc_status: local.grpc_status,
        };
        self.local_response = Some((phase, local));
    }

    /// What the waypoint answers when a filter resets the request.
    fn reset(&mut self, phase: Phase) {
        self.reset = Some(phase);
        let mut headers = Headers::new();
        headers.add("content-type", "text/plain");
        self.response = ClientResponse {
            status: 503,
            headers,
            body: b"the request was reset by a wasm filter".to_vec(),
            trailers: Headers::new(),
        };
    }
}
