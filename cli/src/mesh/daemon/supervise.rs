//! Containers as kubelet runs them: each pod container (and each waypoint) is a process the
//! daemon started and reaps; one that exits is started again per its pod's `restartPolicy`
//! (waypoints: `Always`, as their Deployment's pods), with kubelet's crash-loop backoff.
//!
//! kubelet's backoff, per container: the first exit restarts at once; after that each restart
//! waits until the previous restart plus a delay that starts at 10 s and doubles up to 5 min
//! (`MaxContainerBackOff`); a container whose last restart is more than twice that long ago
//! (10 min) starts over at once. `AMBIT_MESH_RESTART_BACKOFF_MS` sets the first delay (tests use
//! a short one); the cap stays kubelet's.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use ambit_local::manifest::RestartPolicy;
use anyhow::Context;

use crate::mesh::api::{ContainerStatus, LastExit, PodStatus};

/// kubelet's first restart delay (`backOffPeriod`).
pub const INITIAL_BACKOFF: Duration = Duration::from_secs(10);
/// kubelet's `MaxContainerBackOff`.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Overrides [`INITIAL_BACKOFF`], in milliseconds.
pub const BACKOFF_ENV: &str = "AMBIT_MESH_RESTART_BACKOFF_MS";

/// The first restart delay in force: [`INITIAL_BACKOFF`] unless [`BACKOFF_ENV`] says otherwise.
pub fn initial_backoff() -> anyhow::Result<Duration> {
    match std::env::var(BACKOFF_ENV) {
        Ok(value) => value
            .trim()
            .parse::<u64>()
            .map(Duration::from_millis)
            .with_context(|| format!("{BACKOFF_ENV}={value:?}: expected milliseconds")),
        Err(_) => Ok(INITIAL_BACKOFF),
    }
}

/// kubelet's per-container backoff: the delay for the next restart and when the last one was.
#[derive(Clone, Copy, Debug)]
struct CrashBackoff {
    initial: Duration,
    last: Option<(Duration, Instant)>,
}

impl CrashBackoff {
    fn new(initial: Duration) -> Self {
        CrashBackoff {
            initial,
            last: None,
        }
    }

    /// The last restart, if it is recent enough to still count (kubelet forgets a container's
    /// backoff after twice the cap).
    fn recent(&self, now: Instant) -> Option<(Duration, Instant)> {
        self.last
            .filter(|(_, at)| now.saturating_duration_since(*at) <= 2 * MAX_BACKOFF)
    }

    /// When a container that exited at `exited` starts again.
    fn restart_at(&self, exited: Instant) -> Instant {
        match self.recent(exited) {
            Some((delay, at)) => (at + delay).max(exited),
            None => exited,
        }
    }

    /// A restart at `now`: the next one waits twice as long (up to the cap).
    fn restarted(&mut self, now: Instant) {
        let delay = match self.recent(now) {
            Some((delay, _)) => (delay * 2).min(MAX_BACKOFF),
            None => self.initial,
        };
        self.last = Some((delay, now));
    }
}

/// How to start a container's process: `argv` inside network namespace `netns`, in a UTS
/// namespace of its own named `hostname`.
pub struct Launch {
    pub netns: String,
    pub hostname: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Its stdout and stderr, appended.
    pub log: PathBuf,
}

impl Launch {
    fn spawn(&self) -> anyhow::Result<Child> {
        // `ip netns exec` would report a missing program only in the log, as an exit code 255
        // indistinguishable from the program's own; the runtime's error names it.
        self.check_program()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        // `ip netns exec` execs the program: the child's pid is the program's.
        let mut command = std::process::Command::new("ip");
        super::pods::with_hostname(&mut command, &self.hostname);
        command
            .args(["netns", "exec", &self.netns])
            .args(&self.argv)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {:?} in {}", self.argv, self.netns))
    }
}

impl Launch {
    /// Fails as containerd does when the program is not there: `exec: "x": executable file not
    /// found in $PATH` (looked up in the container's `PATH`, else the daemon's).
    fn check_program(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let Some(program) = self.argv.first() else {
            anyhow::bail!("no command to run");
        };
        let runnable = |path: &Path| {
            path.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        };
        if program.contains('/') {
            if runnable(Path::new(program)) {
                return Ok(());
            }
            anyhow::bail!("exec: {program:?}: no such executable file");
        }
        let path = self
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var("PATH").ok())
            .unwrap_or_default();
        if std::env::split_paths(&path).any(|dir| runnable(&dir.join(program))) {
            return Ok(());
        }
        anyhow::bail!("exec: {program:?}: executable file not found in $PATH")
    }
}

/// One supervised container.
pub struct Container {
    pub name: String,
    launch: Launch,
    policy: RestartPolicy,
    /// The running process; `None` once it exited (waiting for its restart, or done).
    child: Option<Child>,
    restarts: u32,
    last_exit: Option<LastExit>,
    backoff: CrashBackoff,
    /// Set while the container waits for its restart.
    restart_at: Option<Instant>,
    /// Why the daemon killed the running process (a liveness or startup probe gave up).
    killed_for: Option<String>,
}

impl Container {
    /// Starts `launch`. A program that cannot be started is the container's first failed run
    /// (kubelet's `StartError`), retried per the restart policy and backoff.
    pub fn start(
        name: &str,
        launch: Launch,
        policy: RestartPolicy,
        initial_backoff: Duration,
    ) -> Container {
        let mut container = Container {
            name: name.to_owned(),
            launch,
            policy,
            child: None,
            restarts: 0,
            last_exit: None,
            backoff: CrashBackoff::new(initial_backoff),
            restart_at: None,
            killed_for: None,
        };
        match container.launch.spawn() {
            Ok(child) => container.child = Some(child),
            Err(err) => container.start_failed(err, Instant::now()),
        }
        container
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Reaps the process if it exited, and restarts it when its policy and backoff say so.
    /// Returns whether the running process changed.
    pub fn supervise(&mut self, now: Instant) -> bool {
        let mut changed = false;
        if let Some(child) = &mut self.child {
            match child.try_wait() {
                Ok(None) => return false,
                Ok(Some(status)) => {
                    let mut exit = last_exit(status);
                    exit.message = self.killed_for.take();
                    tracing::warn!(container = %self.name, pid = child.id(), reason = %exit.reason, exit_code = exit.exit_code, signal = ?exit.signal, "container exited");
                    self.exited(exit, now);
                }
                Err(err) => {
                    tracing::error!(container = %self.name, error = %err, "cannot check the container's process");
                    return false;
                }
            }
            changed = true;
        }
        if self.restart_at.is_some_and(|at| at <= now) {
            self.restart_at = None;
            self.restarts += 1;
            self.backoff.restarted(now);
            match self.launch.spawn() {
                Ok(child) => {
                    tracing::info!(container = %self.name, pid = child.id(), restarts = self.restarts, "container restarted");
                    self.child = Some(child);
                }
                Err(err) => {
                    tracing::error!(container = %self.name, error = %format!("{err:#}"), "container did not restart");
                    self.start_failed(err, now);
                }
            }
            changed = true;
        }
        changed
    }

    /// kubelet's `StartError`: the run that never began counts as one that failed.
    fn start_failed(&mut self, err: anyhow::Error, now: Instant) {
        self.exited(
            LastExit {
                reason: "StartError".into(),
                exit_code: 128,
                signal: None,
                message: Some(format!("{err:#}")),
                finished_at: unix_seconds(),
            },
            now,
        );
    }

    /// Kills the running process for `reason`; it is reaped and restarted per its policy.
    pub fn kill(&mut self, reason: String) {
        if let Some(child) = &mut self.child {
            tracing::warn!(container = %self.name, pid = child.id(), %reason, "killing the container");
            self.killed_for = Some(reason);
            let _ = child.kill();
        }
    }

    fn exited(&mut self, exit: LastExit, now: Instant) {
        self.child = None;
        if self.policy.restarts(exit.exit_code == 0) {
            self.restart_at = Some(self.backoff.restart_at(now));
        }
        self.last_exit = Some(exit);
    }

    /// Kills and reaps the process.
    pub fn stop(&mut self) {
        self.restart_at = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn status(&self) -> ContainerStatus {
        let (state, reason) = match (&self.child, self.restart_at) {
            (Some(_), _) => ("running", None),
            // kubelet's CrashLoopBackOff.
            (None, Some(_)) => ("waiting", Some("CrashLoopBackOff".to_owned())),
            (None, None) => (
                "terminated",
                self.last_exit.as_ref().map(|e| e.reason.clone()),
            ),
        };
        ContainerStatus {
            name: self.name.clone(),
            state: state.into(),
            reason,
            ready: false,
            probe: None,
            pid: self.pid(),
            restarts: self.restarts,
            last_exit: self.last_exit.clone(),
        }
    }
}

/// Fills in what kubectl shows of a pod from its containers: READY (`1/1`), the phase, and the
/// STATUS column (the phase, or the reason a container is waiting or terminated).
pub fn describe_pod(pod: &mut PodStatus) {
    let containers = &pod.containers;
    let ready = containers.iter().filter(|c| c.ready).count();
    pod.ready = format!("{ready}/{}", containers.len());
    let ran = |c: &ContainerStatus| c.state == "running" || c.restarts > 0 || c.last_exit.is_some();
    pod.phase = if containers.iter().any(|c| c.state == "running") {
        "Running"
    } else if containers.is_empty() || !containers.iter().all(ran) {
        "Pending"
    } else if containers.iter().any(|c| c.state == "waiting") {
        // Restarting after an exit: kubelet keeps the phase at Running.
        "Running"
    } else if containers
        .iter()
        .all(|c| c.last_exit.as_ref().is_some_and(|e| e.exit_code == 0))
    {
        "Succeeded"
    } else {
        "Failed"
    }
    .to_owned();
    pod.status = containers
        .iter()
        .find_map(|c| c.reason.clone())
        .unwrap_or_else(|| pod.phase.clone());
}

/// kubelet's terms for how a process ended: `Completed` for exit code 0, `Error` otherwise; a
/// signal shows as the shell's exit code, 128 + its number.
fn last_exit(status: ExitStatus) -> LastExit {
    let (exit_code, signal) = match (status.code(), status.signal()) {
        (Some(code), _) => (code, None),
        (None, Some(signal)) => (128 + signal, Some(signal)),
        (None, None) => (-1, None),
    };
    LastExit {
        reason: if exit_code == 0 { "Completed" } else { "Error" }.into(),
        exit_code,
        signal: signal.map(signal_name),
        message: None,
        finished_at: unix_seconds(),
    }
}

fn signal_name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal)
        .map(|s| format!("{s:?}"))
        .unwrap_or_else(|_| format!("signal {signal}"))
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_as_kubelet_does() {
        let s = Duration::from_secs;
        let t0 = Instant::now();
        let mut backoff = CrashBackoff::new(INITIAL_BACKOFF);
        // The first exit restarts at once.
        assert_eq!(backoff.restart_at(t0), t0);
        backoff.restarted(t0);
        // Then 10 s after the previous restart, 20 s, 40 s ... up to 5 min.
        let mut last = t0;
        for delay in [10, 20, 40, 80, 160, 300, 300] {
            let exit = last + s(1);
            let at = backoff.restart_at(exit);
            assert_eq!(at - last, s(delay));
            backoff.restarted(at);
            last = at;
        }
        // A container that ran past the delay restarts at once, the delay still doubling.
        let mut backoff = CrashBackoff::new(INITIAL_BACKOFF);
        backoff.restarted(t0);
        assert_eq!(backoff.restart_at(t0 + s(15)), t0 + s(15));
        // Ten minutes after the last restart, the backoff is forgotten.
        let later = last + s(601);
        let mut long = CrashBackoff::new(INITIAL_BACKOFF);
        long.last = backoff.last.map(|(_, _)| (MAX_BACKOFF, last));
        assert_eq!(long.restart_at(later), later);
        long.restarted(later);
        assert_eq!(long.restart_at(later + s(1)), later + s(10));
    }

    #[test]
    fn exits_are_described_as_kubelet_does() {
        let exit = |raw| last_exit(ExitStatus::from_raw(raw));
        let completed = exit(0);
        assert_eq!(
            (completed.reason.as_str(), completed.exit_code),
            ("Completed", 0)
        );
        let failed = exit(3 << 8);
        assert_eq!((failed.reason.as_str(), failed.exit_code), ("Error", 3));
        let killed = exit(9);
        assert_eq!(killed.reason, "Error");
        assert_eq!(killed.exit_code, 137);
        assert_eq!(killed.signal.as_deref(), Some("SIGKILL"));
        assert!(RestartPolicy::OnFailure.restarts(false));
        assert!(!RestartPolicy::OnFailure.restarts(true));
        assert!(!RestartPolicy::Never.restarts(false));
        assert!(RestartPolicy::Always.restarts(true));
    }
}
