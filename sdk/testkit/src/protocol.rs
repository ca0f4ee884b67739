//! The line-delimited JSON spoken between a test process and `ambit filter serve`: one JSON
//! object per line each way, over the child's stdin and stdout.
//!
//! The test process sends [`ClientMessage`]s; the server answers each `load`, `run`, `inspect`
//! and `unload` with one [`ServerMessage::Done`] or [`ServerMessage::Failed`] carrying the same
//! `id`. While a request runs, the server asks the test process for what only the test knows:
//! the upstream's response to what reached it ([`ServerMessage::Upstream`]) and the answers to
//! the filter's HTTP calls ([`ServerMessage::Call`]); the test process answers each question with
//! a [`ClientMessage::Reply`] naming the question's `id`. The server's first line is
//! [`ServerMessage::Hello`]; a client refuses a server whose [`PROTOCOL`] differs.
//!
//! Bytes (header values, bodies) travel as JSON strings when they are UTF-8 and as arrays of
//! numbers otherwise ([`Bytes`]).

use serde::{Deserialize, Serialize};

use crate::calls::{HttpCallRequest, HttpCallResponse};
use crate::headers::Headers;
use crate::outcome::{LogEntry, Outcome, Upstream};
use crate::request::{Response, StreamInfo};

/// This protocol's version: a server and a client with different versions do not talk.
pub const PROTOCOL: u32 = 1;

/// Raw bytes on the wire: a string when UTF-8, else an array of numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => serializer.serialize_str(text),
            Err(_) => self.0.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Text(String),
            Raw(Vec<u8>),
        }
        Ok(Bytes(match Wire::deserialize(deserializer)? {
            Wire::Text(text) => text.into_bytes(),
            Wire::Raw(raw) => raw,
        }))
    }
}

/// [`Bytes`] for `Vec<u8>` fields (`#[serde(with = "crate::protocol::bytes")]`).
pub(crate) mod bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(value: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        super::Bytes(value.to_vec()).serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        Ok(super::Bytes::deserialize(deserializer)?.0)
    }
}

/// [`Bytes`] for `Vec<Vec<u8>>` fields (body chunks).
pub(crate) mod chunks {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(value: &[Vec<u8>], serializer: S) -> Result<S::Ok, S::Error> {
        value
            .iter()
            .map(|chunk| super::Bytes(chunk.clone()))
            .collect::<Vec<_>>()
            .serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Vec<u8>>, D::Error> {
        Ok(Vec::<super::Bytes>::deserialize(deserializer)?
            .into_iter()
            .map(|b| b.0)
            .collect())
    }
}

/// How a filter handles its own failures (a WasmPlugin's `failStrategy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailStrategy {
    /// Answer 500: the filter's check cannot be skipped (Istio's default).
    #[default]
    FailClose,
    /// Skip the filter for that request.
    FailOpen,
}

/// A proxy-wasm log level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    #[default]
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

/// What the server needs to load a plugin.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadSpec {
    /// The `.wasm` file (the server reads it).
    pub module: std::path::PathBuf,
    pub name: String,
    pub root_id: String,
    /// Empty: a VM id of the filter's own.
    #[serde(default)]
    pub vm_id: String,
    #[serde(default, with = "bytes")]
    pub configuration: Vec<u8>,
    #[serde(default, with = "bytes")]
    pub vm_configuration: Vec<u8>,
    #[serde(default)]
    pub environment: Vec<(String, String)>,
    #[serde(default)]
    pub fail_strategy: FailStrategy,
    #[serde(default)]
    pub log_level: LogLevel,
}

/// One request and how it starts; the upstream's answer is asked for when it is needed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunSpec {
    /// Pseudo-headers (`:method`, `:path`, `:authority`, `:scheme`) first.
    pub headers: Headers,
    #[serde(default, with = "chunks")]
    pub body: Vec<Vec<u8>>,
    #[serde(default)]
    pub trailers: Headers,
    #[serde(default)]
    pub info: StreamInfo,
}

/// From the test process to the server.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Load a plugin; answered with [`Done::Loaded`].
    Load { id: u64, spec: LoadSpec },
    /// Send a request through loaded plugins, in order (a chain); answered with
    /// [`Done::Ran`].
    Run {
        id: u64,
        filters: Vec<u64>,
        request: RunSpec,
    },
    /// A filter's logs and HTTP calls since it was loaded, its failures and the host's
    /// metrics; answered with [`Done::State`].
    Inspect { id: u64, filter: u64 },
    /// Forget a plugin.
    Unload { id: u64, filter: u64 },
    /// The answer to the server's question `id`.
    Reply { id: u64, answer: Answer },
}

/// The test process's answer to a question.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// The upstream's response to [`ServerMessage::Upstream`].
    Upstream(Response),
    /// The answer to [`ServerMessage::Call`]; `None` fails the call (no such upstream).
    Call(Option<HttpCallResponse>),
}

/// From the server to the test process.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The server's first line.
    Hello { version: String, protocol: u32 },
    /// Request `id` succeeded.
    Done { id: u64, done: Done },
    /// Request `id` failed (the message says why, for a person).
    Failed { id: u64, message: String },
    /// The request of run `run` reached the upstream as `request`: what does it answer?
    Upstream {
        id: u64,
        run: u64,
        request: Upstream,
    },
    /// Filter `filter` made an HTTP call: what does the callee answer?
    Call {
        id: u64,
        filter: u64,
        request: HttpCallRequest,
    },
}

/// What a successful request returns.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Done {
    Loaded { filter: u64 },
    Ran(Box<Outcome>),
    State(Box<FilterState>),
    Unloaded,
}

/// [`ClientMessage::Inspect`]'s answer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FilterState {
    pub logs: Vec<LogEntry>,
    pub calls: Vec<HttpCallRequest>,
    pub failures: u64,
    /// The host's metrics in Prometheus text format.
    pub metrics: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_text_when_they_can_be() {
        let text = serde_json::to_string(&Bytes(b"ok".to_vec())).unwrap();
        assert_eq!(text, r#""ok""#);
        let raw = serde_json::to_string(&Bytes(vec![0xff, 0])).unwrap();
        assert_eq!(raw, "[255,0]");
        for wire in [text, raw] {
            let back: Bytes = serde_json::from_str(&wire).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), wire);
        }
    }

    #[test]
    fn messages_round_trip() {
        let line = r#"{"op":"reply","id":3,"answer":{"call":null}}"#;
        let message: ClientMessage = serde_json::from_str(line).unwrap();
        assert!(matches!(
            message,
            ClientMessage::Reply {
                id: 3,
                answer: Answer::Call(None)
            }
        ));
        assert_eq!(serde_json::to_string(&message).unwrap(), line);
    }
}
