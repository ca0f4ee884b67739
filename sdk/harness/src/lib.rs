//! `ambit-filter-test`: run a proxy-wasm filter's `.wasm` in Ambit's real Wasm host (the one the
//! waypoint embeds, [`ambit_wasm_host`]) and see what a request and its response became.
//!
//! ```no_run
//! use ambit_filter_test::{Filter, Response};
//!
//! # async fn example() -> Result<(), ambit_filter_test::HarnessError> {
//! let filter = Filter::package("ambit-filter-headers")
//!     .config(r#"{"request": {"set": {"x-env": "prod"}}}"#)
//!     .load()?;
//! let outcome = filter
//!     .request()
//!     .method("POST")
//!     .path("/orders")
//!     .header("x-debug", "1")
//!     .body("{}")
//!     .response(Response::new(200).header("server", "envoy").body("ok"))
//!     .send()
//!     .await;
//! assert_eq!(outcome.upstream_header("x-env"), Some("prod"));
//! assert_eq!(outcome.status(), 200);
//! # Ok(()) }
//! ```
//!
//! - A [`Filter`] is one loaded plugin: a module (a file, a workspace package, or a crate
//!   directory built with `cargo build --target wasm32-wasip1`), its JSON configuration, VM
//!   configuration, environment, fail strategy and VM id, plus the answers to the HTTP calls
//!   it makes ([`FilterBuilder::http_calls`]).
//! - [`Filter::request`] builds a request (pseudo-headers default to `GET /`,
//!   `example.com`, `http`), its body chunks and trailers, the upstream's [`Response`] and the
//!   connection's [`StreamInfo`] ([`peer`] makes a mesh peer).
//! - [`Request::send`] drives an [`ambit_wasm_host::HttpStream`] through the phases in the
//!   order the waypoint uses: request headers, body chunks, trailers; the upstream; response
//!   headers, body chunks, trailers; `proxy_on_log`. A local response ends the request there,
//!   as in the waypoint (it does not run response callbacks).
//! - The [`Outcome`] holds what reached the upstream, what the client got, the filter's log
//!   lines, its HTTP calls, and the host's metrics parsed into name → value.
//!
//! Speed: one host [`Runtime`](ambit_wasm_host::Runtime) serves the whole test process, module
//! bytes and builds are cached, and each workspace package is built once per process. Metrics
//! are process-wide like in a proxy: give each test its own metric names (or read deltas).
//! Shared data and queues are scoped by VM id: every [`Filter`] gets its own VM id unless
//! [`FilterBuilder::vm_id`] names one, so tests running in parallel do not share buckets unless
//! they ask to.

mod calls;
mod filter;
mod headers;
mod metrics;
pub mod module;
mod outcome;
mod request;

/// The host itself, for what the harness does not wrap (e.g. driving an
/// [`HttpStream`](ambit_wasm_host::HttpStream) callback by callback via [`Filter::plugin`]).
pub use ambit_wasm_host as host;
pub use ambit_wasm_host::{
    FailStrategy, HttpCallRequest, HttpCallResponse, LocalResponse, LogLevel, StreamInfo,
};

pub use filter::{Filter, FilterBuilder};
pub use headers::Headers;
pub use metrics::{Metrics, Sample};
pub use outcome::{ClientResponse, LogEntry, Outcome, Phase, Upstream};
pub use request::{peer, Request, Response};

/// Why a filter could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("reading the filter module {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("building the filter crate in {dir}: {reason}")]
    Build {
        dir: std::path::PathBuf,
        reason: String,
    },
    #[error("the Wasm runtime could not start: {0}")]
    Runtime(String),
    #[error("loading the filter: {0}")]
    Load(#[from] ambit_wasm_host::PluginError),
}
