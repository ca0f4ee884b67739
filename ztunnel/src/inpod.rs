//! In-pod mode: the node agent hands pods' network namespaces over ZDS, and each gets a
//! [`PodProxy`]. This module is ztunnel's side of ZDS: connect, take the snapshot, keep up with
//! adds and deletes, answer every message, reconnect when the agent goes away.
//!
//! Pods keep running across a lost ZDS connection (the agent comes back and replays its
//! snapshot); a snapshot that no longer names a pod drains it.
//!
//! A pod's uid is the node agent's key for it (istio-cni sends the Kubernetes pod UID): Keep, Del
//! and the snapshot name pods by it, and nothing else does. The pod's workload is found by its
//! `WorkloadInfo` ([`crate::proxy::local`]), so an Add without one is refused, as Istio does; an
//! Add whose workload the state lacks is acked and served once the state delivers it, since the
//! agent's Add for a new pod routinely overtakes the control plane's push.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_mesh::state::StateStore;
use ambit_mesh::zds::{WorkloadEvent, ZdsClient, ZdsError};
use serde::Serialize;

use crate::netns::PodNetns;
use crate::proxy::local::LocalWorkload;
use crate::proxy::{PodInfo, PodProxy, ProxyContext};

/// How often a pod whose proxy failed to start is tried again (Istio's period).
const RETRY_PERIOD: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// What the admin endpoints show about a pod.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// The node agent's key for the pod.
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub identity: String,
    pub netns_inode: u64,
    pub state: &'static str,
    /// The uid of the workload the pod matched in the current state.
    pub workload: Option<String>,
    /// Why it matched none.
    pub workload_error: Option<String>,
    #[serde(skip)]
    local: Arc<LocalWorkload>,
}

/// Shared view of the manager for readiness and config dumps.
pub struct InpodStatus {
    ready: AtomicBool,
    pods: Mutex<BTreeMap<String, PodStatus>>,
    state: Arc<StateStore>,
}

impl InpodStatus {
    /// Ready once the first ZDS snapshot has been taken in and nothing is pending.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Every pod, with the workload it matches in the current state.
    pub fn pods(&self) -> Vec<PodStatus> {
        let snapshot = self.state.load();
        let mut pods: Vec<PodStatus> = self
            .pods
            .lock()
            .expect("status lock")
            .values()
            .cloned()
            .collect();
        for pod in &mut pods {
            match pod.local.find(&snapshot) {
                Ok(workload) => pod.workload = Some(workload.uid.clone()),
                Err(err) => pod.workload_error = Some(err.to_string()),
            }
        }
        pods
    }
}

/// A pod whose proxy failed to start, kept to be tried again.
struct Pending {
    info: PodInfo,
    netns: OwnedFd,
}

/// Owns every pod proxy on the node.
pub struct WorkloadManager {
    context: Arc<ProxyContext>,
    socket: PathBuf,
    pods: HashMap<String, PodProxy>,
    pending: HashMap<String, Pending>,
    /// uids named since connecting, until the snapshot ends.
    snapshot: Option<HashSet<String>>,
    status: Arc<InpodStatus>,
}

impl WorkloadManager {
    pub fn new(context: Arc<ProxyContext>, socket: PathBuf) -> Self {
        let status = Arc::new(InpodStatus {
            ready: AtomicBool::new(false),
            pods: Mutex::default(),
            state: context.state.clone(),
        });
        WorkloadManager {
            context,
            socket,
            pods: HashMap::new(),
            pending: HashMap::new(),
            snapshot: None,
            status,
        }
    }

    pub fn status(&self) -> Arc<InpodStatus> {
        self.status.clone()
    }

    /// Serves ZDS forever: connect, handle, reconnect with backoff.
    pub async fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        loop {
            match ZdsClient::connect(&self.socket).await {
                Ok(client) => {
                    tracing::info!(socket = %self.socket.display(), "connected to the node agent");
                    self.snapshot = Some(HashSet::new());
                    let err = self.serve(client, &mut backoff).await;
                    tracing::warn!(error = %err, "ZDS connection lost; pods keep running, reconnecting");
                }
                Err(err) => {
                    tracing::debug!(socket = %self.socket.display(), error = %err, "node agent not reachable yet");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Answers requests until the connection fails. `backoff` goes back to the minimum only once a
    /// request has been answered: an agent that accepts and hangs up at once (crash-looping, or
    /// refusing our hello) must not be reconnected to every few milliseconds.
    async fn serve(&mut self, mut client: ZdsClient, backoff: &mut Duration) -> ZdsError {
        let mut retry = tokio::time::interval(RETRY_PERIOD);
        retry.tick().await;
        loop {
            let event = tokio::select! {
                event = client.next() => event,
                _ = retry.tick() => {
                    self.retry_pending().await;
                    continue;
                }
            };
            let answer = match event {
                Ok(event) => self.handle(event).await,
                Err(err) if err.is_recoverable() => {
                    tracing::warn!(error = %err, "bad ZDS message; refusing it");
                    Err(err.to_string())
                }
                Err(err) => return err,
            };
            let sent = match answer {
                Ok(()) => client.ack().await,
                Err(reason) => client.nack(&reason).await,
            };
            if let Err(err) = sent {
                return err;
            }
            *backoff = MIN_BACKOFF;
        }
    }

    async fn handle(&mut self, event: WorkloadEvent) -> Result<(), String> {
        match event {
            WorkloadEvent::Add { uid, info, netns } => {
                self.note_in_snapshot(&uid);
                let Some(info) = info else {
                    return Err(format!(
                        "AddWorkload for pod {uid} has no WorkloadInfo; ztunnel finds a pod's \
                         workload by its name, namespace and service account"
                    ));
                };
                if info.name.is_empty() || info.namespace.is_empty() {
                    return Err(format!(
                        "AddWorkload for pod {uid}: WorkloadInfo needs the pod's name and \
                         namespace (got name {:?}, namespace {:?})",
                        info.name, info.namespace
                    ));
                }
                let info = PodInfo {
                    uid: uid.clone(),
                    name: info.name,
                    namespace: info.namespace,
                    service_account: info.service_account,
                };
                self.add(info, netns).await
            }
            WorkloadEvent::Keep { uid } => {
                if self.snapshot.is_none() {
                    return Err(format!(
                        "KeepWorkload for {uid} after the snapshot; only Add and Del are valid now"
                    ));
                }
                self.note_in_snapshot(&uid);
                Ok(())
            }
            WorkloadEvent::Del { uid } => {
                self.pending.remove(&uid);
                if self.pods.remove(&uid).is_some() {
                    tracing::info!(pod = %uid, "pod removed; its proxy is stopped");
                }
                self.publish();
                Ok(())
            }
            WorkloadEvent::SnapshotSent => {
                // A second SnapshotSent on one connection names no pod: acted on, it would drain
                // every pod on the node.
                let Some(named) = self.snapshot.take() else {
                    return Err(
                        "SnapshotSent after the snapshot was already complete; ignored, no pod \
                         is drained"
                            .into(),
                    );
                };
                let stale: Vec<String> = self
                    .pods
                    .keys()
                    .chain(self.pending.keys())
                    .filter(|uid| !named.contains(*uid))
                    .cloned()
                    .collect();
                for uid in stale {
                    tracing::info!(pod = %uid, "pod missing from the node agent's snapshot; draining");
                    self.pods.remove(&uid);
                    self.pending.remove(&uid);
                }
                self.status
                    .ready
                    .store(self.pending.is_empty(), Ordering::Release);
                self.publish();
                Ok(())
            }
        }
    }

    fn note_in_snapshot(&mut self, uid: &str) {
        if let Some(named) = &mut self.snapshot {
            named.insert(uid.to_owned());
        }
    }

    async fn add(&mut self, info: PodInfo, netns: OwnedFd) -> Result<(), String> {
        let uid = info.uid.clone();
        let netns = PodNetns::new(netns).map_err(|e| format!("pod {uid}: {e}"))?;
        let enrolled = (self.pods.get(&uid).map(|p| &p.info))
            .or_else(|| self.pending.get(&uid).map(|p| &p.info));
        if let Some(enrolled) = enrolled.filter(|enrolled| **enrolled != info) {
            // One key for two pods would let a Del or a snapshot for one remove the other.
            return Err(format!(
                "uid {uid} already names pod {}/{}; the node agent must delete it before \
                 reusing the uid for pod {}/{}",
                enrolled.namespace, enrolled.name, info.namespace, info.name
            ));
        }
        if let Some(existing) = self.pods.get(&uid) {
            if existing.netns_inode() == netns.inode() {
                return Ok(());
            }
            tracing::info!(pod = %uid, "pod re-added with a new network namespace; replacing its proxy");
            self.pods.remove(&uid);
        }
        let result = self.start(info.clone(), netns).await;
        if let Err(err) = &result {
            tracing::warn!(pod = %uid, error = %err, "pod proxy failed to start; will retry");
        }
        result
    }

    async fn start(&mut self, info: PodInfo, netns: PodNetns) -> Result<(), String> {
        let uid = info.uid.clone();
        let keep = netns.fd().try_clone().map_err(|e| e.to_string())?;
        match PodProxy::start(self.context.clone(), info.clone(), netns).await {
            Ok(proxy) => {
                self.pending.remove(&uid);
                self.pods.insert(uid, proxy);
                self.publish();
                Ok(())
            }
            Err(err) => {
                self.pending.insert(uid, Pending { info, netns: keep });
                self.publish();
                Err(err.to_string())
            }
        }
    }

    async fn retry_pending(&mut self) {
        let uids: Vec<String> = self.pending.keys().cloned().collect();
        for uid in uids {
            let Some(pending) = self.pending.remove(&uid) else {
                continue;
            };
            let Ok(netns) = PodNetns::new(pending.netns) else {
                continue;
            };
            let _ = self.start(pending.info, netns).await;
        }
        if self.snapshot.is_none() && self.pending.is_empty() {
            self.status.ready.store(true, Ordering::Release);
        }
    }

    fn publish(&self) {
        let status = |info: &PodInfo, identity: String, netns_inode, state| PodStatus {
            uid: info.uid.clone(),
            name: info.name.clone(),
            namespace: info.namespace.clone(),
            service_account: info.service_account.clone(),
            identity,
            netns_inode,
            state,
            workload: None,
            workload_error: None,
            local: Arc::new(LocalWorkload {
                pod: info.clone(),
                node: self.context.node.clone(),
            }),
        };
        let mut pods = BTreeMap::new();
        for (uid, proxy) in &self.pods {
            let running = status(
                &proxy.info,
                proxy.identity.to_string(),
                proxy.netns_inode(),
                "running",
            );
            pods.insert(uid.clone(), running);
        }
        for (uid, pending) in &self.pending {
            pods.insert(
                uid.clone(),
                status(&pending.info, String::new(), 0, "pending"),
            );
        }
        *self.status.pods.lock().expect("status lock") = pods;
    }
}
