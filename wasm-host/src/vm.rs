//! One instance of a plugin's module: its `Store`, the callbacks it exports (looked up once), and
//! every call into it run under the CPU budget, with failures told apart for operators.
//!
//! Calls run on the caller's thread, synchronously: a fiber per call would cost more than most
//! callbacks. A call still running at the first epoch tick hands the rest of its async worker's
//! tasks to another thread (Tokio's `block_in_place`), so other requests go on while it runs to
//! its end or its budget; after two ticks it marks its plugin slow (see
//! `PluginShared::mark_slow`). A slow plugin's calls run on fibers that yield to the executor at
//! every tick, so a runaway guest holds an async worker for one tick at a time, never for its
//! whole budget.

use std::time::Duration;

use wasmtime::{
    Func, Instance, InstancePre, Store, StoreContextMut, Trap, TypedFunc, UpdateDeadline,
    WasmParams, WasmResults,
};

use crate::context::{HostState, StreamData};
use crate::http_call::HttpCallResponse;
use crate::runtime::EPOCH_TICK;

/// Ticks a synchronous call runs before its plugin counts as slow: two, so that a short call
/// which merely straddles a tick is not taken for a slow one.
const SLOW_AFTER_TICKS: u64 = 2;

/// How long a hand-off of an async worker waits for another thread to run the runtime's tasks.
const HANDOFF_WAIT: Duration = Duration::from_millis(2);

/// Why a VM can no longer be used, or why a request could not use it. Every variant but the
/// last two ends the VM (it is replaced); `CircuitOpen` and `Saturated` refuse a request
/// before it reaches the guest.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmFailure {
    #[error("{callback} ran past its CPU budget of {limit:?} and was interrupted")]
    CpuLimit {
        callback: &'static str,
        limit: Duration,
    },
    #[error("{callback} tried to grow memory past the limit of {limit} bytes")]
    MemoryLimit {
        callback: &'static str,
        limit: usize,
    },
    #[error("{callback} trapped: {message}")]
    Trap {
        callback: &'static str,
        message: String,
    },
    #[error("{callback} called proc_exit({code})")]
    Exit { callback: &'static str, code: i32 },
    #[error("the module does not export {0}")]
    MissingExport(&'static str),
    #[error("the module's export {0} has the wrong signature")]
    BadExport(&'static str),
    #[error("{0} returned false: the plugin refused to start")]
    Refused(&'static str),
    #[error("the plugin's VM was replaced after a failure; this request's context is gone")]
    Gone,
    #[error("the plugin is unavailable after repeated failures (retrying with backoff)")]
    Unavailable,
    #[error("a request went away while its callback was suspended mid-call; the VM is replaced")]
    Abandoned,
    #[error(
        "the plugin's circuit is open: its callbacks kept running past their CPU budget \
         (requests fail fast until a probe gets through)"
    )]
    CircuitOpen,
    #[error("the plugin is saturated: {0} callbacks are already running or waiting for its VMs")]
    Saturated(usize),
}

impl VmFailure {
    /// Whether the request was refused before reaching the guest (the VM is fine).
    pub fn is_refusal(&self) -> bool {
        matches!(self, VmFailure::CircuitOpen | VmFailure::Saturated(_))
    }
}

/// An HTTP callback and its arguments.
#[derive(Clone, Copy, Debug)]
pub(crate) enum HttpCallback {
    RequestHeaders { count: usize, end: bool },
    RequestBody { size: usize, end: bool },
    RequestTrailers { count: usize },
    ResponseHeaders { count: usize, end: bool },
    ResponseBody { size: usize, end: bool },
    ResponseTrailers { count: usize },
}

type Fn2 = TypedFunc<(i32, i32), i32>;
type Fn3 = TypedFunc<(i32, i32, i32), i32>;
/// `proxy_on_http_call_response(root, token, headers, body size, trailers)`.
type CallResponseFn = TypedFunc<(i32, i32, i32, i32, i32), ()>;

struct Callbacks {
    on_context_create: Option<TypedFunc<(i32, i32), ()>>,
    on_vm_start: Option<Fn2>,
    on_configure: Option<Fn2>,
    on_tick: Option<TypedFunc<i32, ()>>,
    on_queue_ready: Option<TypedFunc<(i32, i32), ()>>,
    on_done: Option<TypedFunc<i32, i32>>,
    on_log: Option<TypedFunc<i32, ()>>,
    on_delete: Option<TypedFunc<i32, ()>>,
    on_request_headers: Option<Fn3>,
    on_request_body: Option<Fn3>,
    on_request_trailers: Option<Fn2>,
    on_response_headers: Option<Fn3>,
    on_response_body: Option<Fn3>,
    on_response_trailers: Option<Fn2>,
    on_http_call_response: Option<CallResponseFn>,
}

fn lookup<P: WasmParams, R: WasmResults>(
    store: &mut Store<HostState>,
    instance: &Instance,
    name: &'static str,
) -> Result<Option<TypedFunc<P, R>>, VmFailure> {
    match instance.get_func(&mut *store, name) {
        None => Ok(None),
        Some(func) => func
            .typed::<P, R>(&*store)
            .map(Some)
            .map_err(|_| VmFailure::BadExport(name)),
    }
}

/// The id of the plugin's root context in every VM.
pub(crate) const ROOT_CONTEXT: u32 = 1;

pub(crate) struct Vm {
    pub store: Store<HostState>,
    callbacks: Callbacks,
    next_context_id: u32,
    budget: Duration,
    /// The budget in epoch ticks, computed once: armed before every guest call.
    deadline: u64,
}

/// Runs one guest call under the CPU budget and turns its failure into a [`VmFailure`]: on the
/// calling thread, or on a fiber that yields at every tick when the plugin is slow. A free
/// function over the store, so callers can borrow a callback from `Vm::callbacks` at the same
/// time instead of cloning it (a `TypedFunc` clone bumps wasmtime's type registry refcounts).
async fn run<P, R>(
    store: &mut Store<HostState>,
    budget: Duration,
    deadline: u64,
    callback: &'static str,
    f: &TypedFunc<P, R>,
    params: P,
) -> Result<R, VmFailure>
where
    P: WasmParams + Sync,
    R: WasmResults + Sync,
{
    arm(store, deadline);
    let result = if store.data().yielding {
        f.call_async(&mut *store, params).await
    } else {
        f.call(&mut *store, params)
    };
    crate::host::flush_output(store.data_mut());
    result.map_err(|e| classify(store, callback, budget, e))
}

/// [`run`] for the calls that start a VM, which never yield (a VM starts off the async workers,
/// or once after a failure).
fn run_sync<R>(
    store: &mut Store<HostState>,
    budget: Duration,
    deadline: u64,
    callback: &'static str,
    f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
) -> Result<R, VmFailure> {
    store.data_mut().yielding = false;
    arm(store, deadline);
    let result = f(store);
    crate::host::flush_output(store.data_mut());
    result.map_err(|e| classify(store, callback, budget, e))
}

impl Vm {
    /// Instantiates, runs the module's initializer, creates the root context and runs
    /// `on_vm_start` and `on_configure`: a VM that comes back is ready for requests.
    pub fn start(pre: &InstancePre<HostState>, state: HostState) -> Result<Vm, VmFailure> {
        let budget = state.plugin.limits.callback_timeout;
        let deadline = deadline_ticks(budget);
        let mut store = Store::new(pre.module().engine(), state);
        store.limiter(|state| &mut state.limiter);
        store.epoch_deadline_callback(on_epoch);
        arm(&mut store, deadline);
        let instance = pre
            .instantiate(&mut store)
            .map_err(|e| classify(&store, "instantiation", budget, e))?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or(VmFailure::MissingExport("memory"))?;
        let allocator = match lookup::<i32, i32>(&mut store, &instance, "proxy_on_memory_allocate")?
        {
            Some(f) => f,
            None => lookup(&mut store, &instance, "malloc")?.ok_or(VmFailure::MissingExport(
                "proxy_on_memory_allocate (or malloc)",
            ))?,
        };
        store.data_mut().memory = Some(memory);
        store.data_mut().allocator = Some(allocator);
        let callbacks = Callbacks {
            on_context_create: lookup(&mut store, &instance, "proxy_on_context_create")?,
            on_vm_start: lookup(&mut store, &instance, "proxy_on_vm_start")?,
            on_configure: lookup(&mut store, &instance, "proxy_on_configure")?,
            on_tick: lookup(&mut store, &instance, "proxy_on_tick")?,
            on_queue_ready: lookup(&mut store, &instance, "proxy_on_queue_ready")?,
            on_done: lookup(&mut store, &instance, "proxy_on_done")?,
            on_log: lookup(&mut store, &instance, "proxy_on_log")?,
            on_delete: lookup(&mut store, &instance, "proxy_on_delete")?,
            on_request_headers: lookup(&mut store, &instance, "proxy_on_request_headers")?,
            on_request_body: lookup(&mut store, &instance, "proxy_on_request_body")?,
            on_request_trailers: lookup(&mut store, &instance, "proxy_on_request_trailers")?,
            on_response_headers: lookup(&mut store, &instance, "proxy_on_response_headers")?,
            on_response_body: lookup(&mut store, &instance, "proxy_on_response_body")?,
            on_response_trailers: lookup(&mut store, &instance, "proxy_on_response_trailers")?,
            on_http_call_response: lookup(&mut store, &instance, "proxy_on_http_call_response")?,
        };
        let mut vm = Vm {
            store,
            callbacks,
            next_context_id: ROOT_CONTEXT + 1,
            budget,
            deadline,
        };
        vm.initialize(&instance)?;
        let state = vm.store.data_mut();
        state.root_context_id = ROOT_CONTEXT;
        state.effective_context = ROOT_CONTEXT;
        let root = ROOT_CONTEXT as i32;
        let Vm {
            store,
            callbacks,
            budget,
            deadline,
            ..
        } = &mut vm;
        let (budget, deadline) = (*budget, *deadline);
        if let Some(f) = &callbacks.on_context_create {
            run_sync(store, budget, deadline, "proxy_on_context_create", |s| {
                f.call(s, (root, 0))
            })?;
        }
        let vm_config = store.data().plugin.config.vm_configuration.len() as i32;
        if let Some(f) = &callbacks.on_vm_start {
            store.data_mut().effective_context = ROOT_CONTEXT;
            if run_sync(store, budget, deadline, "proxy_on_vm_start", |s| {
                f.call(s, (root, vm_config))
            })? == 0
            {
                return Err(VmFailure::Refused("proxy_on_vm_start"));
            }
        }
        let config = store.data().plugin.config.configuration.len() as i32;
        if let Some(f) = &callbacks.on_configure {
            store.data_mut().effective_context = ROOT_CONTEXT;
            if run_sync(store, budget, deadline, "proxy_on_configure", |s| {
                f.call(s, (root, config))
            })? == 0
            {
                return Err(VmFailure::Refused("proxy_on_configure"));
            }
        }
        store.data_mut().effective_context = ROOT_CONTEXT;
        Ok(vm)
    }

    /// `_initialize` (then `main` when exported) for reactors, `_start` for commands; a command
    /// that exits 0 has simply finished initializing.
    fn initialize(&mut self, instance: &Instance) -> Result<(), VmFailure> {
        let export = |vm: &mut Vm, name| instance.get_func(&mut vm.store, name);
        if let Some(init) = export(self, "_initialize") {
            let init = typed::<(), ()>(&self.store, init, "_initialize")?;
            self.call("_initialize", |s| init.call(s, ()))?;
            if let Some(main) = export(self, "main") {
                if let Ok(main) = main.typed::<(i32, i32), i32>(&self.store) {
                    self.call("main", |s| main.call(s, (0, 0)))?;
                }
            }
        } else if let Some(start) = export(self, "_start") {
            let start = typed::<(), ()>(&self.store, start, "_start")?;
            match self.call("_start", |s| start.call(s, ())) {
                Ok(()) | Err(VmFailure::Exit { code: 0, .. }) => {}
                Err(failure) => return Err(failure),
            }
        }
        Ok(())
    }

    fn call<R>(
        &mut self,
        callback: &'static str,
        f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, VmFailure> {
        run_sync(&mut self.store, self.budget, self.deadline, callback, f)
    }

    /// The id the next request context gets.
    pub fn next_context_id(&self) -> u32 {
        self.next_context_id
    }

    /// Whether the next calls run on yielding fibers (the plugin is slow) or on the caller's
    /// thread.
    pub fn set_yielding(&mut self, yielding: bool) {
        self.store.data_mut().yielding = yielding;
    }

    /// A new context for a request, child of the root context.
    pub async fn create_http_context(&mut self) -> Result<u32, VmFailure> {
        let id = self.next_context_id;
        self.next_context_id += 1;
        if let Some(f) = &self.callbacks.on_context_create {
            self.store.data_mut().effective_context = ROOT_CONTEXT;
            let args = (id as i32, ROOT_CONTEXT as i32);
            run(
                &mut self.store,
                self.budget,
                self.deadline,
                "proxy_on_context_create",
                f,
                args,
            )
            .await?;
        }
        self.store.data_mut().http_contexts.insert(id);
        Ok(id)
    }

    /// Moves the request's data into the store with `effective` as the effective context, by
    /// swapping boxes (a spare is kept in the store), not by copying it. [`Vm::leave_stream`]
    /// moves it back.
    fn enter_stream(&mut self, data: &mut Box<StreamData>, effective: u32) {
        let state = self.store.data_mut();
        let spare = state.spare_stream.take().unwrap_or_default();
        state.stream = Some(std::mem::replace(data, spare));
        state.effective_context = effective;
    }

    fn leave_stream(&mut self, data: &mut Box<StreamData>) {
        let state = self.store.data_mut();
        if let Some(stream) = state.stream.take() {
            state.spare_stream = Some(std::mem::replace(data, stream));
        }
        state.effective_context = ROOT_CONTEXT;
    }

    /// An HTTP callback for one request; a callback the module does not export continues.
    pub async fn http_callback(
        &mut self,
        data: &mut Box<StreamData>,
        callback: HttpCallback,
    ) -> Result<i32, VmFailure> {
        let ctx = data.context_id;
        self.enter_stream(data, ctx);
        let Vm {
            store,
            callbacks: c,
            budget,
            deadline,
            ..
        } = self;
        let (budget, deadline) = (*budget, *deadline);
        let ctx = ctx as i32;
        let (name, three, two, a, b): (_, Option<&Fn3>, Option<&Fn2>, usize, bool) = match callback
        {
            HttpCallback::RequestHeaders { count, end } => (
                "proxy_on_request_headers",
                c.on_request_headers.as_ref(),
                None,
                count,
                end,
            ),
            HttpCallback::RequestBody { size, end } => (
                "proxy_on_request_body",
                c.on_request_body.as_ref(),
                None,
                size,
                end,
            ),
            HttpCallback::RequestTrailers { count } => (
                "proxy_on_request_trailers",
                None,
                c.on_request_trailers.as_ref(),
                count,
                false,
            ),
            HttpCallback::ResponseHeaders { count, end } => (
                "proxy_on_response_headers",
                c.on_response_headers.as_ref(),
                None,
                count,
                end,
            ),
            HttpCallback::ResponseBody { size, end } => (
                "proxy_on_response_body",
                c.on_response_body.as_ref(),
                None,
                size,
                end,
            ),
            HttpCallback::ResponseTrailers { count } => (
                "proxy_on_response_trailers",
                None,
                c.on_response_trailers.as_ref(),
                count,
                false,
            ),
        };
        let result = match (three, two) {
            (Some(f), _) => run(store, budget, deadline, name, f, (ctx, a as i32, b as i32)).await,
            (_, Some(f)) => run(store, budget, deadline, name, f, (ctx, a as i32)).await,
            _ => Ok(0),
        };
        self.leave_stream(data);
        result
    }

    /// Delivers a call's response to the root context, with the request that made it (if any)
    /// in the store so the SDK can switch to it with `proxy_set_effective_context`. A response
    /// to a call whose request context is already gone is dropped, as Envoy cancels such calls:
    /// the SDK would otherwise switch to a context the host no longer knows and trap.
    pub async fn http_call_response(
        &mut self,
        data: Option<&mut Box<StreamData>>,
        token: u32,
        response: Option<HttpCallResponse>,
    ) -> Result<(), VmFailure> {
        let state = self.store.data_mut();
        let Some(origin) = state.calls_in_flight.remove(&token) else {
            return Ok(());
        };
        if origin != ROOT_CONTEXT && !state.http_contexts.contains(&origin) {
            return Ok(());
        }
        if self.callbacks.on_http_call_response.is_none() {
            return Ok(());
        }
        let (headers, body, trailers) = response.as_ref().map_or((0, 0, 0), |r| {
            (r.headers.len(), r.body.len(), r.trailers.len())
        });
        self.store.data_mut().call_response = response;
        let args = (
            ROOT_CONTEXT as i32,
            token as i32,
            headers as i32,
            body as i32,
            trailers as i32,
        );
        let mut data = data;
        match data.as_deref_mut() {
            Some(data) => self.enter_stream(data, ROOT_CONTEXT),
            None => self.store.data_mut().effective_context = ROOT_CONTEXT,
        }
        let f = self
            .callbacks
            .on_http_call_response
            .as_ref()
            .expect("checked above");
        let name = "proxy_on_http_call_response";
        let result = run(&mut self.store, self.budget, self.deadline, name, f, args).await;
        // The callback may have moved the effective context to the request: back to the root.
        self.store.data_mut().effective_context = ROOT_CONTEXT;
        if let Some(data) = data {
            self.leave_stream(data);
        }
        self.store.data_mut().call_response = None;
        result
    }

    /// `proxy_on_log`, then `proxy_on_done` and `proxy_on_delete`: the request is over and its
    /// context finished, all in one visit to the VM.
    pub async fn log_and_finish(&mut self, data: &mut Box<StreamData>) -> Result<(), VmFailure> {
        self.finish_inner(data, true).await
    }

    /// `proxy_on_done` then `proxy_on_delete`: the request's context is finished.
    pub async fn finish(&mut self, data: &mut Box<StreamData>) -> Result<(), VmFailure> {
        self.finish_inner(data, false).await
    }

    async fn finish_inner(
        &mut self,
        data: &mut Box<StreamData>,
        log: bool,
    ) -> Result<(), VmFailure> {
        let ctx = data.context_id;
        self.enter_stream(data, ctx);
        let result = self.finish_calls(ctx as i32, log).await;
        self.leave_stream(data);
        let state = self.store.data_mut();
        state.http_contexts.remove(&ctx);
        if !state.resumed_elsewhere.is_empty() {
            state.resumed_elsewhere.remove(&ctx);
        }
        result
    }

    async fn finish_calls(&mut self, id: i32, log: bool) -> Result<(), VmFailure> {
        let Vm {
            store,
            callbacks: c,
            budget,
            deadline,
            ..
        } = self;
        let (budget, deadline) = (*budget, *deadline);
        if let (true, Some(f)) = (log, &c.on_log) {
            run(store, budget, deadline, "proxy_on_log", f, id).await?;
        }
        if let Some(f) = &c.on_done {
            run(store, budget, deadline, "proxy_on_done", f, id).await?;
        }
        if let Some(f) = &c.on_delete {
            run(store, budget, deadline, "proxy_on_delete", f, id).await?;
        }
        Ok(())
    }

    pub async fn on_tick(&mut self) -> Result<(), VmFailure> {
        self.store.data_mut().effective_context = ROOT_CONTEXT;
        let result = match &self.callbacks.on_tick {
            Some(f) => {
                let root = ROOT_CONTEXT as i32;
                run(
                    &mut self.store,
                    self.budget,
                    self.deadline,
                    "proxy_on_tick",
                    f,
                    root,
                )
                .await
            }
            None => Ok(()),
        };
        // A root callback may switch to a request's context to resume it; the next callback
        // must not start out in that context.
        self.store.data_mut().effective_context = ROOT_CONTEXT;
        result
    }

    pub async fn on_queue_ready(&mut self, queue: u32) -> Result<(), VmFailure> {
        self.store.data_mut().effective_context = ROOT_CONTEXT;
        let result = match &self.callbacks.on_queue_ready {
            Some(f) => {
                let args = (ROOT_CONTEXT as i32, queue as i32);
                let name = "proxy_on_queue_ready";
                run(&mut self.store, self.budget, self.deadline, name, f, args).await
            }
            None => Ok(()),
        };
        self.store.data_mut().effective_context = ROOT_CONTEXT;
        result
    }
}

fn typed<P: WasmParams, R: WasmResults>(
    store: &Store<HostState>,
    func: Func,
    name: &'static str,
) -> Result<TypedFunc<P, R>, VmFailure> {
    func.typed(store).map_err(|_| VmFailure::BadExport(name))
}

/// A callback's budget in epoch ticks (at least one).
fn deadline_ticks(budget: Duration) -> u64 {
    budget.as_nanos().div_ceil(EPOCH_TICK.as_nanos()).max(1) as u64
}

/// Arms the budget for one call: its deadline on the runtime's clock, and the first epoch
/// check, at the next tick.
fn arm(store: &mut Store<HostState>, ticks: u64) {
    let state = store.data_mut();
    state.limiter.memory_refused = false;
    state.exit_code = None;
    state.handed_off = false;
    state.call_started = state.plugin.runtime.now_ticks();
    state.call_deadline = state.call_started + ticks;
    store.set_epoch_deadline(1);
}

/// The epoch check of a running call: past its budget it is interrupted (`Trap::Interrupt`).
/// Before that a yielding call lets the executor run other tasks; a call on the caller's thread
/// hands that thread's other tasks to another thread, and from its second tick on marks its
/// plugin slow.
fn on_epoch(mut store: StoreContextMut<'_, HostState>) -> wasmtime::Result<UpdateDeadline> {
    let state = store.data_mut();
    let now = state.plugin.runtime.now_ticks();
    if now >= state.call_deadline {
        return Ok(UpdateDeadline::Interrupt);
    }
    if state.yielding {
        state.plugin.mark_slow(now);
        return Ok(UpdateDeadline::Yield(1));
    }
    if !state.handed_off {
        // Tried again at every tick until another thread is seen running the runtime's tasks.
        state.handed_off = hand_off_worker();
    }
    if now >= state.call_started + SLOW_AFTER_TICKS {
        state.plugin.mark_slow(now);
    }
    Ok(UpdateDeadline::Continue(1))
}

/// Moves the other tasks of the async worker this thread is (if it is one of a multi-threaded
/// Tokio runtime) to another thread, which Tokio starts to run them: the running guest call
/// keeps this thread to itself until it returns, and the thread stops being a worker then.
/// `block_in_place` does the move and takes the worker back when its closure returns, unless
/// another thread took it first; the closure therefore waits until a probe task has run, i.e.
/// until another thread runs the runtime's tasks (for at most `HANDOFF_WAIT`: on a loaded
/// machine the new thread may not run that soon). Whether it did, or there was nothing to hand
/// off.
fn hand_off_worker() -> bool {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let Ok(handle) = Handle::try_current() else {
        return true;
    };
    // On a current-thread runtime there is no other thread to hand the tasks to.
    if handle.runtime_flavor() != RuntimeFlavor::MultiThread {
        return true;
    }
    tokio::task::block_in_place(|| {
        let (ran, probe) = std::sync::mpsc::channel();
        handle.spawn(async move {
            let _ = ran.send(());
        });
        probe.recv_timeout(HANDOFF_WAIT).is_ok()
    })
}

fn classify(
    store: &Store<HostState>,
    callback: &'static str,
    budget: Duration,
    error: wasmtime::Error,
) -> VmFailure {
    let state = store.data();
    if let Some(code) = state.exit_code {
        return VmFailure::Exit { callback, code };
    }
    if error.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return VmFailure::CpuLimit {
            callback,
            limit: budget,
        };
    }
    if state.limiter.memory_refused {
        return VmFailure::MemoryLimit {
            callback,
            limit: state.limiter.max_memory,
        };
    }
    // The first lines name the trap and the guest frames; the rest is noise for an operator.
    let message = format!("{error:#}")
        .lines()
        .take(8)
        .collect::<Vec<_>>()
        .join(" | ");
    VmFailure::Trap { callback, message }
}
