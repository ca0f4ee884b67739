//! Local responses: answer the client from the filter instead of forwarding.
//!
//! [`LocalResponse::send`] calls `proxy_send_local_response`; the callback that sends must then
//! return `Action::Pause` (the stream is finished, nothing must continue). Envoy and Ambit run
//! the response filters and `on_log` for a local response as for an upstream one.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, Status};
use serde::Serialize;

/// A response built by the filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The JSON body of [`LocalResponse::json_error`].
#[derive(Serialize)]
struct ErrorBody<'a> {
    status: u32,
    error: &'a str,
    message: &'a str,
}

impl LocalResponse {
    /// An empty response with a status.
    pub fn new(status: u32) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Adds a header (the name lowercased).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// A `text/plain` response.
    pub fn text(status: u32, text: &str) -> Self {
        Self::new(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(text)
    }

    /// A JSON response from any serializable value.
    pub fn json(status: u32, value: &impl Serialize) -> Self {
        // Serializing plain data structures cannot fail; fall back to `null` rather than panic.
        let body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
        Self::new(status)
            .header("content-type", "application/json")
            .body(body)
    }

    /// `{"status": 401, "error": "unauthorized", "message": "..."}`: a machine-readable
    /// error code plus a human message.
    pub fn json_error(status: u32, error: &str, message: &str) -> Self {
        Self::json(
            status,
            &ErrorBody {
                status,
                error,
                message,
            },
        )
    }

    /// The first value of a header of this response.
    pub fn get_header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Sends it through the host. Return `Action::Pause` from the callback afterwards.
    pub fn send(&self) {
        if let Err(status) = self.try_send() {
            let _ = hostcalls::log(
                LogLevel::Error,
                &format!(
                    "ambit-sdk: local response {} refused: {status:?}",
                    self.status
                ),
            );
        }
    }

    /// Like [`send`](Self::send), returning the host's status.
    pub fn try_send(&self) -> Result<(), Status> {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let body = (!self.body.is_empty()).then_some(self.body.as_slice());
        hostcalls::send_http_response(self.status, headers, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_error_shape() {
        let r =
            LocalResponse::json_error(429, "rate_limited", "slow down").header("Retry-After", "2");
        assert_eq!(r.status, 429);
        assert_eq!(r.get_header("content-type"), Some("application/json"));
        assert_eq!(r.get_header("retry-after"), Some("2"));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"status": 429, "error": "rate_limited", "message": "slow down"})
        );
    }

    #[test]
    fn text_and_builder() {
        let r = LocalResponse::text(403, "denied");
        assert_eq!(r.body, b"denied");
        assert_eq!(
            r.get_header("Content-Type"),
            Some("text/plain; charset=utf-8")
        );
        let empty = LocalResponse::new(204);
        assert!(empty.body.is_empty() && empty.headers.is_empty());
    }
}
