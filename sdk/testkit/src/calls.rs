//! `proxy_http_call` in tests: the host sends every call the filter makes to the test process,
//! which records it and answers from the test's closure.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::headers::Pairs;

/// A call the filter dispatched, as the host carries it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpCallRequest {
    /// The `upstream` argument: Envoy's cluster name; in Ambit a service host (`name.ns.svc...`,
    /// optionally `:port`) or an `outbound|port||host` cluster name.
    pub upstream: String,
    #[serde(with = "pairs")]
    pub headers: Pairs,
    #[serde(default, with = "crate::protocol::bytes")]
    pub body: Vec<u8>,
    #[serde(default, with = "pairs")]
    pub trailers: Pairs,
    /// The call's timeout (the host applies it).
    #[serde(with = "millis")]
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
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpCallResponse {
    #[serde(with = "pairs")]
    pub headers: Pairs,
    #[serde(default, with = "crate::protocol::bytes")]
    pub body: Vec<u8>,
    #[serde(default, with = "pairs")]
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

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.as_bytes().to_vec()));
        self
    }
}

/// The test's answer to a call: `None` is a failed call (the filter sees zero headers).
pub(crate) type Answer = Arc<dyn Fn(&HttpCallRequest) -> Option<HttpCallResponse> + Send + Sync>;

/// [`Pairs`] as [`crate::Headers`] puts them on the wire.
mod pairs {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::headers::{Headers, Pairs};

    pub fn serialize<S: Serializer>(value: &Pairs, serializer: S) -> Result<S::Ok, S::Error> {
        Headers(value.clone()).serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Pairs, D::Error> {
        Ok(Headers::deserialize(deserializer)?.0)
    }
}

/// A duration as whole milliseconds.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(value.as_millis().try_into().unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(deserializer)?))
    }
}
