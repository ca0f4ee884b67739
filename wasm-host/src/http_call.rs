//! `proxy_http_call`: filters ask the host to make an HTTP request to a named upstream (in a
//! waypoint, a mesh service); the embedder says how such requests travel.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::abi::Pairs;

/// A request a filter dispatched. `headers` include the pseudo-headers `:method`, `:path` and
/// `:authority`, which the ABI requires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpCallRequest {
    /// The `upstream` argument: Envoy's cluster name; in Ambit a service host (`name.ns.svc...`,
    /// optionally `:port`) or an `outbound|port||host` cluster name.
    pub upstream: String,
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub trailers: Pairs,
    pub timeout: Duration,
}

impl HttpCallRequest {
    /// The value of a (pseudo-)header, if present and UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .and_then(|(_, value)| std::str::from_utf8(value).ok())
    }
}

/// The answer handed to `proxy_on_http_call_response`; `headers` include `:status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpCallResponse {
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub trailers: Pairs,
}

impl HttpCallResponse {
    /// A response with just a status and a body.
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        HttpCallResponse {
            headers: vec![(":status".to_owned(), status.to_string().into_bytes())],
            body: body.into(),
            trailers: Vec::new(),
        }
    }
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// How the embedder carries filter-dispatched requests. `None` is a failed call (the filter
/// sees zero headers, as in Envoy); the host applies the call's timeout itself.
pub trait HttpCaller: Send + Sync + 'static {
    fn call(&self, request: HttpCallRequest) -> BoxFuture<Option<HttpCallResponse>>;
}

/// For embedders with no upstreams: every call fails.
pub struct NoUpstreams;

impl HttpCaller for NoUpstreams {
    fn call(&self, request: HttpCallRequest) -> BoxFuture<Option<HttpCallResponse>> {
        tracing::debug!(upstream = %request.upstream, "wasm http call refused: no upstreams configured");
        Box::pin(async { None })
    }
}
