//! Body wrappers that measure streamed bodies without buffering them: [`CountingBody`] counts a
//! request body's bytes as they go upstream; [`ObservedBody`] counts a response body's bytes and
//! records the request's metrics when the response ends (or is abandoned).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};

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

/// What is recorded once a request is over.
pub struct Completion {
    pub metrics: Arc<Metrics>,
    pub labels: RequestLabels,
    pub start: Instant,
    /// Request headers and body bytes, the body part still growing while it streams.
    pub request_bytes: Arc<AtomicU64>,
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
            c.metrics.request(
                &c.labels,
                c.start.elapsed(),
                c.request_bytes.load(Ordering::Relaxed),
                self.response_bytes,
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
