//! Body wrappers that measure streamed bodies without buffering them: [`CountingBody`] counts a
//! request body's bytes as they go upstream; [`ObservedBody`] counts a response body's bytes and
//! records the request's metrics when the response ends (or is abandoned); [`InFlightBody`]
//! keeps a request counted at its endpoint until the response body is done with.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};

use super::upstream::InFlight;
use crate::metrics::{Metrics, RequestLabels};

/// The body type requests and responses are carried in.
pub type BoxBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// A complete body from a string (local replies).
pub fn full(text: impl Into<Bytes>) -> BoxBody {
    Full::new(text.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// Approximate uncompressed size of a header block, as Envoy counts it in `total_size`.
pub fn header_bytes(headers: &http::HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(name, value)| (name.as_str().len() + value.len()) as u64)
        .sum()
}

/// Adds the size of every data frame that passes to a shared counter.
pub struct CountingBody {
    inner: BoxBody,
    count: Arc<AtomicU64>,
}

impl CountingBody {
    pub fn new(inner: BoxBody, count: Arc<AtomicU64>) -> Self {
        CountingBody { inner, count }
    }
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An endpoint's response body, counting the request as in flight at that endpoint (for least
/// request balancing) until the body has been read or dropped.
pub struct InFlightBody {
    inner: hyper::body::Incoming,
    in_flight: Option<InFlight>,
}

impl InFlightBody {
    pub fn new(inner: hyper::body::Incoming, in_flight: InFlight) -> Self {
        InFlightBody {
            inner,
            in_flight: Some(in_flight),
        }
    }
}

impl Body for InFlightBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = &polled {
            self.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What is recorded once a request is over.
pub struct Completion {
    pub metrics: Arc<Metrics>,
    pub labels: RequestLabels,
    pub start: Instant,
    /// Request headers and body bytes, the body part still growing while it streams.
    pub request_bytes: Arc<AtomicU64>,
    /// The request line, when the access log is on.
    pub access: Option<AccessLine>,
}

/// What the access log says about a request beyond its metric labels.
#[derive(Debug, Default)]
pub struct AccessLine {
    pub method: String,
    pub path: String,
    pub authority: String,
    pub request_id: String,
}

/// A response body that counts its bytes and records the request's metrics at its end.
pub struct ObservedBody {
    inner: BoxBody,
    /// Response headers and body bytes so far.
    response_bytes: u64,
    completion: Option<Completion>,
}

impl ObservedBody {
    pub fn new(inner: BoxBody, header_bytes: u64, completion: Completion) -> Self {
        ObservedBody {
            inner,
            response_bytes: header_bytes,
            completion: Some(completion),
        }
    }

    fn finish(&mut self) {
        if let Some(c) = self.completion.take() {
            let duration = c.start.elapsed();
            let request_bytes = c.request_bytes.load(Ordering::Relaxed);
            c.metrics
                .request(&c.labels, duration, request_bytes, self.response_bytes);
            // One line per request in the spirit of Envoy's default access log format, under
            // its own target so operators can route or silence it (`RUST_LOG=access=off`).
            let Some(access) = &c.access else { return };
            let upstream = c
                .labels
                .destination
                .as_ref()
                .and_then(|w| w.workload_ips.first().copied());
            tracing::info!(
                target: "access",
                method = %access.method,
                path = %access.path,
                authority = %access.authority,
                code = c.labels.response_code,
                flags = %c.labels.response_flags,
                bytes_received = request_bytes,
                bytes_sent = self.response_bytes,
                duration_ms = duration.as_millis() as u64,
                upstream = ?upstream,
                source = ?c.labels.source_principal.as_ref().map(ToString::to_string),
                request_id = %access.request_id,
                "request"
            );
        }
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.response_bytes += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref() {
                    // A gRPC status comes in the trailers unless the response was trailers-only.
                    let status = trailers.get("grpc-status").and_then(|v| v.to_str().ok());
                    if let (Some(c), Some(status)) = (self.completion.as_mut(), status) {
                        if c.labels.request_protocol == "grpc" {
                            c.labels.grpc_response_status = status.to_owned();
                        }
                    }
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A gRPC response body bounded by the call's deadline (`grpc-timeout`): past it, the rest of
/// the endpoint's response is dropped (its stream reset, so the server stops too) and the body
/// ends with `DEADLINE_EXCEEDED` trailers, as the client's own deadline would end it.
pub struct DeadlineBody {
    inner: Option<BoxBody>,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl DeadlineBody {
    pub fn new(inner: BoxBody, deadline: tokio::time::Instant) -> Self {
        DeadlineBody {
            inner: Some(inner),
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
        }
    }
}

impl Body for DeadlineBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(frame) = Pin::new(inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.inner = None;
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("4"));
        trailers.insert(
            "grpc-message",
            http::HeaderValue::from_static("deadline exceeded"),
        );
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }
}

/// A request body that may be sent more than once: kept in memory when it is small enough,
/// otherwise streamed (once), or streamed to the first attempt while a copy is kept.
pub enum ReplayBody {
    Buffered {
        chunks: Vec<Bytes>,
        trailers: Option<http::HeaderMap>,
    },
    /// Streamed; `None` once an attempt took it.
    Streaming(Option<BoxBody>),
    /// Streamed without waiting for its end (gRPC streams, requests without a retry policy of
    /// their own), copied as it goes: once the body has ended within the limit, a retry sends
    /// the copy, as Envoy replays what it buffered while streaming.
    Teed {
        body: Option<BoxBody>,
        copy: Arc<std::sync::Mutex<TeeCopy>>,
    },
}

/// What a [`ReplayBody::Teed`] body copied so far.
pub struct TeeCopy {
    /// `None` once the body outgrew the limit (or failed): nothing to replay.
    frames: Option<Vec<Frame<Bytes>>>,
    size: usize,
    limit: usize,
    ended: bool,
}

impl TeeCopy {
    fn record(&mut self, frame: &Frame<Bytes>) {
        let Some(frames) = self.frames.as_mut() else {
            return;
        };
        let copy = if let Some(data) = frame.data_ref() {
            self.size += data.len();
            Frame::data(data.clone())
        } else if let Some(trailers) = frame.trailers_ref() {
            Frame::trailers(trailers.clone())
        } else {
            return;
        };
        if self.size > self.limit {
            self.frames = None;
        } else {
            frames.push(copy);
        }
    }
}

impl ReplayBody {
    /// A body streamed to the first attempt and copied, up to `limit` bytes, for retries.
    pub fn teed(body: BoxBody, limit: usize) -> Self {
        ReplayBody::Teed {
            body: Some(body),
            copy: Arc::new(std::sync::Mutex::new(TeeCopy {
                frames: Some(Vec::new()),
                size: 0,
                limit,
                ended: false,
            })),
        }
    }

    /// Reads up to `limit` bytes of `body` into memory; a longer body is streamed, the part
    /// already read first.
    pub async fn buffer(mut body: BoxBody, limit: usize) -> Result<Self, hyper::Error> {
        if body.is_end_stream() {
            return Ok(ReplayBody::Buffered {
                chunks: Vec::new(),
                trailers: None,
            });
        }
        if body.size_hint().lower() > limit as u64 {
            return Ok(ReplayBody::Streaming(Some(body)));
        }
        let mut chunks = Vec::new();
        let mut size = 0;
        loop {
            match body.frame().await {
                None => {
                    return Ok(ReplayBody::Buffered {
                        chunks,
                        trailers: None,
                    })
                }
                Some(frame) => match frame?.into_data() {
                    Ok(data) => {
                        size += data.len();
                        chunks.push(data);
                        if size > limit {
                            let prefix = chunks.into_iter().map(Frame::data).collect();
                            return Ok(ReplayBody::Streaming(Some(
                                PrefixedBody {
                                    prefix,
                                    rest: Some(body),
                                }
                                .boxed_unsync(),
                            )));
                        }
                    }
                    Err(frame) => {
                        // Trailers end the body.
                        return Ok(ReplayBody::Buffered {
                            chunks,
                            trailers: frame.into_trailers().ok(),
                        });
                    }
                },
            }
        }
    }

    /// Whether another attempt can still send the body.
    pub fn replayable(&self) -> bool {
        match self {
            ReplayBody::Buffered { .. } => true,
            ReplayBody::Streaming(body) => body.is_some(),
            ReplayBody::Teed { body, copy } => {
                let copy = copy.lock().expect("tee lock");
                body.is_some() || (copy.ended && copy.frames.is_some())
            }
        }
    }

    /// Whether the body can be copied (mirrors need their own copy).
    pub fn is_buffered(&self) -> bool {
        matches!(self, ReplayBody::Buffered { .. })
    }

    /// The body for one attempt: a copy when buffered, the stream itself (once) otherwise; a
    /// teed body's copy once the stream went to an earlier attempt and ended.
    pub fn take(&mut self) -> Option<BoxBody> {
        match self {
            ReplayBody::Buffered { chunks, trailers } => {
                let mut prefix: std::collections::VecDeque<Frame<Bytes>> =
                    chunks.iter().cloned().map(Frame::data).collect();
                if let Some(t) = trailers {
                    prefix.push_back(Frame::trailers(t.clone()));
                }
                Some(PrefixedBody { prefix, rest: None }.boxed_unsync())
            }
            ReplayBody::Streaming(body) => body.take(),
            ReplayBody::Teed { body, copy } => {
                if let Some(inner) = body.take() {
                    return Some(
                        TeeBody {
                            inner,
                            copy: copy.clone(),
                        }
                        .boxed_unsync(),
                    );
                }
                let copy = copy.lock().expect("tee lock");
                let frames = copy.frames.as_ref().filter(|_| copy.ended)?;
                let prefix = frames
                    .iter()
                    .map(|f| match f.data_ref() {
                        Some(data) => Frame::data(data.clone()),
                        None => Frame::trailers(f.trailers_ref().cloned().unwrap_or_default()),
                    })
                    .collect();
                Some(PrefixedBody { prefix, rest: None }.boxed_unsync())
            }
        }
    }
}

/// A body passed through while its frames are copied into a [`TeeCopy`].
struct TeeBody {
    inner: BoxBody,
    copy: Arc<std::sync::Mutex<TeeCopy>>,
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(result) = &polled {
            let ended = self.inner.is_end_stream();
            let mut copy = self.copy.lock().expect("tee lock");
            match result {
                Some(Ok(frame)) => copy.record(frame),
                // A broken body is not one to send again.
                Some(Err(_)) => copy.frames = None,
                None => copy.ended = true,
            }
            // The sender ends the stream on the last frame when the body says it is over.
            copy.ended |= ended;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Frames already read, then whatever remains of the original body.
struct PrefixedBody {
    prefix: std::collections::VecDeque<Frame<Bytes>>,
    rest: Option<BoxBody>,
}

impl Body for PrefixedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(frame) = self.prefix.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self
            .prefix
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        match &self.rest {
            None => SizeHint::with_exact(buffered),
            Some(rest) => {
                let h = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(h.lower() + buffered);
                if let Some(upper) = h.upper() {
                    hint.set_upper(upper + buffered);
                }
                hint
            }
        }
    }
}
