//! The WasmPlugin filter chain on one request: AUTHN/AUTHZ-phase plugins before the waypoint's
//! authorization, STATS and unphased ones after routing, bodies and trailers streamed through
//! both chains, and `proxy_on_log` when the response ends. Requests with no plugin never come
//! here.
//!
//! Filters see Envoy's header maps: pseudo-headers first (`:method`, `:path`, `:authority`,
//! `:scheme`; `:status`), then the rest lowercased, `host` folded into `:authority`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use ambit_wasm_host::{BodyStep, FilterChain, LocalResponse, Pairs, Step, StreamInfo};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::{mpsc, oneshot, Mutex};

use super::body::BoxBody;
use super::filters::RequestHead;
use super::inbound::TunnelInfo;
use super::pipeline::LocalReply;
use super::upstream::Target;
use super::Context;
use crate::wasm::Selected;

/// Frames waiting between the filter task and the body it feeds.
const BODY_QUEUE: usize = 4;

/// One request's contexts in its plugins.
pub struct RequestPlugins {
    chains: Arc<Mutex<Chains>>,
    /// Fires when a filter answers or resets the request while its body streams.
    aborted: Option<oneshot::Receiver<LocalReply>>,
}

struct Chains {
    before_authz: FilterChain,
    after_authz: FilterChain,
    logged: bool,
}

/// Whatever way the request ended, its filters' `proxy_on_log` runs once, when the last
/// holder of its contexts (the pipeline or a body task) lets go: in a task of its own, since
/// the guest's callbacks are async.
impl Drop for Chains {
    fn drop(&mut self) {
        if !self.logged {
            self.logged = true;
            let mut before = std::mem::take(&mut self.before_authz);
            let mut after = std::mem::take(&mut self.after_authz);
            // Outside a runtime (shutting down) the chains' streams still finish their contexts
            // when they drop.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    before.log().await;
                    after.log().await;
                });
            }
        }
    }
}

impl Chains {
    async fn log(&mut self) {
        if !self.logged {
            self.logged = true;
            self.before_authz.log().await;
            self.after_authz.log().await;
        }
    }
}

impl RequestPlugins {
    pub fn new(selected: &Selected, info: StreamInfo) -> Self {
        let info = Arc::new(info);
        RequestPlugins {
            chains: Arc::new(Mutex::new(Chains {
                before_authz: FilterChain::new(&selected.before_authz, info.clone()),
                after_authz: FilterChain::new(&selected.after_authz, info),
                logged: false,
            })),
            aborted: None,
        }
    }

    /// Request headers through the AUTHN/AUTHZ-phase plugins.
    pub async fn before_authz(
        &self,
        head: &mut RequestHead,
        end_of_stream: bool,
    ) -> Result<(), LocalReply> {
        let mut chains = self.chains.lock().await;
        headers_phase(&mut chains.before_authz, head, end_of_stream).await
    }

    /// Request headers through the remaining plugins, after routing and route filters.
    pub async fn after_routing(
        &self,
        head: &mut RequestHead,
        end_of_stream: bool,
    ) -> Result<(), LocalReply> {
        let mut chains = self.chains.lock().await;
        headers_phase(&mut chains.after_authz, head, end_of_stream).await
    }

    /// The request body as the filters pass it on; a filter answering mid-body is reported
    /// through [`RequestPlugins::aborted`].
    pub fn request_body(&mut self, body: BoxBody) -> BoxBody {
        let (abort, aborted) = oneshot::channel();
        self.aborted = Some(aborted);
        let chains = self.chains.clone();
        filtered(body, move |frames, body| async move {
            if let Err(reply) = pump(&chains, body, Direction::Request, frames).await {
                let _ = abort.send(reply);
            }
        })
    }

    /// Resolves when a filter answered the request while its body was streaming.
    pub async fn aborted(&mut self) -> LocalReply {
        match self.aborted.as_mut() {
            Some(aborted) => match aborted.await {
                Ok(reply) => reply,
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }

    /// Response headers through every plugin, last first; a filter may answer instead.
    pub async fn response_headers(
        &self,
        parts: &mut http::response::Parts,
        end_of_stream: bool,
    ) -> Result<(), LocalReply> {
        let mut pairs = response_pairs(parts);
        let mut chains = self.chains.lock().await;
        let mut step = chains
            .after_authz
            .response_headers(&mut pairs, end_of_stream)
            .await;
        if step == Step::Continue {
            step = chains
                .before_authz
                .response_headers(&mut pairs, end_of_stream)
                .await;
        }
        if end_of_stream {
            chains.log().await;
        }
        drop(chains);
        match step {
            Step::Continue => {
                apply_response_pairs(parts, pairs);
                Ok(())
            }
            Step::Respond(response) => Err(local_reply(response)),
            Step::Reset => Err(reset_reply()),
        }
    }

    /// The response body as the filters pass it on; `proxy_on_log` runs when it ends. A filter
    /// answering after the response headers left can only cut the body short (logged).
    pub fn response_body(&self, body: BoxBody) -> BoxBody {
        let chains = self.chains.clone();
        filtered(body, move |frames, body| async move {
            if let Err(reply) = pump(&chains, body, Direction::Response, frames).await {
                tracing::warn!(status = %reply.status, "a wasm filter answered after the response headers were sent; the response body is cut short");
            }
            chains.lock().await.log().await;
        })
    }
}

/// Feeds `body` through the chains in `direction` and sends on what they pass, until the body
/// ends (its trailers included) or the receiver goes away; a filter that answers or resets ends
/// the pump with its reply.
async fn pump(
    chains: &Mutex<Chains>,
    mut body: BoxBody,
    direction: Direction,
    frames: FrameSender,
) -> Result<(), LocalReply> {
    loop {
        let frame = body.frame().await;
        let ended = frame.is_none();
        let mut guard = chains.lock().await;
        let out = match frame {
            None => run_body(&mut guard, Bytes::new(), true, direction).await?,
            Some(Err(error)) => {
                let _ = frames.send(Err(error)).await;
                return Ok(());
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let end = body.is_end_stream();
                    run_body(&mut guard, data, end, direction).await?
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(mut trailers) => {
                        let released = run_trailers(&mut guard, &mut trailers, direction).await?;
                        trailer_frames(released, trailers)
                    }
                    Err(_) => continue,
                },
            },
        };
        drop(guard);
        let last = ended || body.is_end_stream() || out.iter().any(Frame::is_trailers);
        for frame in out {
            if frames.send(Ok(frame)).await.is_err() {
                return Ok(());
            }
        }
        if last {
            return Ok(());
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

/// One body chunk through both chains (request: before → after; response: after → before).
async fn run_body(
    chains: &mut Chains,
    data: Bytes,
    end: bool,
    direction: Direction,
) -> Result<Vec<Frame<Bytes>>, LocalReply> {
    let Chains {
        before_authz,
        after_authz,
        ..
    } = chains;
    let order: [&mut FilterChain; 2] = match direction {
        Direction::Request => [before_authz, after_authz],
        Direction::Response => [after_authz, before_authz],
    };
    let mut data = data;
    for chain in order {
        let step = match direction {
            Direction::Request => chain.request_body(data, end).await,
            Direction::Response => chain.response_body(data, end).await,
        };
        data = match step {
            BodyStep::Forward(out) => out,
            BodyStep::Buffered => return Ok(Vec::new()),
            BodyStep::Respond(response) => return Err(local_reply(response)),
            BodyStep::Reset => return Err(reset_reply()),
        };
    }
    Ok(if data.is_empty() {
        Vec::new()
    } else {
        vec![Frame::data(data)]
    })
}

/// Trailers through both chains; returns body bytes filters held until then (they paused every
/// chunk and no callback saw the end of the stream), to send before the trailers.
async fn run_trailers(
    chains: &mut Chains,
    trailers: &mut HeaderMap,
    direction: Direction,
) -> Result<Bytes, LocalReply> {
    let mut pairs = header_pairs(trailers, Vec::new());
    let Chains {
        before_authz,
        after_authz,
        ..
    } = chains;
    let order: [&mut FilterChain; 2] = match direction {
        Direction::Request => [before_authz, after_authz],
        Direction::Response => [after_authz, before_authz],
    };
    let mut released = Bytes::new();
    for chain in order {
        if !released.is_empty() {
            let step = match direction {
                Direction::Request => chain.request_body(released, false).await,
                Direction::Response => chain.response_body(released, false).await,
            };
            released = match step {
                BodyStep::Forward(out) => out,
                BodyStep::Buffered => Bytes::new(),
                BodyStep::Respond(response) => return Err(local_reply(response)),
                BodyStep::Reset => return Err(reset_reply()),
            };
        }
        let step = match direction {
            Direction::Request => chain.request_trailers(&mut pairs).await,
            Direction::Response => chain.response_trailers(&mut pairs).await,
        };
        match step {
            Step::Continue => {}
            Step::Respond(response) => return Err(local_reply(response)),
            Step::Reset => return Err(reset_reply()),
        }
        let more = chain.take_released_body();
        if !more.is_empty() {
            released = [released, more].concat().into();
        }
    }
    *trailers = HeaderMap::new();
    extend_headers(trailers, pairs);
    Ok(released)
}

/// A released body chunk (if any) and the trailers, in that order.
fn trailer_frames(released: Bytes, trailers: HeaderMap) -> Vec<Frame<Bytes>> {
    let mut frames = Vec::with_capacity(2);
    if !released.is_empty() {
        frames.push(Frame::data(released));
    }
    frames.push(Frame::trailers(trailers));
    frames
}

async fn headers_phase(
    chain: &mut FilterChain,
    head: &mut RequestHead,
    end_of_stream: bool,
) -> Result<(), LocalReply> {
    if chain.is_empty() {
        return Ok(());
    }
    let mut pairs = request_pairs(head);
    match chain.request_headers(&mut pairs, end_of_stream).await {
        Step::Continue => {
            apply_request_pairs(head, pairs);
            Ok(())
        }
        Step::Respond(response) => Err(local_reply(response)),
        Step::Reset => Err(reset_reply()),
    }
}

/// What filters may read about the request's connection and peer.
pub fn stream_info(context: &Context, tunnel: &TunnelInfo, target: &Target) -> StreamInfo {
    let connect = &tunnel.connect;
    StreamInfo {
        connection_id: 0,
        source: Some(tunnel.client_address()),
        destination: Some(connect.target),
        mtls: true,
        source_principal: Some(connect.peer_identity.to_string()),
        local_principal: Some(context.identity.to_string()),
        source_namespace: tunnel.source.as_ref().map(|w| w.namespace.clone()),
        source_workload: tunnel.source.as_ref().map(|w| w.name.clone()),
        destination_service: match target {
            Target::Service { service, .. } => Some(service.hostname.clone()),
            Target::Workload { .. } => None,
        },
        started: Some(std::time::SystemTime::now()),
    }
}

fn request_pairs(head: &RequestHead) -> Pairs {
    let path = head
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let pseudo = vec![
        (
            ":method".to_owned(),
            head.method.as_str().as_bytes().to_vec(),
        ),
        (":path".to_owned(), path.into_bytes()),
        (":authority".to_owned(), head.authority().into_bytes()),
        (":scheme".to_owned(), b"http".to_vec()),
    ];
    let mut headers = head.headers.clone();
    headers.remove(header::HOST);
    header_pairs(&headers, pseudo)
}

fn header_pairs(headers: &HeaderMap, mut pairs: Pairs) -> Pairs {
    pairs.extend(
        headers
            .iter()
            .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec())),
    );
    pairs
}

/// Adds regular headers from `pairs`, skipping pseudo-headers and anything HTTP refuses.
fn extend_headers(headers: &mut HeaderMap, pairs: Pairs) {
    for (name, value) in pairs {
        if name.starts_with(':') {
            continue;
        }
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(&value),
        ) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => {
                tracing::warn!(header = %name, "a wasm filter set a header that is not valid HTTP; dropped")
            }
        }
    }
}

fn pseudo<'a>(pairs: &'a Pairs, name: &str) -> Option<&'a [u8]> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_slice())
}

fn apply_request_pairs(head: &mut RequestHead, pairs: Pairs) {
    if let Some(method) = pseudo(&pairs, ":method").and_then(|m| Method::from_bytes(m).ok()) {
        head.method = method;
    }
    let authority = pseudo(&pairs, ":authority").map(<[u8]>::to_vec);
    if let Some(path) = pseudo(&pairs, ":path") {
        let mut parts = head.uri.clone().into_parts();
        match http::uri::PathAndQuery::try_from(path) {
            Ok(path) => {
                parts.path_and_query = Some(path);
                if let Ok(uri) = Uri::from_parts(parts) {
                    head.uri = uri;
                }
            }
            Err(_) => tracing::warn!("a wasm filter set an invalid :path; kept the old one"),
        }
    }
    let mut headers = HeaderMap::new();
    extend_headers(&mut headers, pairs);
    if let Some(value) = authority.and_then(|a| HeaderValue::from_bytes(&a).ok()) {
        headers.insert(header::HOST, value);
    }
    head.headers = headers;
}

fn response_pairs(parts: &http::response::Parts) -> Pairs {
    header_pairs(
        &parts.headers,
        vec![(
            ":status".to_owned(),
            parts.status.as_str().as_bytes().to_vec(),
        )],
    )
}

fn apply_response_pairs(parts: &mut http::response::Parts, pairs: Pairs) {
    if let Some(status) = pseudo(&pairs, ":status").and_then(|s| StatusCode::from_bytes(s).ok()) {
        parts.status = status;
    }
    let mut headers = HeaderMap::new();
    extend_headers(&mut headers, pairs);
    parts.headers = headers;
}

/// A filter's local response as the waypoint's reply.
fn local_reply(response: LocalResponse) -> LocalReply {
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut reply = LocalReply::new(status, "-", Bytes::from(response.body));
    extend_headers(&mut reply.headers, response.headers);
    if let Some(grpc) = response.grpc_status {
        reply.headers.insert("grpc-status", HeaderValue::from(grpc));
    }
    reply
}

fn reset_reply() -> LocalReply {
    LocalReply::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "-",
        "the request was reset by a wasm filter",
    )
}

type FrameSender = mpsc::Sender<Result<Frame<Bytes>, hyper::Error>>;

/// A body fed by a task that runs `drive` over the original body.
fn filtered<F, Fut>(body: BoxBody, drive: F) -> BoxBody
where
    F: FnOnce(FrameSender, BoxBody) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (frames, receiver) = mpsc::channel(BODY_QUEUE);
    tokio::spawn(drive(frames, body));
    ChannelBody { receiver }.boxed_unsync()
}

struct ChannelBody {
    receiver: mpsc::Receiver<Result<Frame<Bytes>, hyper::Error>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.receiver.poll_recv(cx)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
