//! `ambit filter serve`: the Wasm host for filter tests in another process. Speaks
//! `ambit_filter_test::protocol` (JSON lines) on stdin and stdout: loads modules, runs requests
//! through them (several at once), asks the test process for upstream responses and for the
//! answers to the filters' HTTP calls. Exits when stdin closes (the test process ended).

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ambit_filter_test::protocol::{
    Answer, ClientMessage, Done, FilterState, LoadSpec, RunSpec, ServerMessage, PROTOCOL,
};
use ambit_filter_test::Response;
use ambit_wasm_host::http_call::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use super::host::{self, Loaded};

/// The server's state, shared by the tasks of the requests in flight.
struct Server {
    out: mpsc::UnboundedSender<ServerMessage>,
    filters: Mutex<HashMap<u64, Arc<Loaded>>>,
    /// Questions asked of the test process, by id.
    questions: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    next: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn run() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(serve());
    // Plugins' background tasks never end by themselves: stop here, not in the runtime's drop.
    std::process::exit(0)
}

async fn serve() {
    let (out, mut outgoing) = mpsc::unbounded_channel::<ServerMessage>();
    // Plain threads for stdio (the workspace's Tokio has no `io-std`); one writer, so lines
    // never interleave.
    std::thread::spawn(move || {
        let mut stdout = std::io::stdout().lock();
        while let Some(message) = outgoing.blocking_recv() {
            let mut line = serde_json::to_vec(&message).expect("protocol messages serialize");
            line.push(b'\n');
            if stdout
                .write_all(&line)
                .and_then(|()| stdout.flush())
                .is_err()
            {
                break;
            }
        }
    });
    let (lines_tx, mut lines) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let server = Arc::new(Server {
        out,
        filters: Mutex::default(),
        questions: Mutex::default(),
        next: AtomicU64::new(1),
    });
    server.send(ServerMessage::Hello {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        protocol: PROTOCOL,
    });
    while let Some(line) = lines.recv().await {
        match serde_json::from_str::<ClientMessage>(&line) {
            Ok(message) => server.clone().handle(message),
            // Without an id there is no one to answer: say it where a person will look.
            Err(e) => eprintln!("ambit filter serve: ignoring a line that is not a request ({e})"),
        }
    }
    // stdin closed: the test process is gone, and whatever still runs has no one to answer to.
}

impl Server {
    fn send(&self, message: ServerMessage) {
        let _ = self.out.send(message);
    }

    fn answer(&self, id: u64, result: Result<Done, String>) {
        self.send(match result {
            Ok(done) => ServerMessage::Done { id, done },
            Err(message) => ServerMessage::Failed { id, message },
        });
    }

    fn filter(&self, id: u64) -> Result<Arc<Loaded>, String> {
        lock(&self.filters)
            .get(&id)
            .cloned()
            .ok_or_else(|| format!("no filter {id} is loaded"))
    }

    /// Asks the test process a question and waits for its answer.
    async fn ask(&self, question: impl FnOnce(u64) -> ServerMessage) -> Option<Answer> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.questions).insert(id, tx);
        self.send(question(id));
        rx.await.ok()
    }

    fn handle(self: Arc<Self>, message: ClientMessage) {
        match message {
            ClientMessage::Load { id, spec } => {
                // Compiling a module takes a while: off the workers that carry requests.
                tokio::task::spawn_blocking(move || {
                    let result = self.load(&spec).map(|filter| Done::Loaded { filter });
                    self.answer(id, result);
                });
            }
            ClientMessage::Run {
                id,
                filters,
                request,
            } => {
                tokio::spawn(async move {
                    let result = self.run(id, &filters, request).await;
                    self.answer(id, result);
                });
            }
            ClientMessage::Inspect { id, filter } => {
                let result = self.filter(filter).map(|f| {
                    Done::State(Box::new(FilterState {
                        logs: f.logs(),
                        calls: f.calls(),
                        failures: f.failures(),
                        metrics: host::metrics(),
                    }))
                });
                self.answer(id, result);
            }
            ClientMessage::Unload { id, filter } => {
                lock(&self.filters).remove(&filter);
                self.answer(id, Ok(Done::Unloaded));
            }
            ClientMessage::Reply { id, answer } => {
                // A late answer (the call already timed out) has no one waiting: dropped.
                if let Some(waiting) = lock(&self.questions).remove(&id) {
                    let _ = waiting.send(answer);
                }
            }
        }
    }

    fn load(self: &Arc<Self>, spec: &LoadSpec) -> Result<u64, String> {
        let filter = self.next.fetch_add(1, Ordering::Relaxed);
        let server = Arc::downgrade(self);
        let answer: host::Answerer = Arc::new(move |request| -> BoxFuture<_> {
            let server = server.clone();
            Box::pin(async move {
                let server = server.upgrade()?;
                match server
                    .ask(|id| ServerMessage::Call {
                        id,
                        filter,
                        request,
                    })
                    .await
                {
                    Some(Answer::Call(response)) => response,
                    _ => None,
                }
            })
        });
        let loaded = Loaded::load(spec, format!("ambit-filter-test/{filter}"), answer)
            .map_err(|e| e.to_string())?;
        lock(&self.filters).insert(filter, Arc::new(loaded));
        Ok(filter)
    }

    async fn run(&self, id: u64, filters: &[u64], request: RunSpec) -> Result<Done, String> {
        if filters.is_empty() {
            return Err("a run needs at least one filter".into());
        }
        let filters = filters
            .iter()
            .map(|f| self.filter(*f))
            .collect::<Result<Vec<_>, _>>()?;
        let outcome = host::run(&filters, request, |sent| async move {
            match self
                .ask(|question| ServerMessage::Upstream {
                    id: question,
                    run: id,
                    request: sent,
                })
                .await
            {
                Some(Answer::Upstream(response)) => response,
                _ => Response::new(502).body("the test process gave no upstream response"),
            }
        })
        .await;
        Ok(Done::Ran(Box::new(outcome)))
    }
}
