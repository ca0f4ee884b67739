//! What became of one request: what the upstream received, what the client got, and what the
//! filter did on the way (log lines, HTTP calls, metrics).

use ambit_wasm_host::{HttpCallRequest, LocalResponse, LogLevel};

use crate::headers::Headers;
use crate::metrics::Metrics;

/// Where a request ended early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
}

/// The request as it reached the upstream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Upstream {
    /// Pseudo-headers (`:method`, `:path`, `:authority`, `:scheme`) first, as filters see them.
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
    /// The whole request got through (false when the filter answered or reset mid-body).
    pub complete: bool,
}

impl Upstream {
    pub fn method(&self) -> &str {
        self.headers.get(":method").unwrap_or_default()
    }

    pub fn path(&self) -> &str {
        self.headers.get(":path").unwrap_or_default()
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// The response as the client got it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientResponse {
    pub status: u16,
    /// Without `:status`.
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
}

impl ClientResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (`Value::Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// One message the filter logged (`proxy_log`, or a line it wrote to stdout/stderr).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    pub level: LogLevel,
    pub message: String,
}

/// Everything one request went through.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// What reached the upstream; `None` when the filter answered or reset the request before
    /// its headers went on.
    pub upstream: Option<Upstream>,
    /// What the client got: the upstream's response as the filter left it, or the filter's
    /// local response (the waypoint sends it as is).
    pub response: ClientResponse,
    /// The filter's own answer (`proxy_send_local_response`, or the host's 500 when the filter
    /// failed closed), and the phase it came in.
    pub local_response: Option<(Phase, LocalResponse)>,
    /// The filter reset the stream (`proxy_close_stream`) in this phase; the waypoint answers
    /// the client 503.
    pub reset: Option<Phase>,
    /// What the filter logged while this request ran.
    pub logs: Vec<LogEntry>,
    /// HTTP calls the filter made while this request ran, as the host dispatched them.
    pub calls: Vec<HttpCallRequest>,
    /// The host's metrics after the request (process-wide: every filter's).
    pub metrics: Metrics,
}

impl Outcome {
    /// The status the client got.
    pub fn status(&self) -> u16 {
        self.response.status
    }

    /// A header of the response the client got.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.response.header(name)
    }

    /// A header of the request the upstream got (`None` also when nothing reached it).
    pub fn upstream_header(&self, name: &str) -> Option<&str> {
        self.upstream.as_ref()?.headers.get(name)
    }

    /// The request went through to the upstream, whole.
    pub fn passed(&self) -> bool {
        self.upstream.as_ref().is_some_and(|u| u.complete)
            && self.local_response.is_none()
            && self.reset.is_none()
    }

    /// Whether any log line contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.logs.iter().any(|l| l.message.contains(text))
    }
}

impl std::fmt::Display for Outcome {
    /// curl-like: `>` lines for what the upstream received, `<` lines for what the client got.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.upstream {
            Some(upstream) => {
                writeln!(f, "> upstream received:")?;
                for (name, value) in upstream.headers.iter() {
                    writeln!(f, "> {name}: {value}")?;
                }
                writeln!(f, ">")?;
                if !upstream.body.is_empty() {
                    writeln!(f, "{}", upstream.body_str())?;
                }
                for (name, value) in upstream.trailers.iter() {
                    writeln!(f, "> (trailer) {name}: {value}")?;
                }
            }
            None => writeln!(f, "> nothing reached the upstream")?,
        }
        if let Some((phase, local)) = &self.local_response {
            writeln!(
                f,
                "* the filter answered in {phase:?} ({})",
                if local.details.is_empty() {
                    "-"
                } else {
                    &local.details
                }
            )?;
        }
        if let Some(phase) = &self.reset {
            writeln!(f, "* the filter reset the stream in {phase:?}")?;
        }
        for call in &self.calls {
            writeln!(
                f,
                "* http call to {}: {} {}",
                call.upstream,
                call.header(":method").unwrap_or("?"),
                call.header(":path").unwrap_or("?")
            )?;
        }
        writeln!(f, "< client got:")?;
        writeln!(f, "< HTTP/1.1 {}", self.response.status)?;
        for (name, value) in self.response.headers.iter() {
            writeln!(f, "< {name}: {value}")?;
        }
        writeln!(f, "<")?;
        if !self.response.body.is_empty() {
            writeln!(f, "{}", self.response.body_str())?;
        }
        for (name, value) in self.response.trailers.iter() {
            writeln!(f, "< (trailer) {name}: {value}")?;
        }
        Ok(())
    }
}
