//! A request through several plugins in order: request callbacks run first to last, response
//! callbacks last to first (as Envoy runs encoder filters), each filter seeing what the previous
//! one left. The first filter that answers or resets the request ends the phase.

use std::sync::Arc;

use bytes::Bytes;

use crate::abi::Pairs;
use crate::context::StreamInfo;
use crate::plugin::Plugin;
use crate::stream::{BodyStep, HttpStream, Step};

/// One request's contexts in each plugin of a chain.
pub struct FilterChain {
    streams: Vec<HttpStream>,
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

    pub async fn request_trailers(&mut self, trailers: &mut Pairs) -> Step {
        for stream in &mut self.streams {
            let step = stream.request_trailers(trailers).await;
            if step != Step::Continue {
                return step;
            }
        }
        Step::Continue
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

    pub async fn response_trailers(&mut self, trailers: &mut Pairs) -> Step {
        for stream in self.streams.iter_mut().rev() {
            let step = stream.response_trailers(trailers).await;
            if step != Step::Continue {
                return step;
            }
        }
        Step::Continue
    }

    /// `proxy_on_log` in every plugin: call once when the request is over.
    pub fn log(&mut self) {
        for stream in &mut self.streams {
            stream.log();
        }
    }
}
