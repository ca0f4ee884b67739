//! The guest-side SDK for Ambit/Istio/Envoy proxy-wasm filters.
//!
//! Filters are written against the [`proxy_wasm`] crate (re-exported here, not rewritten): its
//! `main!` macro, its context traits and its host calls. This crate adds the helpers filter
//! authors otherwise write by hand in every filter:
//!
//! - [`config`]: plugin JSON configuration into a serde struct; errors go to the host log and
//!   `on_configure` returns `false`, so the host rejects the configuration.
//! - [`headers`]: get/set/remove many headers, case-insensitive lookup, every value of a
//!   repeated header, and declarative header mutations.
//! - [`metrics`]: counters, gauges and histograms defined once per label set, the labels encoded
//!   in the metric name the way Istio's stats filter does (`tag=.=value;.;name`).
//! - [`callout`]: HTTP callouts: build the request, keep a token → pending map, read the answer,
//!   then resume the stream or answer locally.
//! - [`response`]: local responses (status, headers, body), JSON errors.
//! - [`shared`]: read-modify-write of shared data with compare-and-swap retries.
//! - [`properties`]: typed property reads (strings, Envoy's 8-byte little-endian integers).
//! - [`callbacks`]: when each callback runs, its default, and what its return value means.
//!
//! Only the standard proxy-wasm ABI 0.2.1 is used (imports `env.proxy_*` and a few
//! `wasi_snapshot_preview1.*`), so a filter built on this crate also runs in Envoy and Istio.
//!
//! Everything that does not call the host (parsing, header maps, name encoding, request
//! building, decisions) is plain Rust and unit-tested natively with `cargo test`; the host-call
//! wrappers are thin and only run inside a proxy.

pub mod callbacks;
pub mod callout;
pub mod config;
pub mod headers;
pub mod metrics;
pub mod properties;
pub mod response;
pub mod shared;

/// The proxy-wasm Rust SDK this crate builds on; use its `main!` macro as
/// `ambit_sdk::proxy_wasm::main! {{ ... }}`.
pub use proxy_wasm;

/// The `log` facade: after `proxy_wasm::set_log_level`, `log::info!` etc. go to `proxy_log`.
pub use log;

/// What a filter usually needs in scope.
pub mod prelude {
    pub use crate::callout::{CalloutRequest, CalloutResponse, PendingCallouts, Verdict};
    pub use crate::config::PluginConfig;
    pub use crate::headers::{Direction, HeaderMutations, Headers, HeadersExt};
    pub use crate::metrics::{HostMetrics, MetricFamily};
    pub use crate::response::LocalResponse;
    pub use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
    pub use proxy_wasm::types::{Action, Bytes, ContextType, LogLevel, MetricType, Status};
}
