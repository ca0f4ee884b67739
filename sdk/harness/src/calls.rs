//! `proxy_http_call` in tests: the host hands every call to [`TestCaller`], which records it and
//! answers from the test's closure (optionally after a delay, to exercise timeouts).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_wasm_host::http_call::BoxFuture;
use ambit_wasm_host::{HttpCallRequest, HttpCallResponse, HttpCaller};

/// The test's answer to a call: `None` is a failed call (the filter sees zero headers).
pub(crate) type Answer = Arc<dyn Fn(&HttpCallRequest) -> Option<HttpCallResponse> + Send + Sync>;

pub(crate) struct TestCaller {
    answer: Mutex<Answer>,
    delay: Mutex<Duration>,
    made: Mutex<Vec<HttpCallRequest>>,
}

impl TestCaller {
    pub fn new(answer: Answer, delay: Duration) -> Self {
        TestCaller {
            answer: Mutex::new(answer),
            delay: Mutex::new(delay),
            made: Mutex::new(Vec::new()),
        }
    }

    pub fn set_answer(&self, answer: Answer) {
        *self.answer.lock().unwrap_or_else(|e| e.into_inner()) = answer;
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap_or_else(|e| e.into_inner()) = delay;
    }

    /// How many calls were made so far (a mark for [`TestCaller::since`]).
    pub fn count(&self) -> usize {
        self.made.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn since(&self, mark: usize) -> Vec<HttpCallRequest> {
        let made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        made.get(mark..).unwrap_or_default().to_vec()
    }
}

impl HttpCaller for TestCaller {
    fn call(&self, request: HttpCallRequest) -> BoxFuture<Option<HttpCallResponse>> {
        let answer = self
            .answer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let delay = *self.delay.lock().unwrap_or_else(|e| e.into_inner());
        let response = answer(&request);
        self.made
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(request);
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            response
        })
    }
}
