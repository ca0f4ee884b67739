//! The state a VM's host functions work on (`Store<HostState>`), and the per-request state that is
//! moved into it for the duration of a callback about that request.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use wasmtime::{Memory, ResourceLimiter, TypedFunc};

use crate::abi::{LogLevel, Pairs};
use crate::http_call::{HttpCallRequest, HttpCallResponse};
use crate::plugin::PluginShared;
use crate::shared::QueueOwner;

/// A response a filter made itself (`proxy_send_local_response`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u16,
    /// Envoy's `details` (shown in access logs), e.g. `wasm_rejected`.
    pub details: String,
    pub headers: Pairs,
    pub body: Vec<u8>,
    /// A gRPC status to send as `grpc-status`; `None` when the filter passed -1.
    pub grpc_status: Option<i32>,
}

/// What the embedder knows about the connection and peer of a request, for `proxy_get_property`.
#[derive(Clone, Debug, Default)]
pub struct StreamInfo {
    pub connection_id: u64,
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    /// Whether the downstream connection was mutual TLS.
    pub mtls: bool,
    /// The peer's SPIFFE id (`connection.uri_san_peer_certificate`, `source.principal`).
    pub source_principal: Option<String>,
    /// This proxy's SPIFFE id (`connection.uri_san_local_certificate`).
    pub local_principal: Option<String>,
    /// `source.namespace` etc.: Istio's peer metadata, as `downstream_peer` fields.
    pub source_namespace: Option<String>,
    pub source_workload: Option<String>,
    /// The service the request is for (`xds.cluster_name` style host).
    pub destination_service: Option<String>,
    pub started: Option<SystemTime>,
}

/// A dispatched call waiting for the embedder to carry it.
pub(crate) struct OutgoingCall {
    pub token: u32,
    /// The context that was effective when the call was made: its response goes to the same
    /// VM's root context, and the stream that owns that context waits for it.
    pub context_id: u32,
    pub request: HttpCallRequest,
}

/// Context ids and call tokens are small host-chosen integers, not attacker-chosen keys: a
/// multiplicative hash is enough and much cheaper than SipHash on every request.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n);
    }
}

pub(crate) type IdSet = HashSet<u32, BuildHasherDefault<IdHasher>>;
pub(crate) type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

/// Most `proxy_set_property` values one request (or the root context) may hold.
pub(crate) const MAX_FILTER_STATE: usize = 256;

/// One request as filters see it. Boxed, so that handing it to the VM for a callback and back
/// is a pointer swap rather than a copy of the whole struct.
#[derive(Default)]
pub(crate) struct StreamData {
    pub context_id: u32,
    pub info: Arc<StreamInfo>,
    pub request_headers: Pairs,
    pub request_trailers: Pairs,
    pub response_headers: Pairs,
    pub response_trailers: Pairs,
    /// The body buffer of the callback being run: the current chunk, or everything buffered
    /// since the filter paused.
    pub request_body: BytesMut,
    pub response_body: BytesMut,
    pub request_end: bool,
    pub response_end: bool,
    pub local_response: Option<LocalResponse>,
    pub resume_request: bool,
    pub resume_response: bool,
    pub reset: bool,
    /// `proxy_set_property` values, readable back by the same request's filters.
    pub filter_state: BTreeMap<String, Vec<u8>>,
    /// A filter tried to make the host hold more body than `max_buffered_body`
    /// (`proxy_set_buffer_bytes`): the request is answered 413/500 instead of trapping the SDK.
    pub body_too_large: bool,
}

/// Memory limit enforcement, remembering whether the limit was what stopped the guest.
pub(crate) struct Limiter {
    pub max_memory: usize,
    pub memory_refused: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.max_memory;
        if !allowed {
            self.memory_refused = true;
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// `Store<HostState>`'s data: everything host functions read and write.
pub(crate) struct HostState {
    pub plugin: Arc<PluginShared>,
    pub limiter: Limiter,
    pub memory: Option<Memory>,
    pub allocator: Option<TypedFunc<i32, i32>>,
    pub root_context_id: u32,
    pub effective_context: u32,
    /// Contexts the guest created for requests, still alive.
    pub http_contexts: IdSet,
    /// The request a callback is about, if any.
    pub stream: Option<Box<StreamData>>,
    /// The placeholder swapped into the request's `HttpStream` while its data is in the store.
    pub spare_stream: Option<Box<StreamData>>,
    /// Requests resumed from a callback that was not about them (tick, queue).
    pub resumed_elsewhere: IdSet,
    pub tick_period: Option<Duration>,
    /// Whether a task is ticking this VM; a period set later (from any callback) starts one.
    pub ticker_running: bool,
    /// `proxy_set_property` from the root context (no request to attach it to).
    pub root_filter_state: BTreeMap<String, Vec<u8>>,
    pub outgoing_calls: Vec<OutgoingCall>,
    pub next_call_token: u32,
    /// Calls in flight, by token, with the context that made them.
    pub calls_in_flight: IdMap<u32>,
    /// The response being handed to `proxy_on_http_call_response`.
    pub call_response: Option<HttpCallResponse>,
    /// Where queue notifications for this VM go.
    pub queue_owner: QueueOwner,
    /// Queues this VM registered, to notify after an enqueue from anywhere.
    pub queues_to_notify: Vec<(QueueOwner, u32)>,
    /// `fd_write` output not yet ended by a newline.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Set by `proc_exit`: the guest asked to end; the trap that follows is not a crash.
    pub exit_code: Option<i32>,
    /// Whether the running call is on a fiber that yields at every epoch tick.
    pub yielding: bool,
    /// The runtime tick at which the running call started, and the one at which it is
    /// interrupted.
    pub call_started: u64,
    pub call_deadline: u64,
    /// Whether the running call (on the caller's thread) already handed its async worker's
    /// other tasks to another thread.
    pub handed_off: bool,
}

impl HostState {
    pub fn new(plugin: Arc<PluginShared>, queue_owner: QueueOwner) -> Self {
        let max_memory = plugin.limits.max_memory;
        HostState {
            plugin,
            limiter: Limiter {
                max_memory,
                memory_refused: false,
            },
            memory: None,
            allocator: None,
            root_context_id: 0,
            effective_context: 0,
            http_contexts: IdSet::default(),
            stream: None,
            spare_stream: None,
            resumed_elsewhere: IdSet::default(),
            tick_period: None,
            ticker_running: false,
            root_filter_state: BTreeMap::new(),
            outgoing_calls: Vec::new(),
            next_call_token: 1,
            calls_in_flight: IdMap::default(),
            call_response: None,
            queue_owner,
            queues_to_notify: Vec::new(),
            stdout: Vec::new(),
            stderr: Vec::new(),
            exit_code: None,
            yielding: false,
            call_started: 0,
            call_deadline: 0,
            handed_off: false,
        }
    }

    /// The request of the effective context, if the effective context is a request.
    pub fn effective_stream(&mut self) -> Option<&mut StreamData> {
        let effective = self.effective_context;
        self.stream
            .as_deref_mut()
            .filter(|stream| stream.context_id == effective)
    }

    /// Logs a guest message under the plugin's name, and to the embedder's sink if it has one.
    pub fn log(&self, level: LogLevel, message: &str) {
        let plugin = &self.plugin.config.name;
        match level {
            LogLevel::Trace => tracing::trace!(plugin = %plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin = %plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin = %plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin = %plugin, "{message}"),
            LogLevel::Error | LogLevel::Critical => tracing::error!(plugin = %plugin, "{message}"),
        }
        if let Some(sink) = &self.plugin.log_sink {
            sink(level, message);
        }
    }
}
