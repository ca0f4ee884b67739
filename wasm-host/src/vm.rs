//! One instance of a plugin's module: its `Store`, the callbacks it exports (looked up once), and
//! every call into it run under the CPU budget, with failures told apart for operators.

use std::time::Duration;

use wasmtime::{Func, Instance, InstancePre, Store, Trap, TypedFunc, WasmParams, WasmResults};

use crate::context::{HostState, StreamData};
use crate::http_call::HttpCallResponse;
use crate::runtime::EPOCH_TICK;

/// Why a VM can no longer be used; every variant ends the VM (it is replaced).
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
}

impl Vm {
    /// Instantiates, runs the module's initializer, creates the root context and runs
    /// `on_vm_start` and `on_configure`: a VM that comes back is ready for requests.
    pub fn start(pre: &InstancePre<HostState>, state: HostState) -> Result<Vm, VmFailure> {
        let budget = state.plugin.limits.callback_timeout;
        let mut store = Store::new(pre.module().engine(), state);
        store.limiter(|state| &mut state.limiter);
        store.epoch_deadline_trap();
        arm(&mut store, budget);
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
        };
        vm.initialize(&instance)?;
        let state = vm.store.data_mut();
        state.root_context_id = ROOT_CONTEXT;
        state.effective_context = ROOT_CONTEXT;
        let root = ROOT_CONTEXT as i32;
        if let Some(f) = vm.callbacks.on_context_create.clone() {
            vm.call("proxy_on_context_create", |s| f.call(s, (root, 0)))?;
        }
        let vm_config = vm.store.data().plugin.config.vm_configuration.len() as i32;
        if let Some(f) = vm.callbacks.on_vm_start.clone() {
            if vm.call("proxy_on_vm_start", |s| f.call(s, (root, vm_config)))? == 0 {
                return Err(VmFailure::Refused("proxy_on_vm_start"));
            }
        }
        let config = vm.store.data().plugin.config.configuration.len() as i32;
        if let Some(f) = vm.callbacks.on_configure.clone() {
            if vm.call("proxy_on_configure", |s| f.call(s, (root, config)))? == 0 {
                return Err(VmFailure::Refused("proxy_on_configure"));
            }
        }
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

    /// Runs one guest call under the CPU budget and turns its failure into a [`VmFailure`].
    fn call<R>(
        &mut self,
        callback: &'static str,
        f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, VmFailure> {
        arm(&mut self.store, self.budget);
        let result = f(&mut self.store);
        crate::host::flush_output(self.store.data_mut());
        result.map_err(|e| classify(&self.store, callback, self.budget, e))
    }

    /// A new context for a request, child of the root context.
    pub fn create_http_context(&mut self) -> Result<u32, VmFailure> {
        let id = self.next_context_id;
        self.next_context_id += 1;
        if let Some(f) = self.callbacks.on_context_create.clone() {
            self.call("proxy_on_context_create", |s| {
                f.call(s, (id as i32, ROOT_CONTEXT as i32))
            })?;
        }
        self.store.data_mut().http_contexts.insert(id);
        Ok(id)
    }

    /// Runs `f` with the request's data in the store and its context effective.
    fn with_stream<R>(
        &mut self,
        data: &mut StreamData,
        effective: u32,
        f: impl FnOnce(&mut Vm) -> Result<R, VmFailure>,
    ) -> Result<R, VmFailure> {
        let context_id = data.context_id;
        let state = self.store.data_mut();
        state.stream = Some(std::mem::take(data));
        state.effective_context = effective;
        let result = f(self);
        let state = self.store.data_mut();
        *data = state.stream.take().unwrap_or_default();
        data.context_id = context_id;
        state.effective_context = ROOT_CONTEXT;
        result
    }

    /// An HTTP callback for one request; a callback the module does not export continues.
    pub fn http_callback(
        &mut self,
        data: &mut StreamData,
        callback: HttpCallback,
    ) -> Result<i32, VmFailure> {
        let ctx = data.context_id as i32;
        let c = &self.callbacks;
        let (name, three, two, a, b): (_, Option<Fn3>, Option<Fn2>, usize, bool) = match callback {
            HttpCallback::RequestHeaders { count, end } => (
                "proxy_on_request_headers",
                c.on_request_headers.clone(),
                None,
                count,
                end,
            ),
            HttpCallback::RequestBody { size, end } => (
                "proxy_on_request_body",
                c.on_request_body.clone(),
                None,
                size,
                end,
            ),
            HttpCallback::RequestTrailers { count } => (
                "proxy_on_request_trailers",
                None,
                c.on_request_trailers.clone(),
                count,
                false,
            ),
            HttpCallback::ResponseHeaders { count, end } => (
                "proxy_on_response_headers",
                c.on_response_headers.clone(),
                None,
                count,
                end,
            ),
            HttpCallback::ResponseBody { size, end } => (
                "proxy_on_response_body",
                c.on_response_body.clone(),
                None,
                size,
                end,
            ),
            HttpCallback::ResponseTrailers { count } => (
                "proxy_on_response_trailers",
                None,
                c.on_response_trailers.clone(),
                count,
                false,
            ),
        };
        let effective = data.context_id;
        self.with_stream(data, effective, |vm| match (three, two) {
            (Some(f), _) => vm.call(name, |s| f.call(s, (ctx, a as i32, b as i32))),
            (_, Some(f)) => vm.call(name, |s| f.call(s, (ctx, a as i32))),
            _ => Ok(0),
        })
    }

    /// Delivers a call's response to the root context, with the request that made it (if any)
    /// in the store so the SDK can switch to it with `proxy_set_effective_context`.
    pub fn http_call_response(
        &mut self,
        data: Option<&mut StreamData>,
        token: u32,
        response: Option<HttpCallResponse>,
    ) -> Result<(), VmFailure> {
        self.store.data_mut().calls_in_flight.remove(&token);
        let Some(f) = self.callbacks.on_http_call_response.clone() else {
            return Ok(());
        };
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
        let deliver = |vm: &mut Vm| vm.call("proxy_on_http_call_response", |s| f.call(s, args));
        let result = match data {
            Some(data) => self.with_stream(data, ROOT_CONTEXT, deliver),
            None => deliver(self),
        };
        self.store.data_mut().call_response = None;
        result
    }

    pub fn on_log(&mut self, data: &mut StreamData) -> Result<(), VmFailure> {
        let ctx = data.context_id as i32;
        match self.callbacks.on_log.clone() {
            Some(f) => self.with_stream(data, ctx as u32, |vm| {
                vm.call("proxy_on_log", |s| f.call(s, ctx))
            }),
            None => Ok(()),
        }
    }

    /// `proxy_on_done` then `proxy_on_delete`: the request's context is finished.
    pub fn finish(&mut self, data: &mut StreamData) -> Result<(), VmFailure> {
        let ctx = data.context_id as i32;
        let (done, delete) = (
            self.callbacks.on_done.clone(),
            self.callbacks.on_delete.clone(),
        );
        let result = self.with_stream(data, ctx as u32, |vm| {
            if let Some(f) = done {
                vm.call("proxy_on_done", |s| f.call(s, ctx))?;
            }
            if let Some(f) = delete {
                vm.call("proxy_on_delete", |s| f.call(s, ctx))?;
            }
            Ok(())
        });
        let state = self.store.data_mut();
        state.http_contexts.remove(&(ctx as u32));
        state.resumed_elsewhere.remove(&(ctx as u32));
        result
    }

    pub fn on_tick(&mut self) -> Result<(), VmFailure> {
        match self.callbacks.on_tick.clone() {
            Some(f) => self.call("proxy_on_tick", |s| f.call(s, ROOT_CONTEXT as i32)),
            None => Ok(()),
        }
    }

    pub fn on_queue_ready(&mut self, queue: u32) -> Result<(), VmFailure> {
        match self.callbacks.on_queue_ready.clone() {
            Some(f) => self.call("proxy_on_queue_ready", |s| {
                f.call(s, (ROOT_CONTEXT as i32, queue as i32))
            }),
            None => Ok(()),
        }
    }
}

fn typed<P: WasmParams, R: WasmResults>(
    store: &Store<HostState>,
    func: Func,
    name: &'static str,
) -> Result<TypedFunc<P, R>, VmFailure> {
    func.typed(store).map_err(|_| VmFailure::BadExport(name))
}

/// Arms the epoch deadline for one callback's budget.
fn arm(store: &mut Store<HostState>, budget: Duration) {
    let ticks = budget.as_nanos().div_ceil(EPOCH_TICK.as_nanos()).max(1) as u64;
    store.data_mut().limiter.memory_refused = false;
    store.data_mut().exit_code = None;
    store.set_epoch_deadline(ticks);
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
