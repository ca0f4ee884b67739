//! A loaded plugin: its compiled module and `InstancePre`, its configuration, and a small pool of
//! VMs that requests spread over. A VM that fails is dropped and a fresh one started for the next
//! request (with backoff if starting fails too); the failure touches only the requests that were
//! using it. Ticks, queue notifications and calls made from the root context run as tasks.
//!
//! A request's context lives in one VM, and a VM runs one callback at a time: a callback waits
//! for its VM asynchronously (the VM's slot is a Tokio mutex), so a busy or runaway guest never
//! blocks an async worker, and only its own plugin's requests ever wait for it. How many may
//! wait is bounded, and a plugin whose callbacks keep timing out is cut off by a circuit
//! (`circuit`): both fail requests fast, per `failStrategy`.

pub(crate) mod circuit;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use tokio::sync::Notify;
use wasmtime::{InstancePre, Module};

use self::circuit::{Circuit, Outcome};

use crate::abi::{AbiError, AbiVersion, LogLevel};
use crate::context::{HostState, OutgoingCall, StreamData, StreamInfo};
use crate::http_call::{HttpCallResponse, HttpCaller, NoUpstreams};
use crate::runtime::{Limits, Runtime, RuntimeInner};
use crate::shared::QueueOwner;
use crate::stream::HttpStream;
use crate::vm::{Vm, VmFailure};

/// What the waypoint does with a request when the plugin fails (Istio's `failStrategy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailStrategy {
    /// Answer 500: the filter's check cannot be skipped (Istio's default).
    #[default]
    FailClose,
    /// Skip the filter for that request.
    FailOpen,
}

/// A plugin's configuration, as a WasmPlugin gives it.
#[derive(Clone, Debug)]
pub struct PluginConfig {
    /// `metadata.name` (or `pluginName`): in logs and `plugin_name`.
    pub name: String,
    /// `pluginName`: the root id the module's SDK dispatches on.
    pub root_id: String,
    /// Plugins with the same VM id share data and queues.
    pub vm_id: String,
    /// `pluginConfig` as JSON, handed to `proxy_on_configure`.
    pub configuration: Vec<u8>,
    pub vm_configuration: Vec<u8>,
    /// `vmConfig.env`, the module's WASI environment.
    pub environment: Vec<(String, String)>,
    pub fail_strategy: FailStrategy,
    /// Guest log messages below this level are dropped (`proxy_get_log_level` answers it).
    pub log_level: LogLevel,
    pub node_id: String,
    /// `node.metadata.*` (Istio: NAME, NAMESPACE, WORKLOAD_NAME, CLUSTER_ID, ...).
    pub node_metadata: BTreeMap<String, String>,
}

impl PluginConfig {
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        PluginConfig {
            root_id: name.clone(),
            name,
            vm_id: String::new(),
            configuration: Vec::new(),
            vm_configuration: Vec::new(),
            environment: Vec::new(),
            fail_strategy: FailStrategy::default(),
            log_level: LogLevel::Info,
            node_id: String::new(),
            node_metadata: BTreeMap::new(),
        }
    }
}

/// Receives every message a plugin logs (the test harness captures them).
pub type LogSink = Arc<dyn Fn(LogLevel, &str) + Send + Sync>;

/// How a plugin reaches the outside world.
#[derive(Clone)]
pub struct PluginHooks {
    pub http: Arc<dyn HttpCaller>,
    pub log: Option<LogSink>,
}

impl Default for PluginHooks {
    fn default() -> Self {
        PluginHooks {
            http: Arc::new(NoUpstreams),
            log: None,
        }
    }
}

/// Why a plugin could not be loaded; the previous version (if any) keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin {plugin}: the module is not valid WebAssembly: {reason}")]
    Compile { plugin: String, reason: String },
    #[error("plugin {plugin}: {source}")]
    Abi { plugin: String, source: AbiError },
    #[error("plugin {plugin}: {reason}")]
    Link { plugin: String, reason: String },
    #[error("plugin {plugin} failed to start: {source}")]
    Start { plugin: String, source: VmFailure },
}

/// How long a plugin counts as slow after a callback of it last ran past a tick: a minute of
/// epoch ticks.
const SLOW_FOR_TICKS: u64 = 60_000 / crate::runtime::EPOCH_TICK.as_millis() as u64;

/// What every VM of a plugin reads.
pub(crate) struct PluginShared {
    pub config: PluginConfig,
    pub limits: Limits,
    pub runtime: Arc<RuntimeInner>,
    pub log_sink: Option<LogSink>,
    /// The runtime tick until which the plugin counts as slow: its callbacks run on fibers that
    /// yield at every tick instead of on the caller's thread.
    slow_until: AtomicU64,
}

impl PluginShared {
    /// A callback ran past a tick (it is at tick `now`): the plugin's calls yield from now on.
    pub fn mark_slow(&self, now: u64) {
        if self
            .slow_until
            .swap(now + SLOW_FOR_TICKS, Ordering::Relaxed)
            <= now
        {
            tracing::info!(plugin = %self.config.name, "wasm plugin callbacks run long: they now yield to other requests at every tick");
        }
    }

    fn is_slow(&self) -> bool {
        self.slow_until.load(Ordering::Relaxed) > self.runtime.now_ticks()
    }
}

struct Slot {
    vm: Option<Vm>,
    generation: u64,
    /// No new VM is started before this instant after a failed start.
    retry_at: Option<Instant>,
    failed_starts: u32,
    /// Set while a callback runs: still set when the next caller gets the slot, the caller of
    /// that callback went away while it was suspended at a yield, leaving the guest mid-call.
    in_call: bool,
}

/// Who a visit to a VM is for: its calls made from a request's context are carried by that
/// request, the others (root context) by tasks.
#[derive(Clone, Copy)]
pub(crate) enum Caller {
    Root,
    Stream(u32),
    /// A request whose context the visit creates (it gets the VM's next context id).
    NewStream,
}

/// Whether a visit counts against the plugin's bound and circuit.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// A callback on a request's behalf: refused while the circuit is open or the plugin is
    /// saturated.
    Request,
    /// Finishing a context the guest holds, or only reading the VM's state: always runs.
    Always,
}

/// A loaded plugin. Requests hold an `Arc` to the plugin they started with, so replacing a
/// plugin never disturbs requests in flight.
pub struct Plugin {
    shared: Arc<PluginShared>,
    pre: InstancePre<HostState>,
    abi: AbiVersion,
    hooks: PluginHooks,
    slots: Vec<tokio::sync::Mutex<Slot>>,
    next_slot: AtomicUsize,
    circuit: Circuit,
    /// Woken after any root-context callback, which may have resumed a paused request.
    pub(crate) resumed: Notify,
    failures: AtomicU64,
    /// The most recent VM failure (a trap, a limit, a refused start), for operators and tests.
    last_failure: Mutex<Option<VmFailure>>,
    me: Weak<Plugin>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.shared.config.name)
            .field("abi", &self.abi)
            .finish()
    }
}

impl Plugin {
    /// Compiles `wasm`, checks its ABI and imports, and starts one VM through `on_vm_start` and
    /// `on_configure` (the canary): a plugin that comes back is known to start.
    pub fn load(
        runtime: &Runtime,
        wasm: &[u8],
        config: PluginConfig,
        hooks: PluginHooks,
    ) -> Result<Arc<Plugin>, PluginError> {
        let inner = runtime.inner.clone();
        let plugin = config.name.clone();
        let module = Module::new(&inner.engine, wasm).map_err(|e| PluginError::Compile {
            plugin: plugin.clone(),
            reason: format!("{e:#}"),
        })?;
        let abi = AbiVersion::detect(&module).map_err(|source| PluginError::Abi {
            plugin: plugin.clone(),
            source,
        })?;
        let pre = inner
            .linker
            .instantiate_pre(&module)
            .map_err(|e| PluginError::Link {
                plugin: plugin.clone(),
                reason: format!("{e:#}"),
            })?;
        let slots = (0..inner.config.vms_per_plugin.max(1))
            .map(|_| {
                tokio::sync::Mutex::new(Slot {
                    vm: None,
                    generation: 0,
                    retry_at: None,
                    failed_starts: 0,
                    in_call: false,
                })
            })
            .collect();
        let circuit = Circuit::new(
            &config.name,
            inner.clone(),
            inner.config.max_pending_calls,
            inner.circuit_stats(&config.name),
        );
        let shared = Arc::new(PluginShared {
            limits: inner.config.limits.clone(),
            runtime: inner,
            log_sink: hooks.log.clone(),
            config,
            slow_until: AtomicU64::new(0),
        });
        let plugin = Arc::new_cyclic(|me| Plugin {
            shared,
            pre,
            abi,
            hooks,
            slots,
            next_slot: AtomicUsize::new(0),
            circuit,
            resumed: Notify::new(),
            failures: AtomicU64::new(0),
            last_failure: Mutex::new(None),
            me: me.clone(),
        });
        let mut slot = plugin.slots[0]
            .try_lock()
            .expect("a new plugin's slot is free");
        plugin
            .start_vm(0, &mut slot)
            .map_err(|source| PluginError::Start {
                plugin: plugin.shared.config.name.clone(),
                source,
            })?;
        drop(slot);
        Ok(plugin)
    }

    pub fn name(&self) -> &str {
        &self.shared.config.name
    }

    pub fn config(&self) -> &PluginConfig {
        &self.shared.config
    }

    pub fn abi(&self) -> AbiVersion {
        self.abi
    }

    pub fn fail_strategy(&self) -> FailStrategy {
        self.shared.config.fail_strategy
    }

    /// VM failures (traps, limits) since the plugin was loaded.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The most recent VM failure, if any VM of this plugin ever failed: tells a CPU-limit
    /// interrupt from a memory-limit refusal from a plain trap.
    pub fn last_failure(&self) -> Option<VmFailure> {
        self.last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn record_failure(&self, failure: &VmFailure) {
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(failure.clone());
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    pub(crate) fn hooks(&self) -> &PluginHooks {
        &self.hooks
    }

    /// Runs every later callback of this plugin on yielding fibers, as if it had proved slow and
    /// stayed slow (benchmarks: what a fiber per call costs).
    #[doc(hidden)]
    pub fn run_on_fibers_for_bench(&self) {
        self.shared.slow_until.store(u64::MAX, Ordering::Relaxed);
    }

    /// Starts one more instance and drops it, returning how long starting took (benchmarks).
    #[doc(hidden)]
    pub fn start_instance_for_bench(&self) -> Result<Duration, VmFailure> {
        let owner = QueueOwner {
            plugin: self.me.clone(),
            slot: 0,
            generation: u64::MAX,
        };
        let started = Instant::now();
        let vm = Vm::start(&self.pre, HostState::new(self.shared.clone(), owner))?;
        let took = started.elapsed();
        drop(vm);
        Ok(took)
    }

    /// A request's passage through this plugin, on the next VM; its context is created there by
    /// the first callback.
    pub fn http_stream(self: &Arc<Self>, info: Arc<StreamInfo>) -> HttpStream {
        let index = self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        HttpStream::new(self.clone(), index, info)
    }

    fn ensure_vm(&self, index: usize, slot: &mut Slot) -> Result<(), VmFailure> {
        if slot.vm.is_some() {
            return Ok(());
        }
        if slot.retry_at.is_some_and(|at| Instant::now() < at) {
            return Err(VmFailure::Unavailable);
        }
        self.start_vm(index, slot)
    }

    fn start_vm(&self, index: usize, slot: &mut Slot) -> Result<(), VmFailure> {
        slot.generation += 1;
        let owner = QueueOwner {
            plugin: self.me.clone(),
            slot: index,
            generation: slot.generation,
        };
        let state = HostState::new(self.shared.clone(), owner);
        match Vm::start(&self.pre, state) {
            Ok(mut vm) => {
                slot.failed_starts = 0;
                slot.retry_at = None;
                self.start_ticker(index, slot.generation, &mut vm);
                let calls = std::mem::take(&mut vm.store.data_mut().outgoing_calls);
                slot.vm = Some(vm);
                self.spawn_root_calls(index, slot.generation, calls);
                Ok(())
            }
            Err(failure) => {
                self.record_failure(&failure);
                // Restarts of a module that cannot start back off: 1 s, doubling, up to 30 s.
                slot.failed_starts += 1;
                let backoff = Duration::from_secs(1 << slot.failed_starts.min(5).saturating_sub(1));
                slot.retry_at = Some(Instant::now() + backoff.min(Duration::from_secs(30)));
                tracing::error!(plugin = %self.name(), error = %failure, "wasm VM failed to start");
                Err(failure)
            }
        }
    }

    /// Drops a failed VM: its contexts are gone, the next request starts a fresh one.
    fn retire(&self, slot: &mut Slot, failure: &VmFailure) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.record_failure(failure);
        tracing::error!(plugin = %self.name(), error = %failure, "wasm VM failed; replacing it");
        slot.vm = None;
        slot.generation += 1;
    }

    /// Runs `f` on the VM in slot `index` once it is free: the VM of `generation`, or for a new
    /// context (`None`) whichever VM is there, started if need be. Afterwards starts what the
    /// callback set in motion; calls made from the caller's request context are returned with
    /// the VM's generation, for the caller to carry.
    pub(crate) async fn with_vm<R>(
        &self,
        index: usize,
        generation: Option<u64>,
        caller: Caller,
        admit: Admit,
        f: impl AsyncFnOnce(&mut Vm) -> Result<R, VmFailure>,
    ) -> Result<(R, Vec<OutgoingCall>, u64), VmFailure> {
        let admission = match admit {
            Admit::Request => self.circuit.admit()?,
            Admit::Always => self.circuit.admit_always(),
        };
        let mut slot = self.slots[index].lock().await;
        if std::mem::take(&mut slot.in_call) && slot.vm.is_some() {
            self.retire(&mut slot, &VmFailure::Abandoned);
        }
        let generation = match generation {
            Some(generation) if generation == slot.generation => generation,
            Some(_) => return Err(VmFailure::Gone),
            None => {
                if let Err(failure) = self.ensure_vm(index, &mut slot) {
                    if failure != VmFailure::Unavailable {
                        self.retire(&mut slot, &failure);
                    }
                    admission.settle(Outcome::of::<()>(&Err(failure.clone())));
                    return Err(failure);
                }
                slot.generation
            }
        };
        slot.in_call = true;
        let vm = slot.vm.as_mut().ok_or(VmFailure::Gone)?;
        let stream = match caller {
            Caller::Root => None,
            Caller::Stream(context) => Some(context),
            Caller::NewStream => Some(vm.next_context_id()),
        };
        vm.set_yielding(self.shared.is_slow());
        let result = f(vm).await;
        slot.in_call = false;
        admission.settle(Outcome::of(&result));
        let result = match result {
            Ok(value) => value,
            Err(failure) => {
                self.retire(&mut slot, &failure);
                return Err(failure);
            }
        };
        let vm = slot.vm.as_mut().expect("the VM ran the callback");
        self.start_ticker(index, generation, vm);
        let state = vm.store.data_mut();
        // The common case (a callback that made no call and touched no queue) takes nothing.
        if state.outgoing_calls.is_empty() && state.queues_to_notify.is_empty() {
            return Ok((result, Vec::new(), generation));
        }
        let calls = std::mem::take(&mut state.outgoing_calls);
        let notify = std::mem::take(&mut state.queues_to_notify);
        drop(slot);
        let (own, root): (Vec<_>, Vec<_>) = calls
            .into_iter()
            .partition(|call| Some(call.context_id) == stream);
        self.spawn_root_calls(index, generation, root);
        self.notify_queues(notify);
        Ok((result, own, generation))
    }

    /// [`Plugin::with_vm`] for the root context of the VM of `generation`.
    async fn with_root<R>(
        &self,
        index: usize,
        generation: u64,
        f: impl AsyncFnOnce(&mut Vm) -> Result<R, VmFailure>,
    ) -> Result<R, VmFailure> {
        self.with_vm(index, Some(generation), Caller::Root, Admit::Request, f)
            .await
            .map(|(value, _, _)| value)
    }

    /// Starts ticking a VM whose filter set a tick period (in any callback) while no ticker
    /// runs for it.
    fn start_ticker(&self, index: usize, generation: u64, vm: &mut Vm) {
        let state = vm.store.data_mut();
        if let (Some(period), false) = (state.tick_period, state.ticker_running) {
            state.ticker_running = self.spawn_ticker(index, generation, period);
        }
    }

    /// Tells the owners of queues that received items; not generic, so that `with_vm` calling
    /// itself through a task stays one function.
    fn notify_queues(&self, notify: Vec<(QueueOwner, u32)>) {
        for (owner, queue) in notify {
            spawn(async move {
                if let Some(plugin) = owner.plugin.upgrade() {
                    let _ = plugin
                        .with_root(owner.slot, owner.generation, async |vm| {
                            vm.on_queue_ready(queue).await
                        })
                        .await;
                    plugin.resumed.notify_waiters();
                }
            });
        }
    }

    /// `proxy_on_log` and the end of a request's context, in one visit to its VM.
    pub(crate) async fn log_and_finish(
        &self,
        index: usize,
        generation: u64,
        data: &mut Box<StreamData>,
    ) -> Result<(), VmFailure> {
        let caller = Caller::Stream(data.context_id);
        self.with_vm(index, Some(generation), caller, Admit::Always, async |vm| {
            vm.log_and_finish(data).await
        })
        .await
        .map(|((), _, _)| ())
    }

    /// Finishes a request's context, as a task of its own: a request dropped without its log
    /// (it failed, or its client went away) must still free its context in the guest.
    pub(crate) fn finish_stream_later(
        self: &Arc<Self>,
        index: usize,
        generation: u64,
        mut data: Box<StreamData>,
    ) {
        let plugin = self.clone();
        spawn_or_poll(async move {
            let caller = Caller::Stream(data.context_id);
            let _ = plugin
                .with_vm(index, Some(generation), caller, Admit::Always, async |vm| {
                    vm.finish(&mut data).await
                })
                .await;
        });
    }

    /// Carries calls made from the root context (ticks, `on_configure`) and delivers their
    /// responses to the same VM.
    fn spawn_root_calls(&self, index: usize, generation: u64, calls: Vec<OutgoingCall>) {
        for call in calls {
            let me = self.me.clone();
            let request = self.hooks.http.call(call.request.clone());
            let timeout = call.request.timeout;
            spawn(async move {
                let response = tokio::time::timeout(timeout, request).await.ok().flatten();
                if let Some(plugin) = me.upgrade() {
                    let _ = plugin
                        .with_root(index, generation, async |vm| {
                            vm.http_call_response(None, call.token, response).await
                        })
                        .await;
                    plugin.resumed.notify_waiters();
                }
            });
        }
    }

    /// Ticks a VM until its filter sets the period to 0 or the VM goes; false when there is no
    /// Tokio runtime to tick on.
    fn spawn_ticker(&self, index: usize, generation: u64, period: Duration) -> bool {
        let me = self.me.clone();
        spawn(async move {
            let mut period = period;
            loop {
                tokio::time::sleep(period).await;
                let Some(plugin) = me.upgrade() else { return };
                let ticked = plugin
                    .with_root(index, generation, async |vm| {
                        let ticked = vm.on_tick().await;
                        let state = vm.store.data_mut();
                        // Stopping here, under the slot lock, lets a later period start a new
                        // ticker.
                        state.ticker_running = state.tick_period.is_some() && ticked.is_ok();
                        ticked.map(|()| state.tick_period)
                    })
                    .await;
                plugin.resumed.notify_waiters();
                match ticked {
                    Ok(Some(next)) => period = next,
                    // Refused by the circuit: the VM is fine, the tick is skipped.
                    Err(refused) if refused.is_refusal() => {}
                    _ => return,
                }
            }
        })
    }

    /// Delivers a response to a call a request made, with its data in the store.
    pub(crate) async fn deliver(
        &self,
        index: usize,
        generation: u64,
        data: &mut Box<StreamData>,
        token: u32,
        response: Option<HttpCallResponse>,
    ) -> Result<Vec<OutgoingCall>, VmFailure> {
        let caller = Caller::Stream(data.context_id);
        self.with_vm(
            index,
            Some(generation),
            caller,
            Admit::Request,
            async |vm| vm.http_call_response(Some(data), token, response).await,
        )
        .await
        .map(|((), calls, _)| calls)
    }

    /// Whether a tick or queue callback resumed the request `context` while it was paused.
    pub(crate) async fn take_resumed(&self, index: usize, generation: u64, context: u32) -> bool {
        let caller = Caller::Stream(context);
        self.with_vm(index, Some(generation), caller, Admit::Always, async |vm| {
            Ok(vm.store.data_mut().resumed_elsewhere.remove(&context))
        })
        .await
        .is_ok_and(|(resumed, _, _)| resumed)
    }
}

/// Runs `task` on the current Tokio runtime, or, outside one (a plugin used by a plain test),
/// right here: with no runtime there is no other task to wait for, so it completes at once.
fn spawn_or_poll(task: impl std::future::Future<Output = ()> + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(task);
        }
        Err(_) => {
            let _ = task.now_or_never();
        }
    }
}

/// Spawns on the current Tokio runtime; outside one (a plugin loaded by a plain test) background
/// work such as ticks simply does not run.
fn spawn(task: impl std::future::Future<Output = ()> + Send + 'static) -> bool {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(task);
            true
        }
        Err(_) => false,
    }
}
