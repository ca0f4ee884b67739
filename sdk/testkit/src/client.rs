//! The test process's side of [`crate::protocol`]: one `ambit filter serve` child per test
//! process, shared by every test thread. Requests carry ids; a reader thread hands each answer
//! to the thread that waits for it, and answers the filters' HTTP calls itself.
//!
//! Which `ambit`: `AMBIT_BIN` (`ambit filter test` sets it to itself); else, for tests of the
//! Ambit workspace, the `ambit` that `cargo test --workspace` built beside the test binary
//! (`target/debug/ambit`); else `ambit` on `PATH`.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::calls::{Answer, HttpCallRequest};
use crate::outcome::{Outcome, Upstream};
use crate::protocol::{
    Answer as Reply, ClientMessage, Done, FilterState, LoadSpec, RunSpec, ServerMessage, PROTOCOL,
};
use crate::request::Response;
use crate::HarnessError;

/// Lines of the server's stderr kept to explain its exit.
const STDERR_TAIL: usize = 20;

/// What a waiting thread receives.
enum Event {
    Done(Done),
    Failed(String),
    Upstream { id: u64, request: Upstream },
}

/// A filter's call answering.
struct Calls {
    answer: Answer,
    delay: Duration,
}

pub(crate) struct Client {
    stdin: Mutex<ChildStdin>,
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, Sender<Event>>>,
    calls: Mutex<HashMap<u64, Calls>>,
    /// Why the server is gone, once it is.
    gone: Mutex<Option<String>>,
    stderr: Arc<Mutex<VecDeque<String>>>,
    _child: Mutex<Child>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Client {
    /// The process's client, started on first use.
    pub fn get() -> Result<&'static Client, HarnessError> {
        static CLIENT: OnceLock<Result<&'static Client, String>> = OnceLock::new();
        CLIENT
            .get_or_init(|| {
                let client = Client::start()?;
                let client: &'static Client = Box::leak(Box::new(client));
                let stdout = lock(&client._child)
                    .stdout
                    .take()
                    .expect("the server's stdout is piped");
                std::thread::Builder::new()
                    .name("ambit-filter-serve".into())
                    .spawn(move || client.read(BufReader::new(stdout)))
                    .map_err(|e| format!("starting the reader thread: {e}"))?;
                Ok(client)
            })
            .clone()
            .map_err(HarnessError::Server)
    }

    fn start() -> Result<Client, String> {
        let binary = ambit_binary();
        let mut child = Command::new(&binary)
            .args(["filter", "serve"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!(
                    "starting `{} filter serve`: {e} (set AMBIT_BIN to the ambit binary, or run \
                     the tests with `ambit filter test`)",
                    binary.display()
                )
            })?;
        let stderr: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let tail = stderr.clone();
        let child_stderr = child.stderr.take().expect("stderr is piped");
        std::thread::spawn(move || {
            for line in BufReader::new(child_stderr).lines().map_while(Result::ok) {
                let mut tail = lock(&tail);
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut hello = String::new();
        let _ = stdout.read_line(&mut hello);
        match serde_json::from_str::<ServerMessage>(&hello) {
            Ok(ServerMessage::Hello { protocol, .. }) if protocol == PROTOCOL => {}
            Ok(ServerMessage::Hello { version, protocol }) => {
                return Err(format!(
                    "{} (ambit {version}) speaks filter protocol {protocol}, this \
                     ambit-filter-test speaks {PROTOCOL}: use the ambit that made the crate",
                    binary.display()
                ))
            }
            _ => {
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(50));
                return Err(format!(
                    "`{} filter serve` did not start: {}",
                    binary.display(),
                    lock(&stderr).iter().cloned().collect::<Vec<_>>().join("\n")
                ));
            }
        }
        child.stdout = Some(stdout.into_inner());
        let stdin = child.stdin.take().expect("stdin is piped");
        Ok(Client {
            stdin: Mutex::new(stdin),
            next_id: AtomicU64::new(1),
            waiting: Mutex::default(),
            calls: Mutex::default(),
            gone: Mutex::default(),
            stderr,
            _child: Mutex::new(child),
        })
    }

    /// The reader thread: answers go to their waiters, calls are answered here.
    fn read(&'static self, stdout: impl BufRead) {
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            let message = match serde_json::from_str::<ServerMessage>(&line) {
                Ok(message) => message,
                Err(e) => {
                    eprintln!("ambit-filter-test: ignoring a line from the server ({e}): {line}");
                    continue;
                }
            };
            match message {
                ServerMessage::Hello { .. } => {}
                ServerMessage::Done { id, done } => self.deliver(id, Event::Done(done), true),
                ServerMessage::Failed { id, message } => {
                    self.deliver(id, Event::Failed(message), true)
                }
                ServerMessage::Upstream { id, run, request } => {
                    self.deliver(run, Event::Upstream { id, request }, false)
                }
                ServerMessage::Call {
                    id,
                    filter,
                    request,
                } => self.answer_call(id, filter, request),
            }
        }
        // The server exited: fail whoever waits, and every later request.
        std::thread::sleep(Duration::from_millis(50));
        let why = format!(
            "`ambit filter serve` exited; its last lines:\n{}",
            lock(&self.stderr)
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        *lock(&self.gone) = Some(why.clone());
        for (_, waiter) in lock(&self.waiting).drain() {
            let _ = waiter.send(Event::Failed(why.clone()));
        }
    }

    fn deliver(&self, id: u64, event: Event, last: bool) {
        let mut waiting = lock(&self.waiting);
        let waiter = if last {
            waiting.remove(&id)
        } else {
            waiting.get(&id).cloned()
        };
        if let Some(waiter) = waiter {
            let _ = waiter.send(event);
        }
    }

    fn answer_call(&'static self, id: u64, filter: u64, request: HttpCallRequest) {
        let Some((answer, delay)) = lock(&self.calls)
            .get(&filter)
            .map(|c| (c.answer.clone(), c.delay))
        else {
            let _ = self.send(&ClientMessage::Reply {
                id,
                answer: Reply::Call(None),
            });
            return;
        };
        // A thread per call: answers may be delayed, and a slow answer must not hold the others.
        std::thread::spawn(move || {
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            let response =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| answer(&request)))
                    .unwrap_or(None);
            let _ = self.send(&ClientMessage::Reply {
                id,
                answer: Reply::Call(response),
            });
        });
    }

    fn send(&self, message: &ClientMessage) -> Result<(), HarnessError> {
        let mut line = serde_json::to_vec(message).expect("protocol messages serialize");
        line.push(b'\n');
        let mut stdin = lock(&self.stdin);
        stdin
            .write_all(&line)
            .and_then(|()| stdin.flush())
            .map_err(|e| {
                HarnessError::Server(
                    lock(&self.gone)
                        .clone()
                        .unwrap_or_else(|| format!("writing to `ambit filter serve`: {e}")),
                )
            })
    }

    /// Sends a request and returns its id and where its events arrive.
    fn request(
        &self,
        message: impl FnOnce(u64) -> ClientMessage,
    ) -> Result<(u64, Receiver<Event>), HarnessError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = channel();
        {
            if let Some(why) = lock(&self.gone).clone() {
                return Err(HarnessError::Server(why));
            }
            lock(&self.waiting).insert(id, tx);
        }
        if let Err(e) = self.send(&message(id)) {
            lock(&self.waiting).remove(&id);
            return Err(e);
        }
        Ok((id, rx))
    }

    /// A request with one answer.
    fn call(&self, message: impl FnOnce(u64) -> ClientMessage) -> Result<Done, HarnessError> {
        let (_, rx) = self.request(message)?;
        match rx.recv() {
            Ok(Event::Done(done)) => Ok(done),
            Ok(Event::Failed(message)) => Err(HarnessError::Server(message)),
            Ok(Event::Upstream { .. }) | Err(_) => Err(HarnessError::Server(
                "`ambit filter serve` answered out of turn".into(),
            )),
        }
    }

    pub fn load(
        &self,
        spec: LoadSpec,
        answer: Answer,
        delay: Duration,
    ) -> Result<u64, HarnessError> {
        let module = spec.module.clone();
        match self.call(|id| ClientMessage::Load { id, spec }) {
            Ok(Done::Loaded { filter }) => {
                lock(&self.calls).insert(filter, Calls { answer, delay });
                Ok(filter)
            }
            Ok(_) => Err(HarnessError::Server("unexpected answer to load".into())),
            Err(HarnessError::Server(message)) if lock(&self.gone).is_none() => {
                Err(HarnessError::Load { module, message })
            }
            Err(e) => Err(e),
        }
    }

    pub fn run(
        &self,
        filters: Vec<u64>,
        request: RunSpec,
        upstream: Box<dyn FnOnce(&Upstream) -> Response + Send + '_>,
    ) -> Result<Outcome, HarnessError> {
        let (_, rx) = self.request(|id| ClientMessage::Run {
            id,
            filters,
            request,
        })?;
        let mut upstream = Some(upstream);
        loop {
            match rx.recv() {
                Ok(Event::Done(Done::Ran(outcome))) => return Ok(*outcome),
                Ok(Event::Failed(message)) => return Err(HarnessError::Server(message)),
                Ok(Event::Upstream { id, request }) => {
                    let response = match upstream.take() {
                        Some(answer) => answer(&request),
                        None => Response::new(500),
                    };
                    self.send(&ClientMessage::Reply {
                        id,
                        answer: Reply::Upstream(response),
                    })?;
                }
                Ok(Event::Done(_)) | Err(_) => {
                    return Err(HarnessError::Server(
                        "`ambit filter serve` answered out of turn".into(),
                    ))
                }
            }
        }
    }

    pub fn inspect(&self, filter: u64) -> Result<FilterState, HarnessError> {
        match self.call(|id| ClientMessage::Inspect { id, filter })? {
            Done::State(state) => Ok(*state),
            _ => Err(HarnessError::Server("unexpected answer to inspect".into())),
        }
    }

    /// Forgets a filter; does not wait.
    pub fn unload(&self, filter: u64) {
        lock(&self.calls).remove(&filter);
        if let Ok((id, _)) = self.request(|id| ClientMessage::Unload { id, filter }) {
            lock(&self.waiting).remove(&id);
        }
    }

    pub fn set_answer(&self, filter: u64, answer: Answer) {
        if let Some(calls) = lock(&self.calls).get_mut(&filter) {
            calls.answer = answer;
        }
    }

    pub fn set_delay(&self, filter: u64, delay: Duration) {
        if let Some(calls) = lock(&self.calls).get_mut(&filter) {
            calls.delay = delay;
        }
    }
}

/// See the module doc.
fn ambit_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("AMBIT_BIN") {
        return PathBuf::from(path);
    }
    // <target>/<profile>/deps/<test binary> → <target>/<profile>/ambit
    let beside = std::env::current_exe().ok().and_then(|exe| {
        let candidate = exe.parent()?.parent()?.join("ambit");
        candidate.is_file().then_some(candidate)
    });
    beside.unwrap_or_else(|| PathBuf::from("ambit"))
}
