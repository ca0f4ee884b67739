//! What became of one request: what the upstream received, what the client got, and what the
//! filter did on the way (log lines, HTTP calls, metrics).

use serde::{Deserialize, Serialize};

use crate::calls::HttpCallRequest;
use crate::headers::Headers;
use crate::metrics::Metrics;
use crate::protocol::LogLevel;

/// Where a request ended early.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
}

/// A filter's own answer to the client (`proxy_send_local_response`, or the host's 500 when
/// the filter failed closed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalResponse {
    pub status: u16,
    /// Envoy's `details` (shown in access logs), e.g. `wasm_rejected`.
    #[serde(default)]
    pub details: String,
    pub headers: Headers,
    #[serde(default, with = "crate::protocol::bytes")]
    pub body: Vec<u8>,
    /// A gRPC status to send as `grpc-status`; `None` when the filter passed -1.
    #[serde(default)]
    pub grpc_status: Option<i32>,
}

/// The request as it reached the upstream.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    /// Pseudo-headers (`:method`, `:path`, `:authority`, `:scheme`) first, as filters see them.
    pub headers: Headers,
    #[serde(default, with = "crate::protocol::bytes")]
    pub body: Vec<u8>,
    #[serde(default)]
    pub trailers: Headers,
    /// The whole request got through (false when the filter answered or reset mid-body).
    #[serde(default)]
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
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientResponse {
    pub status: u16,
    /// Without `:status`.
    pub headers: Headers,
    #[serde(default, with = "crate::protocol::bytes")]
    pub body: Vec<u8>,
    #[serde(default)]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub level: LogLevel,
    pub message: String,
}

/// Everything one request went through.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Outcome {
    /// The request as the test sent it (before any filter).
    #[serde(default)]
    pub request: Upstream,
    /// What reached the upstream; `None` when the filter answered or reset the request before
    /// its headers went on.
    pub upstream: Option<Upstream>,
    /// What the client got: the upstream's response as the filter left it, or the filter's
    /// local response (the waypoint sends it as is).
    pub response: ClientResponse,
    /// The filter's own answer (`proxy_send_local_response`, or the host's 500 when the filter
    /// failed closed), and the phase it came in.
    #[serde(default)]
    pub local_response: Option<(Phase, LocalResponse)>,
    /// The filter reset the stream (`proxy_close_stream`) in this phase; the waypoint answers
    /// the client 503.
    #[serde(default)]
    pub reset: Option<Phase>,
    /// What the filter logged while this request ran.
    #[serde(default)]
    pub logs: Vec<LogEntry>,
    /// HTTP calls the filter made while this request ran, as the host dispatched them.
    #[serde(default)]
    pub calls: Vec<HttpCallRequest>,
    /// The host's metrics after the request (process-wide: every filter's).
    #[serde(default)]
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

    /// What the upstream received and what the client got, curl style, without the request
    /// sent and the logs ([`Outcome`]'s `Display` has everything).
    pub fn exchange(&self) -> Exchange<'_> {
        Exchange(self)
    }

    /// Panics, showing the request, the filter's logs and the whole exchange, unless the
    /// request went through whole ([`Outcome::passed`]).
    #[track_caller]
    pub fn assert_passed(&self) -> &Self {
        if !self.passed() {
            self.fail(
                "the request did not reach the upstream whole",
                "passed",
                "stopped",
            );
        }
        self
    }

    /// Panics (showing the request, the logs and the exchange) unless the client got `status`.
    #[track_caller]
    pub fn assert_status(&self, status: u16) -> &Self {
        if self.status() != status {
            self.fail("status", status, self.status());
        }
        self
    }

    /// Panics unless the client's response has header `name` = `value` (`None`: absent).
    #[track_caller]
    pub fn assert_header(&self, name: &str, value: Option<&str>) -> &Self {
        if self.header(name) != value {
            self.fail(&format!("client header {name:?}"), value, self.header(name));
        }
        self
    }

    /// Panics unless the upstream's request has header `name` = `value` (`None`: absent).
    #[track_caller]
    pub fn assert_upstream_header(&self, name: &str, value: Option<&str>) -> &Self {
        if self.upstream_header(name) != value {
            self.fail(
                &format!("upstream header {name:?}"),
                value,
                self.upstream_header(name),
            );
        }
        self
    }

    /// Panics unless the client's body is `body`.
    #[track_caller]
    pub fn assert_body(&self, body: &str) -> &Self {
        if self.response.body != body.as_bytes() {
            self.fail("client body", body, self.response.body_str());
        }
        self
    }

    /// Panics unless some log line contains `text`.
    #[track_caller]
    pub fn assert_logged(&self, text: &str) -> &Self {
        if !self.logged(text) {
            self.fail("a log line containing", text, "none");
        }
        self
    }

    #[track_caller]
    fn fail(&self, what: &str, expected: impl std::fmt::Debug, got: impl std::fmt::Debug) {
        panic!("{what}: expected {expected:?}, got {got:?}\n\n{self}");
    }
}

/// See [`Outcome::exchange`].
pub struct Exchange<'a>(&'a Outcome);

impl std::fmt::Display for Outcome {
    /// The request as sent (`}` lines), the exchange ([`Outcome::exchange`]), then the filter's
    /// log lines.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "}} request sent:")?;
        for (name, value) in self.request.headers.iter() {
            writeln!(f, "}} {name}: {value}")?;
        }
        writeln!(f, "}}")?;
        if !self.request.body.is_empty() {
            writeln!(f, "{}", self.request.body_str())?;
        }
        for (name, value) in self.request.trailers.iter() {
            writeln!(f, "}} (trailer) {name}: {value}")?;
        }
        write!(f, "{}", self.exchange())?;
        if self.logs.is_empty() {
            writeln!(f, "* the filter logged nothing")?;
        }
        for log in &self.logs {
            writeln!(f, "* filter log [{:?}] {}", log.level, log.message)?;
        }
        Ok(())
    }
}

impl std::fmt::Display for Exchange<'_> {
    /// curl-like: `>` lines for what the upstream received, `<` lines for what the client got.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let outcome = self.0;
        match &outcome.upstream {
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
        if let Some((phase, local)) = &outcome.local_response {
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
        if let Some(phase) = &outcome.reset {
            writeln!(f, "* the filter reset the stream in {phase:?}")?;
        }
        for call in &outcome.calls {
            writeln!(
                f,
                "* http call to {}: {} {}",
                call.upstream,
                call.header(":method").unwrap_or("?"),
                call.header(":path").unwrap_or("?")
            )?;
        }
        writeln!(f, "< client got:")?;
        writeln!(f, "< HTTP/1.1 {}", outcome.response.status)?;
        for (name, value) in outcome.response.headers.iter() {
            writeln!(f, "< {name}: {value}")?;
        }
        writeln!(f, "<")?;
        if !outcome.response.body.is_empty() {
            writeln!(f, "{}", outcome.response.body_str())?;
        }
        for (name, value) in outcome.response.trailers.iter() {
            writeln!(f, "< (trailer) {name}: {value}")?;
        }
        Ok(())
    }
}
