//! kubelet's prober: each container's `startupProbe`, `readinessProbe` and `livenessProbe`, run
//! against its current process.
//!
//! A container's run is probed from its start: the startup probe first (the other two wait until
//! it passes; failing `failureThreshold` times in a row kills the container), then readiness
//! (ready after `successThreshold` passes in a row, not ready after `failureThreshold` failures;
//! not ready until then) and liveness (killed after `failureThreshold` failures in a row), each
//! first after `initialDelaySeconds`, then every `periodSeconds`, each attempt bounded by
//! `timeoutSeconds`. A restarted container is probed afresh, not ready, as kubelet does. A
//! container without a readiness probe is ready once running (and started).
//!
//! Probes reach the pod as kubelet's do, from outside the app: HTTP and TCP probes connect from
//! inside the pod's network namespace with the proxy's mark, which the in-pod rules never capture
//! (Istio exempts kubelet's probes likewise); exec probes run the command in the pod's network
//! namespace with the container's environment, in a process group of their own that is killed
//! whole when the probe times out.
//!
//! Every probe runs on a task of its own: a probe that hangs costs its own period, never the
//! daemon's loop.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_local::manifest::{Probe, ProbeAction, ProbeKind, Probes};
use ambit_ztunnel::netns::PodNetns;
use http_body_util::Empty;
use hyper::body::Bytes;
use tokio::task::JoinHandle;

/// Where a pod's probes go.
pub struct Target {
    /// The pod's network namespace by name (`ip netns exec`) and path.
    pub netns: String,
    pub netns_path: String,
    pub pod_ip: IpAddr,
    /// The container's environment, for exec probes.
    pub env: Vec<(String, String)>,
}

/// What the probes of one run of a container found so far.
#[derive(Clone, Debug, Default)]
struct Findings {
    ready: bool,
    /// Set when a liveness or startup probe failed for good: the container is to be killed.
    kill: Option<String>,
    /// The last failed attempt, as kubelet's event says it (`Readiness probe failed: ...`).
    failure: Option<String>,
}

/// A container's probes; [`follow`](Self::follow) keeps them on its current process.
pub struct ContainerProbes {
    probes: Probes,
    target: Arc<Target>,
    run: Option<Run>,
}

/// The probing of one process.
struct Run {
    pid: u32,
    findings: Arc<Mutex<Findings>>,
    task: JoinHandle<()>,
}

impl Drop for Run {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ContainerProbes {
    pub fn new(probes: Probes, target: Target) -> Self {
        ContainerProbes {
            probes,
            target: Arc::new(target),
            run: None,
        }
    }

    fn probed(&self) -> bool {
        self.probes.readiness.is_some()
            || self.probes.liveness.is_some()
            || self.probes.startup.is_some()
    }

    /// Follows the container's process `pid` (`None`: not running): a new process is probed
    /// afresh. Returns why the process is to be killed, once, when a liveness or startup probe
    /// gave up on it.
    pub fn follow(&mut self, pid: Option<u32>) -> Option<String> {
        if self.run.as_ref().map(|r| r.pid) != pid {
            self.run = pid.filter(|_| self.probed()).map(|pid| {
                let findings = Arc::new(Mutex::new(Findings::default()));
                let task = tokio::spawn(probe_run(
                    self.probes.clone(),
                    self.target.clone(),
                    findings.clone(),
                ));
                Run {
                    pid,
                    findings,
                    task,
                }
            });
        }
        let run = self.run.as_ref()?;
        run.findings.lock().expect("findings lock").kill.take()
    }

    /// Ready as kubelet says: running, started, and its readiness probe passing (if it has one).
    pub fn ready(&self, running: bool) -> bool {
        if !running {
            return false;
        }
        match &self.run {
            None => !self.probed(),
            Some(run) => run.findings.lock().expect("findings lock").ready,
        }
    }

    /// The last failed probe of the current run.
    pub fn failure(&self) -> Option<String> {
        let run = self.run.as_ref()?;
        run.findings.lock().expect("findings lock").failure.clone()
    }
}

async fn probe_run(probes: Probes, target: Arc<Target>, findings: Arc<Mutex<Findings>>) {
    let worker = |kind, probe| Worker {
        kind,
        probe,
        target: &target,
        findings: &findings,
    };
    if let Some(startup) = &probes.startup {
        if !worker(ProbeKind::Startup, startup).run().await {
            return;
        }
    }
    findings.lock().expect("findings lock").ready = probes.readiness.is_none();
    let readiness = async {
        if let Some(probe) = &probes.readiness {
            worker(ProbeKind::Readiness, probe).run().await;
        }
    };
    let liveness = async {
        if let Some(probe) = &probes.liveness {
            worker(ProbeKind::Liveness, probe).run().await;
        }
    };
    tokio::join!(readiness, liveness);
}

/// One probe's loop (kubelet's `worker`).
struct Worker<'a> {
    kind: ProbeKind,
    probe: &'a Probe,
    target: &'a Target,
    findings: &'a Mutex<Findings>,
}

impl Worker<'_> {
    fn update(&self, change: impl FnOnce(&mut Findings)) {
        change(&mut self.findings.lock().expect("findings lock"));
    }

    /// Probes until the outcome is final: a startup probe's success (`true`), a liveness or
    /// startup probe's giving up (`false`); a readiness probe runs for as long as the process.
    async fn run(&self) -> bool {
        let probe = self.probe;
        tokio::time::sleep(Duration::from_secs(probe.initial_delay_seconds.into())).await;
        let mut period = tokio::time::interval(Duration::from_secs(probe.period_seconds.into()));
        period.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut passes, mut failures) = (0u32, 0u32);
        loop {
            period.tick().await;
            let timeout = Duration::from_secs(probe.timeout_seconds.into());
            let outcome =
                match tokio::time::timeout(timeout, attempt(&probe.action, self.target)).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(format!(
                        "timed out after {}s ({})",
                        probe.timeout_seconds,
                        describe(&probe.action)
                    )),
                };
            match outcome {
                Ok(()) => {
                    passes += 1;
                    failures = 0;
                    match self.kind {
                        ProbeKind::Startup => return true,
                        ProbeKind::Readiness if passes >= probe.success_threshold => {
                            self.update(|f| f.ready = true)
                        }
                        _ => {}
                    }
                }
                Err(reason) => {
                    passes = 0;
                    failures += 1;
                    let message = format!("{} probe failed: {reason}", self.kind.title());
                    tracing::debug!(probe = %message, failures, "probe failed");
                    let give_up = failures >= probe.failure_threshold;
                    let readiness = self.kind == ProbeKind::Readiness;
                    self.update(|f| {
                        if readiness && give_up {
                            f.ready = false;
                        }
                        if give_up && !readiness {
                            f.kill = Some(format!(
                                "{message}; {failures} failures in a row, the container is killed"
                            ));
                        }
                        f.failure = Some(message);
                    });
                    if give_up && !readiness {
                        return false;
                    }
                }
            }
        }
    }
}

fn describe(action: &ProbeAction) -> String {
    match action {
        ProbeAction::HttpGet { port, path, .. } => format!("GET :{port}{path}"),
        ProbeAction::TcpSocket { port, .. } => format!("connect :{port}"),
        ProbeAction::Exec { command } => format!("exec {command:?}"),
    }
}

/// One attempt; `Err` says why it failed, as kubelet's event would.
async fn attempt(action: &ProbeAction, target: &Target) -> Result<(), String> {
    match action {
        ProbeAction::TcpSocket { host, port } => {
            let address = address(host.as_deref(), *port, target)?;
            connect(target, address).await.map(drop)
        }
        ProbeAction::HttpGet {
            host,
            port,
            path,
            headers,
        } => {
            let address = address(host.as_deref(), *port, target)?;
            let stream = connect(target, address).await?;
            http_get(stream, address, path, headers).await
        }
        ProbeAction::Exec { command } => exec(target, command).await,
    }
}

fn address(host: Option<&str>, port: u16, target: &Target) -> Result<SocketAddr, String> {
    let ip = match host {
        None => target.pod_ip,
        Some(host) => host
            .parse()
            .map_err(|_| format!("host {host:?} is not an IP address"))?,
    };
    Ok(SocketAddr::new(ip, port))
}

async fn connect(target: &Target, address: SocketAddr) -> Result<tokio::net::TcpStream, String> {
    let fd: std::os::fd::OwnedFd = std::fs::File::open(&target.netns_path)
        .map_err(|e| format!("cannot open the pod's network namespace: {e}"))?
        .into();
    let netns = PodNetns::new(fd).map_err(|e| e.to_string())?;
    netns
        .connect(address)
        .await
        .map_err(|e| format!("dial tcp {address}: {e}"))
}

/// kubelet's HTTP probe: GET with `User-Agent: kube-probe/...`, 200-399 passes.
async fn http_get(
    stream: tokio::net::TcpStream,
    address: SocketAddr,
    path: &str,
    headers: &[(String, String)],
) -> Result<(), String> {
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("Get \"http://{address}{path}\": {e}"))?;
    let connection = tokio::spawn(connection);
    let mut request = hyper::Request::get(path)
        .header(hyper::header::HOST, address.to_string())
        .header(hyper::header::USER_AGENT, "kube-probe/1.31")
        .header(hyper::header::ACCEPT, "*/*");
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad probe request: {e}"))?;
    let result = sender.send_request(request).await;
    connection.abort();
    let response = result.map_err(|e| format!("Get \"http://{address}{path}\": {e}"))?;
    let status = response.status();
    if (200..400).contains(&status.as_u16()) {
        Ok(())
    } else {
        Err(format!(
            "HTTP probe failed with statuscode: {}",
            status.as_u16()
        ))
    }
}

/// Runs `command` in the pod's namespace and environment, in its own process group, killed as a
/// group if the probe's timeout drops this future.
async fn exec(target: &Target, command: &[String]) -> Result<(), String> {
    let child = tokio::process::Command::new("ip")
        .args(["netns", "exec", &target.netns])
        .args(command)
        .envs(target.env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    let group = child.id().map(|pid| GroupGuard(pid as i32));
    let output = child.wait_with_output().await;
    let output = output.map_err(|e| format!("{command:?}: {e}"))?;
    if let Some(group) = group {
        group.disarm();
    }
    if output.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let text = text.trim();
    let code = output
        .status
        .code()
        .map_or("a signal".to_owned(), |c| format!("exit code {c}"));
    Err(if text.is_empty() {
        format!("command {command:?} ended with {code}")
    } else {
        format!("command {command:?} ended with {code}: {text}")
    })
}

/// Kills a process group when dropped (an exec probe that timed out), unless disarmed.
struct GroupGuard(i32);

impl GroupGuard {
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a process group this prober created; no memory is involved.
        unsafe {
            nix::libc::kill(-self.0, nix::libc::SIGKILL);
        }
    }
}
