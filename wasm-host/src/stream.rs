//! One request through one plugin: the HTTP callbacks in order, each phase returning only once the
//! filter let the request go on (or answered it). A filter that pauses is waited for: its HTTP
//! calls are carried and their responses delivered, and a resume from a tick or queue callback is
//! noticed. A failing VM fails the request per the plugin's `failStrategy`.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::abi::{Action, Pairs};
use crate::context::{LocalResponse, OutgoingCall, StreamData, StreamInfo};
use crate::http_call::{BoxFuture, HttpCallResponse};
use crate::plugin::{Admit, Caller, FailStrategy, Plugin};
use crate::vm::{HttpCallback, VmFailure};

/// How a headers or trailers phase ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Go on (headers as the filter left them).
    Continue,
    /// Answer the client with this instead of going on.
    Respond(LocalResponse),
    /// Reset the stream (`proxy_close_stream`).
    Reset,
}

/// How a body chunk fared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyStep {
    /// Pass these bytes on: the chunk, or everything held since the filter paused, as the filter
    /// left it.
    Forward(Bytes),
    /// The filter holds the body until more (or the end) arrives.
    Buffered,
    Respond(LocalResponse),
    Reset,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

type PendingCall = BoxFuture<(u32, Option<HttpCallResponse>)>;

/// A request's context in one plugin.
pub struct HttpStream {
    plugin: Arc<Plugin>,
    slot: usize,
    /// The generation of the VM holding the request's context, once the first callback
    /// created it.
    generation: Option<u64>,
    data: Box<StreamData>,
    /// Calls the filter made and waits for; created with the first call (most requests make
    /// none, and an empty `FuturesUnordered` still allocates).
    pending: Option<FuturesUnordered<PendingCall>>,
    /// Set when the plugin failed open for this request: callbacks are skipped.
    bypass: bool,
    /// Set once the context is gone (VM failure or finished).
    finished: bool,
}

impl HttpStream {
    pub(crate) fn new(plugin: Arc<Plugin>, slot: usize, info: Arc<StreamInfo>) -> Self {
        HttpStream {
            plugin,
            slot,
            generation: None,
            data: Box::new(StreamData {
                info,
                ..Default::default()
            }),
            pending: None,
            bypass: false,
            finished: false,
        }
    }

    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    /// `proxy_on_request_headers`; `headers` include `:method`, `:path`, `:authority`, `:scheme`.
    pub async fn request_headers(&mut self, headers: &mut Pairs, end_of_stream: bool) -> Step {
        self.data.request_headers = std::mem::take(headers);
        self.data.request_end = end_of_stream;
        let count = self.data.request_headers.len();
        let step = self
            .phase(
                HttpCallback::RequestHeaders {
                    count,
                    end: end_of_stream,
                },
                Direction::Request,
            )
            .await;
        *headers = std::mem::take(&mut self.data.request_headers);
        step
    }

    /// `proxy_on_request_body` with the chunk added to whatever the filter holds.
    pub async fn request_body(&mut self, chunk: Bytes, end_of_stream: bool) -> BodyStep {
        self.body(chunk, end_of_stream, Direction::Request).await
    }

    pub async fn request_trailers(&mut self, trailers: &mut Pairs) -> Step {
        self.data.request_trailers = std::mem::take(trailers);
        self.data.request_end = true;
        let count = self.data.request_trailers.len();
        let step = self
            .phase(HttpCallback::RequestTrailers { count }, Direction::Request)
            .await;
        *trailers = std::mem::take(&mut self.data.request_trailers);
        step
    }

    /// The request body this filter still holds (it paused every chunk and the stream ended with
    /// trailers, so no callback saw `end_of_stream`): once its trailers callback continued, the
    /// bytes go on, before the trailers.
    pub fn take_held_request_body(&mut self) -> Bytes {
        self.take_body(Direction::Request, Bytes::new())
    }

    /// The response body this filter still holds; see [`HttpStream::take_held_request_body`].
    pub fn take_held_response_body(&mut self) -> Bytes {
        self.take_body(Direction::Response, Bytes::new())
    }

    /// `proxy_on_response_headers`; `headers` include `:status`.
    pub async fn response_headers(&mut self, headers: &mut Pairs, end_of_stream: bool) -> Step {
        self.data.response_headers = std::mem::take(headers);
        self.data.response_end = end_of_stream;
        let count = self.data.response_headers.len();
        let step = self
            .phase(
                HttpCallback::ResponseHeaders {
                    count,
                    end: end_of_stream,
                },
                Direction::Response,
            )
            .await;
        *headers = std::mem::take(&mut self.data.response_headers);
        step
    }

    pub async fn response_body(&mut self, chunk: Bytes, end_of_stream: bool) -> BodyStep {
        self.body(chunk, end_of_stream, Direction::Response).await
    }

    pub async fn response_trailers(&mut self, trailers: &mut Pairs) -> Step {
        self.data.response_trailers = std::mem::take(trailers);
        self.data.response_end = true;
        let count = self.data.response_trailers.len();
        let step = self
            .phase(
                HttpCallback::ResponseTrailers { count },
                Direction::Response,
            )
            .await;
        *trailers = std::mem::take(&mut self.data.response_trailers);
        step
    }

    /// `proxy_on_log`: the request is over; called once. The context is finished at the same
    /// time (`proxy_on_done`, `proxy_on_delete`), sparing a second visit to the VM on drop.
    pub async fn log(&mut self) {
        if self.bypass || self.finished {
            return;
        }
        self.pending = None;
        if let Some(generation) = self.generation {
            let finished = self
                .plugin
                .log_and_finish(self.slot, generation, &mut self.data)
                .await;
            if let Err(failure) = finished {
                tracing::debug!(plugin = %self.plugin.name(), error = %failure, "proxy_on_log failed");
            }
        }
        self.finished = true;
        // Whatever the embedder calls after the log, the context is gone: pass it through.
        self.bypass = true;
    }

    async fn phase(&mut self, callback: HttpCallback, direction: Direction) -> Step {
        if self.bypass {
            return Step::Continue;
        }
        match self.invoke(callback).await {
            Ok(action) => self.settle(action, direction).await,
            Err(step) => step,
        }
    }

    async fn body(&mut self, chunk: Bytes, end: bool, direction: Direction) -> BodyStep {
        if self.bypass {
            return BodyStep::Forward(self.take_body(direction, chunk));
        }
        let limit = self.plugin.limits().max_buffered_body;
        let buffer = match direction {
            Direction::Request => {
                self.data.request_end = end;
                &mut self.data.request_body
            }
            Direction::Response => {
                self.data.response_end = end;
                &mut self.data.response_body
            }
        };
        buffer.extend_from_slice(&chunk);
        let size = buffer.len();
        if size > limit {
            return BodyStep::Respond(too_large(direction));
        }
        let callback = match direction {
            Direction::Request => HttpCallback::RequestBody { size, end },
            Direction::Response => HttpCallback::ResponseBody { size, end },
        };
        let action = match self.invoke(callback).await {
            Ok(action) => action,
            Err(step) => return self.body_step(step, direction),
        };
        if std::mem::take(&mut self.data.body_too_large) {
            return BodyStep::Respond(too_large(direction));
        }
        // A filter that answered or reset from its body callback is acted on now, not when
        // the next chunk comes.
        let answered = self.data.local_response.is_some() || self.data.reset;
        if action == Action::Pause && !end && !self.has_pending() && !answered {
            return BodyStep::Buffered;
        }
        let step = self.settle(action, direction).await;
        self.body_step(step, direction)
    }

    fn body_step(&mut self, step: Step, direction: Direction) -> BodyStep {
        match step {
            Step::Continue => BodyStep::Forward(self.take_body(direction, Bytes::new())),
            Step::Respond(response) => BodyStep::Respond(response),
            Step::Reset => BodyStep::Reset,
        }
    }

    /// Everything held for `direction`, plus `extra` (a chunk that bypassed the filter).
    fn take_body(&mut self, direction: Direction, extra: Bytes) -> Bytes {
        let buffer: &mut BytesMut = match direction {
            Direction::Request => &mut self.data.request_body,
            Direction::Response => &mut self.data.response_body,
        };
        if buffer.is_empty() {
            return extra;
        }
        buffer.extend_from_slice(&extra);
        buffer.split().freeze()
    }

    fn has_pending(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| !p.is_empty())
    }

    /// Runs a callback (the first one creates the request's context, in the same visit to the
    /// VM); a failure is turned into the plugin's fail strategy at once.
    async fn invoke(&mut self, callback: HttpCallback) -> Result<Action, Step> {
        let data = &mut self.data;
        let visit = match self.generation {
            Some(generation) => {
                let caller = Caller::Stream(data.context_id);
                self.plugin
                    .with_vm(
                        self.slot,
                        Some(generation),
                        caller,
                        Admit::Request,
                        async |vm| vm.http_callback(data, callback).await,
                    )
                    .await
            }
            None => {
                self.plugin
                    .with_vm(
                        self.slot,
                        None,
                        Caller::NewStream,
                        Admit::Request,
                        async |vm| {
                            data.context_id = vm.create_http_context().await?;
                            vm.http_callback(data, callback).await
                        },
                    )
                    .await
            }
        };
        match visit {
            Ok((raw, calls, generation)) => {
                self.generation = Some(generation);
                self.carry(calls);
                Ok(Action::from_raw(raw))
            }
            Err(failure) => Err(self.fail(failure)),
        }
    }

    /// Waits until a paused filter lets the request go on, answers it, or fails.
    async fn settle(&mut self, action: Action, direction: Direction) -> Step {
        loop {
            if let Some(response) = self.data.local_response.take() {
                return Step::Respond(response);
            }
            if self.data.reset {
                return Step::Reset;
            }
            let resumed = match direction {
                Direction::Request => std::mem::take(&mut self.data.resume_request),
                Direction::Response => std::mem::take(&mut self.data.resume_response),
            };
            if action == Action::Continue || resumed {
                return Step::Continue;
            }
            // Never 0 once a callback ran: a stale generation finds the VM gone.
            let generation = self.generation.unwrap_or_default();
            let resumed = self.plugin.resumed.notified();
            // A tick or queue callback may have resumed this request between the callback that
            // paused it and the waiter above: checked after the waiter exists, so a resume is
            // either seen here or wakes it.
            if self
                .plugin
                .take_resumed(self.slot, generation, self.data.context_id)
                .await
            {
                return Step::Continue;
            }
            let has_pending = self.has_pending();
            tokio::select! {
                Some((token, response)) = next_pending(&mut self.pending), if has_pending => {
                    let data = &mut self.data;
                    match self.plugin.deliver(self.slot, generation, data, token, response).await {
                        Ok(calls) => self.carry(calls),
                        Err(failure) => return self.fail(failure),
                    }
                }
                () = resumed => {
                    if self.plugin.take_resumed(self.slot, generation, self.data.context_id).await {
                        match direction {
                            Direction::Request => self.data.resume_request = true,
                            Direction::Response => self.data.resume_response = true,
                        }
                    }
                }
            }
        }
    }

    /// Starts the calls the filter made; their responses are delivered while it waits.
    fn carry(&mut self, calls: Vec<OutgoingCall>) {
        if calls.is_empty() {
            return;
        }
        let pending = self.pending.get_or_insert_with(FuturesUnordered::new);
        for call in calls {
            let request = self.plugin.hooks().http.call(call.request.clone());
            let timeout = call.request.timeout;
            let token = call.token;
            pending.push(Box::pin(async move {
                let response = tokio::time::timeout(timeout, request).await.ok().flatten();
                (token, response)
            }));
        }
    }

    fn fail(&mut self, failure: VmFailure) -> Step {
        self.pending = None;
        let strategy = self.plugin.fail_strategy();
        if failure.is_refusal() {
            // Refused before the guest: the VM, and the request's context in it (if any), are
            // fine; dropping the stream finishes the context. Logged per circuit or
            // saturation episode, not per request.
            tracing::debug!(plugin = %self.plugin.name(), error = %failure, ?strategy, "wasm filter refused a request");
        } else {
            self.finished = true;
            tracing::warn!(plugin = %self.plugin.name(), error = %failure, ?strategy, "wasm filter failed for a request");
        }
        match strategy {
            FailStrategy::FailOpen => {
                self.bypass = true;
                Step::Continue
            }
            FailStrategy::FailClose => {
                Step::Respond(local(500, "wasm_fail_close", "wasm filter failed"))
            }
        }
    }
}

impl Drop for HttpStream {
    fn drop(&mut self) {
        if let (false, Some(generation)) = (self.finished, self.generation) {
            self.finished = true;
            let data = std::mem::take(&mut self.data);
            self.plugin.finish_stream_later(self.slot, generation, data);
        }
    }
}

async fn next_pending(
    pending: &mut Option<FuturesUnordered<PendingCall>>,
) -> Option<(u32, Option<HttpCallResponse>)> {
    match pending {
        Some(pending) => pending.next().await,
        None => None,
    }
}

/// Envoy's answers to a body past the buffer limit.
fn too_large(direction: Direction) -> LocalResponse {
    match direction {
        Direction::Request => local(413, "request_payload_too_large", "Payload Too Large"),
        Direction::Response => local(500, "response_payload_too_large", "Internal Server Error"),
    }
}

fn local(status: u16, details: &str, body: &str) -> LocalResponse {
    LocalResponse {
        status,
        details: details.to_owned(),
        headers: vec![("content-type".to_owned(), b"text/plain".to_vec())],
        body: body.as_bytes().to_vec(),
        grpc_status: None,
    }
}
