//! A request through several plugins in order: request callbacks run first to last, response
//! callbacks last to first (as Envoy runs encoder filters), each filter seeing what the previous
//! one left. The first filter that answers or resets the request ends the phase.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::abi::Pairs;
use crate::context::StreamInfo;
use crate::plugin::Plugin;
use crate::stream::{BodyStep, HttpStream, Step};

/// One request's contexts in each plugin of a chain.
#[derive(Default)]
pub struct FilterChain {
    streams: Vec<HttpStream>,
    /// Body bytes released by a trailers phase (held by a filter that paused every chunk), to
    /// send before the trailers.
    released: BytesMut,
}

impl FilterChain {
    pub fn new<'a>(
        plugins: impl IntoIterator<Item = &'a Arc<Plugin>>,
        info: Arc<StreamInfo>,
    ) -> Self {
        FilterChain {
            streams: plugins
                .into_iter()
                .map(|plugin| plugin.http_stream(info.clone()))
                .collect(),
            released: BytesMut::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    pub async fn request_headers(&mut self, headers: &mut Pairs, end_of_stream: bool) -> Step {
        for stream in &mut self.streams {
            let step = stream.request_headers(headers, end_of_stream).await;
            if step != Step::Continue {
                return step;
            }
        }
        Step::Continue
    }

    pub async fn request_body(&mut self, chunk: Bytes, end_of_stream: bool) -> BodyStep {
        let mut data = chunk;
        for stream in &mut self.streams {
            match stream.request_body(data, end_of_stream).await {
                BodyStep::Forward(out) => data = out,
                other => return other,
            }
        }
        BodyStep::Forward(data)
    }

    /// Trailers through every filter. A filter that still holds body bytes releases them once
    /// its trailers callback continued; they pass the filters after it as a body chunk and are
    /// then in [`FilterChain::take_released_body`], to be sent before the trailers.
    pub async fn request_trailers(&mut self, trailers: &mut Pairs) -> Step {
        for index in 0..self.streams.len() {
            let step = self.streams[index].request_trailers(trailers).await;
            if step != Step::Continue {
                return step;
            }
            let mut held = self.streams[index].take_held_request_body();
            for later in &mut self.streams[index + 1..] {
                if held.is_empty() {
                    break;
                }
                match later.request_body(held, false).await {
                    BodyStep::Forward(out) => held = out,
                    BodyStep::Buffered => held = Bytes::new(),
                    BodyStep::Respond(response) => return Step::Respond(response),
                    BodyStep::Reset => return Step::Reset,
                }
            }
            self.released.extend_from_slice(&held);
        }
        Step::Continue
    }

    /// Body bytes the last trailers phase released (see [`FilterChain::request_trailers`]).
    pub fn take_released_body(&mut self) -> Bytes {
        self.released.split().freeze()
    }

    pub async fn response_headers(&mut self, headers: &mut Pairs, end_of_stream: bool) -> Step {
        for stream in self.streams.iter_mut().rev() {
            let step = stream.response_headers(headers, end_of_stream).await;
            if step != Step::Continue {
                return step;
            }
        }
        Step::Continue
    }

    pub async fn response_body(&mut self, chunk: Bytes, end_of_stream: bool) -> BodyStep {
        let mut data = chunk;
        for stream in self.streams.iter_mut().rev() {
            match stream.response_body(data, end_of_stream).await {
                BodyStep::Forward(out) => data = out,
                other => return other,
            }
        }
        BodyStep::Forward(data)
    }

    /// Response trailers, last filter first; held body bytes are released as for requests.
    pub async fn response_trailers(&mut self, trailers: &mut Pairs) -> Step {
        for index in (0..self.streams.len()).rev() {
            let step = self.streams[index].response_trailers(trailers).await;
            if step != Step::Continue {
                return step;
            }
            let mut held = self.streams[index].take_held_response_body();
            for earlier in self.streams[..index].iter_mut().rev() {
                if held.is_empty() {
                    break;
                }
                match earlier.response_body(held, false).await {
                    BodyStep::Forward(out) => held = out,
                    BodyStep::Buffered => held = Bytes::new(),
                    BodyStep::Respond(response) => return Step::Respond(response),
                    BodyStep::Reset => return Step::Reset,
                }
            }
            self.released.extend_from_slice(&held);
        }
        Step::Continue
    }

    /// `proxy_on_log` in every plugin: call once when the request is over. A chain dropped
    /// without it still finishes its contexts (without `proxy_on_log`), in the background.
    pub async fn log(&mut self) {
        for stream in &mut self.streams {
            stream.log().await;
        }
    }
}
