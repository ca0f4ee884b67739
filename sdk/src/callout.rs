//! HTTP callouts: dispatch a request to another service, pause the stream, and resume or deny
//! when the answer arrives.
//!
//! The pattern, in an [`HttpContext`](proxy_wasm::traits::HttpContext):
//!
//! 1. `on_http_request_headers`: build a [`CalloutRequest`], dispatch it through
//!    [`PendingCallouts::dispatch`] with whatever the answer will need (the "pending" state),
//!    and return `Action::Pause`. If dispatching fails (unknown upstream: `BadArgument`), decide
//!    at once (fail open or closed) instead of pausing forever.
//! 2. `on_http_call_response(token, n_headers, body_size, n_trailers)`: take the pending state
//!    with [`PendingCallouts::take`] (unknown token: ignore), read the answer with
//!    [`CalloutResponse::read`] (`None`: the call failed or timed out), decide a [`Verdict`]
//!    with plain Rust (unit-testable), and [`Verdict::apply`] it: resume the request, or answer
//!    locally.
//!
//! The proxy-wasm SDK delivers `on_http_call_response` to the context that dispatched the call
//! (the host reports it on the root context; the SDK maps the token back and sets the effective
//! context), so `resume_http_request` and `send_http_response` act on the right stream. The
//! upstream is a cluster name in Envoy; in Ambit and Istio-on-Ambit a mesh service
//! `host:port` such as `authz.default.svc.cluster.local:8000`.

use std::collections::HashMap;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, Status};

use crate::headers::{Direction, Headers};
use crate::response::LocalResponse;

/// A request to dispatch with `proxy_http_call`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CalloutRequest {
    /// Where to send it: an Envoy cluster name, or a mesh `host:port` in Ambit.
    pub upstream: String,
    pub method: String,
    pub path: String,
    /// `:authority`; the upstream name when `None`.
    pub authority: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub trailers: Vec<(String, String)>,
    pub timeout: Duration,
}

impl CalloutRequest {
    /// A bodyless request with a 1 s timeout.
    pub fn new(upstream: &str, method: &str, path: &str) -> Self {
        Self {
            upstream: upstream.to_string(),
            method: method.to_string(),
            path: path.to_string(),
            authority: None,
            headers: Vec::new(),
            body: None,
            trailers: Vec::new(),
            timeout: Duration::from_secs(1),
        }
    }

    pub fn authority(mut self, authority: &str) -> Self {
        self.authority = Some(authority.to_string());
        self
    }

    /// Adds a header (lowercased; pseudo headers are set from the fields above).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The header list the host gets: `:method`, `:path`, `:authority` first, then the rest
    /// (pseudo headers among them dropped: they would duplicate the first three).
    pub fn host_headers(&self) -> Vec<(&str, &str)> {
        let authority = self.authority.as_deref().unwrap_or(&self.upstream);
        let mut out = vec![
            (":method", self.method.as_str()),
            (":path", self.path.as_str()),
            (":authority", authority),
        ];
        out.extend(
            self.headers
                .iter()
                .filter(|(k, _)| !k.starts_with(':'))
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        out
    }

    /// Dispatches through the host; the token identifies the answer.
    pub fn dispatch(&self) -> Result<u32, Status> {
        let trailers: Vec<(&str, &str)> = self
            .trailers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        hostcalls::dispatch_http_call(
            &self.upstream,
            self.host_headers(),
            self.body.as_deref(),
            trailers,
            self.timeout,
        )
    }
}

/// The answer to a callout.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CalloutResponse {
    /// `:status`, when present and numeric.
    pub status: Option<u32>,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
}

impl CalloutResponse {
    /// Builds a response from its parts (what [`read`](Self::read) gets from the host).
    pub fn from_parts(headers: Headers, body: Vec<u8>, trailers: Headers) -> Self {
        let status = headers.get(":status").and_then(|s| s.trim().parse().ok());
        Self {
            status,
            headers,
            body,
            trailers,
        }
    }

    /// Reads the answer inside `on_http_call_response`. `None` when the call failed (the host
    /// reports no headers: timeout, connection failure, reset).
    pub fn read(num_headers: usize, body_size: usize, num_trailers: usize) -> Option<Self> {
        if num_headers == 0 {
            return None;
        }
        let headers = hostcalls::get_map(MapType::HttpCallResponseHeaders).ok()?;
        let body = if body_size > 0 {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let trailers = if num_trailers > 0 {
            hostcalls::get_map(MapType::HttpCallResponseTrailers).unwrap_or_default()
        } else {
            Vec::new()
        };
        Some(Self::from_parts(headers.into(), body, trailers.into()))
    }

    /// A 2xx status.
    pub fn is_success(&self) -> bool {
        matches!(self.status, Some(200..=299))
    }
}

/// Callouts in flight: token → what the answer needs.
#[derive(Debug)]
pub struct PendingCallouts<P> {
    pending: HashMap<u32, P>,
}

impl<P> Default for PendingCallouts<P> {
    fn default() -> Self {
        Self {
            pending: HashMap::new(),
        }
    }
}

impl<P> PendingCallouts<P> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Dispatches `request` and remembers `pending` under its token.
    pub fn dispatch(&mut self, request: &CalloutRequest, pending: P) -> Result<u32, Status> {
        let token = request.dispatch()?;
        self.insert(token, pending);
        Ok(token)
    }

    /// Remembers state for a token dispatched some other way.
    pub fn insert(&mut self, token: u32, pending: P) {
        self.pending.insert(token, pending);
    }

    /// The state of an answered call; `None` for a token this context did not dispatch.
    pub fn take(&mut self, token: u32) -> Option<P> {
        self.pending.remove(&token)
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// What to do with a paused stream once the callout has answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Resume; first set these headers on the request (e.g. identity from the authz service).
    Allow { set_headers: Vec<(String, String)> },
    /// Answer the client locally; the stream goes no further.
    Deny(LocalResponse),
}

impl Verdict {
    /// Allow with no header changes.
    pub fn allow() -> Self {
        Verdict::Allow {
            set_headers: Vec::new(),
        }
    }

    /// Carries out the verdict on the paused `dir` side of the current stream.
    pub fn apply(&self, dir: Direction) {
        match self {
            Verdict::Allow { set_headers } => {
                for (name, value) in set_headers {
                    let name = name.to_ascii_lowercase();
                    let _ = hostcalls::set_map_value(dir.headers_map(), &name, Some(value));
                }
                let _ = match dir {
                    Direction::Request => hostcalls::resume_http_request(),
                    Direction::Response => hostcalls::resume_http_response(),
                };
            }
            Verdict::Deny(response) => response.send(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_headers_put_pseudo_headers_first() {
        let r = CalloutRequest::new("authz.default.svc.cluster.local:8000", "POST", "/check")
            .header("X-User", "alice")
            .header(":path", "/ignored")
            .body("{}")
            .timeout(Duration::from_millis(250));
        assert_eq!(
            r.host_headers(),
            vec![
                (":method", "POST"),
                (":path", "/check"),
                (":authority", "authz.default.svc.cluster.local:8000"),
                ("x-user", "alice"),
            ]
        );
        assert_eq!(r.timeout, Duration::from_millis(250));
        let r = r.authority("authz");
        assert_eq!(r.host_headers()[2], (":authority", "authz"));
    }

    #[test]
    fn response_status_and_success() {
        let ok = CalloutResponse::from_parts(
            [(":status", "204"), ("x-user", "alice")]
                .into_iter()
                .collect(),
            Vec::new(),
            Headers::new(),
        );
        assert_eq!(ok.status, Some(204));
        assert!(ok.is_success());
        let denied = CalloutResponse::from_parts(
            [(":status", "403")].into_iter().collect(),
            b"no".to_vec(),
            Headers::new(),
        );
        assert!(!denied.is_success());
        let garbage = CalloutResponse::from_parts(
            [(":status", "abc")].into_iter().collect(),
            Vec::new(),
            Headers::new(),
        );
        assert_eq!(garbage.status, None);
        assert!(!garbage.is_success());
    }

    #[test]
    fn pending_map_hands_state_back_once() {
        let mut p: PendingCallouts<&str> = PendingCallouts::new();
        p.insert(7, "check");
        p.insert(9, "refresh");
        assert_eq!(p.len(), 2);
        assert_eq!(p.take(7), Some("check"));
        assert_eq!(p.take(7), None);
        assert_eq!(p.take(42), None);
        assert_eq!(p.take(9), Some("refresh"));
        assert!(p.is_empty());
    }
}
