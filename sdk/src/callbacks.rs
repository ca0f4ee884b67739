//! The proxy-wasm callbacks: when each runs, what it does by default, and what its return means.
//!
//! The traits are the [`proxy_wasm`] crate's, re-exported below unchanged; this module documents
//! them as a filter author needs them in Ambit, Envoy and Istio. The host calls the module's
//! `proxy_on_*` exports; the SDK's dispatcher turns each into a trait method on the context
//! whose id the host passed. A panic in any callback is a Wasm trap: the host marks the VM failed
//! and applies the plugin's fail policy (Istio `failStrategy`: close → 5xx, open → bypass,
//! reload → new VM).
//!
//! # Start-up
//!
//! `proxy_wasm::main! {{ ... }}` defines `_initialize`, which the host calls once after
//! instantiating the module. Only register constructors and the log level there
//! (`set_log_level`, `set_root_context`, `set_http_context`); proxies forbid most host calls
//! during initialization.
//!
//! # [`RootContext`] (one per plugin configuration; id given with parent 0)
//!
//! | callback | runs | default | return |
//! | --- | --- | --- | --- |
//! | `on_vm_start(vm_config_size)` | once per VM, after the root context is created, before `on_configure`; the VM configuration is readable with `get_vm_configuration` | `true` | `false` fails the VM start: the plugin is not loaded |
//! | `on_configure(plugin_config_size)` | after `on_vm_start`, and again on every configuration change; the plugin configuration is readable with `get_plugin_configuration` (see [`crate::config`]) | `true` | `false` rejects the configuration (Envoy NACKs it; Ambit keeps the previous plugin) |
//! | `on_tick()` | every period set by `set_tick_period` (0 stops it) | nothing | — |
//! | `on_queue_ready(queue_id)` | after something was enqueued to a queue this VM registered | nothing | — |
//! | `create_http_context(id)` | per HTTP stream when no constructor was given to `set_http_context` | `None` | the stream's context; `None` falls back to `get_type` / panics |
//! | `create_stream_context(id)` | per TCP connection, likewise | `None` | likewise |
//! | `get_type()` | with the two above | `None` | which kind of context this root makes |
//! | `on_log()` | Envoy calls it for root contexts only in odd cases; ignore | nothing | — |
//! | `on_done()` | when the host wants to delete the VM or plugin | `true` | `false` asks for time: call `done()` when finished |
//!
//! # [`HttpContext`] (one per HTTP request/response stream)
//!
//! `Action::Continue` passes the stream on to the next filter; `Action::Pause` stops it until
//! the filter calls `resume_http_request`/`resume_http_response` (or answers locally with
//! `send_http_response`, after which the callback must return `Pause`).
//!
//! | callback | runs | default | `Pause` means |
//! | --- | --- | --- | --- |
//! | `on_http_request_headers(n, end_of_stream)` | request headers arrived (`end_of_stream`: no body follows) | `Continue` | hold the headers (and the body behind them) until resumed; in ABI 0.2.x Envoy turns this into StopAllIterationAndWatermark |
//! | `on_http_request_body(size, end_of_stream)` | a body chunk arrived; after a `Pause`, `size` is the size of everything buffered so far | `Continue` | keep buffering; the next call sees the whole buffer, and at `end_of_stream` it can be read and replaced with `get/set_http_request_body(0, size, ..)` |
//! | `on_http_request_trailers(n)` | request trailers arrived | `Continue` | hold them until resumed |
//! | `on_http_response_headers(n, end_of_stream)` | response headers arrived (upstream or local) | `Continue` | as for request headers |
//! | `on_http_response_body(size, end_of_stream)` | a response body chunk; cumulative after `Pause` | `Continue` | keep buffering |
//! | `on_http_response_trailers(n)` | response trailers arrived | `Continue` | hold them |
//! | `on_log()` | once the stream is complete (also after local replies and resets): the place for metrics and access logs; request/response headers and properties are still readable | nothing | — |
//! | `on_done()` | right before the context is deleted | `true` | `false` defers deletion until `done()` |
//!
//! # [`StreamContext`] (one per TCP connection; Ambit's waypoint runs HTTP filters only)
//!
//! | callback | runs | default | return |
//! | --- | --- | --- | --- |
//! | `on_new_connection()` | connection accepted | `Continue` | `Pause` holds it |
//! | `on_downstream_data(size, end_of_stream)` | bytes from the client | `Continue` | `Pause` buffers |
//! | `on_upstream_data(size, end_of_stream)` | bytes from the server | `Continue` | `Pause` buffers |
//! | `on_downstream_close(peer)` / `on_upstream_close(peer)` | a side closed | nothing | — |
//! | `on_log()` | connection finished | nothing | — |
//!
//! # [`Context`] (every context)
//!
//! | callback | runs | default | return |
//! | --- | --- | --- | --- |
//! | `on_http_call_response(token, n_headers, body_size, n_trailers)` | the answer to this context's `dispatch_http_call`; `n_headers == 0` means the call failed (timeout, reset, no upstream). The SDK routes it to the context that dispatched it, so per-stream state is at hand (see [`crate::callout`]) | nothing | — |
//! | `on_grpc_call_response(token, status, size)` | a unary gRPC call finished | nothing | — |
//! | `on_grpc_stream_initial_metadata` / `_message` / `_trailing_metadata` / `_close` | events on a gRPC stream opened by this context | nothing | — |
//! | `on_foreign_function(id, size)` | the host invoked a foreign function (host-specific) | nothing | — |
//! | `on_done()` | see above | `true` | see above |

/// Methods and callbacks shared by every context (time, properties, shared data, queues,
/// callouts). See the module documentation for when each callback runs.
pub use proxy_wasm::traits::Context;
/// One per HTTP stream: request/response headers, bodies, trailers, local responses.
pub use proxy_wasm::traits::HttpContext;
/// One per plugin configuration: VM start, configuration, ticks, queues, context creation.
pub use proxy_wasm::traits::RootContext;
/// One per TCP connection (network filters).
pub use proxy_wasm::traits::StreamContext;
