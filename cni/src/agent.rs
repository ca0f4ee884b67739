//! The node agent's enrollment logic, independent of where pods come from (the local mesh's
//! manifests today, the Kubernetes API later).
//!
//! [`enrollment`] decides which pods belong in the mesh, with istio-cni's rules. [`NodeAgent`]
//! does the enrolling: it listens on the ZDS socket ztunnel connects to, installs Istio's in-pod
//! redirect rules in a pod's network namespace, hands that namespace to ztunnel and waits for the
//! ack, and takes it all back on [`NodeAgent::unenroll`]. Every time ztunnel (re)connects it gets
//! the full snapshot of enrolled pods, so a restarted ztunnel picks up every pod by itself.
//!
//! What the caller still does: watch its pods, call [`enrollment`], and after a successful
//! [`NodeAgent::enroll`] set the pod annotation [`REDIRECTION_ANNOTATION`]`:`
//! [`REDIRECTION_ENABLED`] (and remove it after [`NodeAgent::unenroll`]). Istio's control plane
//! only tells peers to use HBONE towards a pod once that annotation is set, which is why it must
//! come last.

mod selection;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex, OnceLock, Weak};
use std::time::Duration;

use ambit_mesh::zds::{WorkloadInfo, ZdsConnection, ZdsError, ZdsServer};
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};
use tokio::sync::{watch, Mutex};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::rules::{self, Backend, RuleOptions, RulesError};

pub use selection::{
    enrollment, Enrollment, NotEnrolled, PodMeta, DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL,
    DATAPLANE_MODE_NONE, SIDECAR_STATUS_ANNOTATION,
};

/// Pod annotation istio-cni sets once a pod is fully enrolled (rules in place, ztunnel acked).
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// The value of [`REDIRECTION_ANNOTATION`] for an enrolled pod.
pub const REDIRECTION_ENABLED: &str = "enabled";
/// How long [`NodeAgent::enroll`] waits for a ztunnel to be connected, by default.
pub const DEFAULT_ZTUNNEL_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept, so a broken listener or a misbehaving peer cannot spin the loop
/// (istio-cni rate-limits accepts to 5/s).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(200);

/// A pod to enroll, as ztunnel needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrolledPod {
    /// The workload uid, as the control plane names the pod (`<cluster>//v1/Pod/<ns>/<name>` in
    /// Istio); ztunnel looks the pod up in its state by it.
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    /// The pod's network namespace: `/var/run/netns/<name>` or `/proc/<pid>/ns/net`. Opened once
    /// at enrollment and kept open, so a later snapshot replay never depends on the path.
    pub netns: PathBuf,
}

impl EnrolledPod {
    fn display_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn info(&self) -> WorkloadInfo {
        WorkloadInfo {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
        }
    }
}

/// What became of a pod's rules after a failed enrollment.
#[derive(Debug)]
pub enum Rollback {
    /// The rules were removed again; the pod is as it was.
    Clean,
    /// Removing them failed too: the pod may still redirect to a ztunnel that does not serve it.
    Failed(Box<RulesError>),
}

impl fmt::Display for Rollback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rollback::Clean => f.write_str("its redirect rules were removed again"),
            Rollback::Failed(e) => write!(
                f,
                "removing its redirect rules again failed as well, so its traffic may still be \
                 redirected to a ztunnel that does not serve it: {e}"
            ),
        }
    }
}

impl From<Result<(), RulesError>> for Rollback {
    fn from(result: Result<(), RulesError>) -> Self {
        match result {
            Ok(()) => Rollback::Clean,
            Err(e) => Rollback::Failed(Box::new(e)),
        }
    }
}

/// Why the agent could not start, enroll or unenroll. A failed enrollment never leaves the pod
/// recorded; the message says whether its rules are gone again.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the node agent cannot listen for ztunnel: {0}")]
    Listen(#[source] ZdsError),
    #[error("pod {pod}: cannot open its network namespace {}: {source}", path.display())]
    OpenNetns {
        pod: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "pod {pod}: {} is not a network namespace; expected /var/run/netns/<name> or \
         /proc/<pid>/ns/net",
        path.display()
    )]
    NotANetns { pod: String, path: PathBuf },
    #[error(
        "pod {pod}: no ztunnel connected to {} within {timeout:?}; the pod was not enrolled and \
         its network was left untouched (is ztunnel running, with INPOD_UDS at that path?)",
        socket.display()
    )]
    NoZtunnel {
        pod: String,
        socket: PathBuf,
        timeout: Duration,
    },
    #[error("no ztunnel connected to {} within {timeout:?}", socket.display())]
    ZtunnelTimeout { socket: PathBuf, timeout: Duration },
    #[error("pod {pod}: installing the in-pod redirect rules failed: {source}; {rollback}")]
    InstallRules {
        pod: String,
        #[source]
        source: RulesError,
        rollback: Rollback,
    },
    #[error("pod {pod}: ztunnel did not take the pod: {source}; {rollback}")]
    Ztunnel {
        pod: String,
        #[source]
        source: ZdsError,
        rollback: Rollback,
    },
    #[error(
        "pod {pod}: removing the in-pod redirect rules failed: {source}; the pod stays enrolled \
         (ztunnel still serves it), retry the unenrollment"
    )]
    RemoveRules {
        pod: String,
        #[source]
        source: RulesError,
    },
}

/// One enrolled pod.
struct Pod {
    spec: EnrolledPod,
    /// Kept open for snapshot replays: a `/proc/<pid>` path can vanish or, after pid reuse,
    /// name another process.
    netns: File,
    netns_id: NetnsId,
}

/// Device and inode of a namespace file: equal ids are the same namespace.
type NetnsId = (u64, u64);

/// The node agent: see the module docs. Create it with [`NodeAgent::start`]; dropping the last
/// `Arc` stops listening and closes the ZDS connections. ztunnel keeps serving the pods and the
/// rules stay, as when istio-cni restarts, but a new agent knows nothing of them: re-enroll them
/// there, or its first snapshot makes ztunnel drop them.
pub struct NodeAgent {
    socket: PathBuf,
    backend: Backend,
    rule_options: RuleOptions,
    ztunnel_timeout: StdMutex<Duration>,
    /// Held for the whole of each enroll and unenroll. One at a time is simple and safe (two
    /// calls for one pod can never interleave), and the work is milliseconds per pod.
    operations: Mutex<()>,
    /// Open ztunnel connections, oldest first; Adds go to the newest (the last), Dels to all.
    /// Held across each ZDS exchange, which are strictly one at a time per connection, and
    /// whenever `pods` changes, so that a snapshot replay always sees a settled set of pods.
    ztunnels: Mutex<Vec<ZdsConnection>>,
    /// Enrolled pods by uid. Only changed with `ztunnels` locked; readable without it.
    pods: StdMutex<BTreeMap<String, Arc<Pod>>>,
    /// `ztunnels.len()`, for waiting on a connection without holding the lock the accept loop
    /// needs to add one.
    connected: watch::Sender<usize>,
    accept_task: OnceLock<AbortHandle>,
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        if let Some(task) = self.accept_task.get() {
            task.abort();
        }
    }
}

impl NodeAgent {
    /// Listens for ztunnel on `socket` (replacing a stale socket file) and starts accepting in
    /// the background: each ztunnel that connects gets an Add for every enrolled pod, then
    /// SnapshotSent, and from then on is the one new pods go to. Needs a tokio runtime.
    pub fn start(
        socket: &Path,
        backend: Backend,
        rule_options: RuleOptions,
    ) -> Result<Arc<NodeAgent>, AgentError> {
        let agent = Self::new(socket, backend, rule_options);
        agent.listen()?;
        Ok(agent)
    }

    /// Like [`start`](Self::start), for an agent restarting on a node where `pods` are already
    /// enrolled (annotated by the previous agent): their rules are (re)installed and they are
    /// recorded *before* listening, so the snapshot the reconnecting ztunnel gets names them and
    /// ztunnel keeps serving them. With an empty first snapshot it would drop them all until
    /// they were enrolled again. Pods whose rules cannot be installed are left out (with their
    /// errors, for the caller to retry them the ordinary way).
    pub async fn start_with_pods(
        socket: &Path,
        backend: Backend,
        rule_options: RuleOptions,
        pods: Vec<EnrolledPod>,
    ) -> Result<(Arc<NodeAgent>, Vec<(EnrolledPod, AgentError)>), AgentError> {
        let agent = Self::new(socket, backend, rule_options);
        let mut failed = Vec::new();
        for pod in pods {
            let name = pod.display_name();
            let (netns, netns_id) = match open_netns(&pod) {
                Ok(opened) => opened,
                Err(error) => {
                    failed.push((pod, error));
                    continue;
                }
            };
            if let Err(source) = agent.install_rules(&netns).await {
                let rollback = agent.remove_rules(&netns).await.into();
                let error = AgentError::InstallRules {
                    pod: name,
                    source,
                    rollback,
                };
                failed.push((pod, error));
                continue;
            }
            tracing::info!(pod = %name, uid = %pod.uid, "pod was enrolled before the agent restarted; kept for ztunnel's snapshot");
            let record = Arc::new(Pod {
                spec: pod.clone(),
                netns,
                netns_id,
            });
            agent
                .pods
                .lock()
                .expect("pods lock")
                .insert(pod.uid, record);
        }
        agent.listen()?;
        Ok((agent, failed))
    }

    fn new(socket: &Path, backend: Backend, rule_options: RuleOptions) -> Arc<NodeAgent> {
        Arc::new(NodeAgent {
            socket: socket.to_path_buf(),
            backend,
            rule_options,
            ztunnel_timeout: StdMutex::new(DEFAULT_ZTUNNEL_TIMEOUT),
            operations: Mutex::new(()),
            ztunnels: Mutex::new(Vec::new()),
            pods: StdMutex::new(BTreeMap::new()),
            connected: watch::Sender::new(0),
            accept_task: OnceLock::new(),
        })
    }

    fn listen(self: &Arc<Self>) -> Result<(), AgentError> {
        let server = ZdsServer::bind(&self.socket).map_err(AgentError::Listen)?;
        // The loop holds only a weak reference, so dropping the agent ends it.
        let task = tokio::spawn(accept_loop(Arc::downgrade(self), server));
        let _ = self.accept_task.set(task.abort_handle());
        tracing::info!(socket = %self.socket.display(), backend = %self.backend, "node agent listening for ztunnel");
        Ok(())
    }

    /// The ZDS socket ztunnel connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// How long [`enroll`](Self::enroll) waits for a ztunnel (default
    /// [`DEFAULT_ZTUNNEL_TIMEOUT`]).
    pub fn set_ztunnel_timeout(&self, timeout: Duration) {
        *self.ztunnel_timeout.lock().expect("timeout lock") = timeout;
    }

    /// The uids of the enrolled pods, sorted.
    pub fn enrolled(&self) -> Vec<String> {
        self.pods
            .lock()
            .expect("pods lock")
            .keys()
            .cloned()
            .collect()
    }

    /// Waits until a ztunnel has connected and taken its snapshot. A ztunnel that went away is
    /// only noticed at the next message sent to it, so this can return for a connection that is
    /// already dead; [`enroll`](Self::enroll) copes with that by waiting for the next one.
    pub async fn wait_for_ztunnel(&self, timeout: Duration) -> Result<(), AgentError> {
        if self.wait_connected(Instant::now() + timeout).await {
            Ok(())
        } else {
            Err(AgentError::ZtunnelTimeout {
                socket: self.socket.clone(),
                timeout,
            })
        }
    }

    /// Enrolls a running or starting pod: waits for a ztunnel (up to the
    /// [ztunnel timeout](Self::set_ztunnel_timeout), without touching the pod meanwhile),
    /// installs the in-pod redirect rules in its netns, sends ZDS AddWorkload with the netns and
    /// waits for the ack, then records the pod. A running pod needs no restart: its listening
    /// sockets keep serving, now behind ztunnel. Connections open at that moment are reset, as
    /// with istio-cni: the pod's conntrack starts with the rules, so their next packet is
    /// redirected to ztunnel, which does not know them.
    ///
    /// On success the caller sets the pod annotation [`REDIRECTION_ANNOTATION`]`:`
    /// [`REDIRECTION_ENABLED`]; this library never talks to the pod's source.
    ///
    /// Enrolling an enrolled pod with the same netns does nothing; with another netns (the pod's
    /// sandbox was recreated) the old enrollment is undone first. On any error nothing is
    /// recorded and the rules are removed again (the error says if that failed); a ztunnel that
    /// refused the pod is told to forget it, and one whose connection broke mid-Add will not
    /// find it in the snapshot it gets on reconnecting.
    pub async fn enroll(&self, pod: EnrolledPod) -> Result<(), AgentError> {
        let _operation = self.operations.lock().await;
        let name = pod.display_name();
        let (netns, netns_id) = open_netns(&pod)?;
        let previous = self.pods.lock().expect("pods lock").get(&pod.uid).cloned();
        if let Some(previous) = previous {
            if previous.netns_id == netns_id {
                tracing::debug!(pod = %name, uid = %pod.uid, "already enrolled");
                return Ok(());
            }
            tracing::info!(pod = %name, uid = %pod.uid, "pod has a new network namespace; undoing its old enrollment first");
            self.unenroll_locked(&pod.uid).await?;
        }

        let timeout = *self.ztunnel_timeout.lock().expect("timeout lock");
        let deadline = Instant::now() + timeout;
        // Wait before touching the pod: rules without a ztunnel behind them would cut its
        // traffic off for as long as we wait.
        if !self.wait_connected(deadline).await {
            return Err(AgentError::NoZtunnel {
                pod: name,
                socket: self.socket.clone(),
                timeout,
            });
        }
        tracing::info!(pod = %name, uid = %pod.uid, netns = %pod.netns.display(), "enrolling pod");
        if let Err(source) = self.install_rules(&netns).await {
            // A failed install can leave part of the rules (the routing goes in first).
            let rollback = self.remove_rules(&netns).await.into();
            return Err(AgentError::InstallRules {
                pod: name,
                source,
                rollback,
            });
        }
        match self.hand_over(&pod, netns, netns_id, deadline).await {
            Ok(()) => {
                tracing::info!(pod = %name, uid = %pod.uid, "pod enrolled");
                Ok(())
            }
            Err((source, netns)) => {
                let rollback = self.remove_rules(&netns).await.into();
                Err(AgentError::Ztunnel {
                    pod: name,
                    source,
                    rollback,
                })
            }
        }
    }

    /// Takes a pod out of the mesh: removes its redirect rules, then sends ZDS DelWorkload to
    /// every connected ztunnel. Unknown uids are a no-op. The caller then removes the
    /// [`REDIRECTION_ANNOTATION`].
    ///
    /// Rules go first, as in istio-cni: from then on new connections bypass ztunnel, while
    /// ztunnel still answers on 15008 for peers that have not yet heard the pod left. The other
    /// order would leave the rules redirecting to ports nobody listens on in between. If the
    /// rules cannot be removed the pod stays enrolled (and working) and the call can be retried.
    pub async fn unenroll(&self, uid: &str) -> Result<(), AgentError> {
        let _operation = self.operations.lock().await;
        self.unenroll_locked(uid).await
    }

    /// [`unenroll`](Self::unenroll) with `operations` already held.
    async fn unenroll_locked(&self, uid: &str) -> Result<(), AgentError> {
        let Some(pod) = self.pods.lock().expect("pods lock").get(uid).cloned() else {
            tracing::debug!(uid, "not enrolled; nothing to undo");
            return Ok(());
        };
        let name = pod.spec.display_name();
        tracing::info!(pod = %name, uid, "unenrolling pod");
        self.remove_rules(&pod.netns)
            .await
            .map_err(|source| AgentError::RemoveRules {
                pod: name.clone(),
                source,
            })?;
        let mut ztunnels = self.ztunnels.lock().await;
        self.pods.lock().expect("pods lock").remove(uid);
        self.send_del(&mut ztunnels, uid).await;
        tracing::info!(pod = %name, uid, "pod unenrolled");
        Ok(())
    }

    /// Sends Add to the newest ztunnel and records the pod once acked. A dead connection is
    /// dropped and the next ztunnel awaited until `deadline`. On error, hands the netns back for
    /// the rollback.
    async fn hand_over(
        &self,
        pod: &EnrolledPod,
        netns: File,
        netns_id: NetnsId,
        deadline: Instant,
    ) -> Result<(), (ZdsError, File)> {
        let mut last_error = None;
        loop {
            let mut ztunnels = self.ztunnels.lock().await;
            let Some(ztunnel) = ztunnels.last_mut() else {
                drop(ztunnels);
                if self.wait_connected(deadline).await {
                    continue;
                }
                // Only a connection we dropped below can leave none, so there is an error.
                return Err((last_error.unwrap_or(ZdsError::Closed), netns));
            };
            match ztunnel.add(&pod.uid, pod.info(), netns.as_fd()).await {
                Ok(()) => {
                    let record = Arc::new(Pod {
                        spec: pod.clone(),
                        netns,
                        netns_id,
                    });
                    self.pods
                        .lock()
                        .expect("pods lock")
                        .insert(pod.uid.clone(), record);
                    return Ok(());
                }
                Err(err) if err.is_recoverable() => {
                    // A nack: ztunnel keeps a pod it could not start and retries it every few
                    // seconds. We give the pod up, so ztunnel must forget it too.
                    if let Err(del) = ztunnel.del(&pod.uid).await {
                        tracing::warn!(uid = %pod.uid, error = %del, "ztunnel did not take back a refused pod; dropping its connection so that it resyncs");
                        ztunnels.pop();
                        self.connected.send_replace(ztunnels.len());
                    }
                    return Err((err, netns));
                }
                Err(err) => {
                    // The ztunnel is gone (or out of step). Whatever it did with the Add, its
                    // successor's snapshot will not name the pod; try that successor.
                    tracing::warn!(uid = %pod.uid, error = %err, "ZDS connection failed; waiting for ztunnel to reconnect");
                    ztunnels.pop();
                    self.connected.send_replace(ztunnels.len());
                    last_error = Some(err);
                }
            }
        }
    }

    /// Sends Del to every connection, oldest first. A connection that fails or refuses is
    /// dropped: a live ztunnel then reconnects and gets a snapshot without the pod, which
    /// removes it there just as well.
    async fn send_del(&self, ztunnels: &mut Vec<ZdsConnection>, uid: &str) {
        let mut kept = Vec::with_capacity(ztunnels.len());
        for mut ztunnel in ztunnels.drain(..) {
            match ztunnel.del(uid).await {
                Ok(()) => kept.push(ztunnel),
                Err(err) => {
                    tracing::warn!(uid, error = %err, "ZDS DelWorkload failed; dropping that connection (a live ztunnel reconnects and resyncs)");
                }
            }
        }
        *ztunnels = kept;
        self.connected.send_replace(ztunnels.len());
    }

    /// Takes in a new ztunnel connection: replays the snapshot, then makes it the newest.
    async fn adopt(&self, mut ztunnel: ZdsConnection) {
        let mut ztunnels = self.ztunnels.lock().await;
        let pods: Vec<Arc<Pod>> = self
            .pods
            .lock()
            .expect("pods lock")
            .values()
            .cloned()
            .collect();
        for pod in &pods {
            match ztunnel
                .add(&pod.spec.uid, pod.spec.info(), pod.netns.as_fd())
                .await
            {
                Ok(()) => {}
                // ztunnel keeps a pod it refused and retries it by itself; the pod stays ours.
                Err(err) if err.is_recoverable() => {
                    tracing::warn!(uid = %pod.spec.uid, error = %err, "ztunnel refused a pod of the snapshot; it retries on its own")
                }
                Err(err) => {
                    tracing::warn!(error = %err, "ZDS connection failed during the snapshot; waiting for ztunnel to reconnect");
                    return;
                }
            }
        }
        if let Err(err) = ztunnel.snapshot_sent().await {
            tracing::warn!(error = %err, "ZDS SnapshotSent failed; waiting for ztunnel to reconnect");
            return;
        }
        ztunnels.push(ztunnel);
        self.connected.send_replace(ztunnels.len());
        tracing::info!(
            pods = pods.len(),
            connections = ztunnels.len(),
            "ztunnel connected; snapshot sent"
        );
    }

    /// True once a ztunnel is connected, false if none is by `deadline`.
    async fn wait_connected(&self, deadline: Instant) -> bool {
        let mut connected = self.connected.subscribe();
        // `wait_for` returns a read guard on the channel; it must not outlive this line.
        let waited = tokio::time::timeout_at(deadline, connected.wait_for(|n| *n > 0))
            .await
            .map(|seen| seen.is_ok());
        matches!(waited, Ok(true))
    }

    /// The rule programs block, so they run off the async workers.
    async fn install_rules(&self, netns: &File) -> Result<(), RulesError> {
        let netns = netns.try_clone().map_err(RulesError::Netns)?;
        let (backend, options) = (self.backend, self.rule_options.clone());
        blocking(move || rules::install(netns, backend, &options)).await
    }

    async fn remove_rules(&self, netns: &File) -> Result<(), RulesError> {
        let netns = netns.try_clone().map_err(RulesError::Netns)?;
        let backend = self.backend;
        blocking(move || rules::remove(netns, backend)).await
    }
}

async fn accept_loop(agent: Weak<NodeAgent>, server: ZdsServer) {
    loop {
        let accepted = server.accept().await;
        let Some(agent) = agent.upgrade() else {
            return;
        };
        match accepted {
            Ok(ztunnel) => agent.adopt(ztunnel).await,
            Err(err) => {
                tracing::warn!(socket = %agent.socket.display(), error = %err, "ztunnel connection refused");
                drop(agent);
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// Opens and checks a pod's namespace.
fn open_netns(pod: &EnrolledPod) -> Result<(File, NetnsId), AgentError> {
    let open_error = |source| AgentError::OpenNetns {
        pod: pod.display_name(),
        path: pod.netns.clone(),
        source,
    };
    let file = File::open(&pod.netns).map_err(open_error)?;
    // Namespace files live on nsfs, whether reached through /proc or a bind mount under
    // /var/run/netns. Anything else (a mistyped path to a plain file) would only fail later,
    // deep inside setns, as EINVAL.
    let fs = fstatfs(&file).map_err(|e| open_error(e.into()))?;
    if fs.filesystem_type() != NSFS_MAGIC {
        return Err(AgentError::NotANetns {
            pod: pod.display_name(),
            path: pod.netns.clone(),
        });
    }
    let meta = file.metadata().map_err(open_error)?;
    Ok((file, (meta.dev(), meta.ino())))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(err) => match err.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Only a shutting-down runtime cancels a blocking task.
            Err(err) => panic!("rule task did not finish: {err}"),
        },
    }
}
