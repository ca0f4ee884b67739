//! One wasmtime `Engine` per process (pooling allocator, copy-on-write memory images, epoch
//! interruption) and the `Linker` with every host function, built once; plus what all plugins
//! share: shared data, queues, metrics and a coarse clock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, Linker, PoolingAllocationConfig};

use crate::context::HostState;
use crate::host;
use crate::metrics::WasmMetrics;
use crate::plugin::circuit::CircuitStats;
use crate::shared::{SharedData, SharedQueues};

/// How often the engine's epoch advances: the granularity of the per-callback CPU budget.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Limits every VM of the runtime runs under.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Linear memory a VM may grow to; growth past it fails inside the guest (usually a trap).
    pub max_memory: usize,
    /// Wall-clock budget of one callback, enforced by epoch interruption.
    pub callback_timeout: Duration,
    /// Largest body a filter may make the host buffer (by pausing) before the request is
    /// answered 413 (request) or 500 (response), like Envoy's buffer limit.
    pub max_buffered_body: usize,
    /// Largest header map or buffer handed over in one host call.
    pub max_host_buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_memory: 64 * 1024 * 1024,
            callback_timeout: Duration::from_millis(100),
            max_buffered_body: 1024 * 1024,
            max_host_buffer: 1024 * 1024,
        }
    }
}

/// When a plugin's circuit opens: requests then fail fast, per the plugin's `failStrategy`,
/// without entering the guest, until a probe request gets through in time.
#[derive(Clone, Debug)]
pub struct CircuitSettings {
    /// Consecutive callbacks interrupted at the CPU budget that open the circuit.
    pub trip_after: u32,
    /// How long the circuit first stays open; doubled each time a probe times out again.
    pub open_for: Duration,
    pub max_open_for: Duration,
}

impl Default for CircuitSettings {
    fn default() -> Self {
        CircuitSettings {
            trip_after: 3,
            // A probe costs a whole budget of CPU: a looping plugin is retried rarely.
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(60),
        }
    }
}

/// Runtime-wide settings.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    pub limits: Limits,
    /// Instances the pooling allocator reserves (all plugins, all VMs).
    pub max_instances: u32,
    /// VMs per plugin; requests spread over them so callbacks run in parallel.
    pub vms_per_plugin: usize,
    /// Callbacks of one plugin running or waiting for their VM at once; past it the plugin is
    /// saturated and further requests fail fast (per `failStrategy`) instead of queueing.
    pub max_pending_calls: usize,
    pub circuit: CircuitSettings,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        let vms_per_plugin = std::thread::available_parallelism().map_or(2, |n| n.get());
        RuntimeConfig {
            limits: Limits::default(),
            max_instances: 128,
            vms_per_plugin,
            max_pending_calls: vms_per_plugin * 32,
            circuit: CircuitSettings::default(),
        }
    }
}

/// Why the runtime could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("creating the wasmtime engine: {0}")]
    Engine(String),
    #[error("defining the proxy-wasm host functions: {0}")]
    Linker(String),
}

pub(crate) struct RuntimeInner {
    pub engine: Engine,
    pub linker: Linker<HostState>,
    pub config: RuntimeConfig,
    pub shared_data: SharedData,
    pub queues: SharedQueues,
    pub metrics: WasmMetrics,
    /// Epoch ticks since the runtime started: a clock that costs one load to read, for the
    /// per-call checks (circuit deadlines, how long a plugin counts as slow).
    pub ticks: Arc<AtomicU64>,
    /// Each plugin's circuit, by plugin name (a new version of a plugin carries on its counts).
    pub circuits: Mutex<BTreeMap<String, Arc<CircuitStats>>>,
    stop_epoch: Arc<AtomicBool>,
}

impl RuntimeInner {
    pub fn now_ticks(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }

    pub fn circuit_stats(&self, plugin: &str) -> Arc<CircuitStats> {
        let mut circuits = self.circuits.lock().unwrap_or_else(|e| e.into_inner());
        circuits.entry(plugin.to_owned()).or_default().clone()
    }
}

impl Drop for RuntimeInner {
    fn drop(&mut self) {
        self.stop_epoch.store(true, Ordering::Relaxed);
    }
}

/// The Wasm runtime: cheap to clone, one per process.
#[derive(Clone)]
pub struct Runtime {
    pub(crate) inner: Arc<RuntimeInner>,
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        let mut pooling = PoolingAllocationConfig::new();
        pooling
            .total_core_instances(config.max_instances)
            .total_memories(config.max_instances)
            .total_tables(config.max_instances)
            .max_memory_size(config.limits.max_memory);
        let mut engine_config = Config::new();
        // Every VM runs one callback at a time, and only a plugin that proved slow runs its
        // callbacks on fibers: one stack per instance is enough.
        pooling.total_stacks(config.max_instances);
        engine_config
            .epoch_interruption(true)
            .memory_init_cow(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        let engine =
            Engine::new(&engine_config).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        host::define(&mut linker).map_err(|e| RuntimeError::Linker(format!("{e:#}")))?;
        let stop_epoch = Arc::new(AtomicBool::new(false));
        let ticks = Arc::new(AtomicU64::new(0));
        spawn_epoch_ticker(engine.clone(), ticks.clone(), stop_epoch.clone());
        Ok(Runtime {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                config,
                shared_data: SharedData::default(),
                queues: SharedQueues::default(),
                metrics: WasmMetrics::default(),
                ticks,
                circuits: Mutex::default(),
                stop_epoch,
            }),
        })
    }

    /// Metrics filters defined, and each plugin's circuit, in Prometheus text for the proxy's
    /// `/metrics`.
    pub fn render_metrics(&self) -> String {
        let mut text = self.inner.metrics.render();
        let circuits = self
            .inner
            .circuits
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        text.push_str(&CircuitStats::render(circuits.iter()));
        text
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.config.limits
    }
}

/// A plain thread, not a task: it must keep ticking while every runtime worker is stuck in a
/// runaway guest, which is exactly when it is needed.
fn spawn_epoch_ticker(engine: Engine, ticks: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    std::thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                ticks.fetch_add(1, Ordering::Relaxed);
                engine.increment_epoch();
            }
        })
        .expect("spawning the wasm epoch thread");
}
