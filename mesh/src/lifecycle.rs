//! How Ambit's binaries start and stop: the open-files limit, and a graceful drain on SIGTERM.
//!
//! Kubernetes stops a pod with SIGTERM, waits `terminationGracePeriodSeconds`, then sends SIGKILL.
//! On SIGTERM or SIGINT (or an admin `/quitquitquit`) a [`Drain`] starts: readiness turns
//! not-ready at once, listeners close (so a replacement's `SO_REUSEPORT` listener, or nobody,
//! takes new connections), HBONE servers send GOAWAY, and open connections keep going until they
//! end or the [deadline](termination_deadline) passes. What is still open then is cut and the
//! process exits 0 with one line saying so. A second signal during the drain cuts at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tokio::sync::watch;

/// Istio ztunnel's drain deadline when nothing sets one.
pub const DEFAULT_TERMINATION_DEADLINE: Duration = Duration::from_secs(5);

/// The deadline set explicitly, as a Go duration (`5s`, `1500ms`, `1m`) (Istio's name).
pub const CONNECTION_TERMINATION_DEADLINE: &str = "CONNECTION_TERMINATION_DEADLINE";
/// The pod's `terminationGracePeriodSeconds`, passed down by the manifest (Istio's name).
pub const TERMINATION_GRACE_PERIOD_SECONDS: &str = "TERMINATION_GRACE_PERIOD_SECONDS";

/// A drain setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("{CONNECTION_TERMINATION_DEADLINE}={0:?} is not a duration (e.g. 5s, 1500ms, 1m)")]
    Deadline(String),
    #[error("{TERMINATION_GRACE_PERIOD_SECONDS}={0:?} is not a whole number of seconds")]
    GracePeriod(String),
}

/// How long open connections may drain, from the environment (see [`deadline_from`]).
pub fn termination_deadline() -> Result<Duration, LifecycleError> {
    deadline_from(
        std::env::var(CONNECTION_TERMINATION_DEADLINE)
            .ok()
            .as_deref(),
        std::env::var(TERMINATION_GRACE_PERIOD_SECONDS)
            .ok()
            .as_deref(),
    )
}

/// Istio ztunnel's rule: an explicit deadline wins; else a few seconds less than the grace period
/// (5 s less above 10 s, else 1 s less, at least 1 s), so whatever is left is closed cleanly
/// (RST_STREAM, TLS close) before SIGKILL; else 5 s. Empty values count as unset.
pub fn deadline_from(
    explicit: Option<&str>,
    grace_period: Option<&str>,
) -> Result<Duration, LifecycleError> {
    if let Some(value) = explicit.filter(|v| !v.is_empty()) {
        return parse_duration(value).ok_or_else(|| LifecycleError::Deadline(value.to_owned()));
    }
    if let Some(value) = grace_period.filter(|v| !v.is_empty()) {
        let seconds: u64 = value
            .trim()
            .parse()
            .map_err(|_| LifecycleError::GracePeriod(value.to_owned()))?;
        let margin = if seconds > 10 { 5 } else { 1 };
        return Ok(Duration::from_secs(seconds.saturating_sub(margin).max(1)));
    }
    Ok(DEFAULT_TERMINATION_DEADLINE)
}

/// The subset of Go's durations Istio's deployments use: one number, one unit.
fn parse_duration(value: &str) -> Option<Duration> {
    let value = value.trim();
    let split = value.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(seconds).ok()
}

/// Raises the open-files soft limit to the hard one, as Istio's ztunnel does: the common default
/// soft limit of 1024 is spent by a few hundred proxied connections. Logs both values.
pub fn raise_open_files_limit() {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(
                soft,
                hard,
                "open files limit raised from the soft limit to the hard one"
            ),
            Err(err) => {
                tracing::warn!(soft, hard, error = %err, "cannot raise the open files limit; connections beyond the soft limit will fail")
            }
        },
        Ok((soft, hard)) => {
            tracing::info!(soft, hard, "open files limit already at the hard limit")
        }
        Err(err) => tracing::warn!(error = %err, "cannot read the open files limit"),
    }
}

/// Shared by everything that takes part in a drain: whether it started (and why), and how many
/// connections are open. Cloning shares it.
#[derive(Clone, Debug)]
pub struct Drain {
    reason: Arc<watch::Sender<Option<String>>>,
    open: Arc<watch::Sender<usize>>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            reason: Arc::new(watch::channel(None).0),
            open: Arc::new(watch::channel(0).0),
        }
    }
}

/// One open connection; counted until dropped.
#[derive(Debug)]
pub struct OpenConnection {
    open: Arc<watch::Sender<usize>>,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.open.send_modify(|open| *open -= 1);
    }
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainOutcome {
    /// Connections open when the drain started.
    pub open_at_start: usize,
    /// Connections still open at the deadline (cut).
    pub cut: usize,
    pub waited: Duration,
}

impl Drain {
    /// Starts the drain (once; later calls change nothing). Returns whether this call started it.
    pub fn start(&self, reason: &str) -> bool {
        self.reason.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(reason.to_owned());
            true
        })
    }

    pub fn is_draining(&self) -> bool {
        self.reason.borrow().is_some()
    }

    /// Resolves once the drain has started, with why.
    pub async fn started(&self) -> String {
        let mut reason = self.reason.subscribe();
        let reason = reason
            .wait_for(Option::is_some)
            .await
            .expect("the sender lives in self");
        reason.clone().unwrap_or_default()
    }

    /// Counts a connection as open until the returned value is dropped.
    pub fn track(&self) -> OpenConnection {
        self.open.send_modify(|open| *open += 1);
        OpenConnection {
            open: self.open.clone(),
        }
    }

    pub fn open_connections(&self) -> usize {
        *self.open.borrow()
    }

    /// Waits until no connection is open or `deadline` passes.
    pub async fn wait(&self, deadline: Duration) -> DrainOutcome {
        let began = Instant::now();
        let open_at_start = self.open_connections();
        let mut open = self.open.subscribe();
        let _ = tokio::time::timeout(deadline, open.wait_for(|open| *open == 0)).await;
        DrainOutcome {
            open_at_start,
            cut: self.open_connections(),
            waited: began.elapsed(),
        }
    }

    /// What a binary's `main` runs once it serves: waits for SIGTERM, SIGINT or a drain started
    /// elsewhere, drains until `deadline`, logs one line saying what was cut, and returns (the
    /// caller exits 0). A second signal during the drain stops waiting.
    pub async fn run_until_stopped(&self, component: &str, deadline: Duration) {
        let mut terminate = signal(tokio::signal::unix::SignalKind::terminate());
        let mut interrupt = signal(tokio::signal::unix::SignalKind::interrupt());
        let next_signal = async |terminate: &mut Signal, interrupt: &mut Signal| {
            tokio::select! {
                _ = recv(terminate) => "SIGTERM",
                _ = recv(interrupt) => "SIGINT",
            }
        };
        tokio::select! {
            name = next_signal(&mut terminate, &mut interrupt) => { self.start(name); }
            _ = self.started() => {}
        }
        let reason = self.started().await;
        tracing::info!(
            component,
            reason,
            ?deadline,
            open = self.open_connections(),
            "shutting down: not ready, listeners closed, draining open connections"
        );
        let outcome = tokio::select! {
            outcome = self.wait(deadline) => outcome,
            name = next_signal(&mut terminate, &mut interrupt) => {
                tracing::info!(component, signal = name, "second signal during the drain; cutting now");
                DrainOutcome {
                    open_at_start: self.open_connections(),
                    cut: self.open_connections(),
                    waited: Duration::ZERO,
                }
            }
        };
        if outcome.cut == 0 {
            tracing::info!(component, reason, waited = ?outcome.waited, "shut down: every open connection closed by itself; nothing cut");
        } else {
            tracing::warn!(
                component,
                reason,
                ?deadline,
                cut = outcome.cut,
                "shut down: {} connection(s) still open at the deadline were cut",
                outcome.cut
            );
        }
    }
}

type Signal = Option<tokio::signal::unix::Signal>;

/// A signal stream; `None` (never fires) when the handler cannot be installed.
fn signal(kind: tokio::signal::unix::SignalKind) -> Signal {
    match tokio::signal::unix::signal(kind) {
        Ok(signal) => Some(signal),
        Err(err) => {
            tracing::warn!(error = %err, ?kind, "cannot install a signal handler");
            None
        }
    }
}

async fn recv(signal: &mut Signal) {
    match signal {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// What an accept loop does after `accept` fails: out of descriptors (EMFILE, ENFILE) or a
/// connection that died in the queue are waited out, never spun on. Returns whether the listener
/// is still usable.
pub async fn accept_failed(err: &std::io::Error, what: &str) -> bool {
    use std::io::ErrorKind::*;
    let out_of_descriptors = matches!(err.raw_os_error(), Some(EMFILE | ENFILE));
    let transient = out_of_descriptors
        || matches!(
            err.kind(),
            ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
        );
    if !transient {
        return false;
    }
    tracing::warn!(error = %err, "{what} accept failed; backing off");
    // Descriptors come back only as connections close: give them time.
    let pause = if out_of_descriptors { 100 } else { 10 };
    tokio::time::sleep(Duration::from_millis(pause)).await;
    true
}

const EMFILE: i32 = nix::libc::EMFILE;
const ENFILE: i32 = nix::libc::ENFILE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_follows_istio() {
        let d = |explicit, grace| deadline_from(explicit, grace).unwrap();
        assert_eq!(d(None, None), Duration::from_secs(5));
        assert_eq!(d(Some(""), Some("")), Duration::from_secs(5));
        assert_eq!(d(None, Some("30")), Duration::from_secs(25));
        assert_eq!(d(None, Some("5")), Duration::from_secs(4));
        assert_eq!(d(None, Some("1")), Duration::from_secs(1));
        assert_eq!(d(None, Some("0")), Duration::from_secs(1));
        assert_eq!(d(Some("1500ms"), Some("30")), Duration::from_millis(1500));
        assert_eq!(d(Some("2m"), None), Duration::from_secs(120));
        let err = deadline_from(Some("soon"), None).unwrap_err();
        assert!(
            err.to_string().contains("CONNECTION_TERMINATION_DEADLINE"),
            "{err}"
        );
        let err = deadline_from(None, Some("-3")).unwrap_err();
        assert!(
            err.to_string().contains("TERMINATION_GRACE_PERIOD_SECONDS"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn drain_waits_for_open_connections_until_the_deadline() {
        let drain = Drain::default();
        assert!(!drain.is_draining());
        let first = drain.track();
        let second = drain.track();
        assert!(drain.start("test"));
        assert!(!drain.start("again"));
        assert_eq!(drain.started().await, "test");
        drop(first);
        let outcome = drain.wait(Duration::from_millis(50)).await;
        assert_eq!((outcome.open_at_start, outcome.cut), (1, 1));
        let closer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(second);
        });
        let outcome = drain.wait(Duration::from_secs(10)).await;
        assert_eq!(outcome.cut, 0);
        assert!(outcome.waited < Duration::from_secs(5), "{outcome:?}");
        closer.await.unwrap();
    }
}
