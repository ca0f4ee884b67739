//! One request through a filter, phase by phase in the waypoint's order, with the upstream's
//! response supplied by the test.

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_wasm_host::{BodyStep, HttpStream, LocalResponse, Step, StreamInfo};
use bytes::Bytes;

use crate::filter::{background, Filter};
use crate::headers::Headers;
use crate::outcome::{ClientResponse, Outcome, Phase, Upstream};

/// What the upstream answers. Header names are lowercased (HTTP/2 style, as filters see them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Headers,
    pub body: Vec<Bytes>,
    pub trailers: Headers,
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
    pub fn body(mut self, chunk: impl Into<Bytes>) -> Self {
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

/// A request being built; [`Request::send`] runs it.
pub struct Request<'f> {
    filter: &'f Filter,
    headers: Headers,
    body: Vec<Bytes>,
    trailers: Headers,
    info: StreamInfo,
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
        started: Some(std::time::SystemTime::now()),
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
            filter,
            headers,
            body: Vec::new(),
            trailers: Headers::new(),
            info: StreamInfo {
                started: Some(std::time::SystemTime::now()),
                ..StreamInfo::default()
            },
            upstream: Box::new(|_| Response::new(200)),
        }
    }

    pub fn method(mut self, method: &str) -> Self {
        self.headers.set(":method", method);
        self
    }

    /// Path and query.
    pub fn path(mut self, path: &str) -> Self {
        self.headers.set(":path", path);
        self
    }

    /// `:authority` (the `host` header).
    pub fn authority(mut self, authority: &str) -> Self {
        self.headers.set(":authority", authority);
        self
    }

    pub fn scheme(mut self, scheme: &str) -> Self {
        self.headers.set(":scheme", scheme);
        self
    }

    /// Appends a header (`host` sets `:authority`, as the waypoint folds it).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        if name.eq_ignore_ascii_case("host") {
            return self.authority(value);
        }
        if name.starts_with(':') {
            self.headers.set(name, value);
        } else {
            self.headers.add(name, value);
        }
        self
    }

    /// Adds one body chunk; call again for more chunks.
    pub fn body(mut self, chunk: impl Into<Bytes>) -> Self {
        self.body.push(chunk.into());
        self
    }

    /// A JSON body with `content-type: application/json`.
    pub fn json(self, value: &serde_json::Value) -> Self {
        self.header("content-type", "application/json")
            .body(value.to_string())
    }

    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.trailers.add(name, value);
        self
    }

    /// The connection and peer (see [`peer`]).
    pub fn stream_info(mut self, info: StreamInfo) -> Self {
        self.info = info;
        self
    }

    /// The peer's SPIFFE id (`source.principal`, `connection.uri_san_peer_certificate`), over
    /// mutual TLS.
    pub fn source_principal(mut self, principal: &str) -> Self {
        self.info.source_principal = Some(principal.to_owned());
        self.info.mtls = true;
        self
    }

    /// The client's address (`source.address`).
    pub fn source_address(mut self, address: SocketAddr) -> Self {
        self.info.source = Some(address);
        self
    }

    /// The address the client connected to (`destination.address`).
    pub fn destination_address(mut self, address: SocketAddr) -> Self {
        self.info.destination = Some(address);
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

    /// Runs the request on the harness's own Tokio runtime. Not from inside an async test:
    /// there, use [`Request::send`].
    pub fn run(self) -> Outcome {
        background().block_on(self.send())
    }

    /// Runs the request: request headers, body chunks and trailers through the filter, the
    /// upstream's response, response headers, body chunks and trailers through the filter,
    /// then `proxy_on_log`. A local response or reset ends the request where it happens.
    pub async fn send(self) -> Outcome {
        let filter = self.filter;
        let log_mark = filter.logs.lock().unwrap_or_else(|e| e.into_inner()).len();
        let call_mark = filter.caller.count();
        let mut stream = filter.plugin.http_stream(Arc::new(self.info));
        let mut run = Run {
            upstream: None,
            response: ClientResponse::default(),
            local_response: None,
            reset: None,
        };
        run.exchange(
            &mut stream,
            self.headers,
            self.body,
            self.trailers,
            self.upstream,
        )
        .await;
        stream.log().await;
        drop(stream);
        let logs = filter.logs.lock().unwrap_or_else(|e| e.into_inner())[log_mark..].to_vec();
        Outcome {
            upstream: run.upstream,
            response: run.response,
            local_response: run.local_response,
            reset: run.reset,
            logs,
            calls: filter.caller.since(call_mark),
            metrics: filter.metrics(),
        }
    }
}

/// Where one request got to.
struct Run {
    upstream: Option<Upstream>,
    response: ClientResponse,
    local_response: Option<(Phase, LocalResponse)>,
    reset: Option<Phase>,
}

/// How a phase ended, for the caller: go on, or stop (the client's answer is set).
type Flow = Result<(), ()>;

impl Run {
    async fn exchange(
        &mut self,
        stream: &mut HttpStream,
        headers: Headers,
        body: Vec<Bytes>,
        trailers: Headers,
        upstream: UpstreamFn<'_>,
    ) {
        if self.request(stream, headers, body, trailers).await.is_err() {
            return;
        }
        let sent = self
            .upstream
            .as_ref()
            .expect("request reached the upstream");
        let response = upstream(sent);
        let _ = self.response(stream, response).await;
    }

    async fn request(
        &mut self,
        stream: &mut HttpStream,
        headers: Headers,
        body: Vec<Bytes>,
        trailers: Headers,
    ) -> Flow {
        let mut pairs = headers.0;
        let end = body.is_empty() && trailers.is_empty();
        let step = stream.request_headers(&mut pairs, end).await;
        self.step(step, Phase::RequestHeaders)?;
        self.upstream = Some(Upstream {
            headers: Headers(pairs),
            ..Upstream::default()
        });
        let chunks = body.len();
        for (index, chunk) in body.into_iter().enumerate() {
            let end = index + 1 == chunks && trailers.is_empty();
            let step = stream.request_body(chunk, end).await;
            let out = self.body_step(step, Phase::RequestBody)?;
            self.upstream_mut().body.extend_from_slice(&out);
        }
        if !trailers.is_empty() {
            let mut pairs = trailers.0;
            let step = stream.request_trailers(&mut pairs).await;
            self.step(step, Phase::RequestTrailers)?;
            let held = stream.take_held_request_body();
            let upstream = self.upstream_mut();
            upstream.body.extend_from_slice(&held);
            upstream.trailers = Headers(pairs);
        }
        self.upstream_mut().complete = true;
        Ok(())
    }

    async fn response(&mut self, stream: &mut HttpStream, response: Response) -> Flow {
        let mut pairs = vec![(
            ":status".to_owned(),
            response.status.to_string().into_bytes(),
        )];
        pairs.extend(response.headers.0);
        let end = response.body.is_empty() && response.trailers.is_empty();
        let step = stream.response_headers(&mut pairs, end).await;
        self.step(step, Phase::ResponseHeaders)?;
        let status = pairs
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
            .unwrap_or(response.status);
        pairs.retain(|(k, _)| !k.starts_with(':'));
        self.response = ClientResponse {
            status,
            headers: Headers(pairs),
            ..ClientResponse::default()
        };
        let chunks = response.body.len();
        for (index, chunk) in response.body.into_iter().enumerate() {
            let end = index + 1 == chunks && response.trailers.is_empty();
            let step = stream.response_body(chunk, end).await;
            let out = self.body_step(step, Phase::ResponseBody)?;
            self.response.body.extend_from_slice(&out);
        }
        if !response.trailers.is_empty() {
            let mut pairs = response.trailers.0;
            let step = stream.response_trailers(&mut pairs).await;
            self.step(step, Phase::ResponseTrailers)?;
            let held = stream.take_held_response_body();
            self.response.body.extend_from_slice(&held);
            self.response.trailers = Headers(pairs);
        }
        Ok(())
    }

    fn upstream_mut(&mut self) -> &mut Upstream {
        self.upstream
            .as_mut()
            .expect("request headers went upstream")
    }

    fn step(&mut self, step: Step, phase: Phase) -> Flow {
        match step {
            Step::Continue => Ok(()),
            Step::Respond(local) => {
                self.answer(phase, local);
                Err(())
            }
            Step::Reset => {
                self.reset(phase);
                Err(())
            }
        }
    }

    fn body_step(&mut self, step: BodyStep, phase: Phase) -> Result<Bytes, ()> {
        match step {
            BodyStep::Forward(bytes) => Ok(bytes),
            BodyStep::Buffered => Ok(Bytes::new()),
            BodyStep::Respond(local) => {
                self.answer(phase, local);
                Err(())
            }
            BodyStep::Reset => {
                self.reset(phase);
                Err(())
            }
        }
    }

    /// The client gets the filter's response as is (the waypoint does not run response
    /// callbacks on it).
    fn answer(&mut self, phase: Phase, local: LocalResponse) {
        let mut headers = Headers(local.headers.clone());
        if let Some(grpc) = local.grpc_status {
            headers.set("grpc-status", grpc.to_string());
        }
        self.response = ClientResponse {
            status: local.status,
            headers,
            body: local.body.clone(),
            trailers: Headers::new(),
        };
        self.local_response = Some((phase, local));
    }

    /// What the waypoint answers when a filter resets the request.
    fn reset(&mut self, phase: Phase) {
        self.reset = Some(phase);
        let mut headers = Headers::new();
        headers.add("content-type", "text/plain");
        self.response = ClientResponse {
            status: 503,
            headers,
            body: b"the request was reset by a wasm filter".to_vec(),
            trailers: Headers::new(),
        };
    }
}
