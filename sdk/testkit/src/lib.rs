//! `ambit-filter-test`: run a proxy-wasm filter's `.wasm` in Ambit's real Wasm host (the one the
//! waypoint embeds, inside the `ambit` binary) and see what a request and its response became.
//!
//! ```no_run
//! use ambit_filter_test::{Filter, Response};
//!
//! # fn example() -> Result<(), ambit_filter_test::HarnessError> {
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
//!     .run();
//! outcome.assert_upstream_header("x-env", Some("prod")).assert_status(200);
//! # Ok(()) }
//! ```
//!
//! - A [`Filter`] is one loaded plugin: a module (a file, a workspace package, or a crate
//!   directory built with `cargo build --target wasm32-wasip1`), its JSON configuration, VM
//!   configuration, environment, fail strategy and VM id, plus the answers to the HTTP calls
//!   it makes ([`FilterBuilder::http_calls`]).
//! - [`Filter::request`] builds a request (pseudo-headers default to `GET /`,
//!   `example.com`, `http`), its body chunks and trailers, the upstream's [`Response`] and the
//!   connection's [`StreamInfo`] ([`peer`] makes a mesh peer); [`Request::then`] adds filters
//!   after the first (a chain, as the waypoint runs several plugins).
//! - [`Request::run`] sends it through the phases in the order the waypoint uses: request
//!   headers, body chunks, trailers; the upstream; response headers, body chunks, trailers;
//!   `proxy_on_log`. A local response ends the request there, as in the waypoint (it does not
//!   run response callbacks).
//! - The [`Outcome`] holds the request as sent, what reached the upstream, what the client got,
//!   the filter's log lines, its HTTP calls, and the host's metrics parsed into name → value.
//!   Its `assert_*` methods panic with all of that and what differed.
//!
//! The host runs in one `ambit filter serve` process per test process ([`protocol`]: JSON
//! lines over its stdin and stdout), so this crate compiles in seconds: it never links the host.
//! Metrics are process-wide like in a proxy: give each test its own metric names (or read
//! deltas). Shared data and queues are scoped by VM id: every [`Filter`] gets its own VM id
//! unless [`FilterBuilder::vm_id`] names one, so tests running in parallel do not share buckets
//! unless they ask to.

mod calls;
mod client;
mod filter;
mod headers;
mod metrics;
pub mod module;
mod outcome;
pub mod protocol;
mod request;

pub use calls::{HttpCallRequest, HttpCallResponse};
pub use filter::{Filter, FilterBuilder};
pub use headers::{Headers, Pairs};
pub use metrics::{Metrics, Sample};
pub use outcome::{ClientResponse, Exchange, LocalResponse, LogEntry, Outcome, Phase, Upstream};
pub use protocol::{FailStrategy, LogLevel};
pub use request::{peer, Request, Response, StreamInfo};

/// Why a filter could not be loaded or run.
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
    #[error("loading the filter {module}: {message}")]
    Load {
        module: std::path::PathBuf,
        message: String,
    },
    #[error("{0}")]
    Server(String),
}
