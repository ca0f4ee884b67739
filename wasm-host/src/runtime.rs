//! One wasmtime `Engine` per process (pooling allocator, copy-on-write memory images, epoch
//! interruption) and the `Linker` with every host function, built once; plus what all plugins
//! share: shared data, queues and metrics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, Linker, PoolingAllocationConfig};

use crate::context::HostState;
use crate::host;
use crate::metrics::WasmMetrics;
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

/// Runtime-wide settings.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    pub limits: Limits,
    /// Instances the pooling allocator reserves (all plugins, all VMs).
    pub max_instances: u32,
    /// VMs per plugin; requests spread over them so callbacks run in parallel.
    pub vms_per_plugin: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            limits: Limits::default(),
            max_instances: 128,
            vms_per_plugin: std::thread::available_parallelism().map_or(2, |n| n.get()),
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
    stop_epoch: Arc<AtomicBool>,
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
        engine_config
            .epoch_interruption(true)
            .memory_init_cow(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        let engine =
            Engine::new(&engine_config).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        host::define(&mut linker).map_err(|e| RuntimeError::Linker(format!("{e:#}")))?;
        let stop_epoch = Arc::new(AtomicBool::new(false));
        spawn_epoch_ticker(engine.clone(), stop_epoch.clone());
        Ok(Runtime {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                config,
                shared_data: SharedData::default(),
                queues: SharedQueues::default(),
                metrics: WasmMetrics::default(),
                stop_epoch,
            }),
        })
    }

    /// Metrics filters defined, in Prometheus text, for the proxy's `/metrics`.
    pub fn render_metrics(&self) -> String {
        self.inner.metrics.render()
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.config.limits
    }
}

/// A plain thread, not a task: it must keep ticking while every runtime worker is stuck in a
/// runaway guest, which is exactly when it is needed.
fn spawn_epoch_ticker(engine: Engine, stop: Arc<AtomicBool>) {
    std::thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        })
        .expect("spawning the wasm epoch thread");
}
