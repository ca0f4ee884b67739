//! The node agent on Kubernetes: watches the pods of its node and all namespaces, and keeps each
//! pod's enrollment in line with istio-cni's rules ([`enrollment`]).
//!
//! One task owns all state and handles, one at a time: pod and namespace watch events (kube-rs'
//! [`watcher`], which relists by itself when the API server answers 410 Gone), events from the
//! CNI plugin ([`crate::plugin::event`]) and retries. For each pod it compares what should be
//! (enrolled or not) with what is, and closes the gap:
//!
//! - to enroll: find the pod's network namespace (the one the CNI plugin named, or by the pod's
//!   IP, see [`NetnsLocator`]), install the rules and hand it to ztunnel ([`NodeAgent::enroll`]),
//!   then PATCH `pods/status` with `ambient.istio.io/redirection: enabled` (a JSON merge patch on
//!   the status subresource, as istio-cni does), last, because istiod only tells peers to use
//!   HBONE towards annotated pods;
//! - to unenroll (label removed, pod Succeeded/Failed, pod deleted): [`NodeAgent::unenroll`]
//!   (rules, then ZDS Del), then remove the annotation if the pod still exists.
//!
//! - kubelet probes: while a pod is enrolled, its addresses are in the node's probe SNAT
//!   ([`rules::probes`]), so the kubelet's probes reach it from 169.254.7.127, which its in-pod
//!   rules leave to the app. Synced after the rest (a failure there is retried, but does not hold
//!   back the enrollment), and from scratch when the agent starts.
//!
//! A step that fails (no namespace holds the pod's IP yet, no ztunnel, an API error) is retried
//! with exponential backoff; [`NodeAgent::enroll`] never leaves a pod half-enrolled, and a pod is
//! only recorded once the whole enrollment went through, so a retry starts clean.
//!
//! Nothing is decided before both watches have listed once: before that, a pod's namespace would
//! look unlabeled. And the ZDS socket only opens then, with the pods the previous agent left
//! annotated already in ztunnel's snapshot ([`NodeAgent::start_with_pods`]): an agent restart
//! does not disturb running pods.

mod pod;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::time::{delay_queue, DelayQueue};

use crate::agent::{
    enrollment, EnrolledPod, Enrollment, NodeAgent, REDIRECTION_ANNOTATION, REDIRECTION_ENABLED,
};
use crate::locate::{self, NetnsLocator};
use crate::plugin::event::{EventKind, EventReply, PluginRequest, PodEvent};
use crate::rules::{self, Backend, RuleOptions};

pub use pod::PodKey;

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// This node's name (`spec.nodeName` of the pods to manage).
    pub node_name: String,
    /// Where ztunnel connects (ZDS), how rules are installed.
    pub zds_socket: PathBuf,
    pub backend: Backend,
    pub rule_options: RuleOptions,
    /// How long an enrollment waits for ztunnel.
    pub ztunnel_timeout: Duration,
    pub locator: NetnsLocator,
    /// Namespaces never enrolled, whatever their labels (istio-cni's `excludeNamespaces`;
    /// `kube-system` and the agent's own namespace, where ztunnel runs).
    pub excluded_namespaces: Vec<String>,
    /// The node's network namespace, where the kubelet's probes of enrolled pods are SNATed to
    /// `rule_options.probe_address` ([`rules::probes`]); `None` leaves probes alone. The agent
    /// runs with the host's network, so by default its own (`/proc/self/ns/net`).
    pub probe_netns: Option<PathBuf>,
    /// First retry delay after a failure; doubled per failure up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl ControllerConfig {
    /// Defaults for a node: istio-cni's socket paths and rules, retries 200 ms → 10 s.
    pub fn new(node_name: impl Into<String>) -> Self {
        ControllerConfig {
            node_name: node_name.into(),
            zds_socket: ambit_mesh::zds::DEFAULT_SOCKET_PATH.into(),
            backend: Backend::Iptables,
            rule_options: RuleOptions::default(),
            ztunnel_timeout: crate::agent::DEFAULT_ZTUNNEL_TIMEOUT,
            locator: NetnsLocator::default(),
            excluded_namespaces: vec!["kube-system".into()],
            probe_netns: Some(PathBuf::from("/proc/self/ns/net")),
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(10),
        }
    }
}

/// Why the controller stopped. It only stops when it cannot go on at all.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("cannot start the node agent: {0}")]
    Agent(#[source] crate::agent::AgentError),
    #[error("the {0} watch ended; the controller cannot go on without it")]
    WatchEnded(&'static str),
}

/// What the controller did, counted (for tests and logs): pods handed to the node agent, and
/// taken back.
#[derive(Debug, Default)]
pub struct Stats {
    pub enrollments: AtomicUsize,
    pub unenrollments: AtomicUsize,
}

/// The controller: create it, hand [`plugin_requests`](Self::plugin_requests) to the plugin
/// socket's server, then [`run`](Self::run) it.
pub struct Controller {
    client: Client,
    config: ControllerConfig,
    requests_tx: mpsc::Sender<PluginRequest>,
    requests: mpsc::Receiver<PluginRequest>,
    agent_tx: tokio::sync::watch::Sender<Option<Arc<NodeAgent>>>,
    stats: Arc<Stats>,
}

impl Controller {
    pub fn new(client: Client, config: ControllerConfig) -> Self {
        let (requests_tx, requests) = mpsc::channel(64);
        Controller {
            client,
            config,
            requests_tx,
            requests,
            agent_tx: tokio::sync::watch::Sender::new(None),
            stats: Arc::default(),
        }
    }

    /// Counters of what the controller did.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Where the plugin socket's server sends the CNI plugin's events. They wait until the
    /// first sync is done.
    pub fn plugin_requests(&self) -> mpsc::Sender<PluginRequest> {
        self.requests_tx.clone()
    }

    /// The node agent, once the first sync has started it (for tests and health checks).
    pub fn agent(&self) -> tokio::sync::watch::Receiver<Option<Arc<NodeAgent>>> {
        self.agent_tx.subscribe()
    }

    /// Runs until a watch stream ends (which kube-rs' watcher never does by itself) or the node
    /// agent cannot start.
    pub async fn run(self) -> Result<(), ControllerError> {
        let Controller {
            client,
            config,
            requests_tx,
            mut requests,
            agent_tx,
            stats,
        } = self;
        drop(requests_tx);
        let pods_api: Api<Pod> = Api::all(client.clone());
        let namespaces_api: Api<Namespace> = Api::all(client.clone());
        let pod_config =
            watcher::Config::default().fields(&format!("spec.nodeName={}", config.node_name));
        let mut pod_events = watcher(pods_api, pod_config).default_backoff().boxed();
        let mut namespace_events = watcher(namespaces_api, watcher::Config::default())
            .default_backoff()
            .boxed();

        let mut state = State::new(client, config, stats);
        // First sync: both lists, nothing decided yet.
        while !(state.pods_synced && state.namespaces_synced) {
            tokio::select! {
                event = pod_events.next() => {
                    let event = event.ok_or(ControllerError::WatchEnded("pod"))?;
                    state.on_pod_event(event).await;
                }
                event = namespace_events.next() => {
                    let event = event.ok_or(ControllerError::WatchEnded("namespace"))?;
                    state.on_namespace_event(event).await;
                }
            }
        }
        state.start_agent().await?;
        agent_tx.send_replace(state.agent.clone());
        state.reconcile_all().await;

        loop {
            tokio::select! {
                event = pod_events.next() => {
                    let event = event.ok_or(ControllerError::WatchEnded("pod"))?;
                    state.on_pod_event(event).await;
                }
                event = namespace_events.next() => {
                    let event = event.ok_or(ControllerError::WatchEnded("namespace"))?;
                    state.on_namespace_event(event).await;
                }
                Some(request) = requests.recv() => state.on_plugin_request(request).await,
                Some(expired) = state.retries.next(), if !state.retries.is_empty() => {
                    let key = expired.into_inner();
                    state.retry_timers.remove(&key);
                    state.reconcile(&key).await;
                }
            }
        }
    }
}

/// A pod this agent enrolled.
#[derive(Clone, Debug)]
struct Enrolled {
    uid: String,
}

/// The sandbox namespace the CNI plugin named for a pod.
#[derive(Clone, Debug)]
struct Hint {
    netns: PathBuf,
    ips: Vec<IpAddr>,
}

struct State {
    client: Client,
    stats: Arc<Stats>,
    config: ControllerConfig,
    agent: Option<Arc<NodeAgent>>,
    pods: HashMap<PodKey, Pod>,
    namespaces: HashMap<String, BTreeMap<String, String>>,
    /// During a (re)list: what it has named so far.
    listing_pods: Option<HashSet<PodKey>>,
    listing_namespaces: Option<HashSet<String>>,
    pods_synced: bool,
    namespaces_synced: bool,
    enrolled: HashMap<PodKey, Enrolled>,
    hints: HashMap<PodKey, Hint>,
    retries: DelayQueue<PodKey>,
    retry_timers: HashMap<PodKey, delay_queue::Key>,
    /// The delay after the next failure, per pod.
    backoff: HashMap<PodKey, Duration>,
    /// The node's namespace for the probe SNAT (`config.probe_netns`, opened at start).
    probe_netns: Option<Arc<std::fs::File>>,
    /// Per pod, the addresses in the probe SNAT.
    probe_ips: HashMap<PodKey, Vec<IpAddr>>,
}

impl State {
    fn new(client: Client, config: ControllerConfig, stats: Arc<Stats>) -> Self {
        State {
            client,
            stats,
            config,
            agent: None,
            pods: HashMap::new(),
            namespaces: HashMap::new(),
            listing_pods: None,
            listing_namespaces: None,
            pods_synced: false,
            namespaces_synced: false,
            enrolled: HashMap::new(),
            hints: HashMap::new(),
            retries: DelayQueue::new(),
            retry_timers: HashMap::new(),
            backoff: HashMap::new(),
            probe_netns: None,
            probe_ips: HashMap::new(),
        }
    }

    fn ready(&self) -> bool {
        self.agent.is_some()
    }

    async fn on_pod_event(&mut self, event: Result<Event<Pod>, watcher::Error>) {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                // The watcher recovers by itself (re-watch, or relist after 410 Gone), after
                // the backoff.
                tracing::warn!(%error, "pod watch failed; recovering");
                return;
            }
        };
        tracing::debug!(event = ?event_name(&event), "pod event");
        match event {
            Event::Init => self.listing_pods = Some(HashSet::new()),
            Event::InitApply(pod) => {
                let key = PodKey::of(&pod);
                if let Some(listed) = &mut self.listing_pods {
                    listed.insert(key.clone());
                }
                self.pod_changed(key, pod).await;
            }
            Event::InitDone => {
                let listed = self.listing_pods.take().unwrap_or_default();
                // Pods missing from a relist were deleted while we were not watching.
                let gone: Vec<PodKey> = self
                    .pods
                    .keys()
                    .filter(|key| !listed.contains(*key))
                    .cloned()
                    .collect();
                for key in gone {
                    self.pod_deleted(key).await;
                }
                self.pods_synced = true;
            }
            Event::Apply(pod) => {
                let key = PodKey::of(&pod);
                self.pod_changed(key, pod).await;
            }
            Event::Delete(pod) => self.pod_deleted(PodKey::of(&pod)).await,
        }
    }

    async fn pod_changed(&mut self, key: PodKey, pod: Pod) {
        // Only what decides enrollment matters; a status heartbeat is not worth a reconcile.
        let unchanged = self
            .pods
            .get(&key)
            .is_some_and(|old| same_for_us(old, &pod));
        self.pods.insert(key.clone(), pod);
        if !unchanged && self.ready() {
            self.reconcile(&key).await;
        }
    }

    async fn pod_deleted(&mut self, key: PodKey) {
        self.pods.remove(&key);
        self.hints.remove(&key);
        if self.ready() {
            self.reconcile(&key).await;
        }
    }

    async fn on_namespace_event(&mut self, event: Result<Event<Namespace>, watcher::Error>) {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, "namespace watch failed; recovering");
                return;
            }
        };
        tracing::debug!(event = ?event_name(&event), "namespace event");
        match event {
            Event::Init => self.listing_namespaces = Some(HashSet::new()),
            Event::InitApply(namespace) => {
                let name = namespace.metadata.name.clone().unwrap_or_default();
                if let Some(listed) = &mut self.listing_namespaces {
                    listed.insert(name.clone());
                }
                self.namespace_changed(name, Some(namespace)).await;
            }
            Event::InitDone => {
                let listed = self.listing_namespaces.take().unwrap_or_default();
                let gone: Vec<String> = self
                    .namespaces
                    .keys()
                    .filter(|name| !listed.contains(*name))
                    .cloned()
                    .collect();
                for name in gone {
                    self.namespace_changed(name, None).await;
                }
                self.namespaces_synced = true;
            }
            Event::Apply(namespace) => {
                let name = namespace.metadata.name.clone().unwrap_or_default();
                self.namespace_changed(name, Some(namespace)).await;
            }
            Event::Delete(namespace) => {
                let name = namespace.metadata.name.clone().unwrap_or_default();
                self.namespace_changed(name, None).await;
            }
        }
    }

    /// Records a namespace's labels; if they changed, reconsiders every pod in it (istio-cni
    /// re-queues them all the same way).
    async fn namespace_changed(&mut self, name: String, namespace: Option<Namespace>) {
        let labels = namespace.map(|n| n.metadata.labels.unwrap_or_default());
        let changed = self.namespaces.get(&name) != labels.as_ref();
        match labels {
            Some(labels) => self.namespaces.insert(name.clone(), labels),
            None => self.namespaces.remove(&name),
        };
        if !changed || !self.ready() {
            return;
        }
        let mut keys: Vec<PodKey> = self
            .pods
            .keys()
            .filter(|key| key.namespace == name)
            .cloned()
            .collect();
        keys.sort();
        for key in keys {
            self.reconcile(&key).await;
        }
    }

    async fn reconcile_all(&mut self) {
        let mut keys: Vec<PodKey> = self.pods.keys().cloned().collect();
        keys.extend(self.enrolled.keys().cloned());
        keys.sort();
        keys.dedup();
        for key in keys {
            self.reconcile(&key).await;
        }
    }

    /// Why `pod` is not to be enrolled, or `None` if it is.
    fn exclusion(&self, pod: &Pod) -> Option<String> {
        if pod::is_terminal(pod) {
            return Some("the pod has terminated".into());
        }
        let meta = pod::meta(pod);
        if self.config.excluded_namespaces.contains(&meta.namespace) {
            return Some(format!(
                "namespace {} is excluded from the mesh",
                meta.namespace
            ));
        }
        let no_labels = BTreeMap::new();
        let namespace_labels = self.namespaces.get(&meta.namespace).unwrap_or(&no_labels);
        match enrollment(&meta, namespace_labels) {
            Enrollment::Enrolled => None,
            Enrollment::NotEnrolled(reason) => Some(reason.to_string()),
        }
    }

    /// Brings one pod in line, scheduling a retry with backoff if a step fails.
    async fn reconcile(&mut self, key: &PodKey) {
        match self.converge(key).await {
            Ok(()) => {
                if let Some(timer) = self.retry_timers.remove(key) {
                    self.retries.remove(&timer);
                }
                self.backoff.remove(key);
            }
            Err(reason) => {
                let delay = self
                    .backoff
                    .get(key)
                    .copied()
                    .unwrap_or(self.config.retry_initial);
                self.backoff
                    .insert(key.clone(), (delay * 2).min(self.config.retry_max));
                tracing::warn!(pod = %key, retry_in = ?delay, "{reason}");
                match self.retry_timers.get(key) {
                    Some(timer) => self.retries.reset(timer, delay),
                    None => {
                        let timer = self.retries.insert(key.clone(), delay);
                        self.retry_timers.insert(key.clone(), timer);
                    }
                }
            }
        }
    }

    async fn converge(&mut self, key: &PodKey) -> Result<(), String> {
        let agent = self
            .agent
            .clone()
            .expect("reconciles start after the agent");
        let pod = self.pods.get(key).cloned();
        let wanted = pod.as_ref().filter(|pod| self.exclusion(pod).is_none());
        let current = self.enrolled.get(key).cloned();

        // Whatever we enrolled under this name that is not what should be enrolled now (label
        // gone, pod gone, or a new pod with the same name) goes first.
        if let Some(current) = &current {
            if wanted.map(pod::uid).as_ref() != Some(&current.uid) {
                agent
                    .unenroll(&current.uid)
                    .await
                    .map_err(|e| e.to_string())?;
                self.stats.unenrollments.fetch_add(1, Ordering::Relaxed);
                self.enrolled.remove(key);
            }
        }

        let Some(pod) = wanted.cloned() else {
            if let Some(pod) = &pod {
                if pod::is_annotated(pod) {
                    if current.is_none() {
                        // Annotated, yet not ours: left by an earlier agent, whose rules may
                        // still be in the pod. Out they go, or its traffic would keep going to a
                        // ztunnel that no longer serves it.
                        self.remove_leftover_rules(key, pod).await?;
                    }
                    self.annotate(key, false).await?;
                }
            }
            // Last, so that a failure here never holds back the annotation's removal; a stale
            // entry only SNATs the node's own connections to a pod that serves them all the same.
            return self.sync_probes(key, Vec::new()).await;
        };

        if !self.enrolled.contains_key(key) {
            let Some(netns) = self.netns_of(key, &pod).await? else {
                tracing::debug!(pod = %key, "no IP yet; waiting for the pod's next update");
                return Ok(());
            };
            let uid = pod::uid(&pod);
            agent
                .enroll(EnrolledPod {
                    uid: uid.clone(),
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    service_account: pod::service_account(&pod),
                    netns,
                })
                .await
                .map_err(|e| e.to_string())?;
            self.stats.enrollments.fetch_add(1, Ordering::Relaxed);
            self.enrolled.insert(key.clone(), Enrolled { uid });
        }
        if !pod::is_annotated(&pod) {
            self.annotate(key, true).await?;
        }
        let mut ips = pod::ips(&pod);
        ips.extend(
            self.hints
                .get(key)
                .map(|h| h.ips.clone())
                .unwrap_or_default(),
        );
        self.sync_probes(key, ips).await
    }

    /// Makes the probe SNAT hold exactly `ips` for this pod. An address another pod holds too
    /// (a terminated pod's, reused) stays.
    async fn sync_probes(&mut self, key: &PodKey, mut ips: Vec<IpAddr>) -> Result<(), String> {
        let Some(netns) = self.probe_netns.clone() else {
            return Ok(());
        };
        ips.sort();
        ips.dedup();
        let old = self.probe_ips.get(key).cloned().unwrap_or_default();
        if old == ips {
            return Ok(());
        }
        let remove: Vec<IpAddr> = old
            .into_iter()
            .filter(|ip| {
                !ips.contains(ip)
                    && !self
                        .probe_ips
                        .iter()
                        .any(|(other, held)| other != key && held.contains(ip))
            })
            .collect();
        let options = self.config.rule_options.clone();
        let add = ips.clone();
        tokio::task::spawn_blocking(move || {
            rules::probes::update(&*netns, &options, &add, &remove)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("pod {key}: updating the node's kubelet-probe SNAT: {e}"))?;
        if ips.is_empty() {
            self.probe_ips.remove(key);
        } else {
            self.probe_ips.insert(key.clone(), ips);
        }
        Ok(())
    }

    /// The pod's namespace: the CNI plugin's if it still exists, else the one holding its IPs.
    /// `Ok(None)` when the pod has no IP yet (its update will come); an error, to retry, when no
    /// namespace holds its IPs yet.
    async fn netns_of(&self, key: &PodKey, pod: &Pod) -> Result<Option<PathBuf>, String> {
        let mut ips = pod::ips(pod);
        if let Some(hint) = self.hints.get(key) {
            if locate::exists(&hint.netns) {
                return Ok(Some(hint.netns.clone()));
            }
            ips.extend(hint.ips.iter().copied());
        }
        if ips.is_empty() {
            return Ok(None);
        }
        let locator = self.config.locator.clone();
        let search = ips.clone();
        let found = tokio::task::spawn_blocking(move || locator.find(&search))
            .await
            .map_err(|e| format!("searching the network namespaces failed: {e}"))?
            .map_err(|e| e.to_string())?;
        match found {
            Some(netns) => Ok(Some(netns)),
            None => Err(format!(
                "pod {key}: no network namespace on this node holds its address {} yet; not \
                 enrolled, will retry",
                ips.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    async fn remove_leftover_rules(&self, key: &PodKey, pod: &Pod) -> Result<(), String> {
        let ips = pod::ips(pod);
        let locator = self.config.locator.clone();
        let backend = self.config.backend;
        let removed = tokio::task::spawn_blocking(move || -> Result<bool, String> {
            let Some(path) = locator.find(&ips).map_err(|e| e.to_string())? else {
                return Ok(false);
            };
            let netns = std::fs::File::open(&path).map_err(|e| e.to_string())?;
            rules::remove(netns, backend).map_err(|e| e.to_string())?;
            Ok(true)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("pod {key}: removing redirect rules left by an earlier agent: {e}"))?;
        if removed {
            tracing::info!(pod = %key, "removed redirect rules an earlier agent left in the pod");
        }
        Ok(())
    }

    /// Sets or removes `ambient.istio.io/redirection` with a merge patch on `pods/status`, and
    /// records the patched pod so the next watch event is not mistaken for a change.
    async fn annotate(&mut self, key: &PodKey, enabled: bool) -> Result<(), String> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &key.namespace);
        let value = enabled.then_some(REDIRECTION_ENABLED);
        let patch = json!({ "metadata": { "annotations": { REDIRECTION_ANNOTATION: value } } });
        match api
            .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(patched) => {
                tracing::info!(pod = %key, annotation = REDIRECTION_ANNOTATION, ?value, "pod annotated");
                if let Some(pod) = self.pods.get_mut(key) {
                    pod.metadata.annotations = patched.metadata.annotations;
                }
                Ok(())
            }
            // Gone meanwhile: nothing left to annotate.
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(error) => Err(format!(
                "pod {key}: cannot set the {REDIRECTION_ANNOTATION} annotation: {error}"
            )),
        }
    }

    /// Starts the node agent once the first sync is done, with the pods the previous agent left
    /// annotated (and that still belong) already recorded for ztunnel's snapshot.
    async fn start_agent(&mut self) -> Result<(), ControllerError> {
        let mut adopted = Vec::new();
        for (key, pod) in &self.pods {
            if !pod::is_annotated(pod) || self.exclusion(pod).is_some() {
                continue;
            }
            match self.netns_of(key, pod).await {
                Ok(Some(netns)) => adopted.push(EnrolledPod {
                    uid: pod::uid(pod),
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    service_account: pod::service_account(pod),
                    netns,
                }),
                Ok(None) => {}
                Err(reason) => {
                    tracing::warn!(pod = %key, "cannot keep an enrolled pod across the restart: {reason}")
                }
            }
        }
        let (agent, failed) = NodeAgent::start_with_pods(
            &self.config.zds_socket,
            self.config.backend,
            self.config.rule_options.clone(),
            adopted.clone(),
        )
        .await
        .map_err(ControllerError::Agent)?;
        agent.set_ztunnel_timeout(self.config.ztunnel_timeout);
        let failed: HashSet<String> = failed
            .into_iter()
            .map(|(pod, error)| {
                tracing::warn!(pod = %pod.name, %error, "re-enrolling an annotated pod failed");
                pod.uid
            })
            .collect();
        for pod in adopted.into_iter().filter(|p| !failed.contains(&p.uid)) {
            let key = PodKey::new(&pod.namespace, &pod.name);
            if let Some(ips) = self.pods.get(&key).map(pod::ips) {
                self.probe_ips.insert(key.clone(), ips);
            }
            self.enrolled.insert(key, Enrolled { uid: pod.uid });
        }
        self.start_probes().await;
        self.agent = Some(agent);
        Ok(())
    }

    /// Opens the node's namespace and converges its probe SNAT to the pods kept across the
    /// restart (dropping what the previous agent left for pods gone since). A failure is logged
    /// and the SNAT is retried with each pod's next sync.
    async fn start_probes(&mut self) {
        let Some(path) = self.config.probe_netns.clone() else {
            return;
        };
        let netns = match std::fs::File::open(&path) {
            Ok(netns) => Arc::new(netns),
            Err(error) => {
                tracing::error!(netns = %path.display(), %error, "cannot open the node's network namespace; kubelet probes of enrolled pods will not be SNATed");
                return;
            }
        };
        self.probe_netns = Some(netns.clone());
        let mut ips: Vec<IpAddr> = self.probe_ips.values().flatten().copied().collect();
        ips.sort();
        ips.dedup();
        let options = self.config.rule_options.clone();
        let installed =
            tokio::task::spawn_blocking(move || rules::probes::install(&*netns, &options, &ips))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(error) = installed {
            tracing::error!(%error, "cannot install the node's kubelet-probe SNAT; retried as pods are enrolled");
            // Nothing is known to be installed: every pod's next sync adds its addresses.
            self.probe_ips.clear();
        }
    }

    async fn on_plugin_request(&mut self, request: PluginRequest) {
        let PluginRequest { kind, event, reply } = request;
        let key = PodKey::new(&event.pod_namespace, &event.pod_name);
        let verdict = match kind {
            EventKind::Add => self.plugin_add(&key, event).await,
            EventKind::Check => self.plugin_check(&key).await,
        };
        if let Err(message) = &verdict {
            tracing::warn!(pod = %key, ?kind, "CNI plugin event failed: {message}");
        }
        let _ = reply.send(verdict);
    }

    /// The pod as the API has it now, and its namespace's labels recorded as they are now. The
    /// plugin runs as the sandbox starts, usually before the watch has shown the pod, and maybe
    /// before it has shown a label that was just set: so both are read fresh (as istio-cni's
    /// plugin does), and a namespace found changed is handled as its watch event would be (its
    /// pods reconsidered), which makes the event itself a no-op when it comes. Without the API,
    /// the watch's view is used.
    async fn fetch(&mut self, key: &PodKey) -> Result<Pod, String> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &key.namespace);
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let fresh = match pods.get(&key.name).await {
            Ok(pod) => namespaces.get(&key.namespace).await.map(|ns| (pod, ns)),
            Err(error) => Err(error),
        };
        match fresh {
            Ok((pod, namespace)) => {
                self.pods.insert(key.clone(), pod.clone());
                self.namespace_changed(key.namespace.clone(), Some(namespace))
                    .await;
                Ok(pod)
            }
            Err(error) => match self.pods.get(key) {
                Some(pod) => {
                    tracing::warn!(pod = %key, %error, "cannot read the pod from the API server; deciding on the watch's view");
                    Ok(pod.clone())
                }
                None => Err(format!(
                    "cannot read pod {key} from the API server: {error}"
                )),
            },
        }
    }

    async fn plugin_add(&mut self, key: &PodKey, event: PodEvent) -> Result<EventReply, String> {
        let pod = self.fetch(key).await?;
        if let Some(reason) = self.exclusion(&pod) {
            return Ok(EventReply {
                enrolled: false,
                reason,
            });
        }
        self.hints.insert(
            key.clone(),
            Hint {
                netns: event.netns,
                ips: event.ips,
            },
        );
        // The sandbox is new: whatever we had for this pod is from an older one.
        if let Some(enrolled) = self.enrolled.get(key) {
            if enrolled.uid == pod::uid(&pod) {
                self.enrolled.remove(key);
            }
        }
        match self.converge(key).await {
            Ok(()) if self.enrolled.contains_key(key) => {
                self.backoff.remove(key);
                Ok(EventReply {
                    enrolled: true,
                    reason: String::new(),
                })
            }
            Ok(()) => Err(format!("pod {key} could not be enrolled")),
            Err(reason) if self.enrolled.contains_key(key) => {
                // Enrolled; only the annotation is missing: the pod may start, the annotation
                // follows on the retry.
                self.reconcile(key).await;
                tracing::warn!(pod = %key, "{reason}");
                Ok(EventReply {
                    enrolled: true,
                    reason: String::new(),
                })
            }
            Err(reason) => Err(reason),
        }
    }

    async fn plugin_check(&mut self, key: &PodKey) -> Result<EventReply, String> {
        let pod = self.fetch(key).await?;
        if let Some(reason) = self.exclusion(&pod) {
            return Ok(EventReply {
                enrolled: false,
                reason,
            });
        }
        match self.enrolled.get(key) {
            Some(enrolled) if enrolled.uid == pod::uid(&pod) => Ok(EventReply {
                enrolled: true,
                reason: String::new(),
            }),
            _ => Err(format!(
                "pod {key} belongs in the ambient mesh but is not enrolled"
            )),
        }
    }
}

/// An event's type and object name, for the logs.
fn event_name<K: kube::Resource>(event: &Event<K>) -> String {
    use kube::ResourceExt;
    match event {
        Event::Init => "Init".into(),
        Event::InitApply(o) => format!("InitApply {}", o.name_any()),
        Event::InitDone => "InitDone".into(),
        Event::Apply(o) => format!("Apply {}", o.name_any()),
        Event::Delete(o) => format!("Delete {}", o.name_any()),
    }
}

/// True if nothing the controller looks at differs between two versions of a pod.
fn same_for_us(old: &Pod, new: &Pod) -> bool {
    pod::uid(old) == pod::uid(new)
        && pod::meta(old) == pod::meta(new)
        && pod::ips(old) == pod::ips(new)
        && pod::is_terminal(old) == pod::is_terminal(new)
}
