//! Body wrappers that measure streamed bodies without buffering them: [`CountingBody`] counts a
//! request body's bytes (and a gRPC request's messages) as they go upstream; [`ObservedBody`]
//! counts a response body's bytes (and messages) and records the request's metrics when the
//! response ends (or is abandoned); [`InFlightBody`] keeps a request counted at its endpoint
//! until the response body is done with.

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

/// Counts length-prefixed gRPC messages in a body's data frames as they pass, holding none of
/// them: a message counts at its first byte, as Envoy's gRPC frame inspector (the `grpc_stats`
/// filter Istio's message counts come from) counts it. Only the position within the current
/// message (its 5-byte prefix, then its payload) is kept between frames.
#[derive(Debug, Default)]
pub struct GrpcMessages {
    count: u64,
    /// Bytes of the current message's prefix read so far; 0 at a message boundary.
    prefix_read: u8,
    /// The payload length, as far as the prefix has been read.
    length: u32,
    payload_left: u64,
}

impl GrpcMessages {
    pub fn inspect(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let skip = data
                    .len()
                    .min(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
                self.payload_left -= skip as u64;
                data = &data[skip..];
                continue;
            }
            let byte = data[0];
            data = &data[1..];
            if self.prefix_read == 0 {
                // The compression flag: a new message.
                self.count += 1;
            } else {
                self.length = (self.length << 8) | u32::from(byte);
            }
            self.prefix_read += 1;
            if self.prefix_read == 5 {
                self.payload_left = u64::from(self.length);
                self.prefix_read = 0;
                self.length = 0;
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Adds the size of every data frame that passes to a shared counter, and for gRPC the number
/// of messages to another.
pub struct CountingBody {
    inner: BoxBody,
    count: Arc<AtomicU64>,
    messages: Option<(GrpcMessages, Arc<AtomicU64>)>,
}

impl CountingBody {
    pub fn new(inner: BoxBody, count: Arc<AtomicU64>) -> Self {
        CountingBody {
            inner,
            count,
            messages: None,
        }
    }

    /// Counts the body's gRPC messages into `messages` too.
    pub fn grpc(mut self, messages: Arc<AtomicU64>) -> Self {
        self.messages = Some((GrpcMessages::default(), messages));
        self
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
                if let Some((messages, shared)) = self.messages.as_mut() {
                    messages.inspect(data);
                    shared.store(messages.count(), Ordering::Relaxed);
                }
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
    /// A gRPC request's messages so far (`None` for plain HTTP).
    pub request_messages: Option<Arc<AtomicU64>>,
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
    /// A gRPC response's messages so far.
    response_messages: Option<GrpcMessages>,
    completion: Option<Completion>,
}

impl ObservedBody {
    pub fn new(inner: BoxBody, header_bytes: u64, completion: Completion) -> Self {
        ObservedBody {
            inner,
            response_bytes: header_bytes,
            response_messages: completion
                .request_messages
                .is_some()
                .then(GrpcMessages::default),
            completion: Some(completion),
        }
    }

    fn finish(&mut self) {
        if let Some(c) = self.completion.take() {
            let duration = c.start.elapsed();
            let request_bytes = c.request_bytes.load(Ordering::Relaxed);
            let messages = c.request_messages.as_ref().map(|request| {
                let response = self
                    .response_messages
                    .as_ref()
                    .map_or(0, GrpcMessages::count);
                (request.load(Ordering::Relaxed), response)
            });
            c.metrics.request(
                &c.labels,
                duration,
                request_bytes,
                self.response_bytes,
                messages,
            );
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
                    if let Some(messages) = self.response_messages.as_mut() {
                        messages.inspect(data);
                    }
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
    /// their own), copied as it goes while the copy fits the limit. A retry replays the copy and
    /// then goes on with what the client has not sent yet, whether or not the body had ended
    /// (Envoy replays what it buffered the same way); once the body outgrew the limit there is
    /// nothing to replay, and no retry happens.
    Teed(Arc<std::sync::Mutex<Tee>>),
}

/// The client's body behind a [`ReplayBody::Teed`], shared by the attempts' bodies.
pub struct Tee {
    /// The client's body, until it ends.
    inner: Option<BoxBody>,
    /// Every frame read from the client so far; `None` once they outgrew the limit (or the
    /// body failed): nothing to replay.
    frames: Option<Vec<Frame<Bytes>>>,
    /// Frames read from the client so far (copied or not).
    read: usize,
    size: usize,
    limit: usize,
    ended: bool,
    /// Attempts that took the body; only the latest one's body reads on.
    attempts: u32,
}

impl Tee {
    fn record(&mut self, frame: &Frame<Bytes>) {
        self.read += 1;
        let Some(frames) = self.frames.as_mut() else {
            return;
        };
        let Some(copy) = copy_frame(frame) else {
            // A frame that cannot be copied leaves a hole in the copy.
            self.frames = None;
            return;
        };
        self.size += frame.data_ref().map_or(0, Bytes::len);
        if self.size > self.limit {
            self.frames = None;
        } else {
            frames.push(copy);
        }
    }
}

/// A data or trailers frame again (`Bytes` are shared, not copied).
fn copy_frame(frame: &Frame<Bytes>) -> Option<Frame<Bytes>> {
    if let Some(data) = frame.data_ref() {
        Some(Frame::data(data.clone()))
    } else {
        frame.trailers_ref().cloned().map(Frame::trailers)
    }
}

impl ReplayBody {
    /// A body streamed to the first attempt and copied, up to `limit` bytes, for retries.
    pub fn teed(body: BoxBody, limit: usize) -> Self {
        ReplayBody::Teed(Arc::new(std::sync::Mutex::new(Tee {
            ended: body.is_end_stream(),
            inner: Some(body),
            frames: Some(Vec::new()),
            read: 0,
            size: 0,
            limit,
            attempts: 0,
        })))
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
            ReplayBody::Teed(tee) => {
                let tee = tee.lock().expect("tee lock");
                tee.attempts == 0 || tee.frames.is_some()
            }
        }
    }

    /// Whether the body can be copied (mirrors need their own copy).
    pub fn is_buffered(&self) -> bool {
        matches!(self, ReplayBody::Buffered { .. })
    }

    /// The body for one attempt: a copy when buffered, the stream itself (once) otherwise; a
    /// teed body from its start, while it can be replayed. A teed body handed to an earlier
    /// attempt ends where it is: that attempt is over.
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
            ReplayBody::Teed(shared) => {
                let mut tee = shared.lock().expect("tee lock");
                if tee.attempts > 0 && tee.frames.is_none() {
                    return None;
                }
                tee.attempts += 1;
                Some(
                    TeeBody {
                        tee: shared.clone(),
                        attempt: tee.attempts,
                        position: 0,
                    }
                    .boxed_unsync(),
                )
            }
        }
    }
}

/// One attempt's view of a [`Tee`]: the frames copied so far from its start, then the client's
/// body itself, copied on the way.
struct TeeBody {
    tee: Arc<std::sync::Mutex<Tee>>,
    attempt: u32,
    /// Frames of the client's body this attempt has sent.
    position: usize,
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let mut tee = this.tee.lock().expect("tee lock");
        if tee.attempts != this.attempt {
            // A later attempt took over: this one's stream ends here.
            return Poll::Ready(None);
        }
        if this.position < tee.read {
            // Behind the client: replay. The copy is whole here, since `take` hands out a body
            // only while it is, and only the attempt at the front reads (and copies) on.
            let frame = tee
                .frames
                .as_ref()
                .and_then(|frames| frames.get(this.position))
                .and_then(copy_frame);
            this.position += 1;
            return Poll::Ready(frame.map(Ok));
        }
        let Some(inner) = tee.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let ended = tee.inner.as_ref().is_none_or(|b| b.is_end_stream());
                tee.record(frame);
                this.position += 1;
                // The sender ends the stream on the last frame when the body says it is over.
                tee.ended |= ended;
            }
            // A broken body is not one to send again.
            Poll::Ready(Some(Err(_))) => tee.frames = None,
            Poll::Ready(None) => {
                tee.ended = true;
                tee.inner = None;
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let tee = self.tee.lock().expect("tee lock");
        tee.attempts != self.attempt || (self.position >= tee.read && tee.ended)
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

#[cfg(test)]
mod tests {
    use super::GrpcMessages;

    /// Messages of 0, 1, 300 and 70,000 payload bytes, framed as gRPC frames them.
    fn stream() -> Vec<u8> {
        let mut bytes = Vec::new();
        for (flag, size) in [(0u8, 0usize), (1, 1), (0, 300), (0, 70_000)] {
            bytes.push(flag);
            bytes.extend_from_slice(&(size as u32).to_be_bytes());
            bytes.extend(std::iter::repeat_n(0u8, size));
        }
        bytes
    }

    #[test]
    fn grpc_messages_count_however_the_frames_split_them() {
        let bytes = stream();
        let mut whole = GrpcMessages::default();
        whole.inspect(&bytes);
        assert_eq!(whole.count(), 4);
        // Every split point, prefixes included, and byte by byte.
        for at in 0..=bytes.len() {
            let mut split = GrpcMessages::default();
            split.inspect(&bytes[..at]);
            split.inspect(&bytes[at..]);
            assert_eq!(split.count(), 4, "split at {at}");
        }
        let mut bytewise = GrpcMessages::default();
        for byte in &bytes {
            bytewise.inspect(std::slice::from_ref(byte));
        }
        assert_eq!(bytewise.count(), 4);
        // A message counts from its first byte, as Envoy's frame inspector counts it.
        let mut started = GrpcMessages::default();
        started.inspect(&bytes[..6]);
        assert_eq!(started.count(), 2);
    }
}
