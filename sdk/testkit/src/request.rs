//! One request through a filter, phase by phase in the waypoint's order, with the upstream's
//! response supplied by the test.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::filter::Filter;
use crate::headers::Headers;
use crate::outcome::{Outcome, Upstream};
use crate::protocol::RunSpec;

/// What the upstream answers. Header names are lowercased (HTTP/2 style, as filters see them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub status: u16,
    #[serde(default)]
    pub headers: Headers,
    /// Body chunks, in order.
    #[serde(default, with = "crate::protocol::chunks")]
    pub body: Vec<Vec<u8>>,
    #[serde(default)]
    pub trailers: Headers,
}

/// What the waypoint knows about the connection and peer of a request (`source.*`,
/// `connection.*` properties).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamInfo {
    pub connection_id: u64,
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    /// Whether the downstream connection was mutual TLS.
    pub mtls: bool,
    /// The peer's SPIFFE id (`connection.uri_san_peer_certificate`, `source.principal`).
    pub source_principal: Option<String>,
    /// This proxy's SPIFFE id (`connection.uri_san_local_certificate`).
    pub local_principal: Option<String>,
    /// Istio's peer metadata (`downstream_peer`).
    pub source_namespace: Option<String>,
    pub source_workload: Option<String>,
    /// The service the request is for.
    pub destination_service: Option<String>,
}

impl Response {
    pub fn new(status: u16) -> Self {
        Response {
            status,
            headers: Headers::new(),
            body: Vec::new(),
            trailers: Headers::new(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.add(name, value);
        self
    }

    /// Adds one body chunk; call again for more chunks.
    pub fn body(mut self, chunk: impl Into<Vec<u8>>) -> Self {
        self.body.push(chunk.into());
        self
    }

    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.trailers.add(name, value);
        self
    }

    /// An echo server's answer: 200, `content-type: text/plain`, and the request it received
    /// (request line, headers, blank line, body) as the body.
    pub fn echo(request: &Upstream) -> Response {
        let mut text = format!("{} {} HTTP/1.1\n", request.method(), request.path());
        for (name, value) in request.headers.iter() {
            if !name.starts_with(':') {
                text.push_str(&format!("{name}: {value}\n"));
            }
        }
        text.push('\n');
        let mut body = text.into_bytes();
        body.extend_from_slice(&request.body);
        Response::new(200)
            .header("content-type", "text/plain")
            .body(body)
    }
}

type UpstreamFn<'a> = Box<dyn FnOnce(&Upstream) -> Response + Send + 'a>;

/// A request being built; [`Request::run`] runs it.
pub struct Request<'f> {
    filters: Vec<&'f Filter>,
    spec: RunSpec,
    upstream: UpstreamFn<'f>,
}

/// A mesh peer as the waypoint describes it: mutual TLS from
/// `spiffe://cluster.local/ns/<namespace>/sa/<service_account>`, from 10.0.0.2:40000 to
/// 10.0.0.3:8080.
pub fn peer(namespace: &str, service_account: &str) -> StreamInfo {
    StreamInfo {
        connection_id: 1,
        source: Some(SocketAddr::from(([10, 0, 0, 2], 40000))),
        destination: Some(SocketAddr::from(([10, 0, 0, 3], 8080))),
        mtls: true,
        source_principal: Some(format!(
            "spiffe://cluster.local/ns/{namespace}/sa/{service_account}"
        )),
        local_principal: Some("spiffe://cluster.local/ns/default/sa/waypoint".into()),
        source_namespace: Some(namespace.to_owned()),
        source_workload: Some(service_account.to_owned()),
        destination_service: None,
    }
}

impl<'f> Request<'f> {
    pub(crate) fn new(filter: &'f Filter) -> Self {
        let mut headers = Headers::new();
        headers.add(":method", "GET");
        headers.add(":path", "/");
        headers.add(":authority", "example.com");
        headers.add(":scheme", "http");
        Request {
            filters: vec![filter],
            spec: RunSpec {
                headers,
                ..RunSpec::default()
            },
            upstream: Box::new(|_| Response::new(200)),
        }
    }

    /// Runs `filter` after the filters already on this request (a filter chain, in order).
    pub fn then(mut self, filter: &'f Filter) -> Self {
        self.filters.push(filter);
        self
    }

    pub fn method(mut self, method: &str) -> Self {
        self.spec.headers.set(":method", method);
        self
    }

    /// Path and query.
    pub fn path(mut self, path: &str) -> Self {
        self.spec.headers.set(":path", path);
        self
    }

    /// `:authority` (the `host` header).
    pub fn authority(mut self, authority: &str) -> Self {
        self.spec.headers.set(":authority", authority);
        self
    }

    pub fn scheme(mut self, scheme: &str) -> Self {
        self.spec.headers.set(":scheme", scheme);
        self
    }

    /// Appends a header (`host` sets `:authority`, as the waypoint folds it).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        if name.eq_ignore_ascii_case("host") {
            return self.authority(value);
        }
        if name.starts_with(':') {
            self.spec.headers.set(name, value);
        } else {
            self.spec.headers.add(name, value);
        }
        self
    }

    /// Adds one body chunk; call again for more chunks.
    pub fn body(mut self, chunk: impl Into<Vec<u8>>) -> Self {
        self.spec.body.push(chunk.into());
        self
    }

    /// A JSON body with `content-type: application/json`.
    pub fn json(self, value: &serde_json::Value) -> Self {
        self.header("content-type", "application/json")
            .body(value.to_string())
    }

    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.spec.trailers.add(name, value);
        self
    }

    /// The connection and peer (see [`peer`]).
    pub fn stream_info(mut self, info: StreamInfo) -> Self {
        self.spec.info = info;
        self
    }

    /// The peer's SPIFFE id (`source.principal`, `connection.uri_san_peer_certificate`), over
    /// mutual TLS.
    pub fn source_principal(mut self, principal: &str) -> Self {
        self.spec.info.source_principal = Some(principal.to_owned());
        self.spec.info.mtls = true;
        self
    }

    /// The client's address (`source.address`).
    pub fn source_address(mut self, address: SocketAddr) -> Self {
        self.spec.info.source = Some(address);
        self
    }

    /// The address the client connected to (`destination.address`).
    pub fn destination_address(mut self, address: SocketAddr) -> Self {
        self.spec.info.destination = Some(address);
        self
    }

    /// The upstream's answer (default: 200 with no headers and no body).
    pub fn response(mut self, response: Response) -> Self {
        self.upstream = Box::new(move |_| response);
        self
    }

    /// The upstream's answer, computed from what it received.
    pub fn upstream(mut self, answer: impl FnOnce(&Upstream) -> Response + Send + 'f) -> Self {
        self.upstream = Box::new(answer);
        self
    }

    /// An echo upstream (see [`Response::echo`]).
    pub fn echo(self) -> Self {
        self.upstream(Response::echo)
    }

    /// Runs the request: request headers, body chunks and trailers through the filter, the
    /// upstream's response, response headers, body chunks and trailers through the filter,
    /// then `proxy_on_log`. A local response or reset ends the request where it happens.
    ///
    /// Panics when `ambit filter serve` is gone (it prints why).
    pub fn run(self) -> Outcome {
        let ids = self.filters.iter().map(|f| f.id).collect();
        let mut outcome = self.filters[0]
            .client
            .run(ids, self.spec.clone(), self.upstream)
            .unwrap_or_else(|e| panic!("{e}"));
        outcome.request = Upstream {
            headers: self.spec.headers,
            body: self.spec.body.concat(),
            trailers: self.spec.trailers,
            complete: true,
        };
        outcome
    }

    /// [`Request::run`] for async tests. It blocks the calling thread while the request runs
    /// (in another process), which an async test can afford.
    pub async fn send(self) -> Outcome {
        self.run()
    }
}
