//! WasmPlugins in the waypoint: which plugins apply to a request (targetRefs, ports), in which
//! order (phase, then priority), and loading them into the process's one Wasm runtime. Modules
//! come from files (`file://` or an absolute path, `sha256` checked) or are [fetched](remote)
//! and cached as Istio's agent does: `https://`/`http://` URLs, and OCI images (`oci://`, or a
//! url without a scheme), with `sha256` and `imagePullPolicy` as Istio reads them. A changed
//! plugin is loaded beside the old one and swapped in; requests in flight keep the plugin they
//! started with. A plugin that fails to load (or whose module cannot be fetched) leaves the
//! previous version (if any) in force and is reported.
//!
//! A module that could not be fetched for a reason that may pass (the server is not up yet,
//! `5xx`, a timeout) is fetched again by [`WasmFilters::retry`] with a backoff (1 s doubling to
//! 10 s, Envoy's defaults for remote Wasm sources), for as long as the plugin stays configured,
//! with no configuration change; anything else (a digest mismatch, a module that does not
//! compile) waits for the plugin to change. Each plugin's [state](PluginStatus) and last error
//! are on `/metrics`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ambit_local::manifest::{FailStrategy as ManifestFailStrategy, WasmPhase, WasmPlugin};
use ambit_wasm_host::runtime::RuntimeError;
use ambit_wasm_host::{FailStrategy, Plugin, PluginConfig, PluginHooks, Runtime, RuntimeConfig};
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::l7::WaypointName;

pub mod remote;

use remote::{FetchError, Pull, PullPolicy, RemoteModules};

/// Why a WasmPlugin is not running.
#[derive(Debug, thiserror::Error)]
pub enum WasmPluginError {
    #[error("WasmPlugin {plugin}: url {url}: the scheme is none of file://, http://, https:// and oci:// (a url without a scheme is an OCI image)")]
    UnsupportedUrl { plugin: String, url: String },
    #[error("WasmPlugin {plugin}: fetching the module: {source}")]
    Fetch { plugin: String, source: FetchError },
    #[error("WasmPlugin {plugin}: reading {path}: {source}")]
    Read {
        plugin: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "WasmPlugin {plugin}: the module's sha256 is {actual}, but the plugin requires {expected}"
    )]
    Digest {
        plugin: String,
        expected: String,
        actual: String,
    },
    #[error("WasmPlugin {plugin}: type NETWORK plugins run in ztunnel's place in Istio; this waypoint runs HTTP plugins only")]
    Network { plugin: String },
    #[error(transparent)]
    Load(#[from] ambit_wasm_host::PluginError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

impl WasmPluginError {
    /// Loading again later may succeed with the same configuration.
    pub fn is_transient(&self) -> bool {
        matches!(self, WasmPluginError::Fetch { source, .. } if source.is_transient())
    }
}

/// The first wait before a failed fetch is tried again; it doubles up to [`RETRY_MAX`].
pub const RETRY_INITIAL: Duration = Duration::from_secs(1);
pub const RETRY_MAX: Duration = Duration::from_secs(10);

/// Where a configured plugin stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PluginState {
    /// The plugin as configured is in force.
    Running,
    /// Its module could not be fetched yet; fetched again after a backoff.
    Retrying,
    /// It cannot load as configured (digest mismatch, bad module...): not tried again until the
    /// plugin changes.
    Failed,
}

impl PluginState {
    const ALL: [PluginState; 3] = [
        PluginState::Running,
        PluginState::Retrying,
        PluginState::Failed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            PluginState::Running => "running",
            PluginState::Retrying => "retrying",
            PluginState::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        PluginState::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// One configured plugin's state, for the operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginStatus {
    /// `namespace.name`.
    pub name: String,
    pub state: PluginState,
    /// Some version of the plugin serves requests (the previous one, while a new one fails).
    pub in_force: bool,
    /// Failed attempts since the plugin last loaded or changed.
    pub failures: u32,
    pub last_error: Option<String>,
}

/// A plugin whose module is fetched again at `at`.
#[derive(Clone, Copy)]
struct Retry {
    failures: u32,
    at: Instant,
}

/// The waypoint's last configuration, for the retries.
#[derive(Default)]
struct Applied {
    plugins: Vec<WasmPlugin>,
    me: Option<WaypointName>,
    retries: HashMap<String, Retry>,
}

/// A plugin in force, with what decides where it applies.
#[derive(Clone)]
pub struct Attached {
    /// The plugin, or why a fail-closed plugin could not be loaded: then the requests it
    /// applies to are refused rather than let through unfiltered.
    pub plugin: Result<Arc<Plugin>, Arc<str>>,
    pub name: String,
    pub phase: WasmPhase,
    pub priority: i32,
    /// `None`: the whole waypoint (targetRef to its Gateway); otherwise these service names.
    pub services: Option<Vec<String>>,
    /// `match[].ports`; empty applies to all.
    pub ports: Vec<u16>,
}

/// The plugins for one request, split around the waypoint's own authorization like Istio's
/// chain: AUTHN and AUTHZ plugins run before it, STATS and unspecified ones after.
#[derive(Clone, Default)]
pub struct Selected {
    pub before_authz: Vec<Arc<Plugin>>,
    pub after_authz: Vec<Arc<Plugin>>,
    /// A fail-closed plugin that applies but is not running, with the reason.
    pub unavailable: Option<(String, Arc<str>)>,
}

impl Selected {
    pub fn is_empty(&self) -> bool {
        self.before_authz.is_empty() && self.after_authz.is_empty() && self.unavailable.is_none()
    }
}

/// What a plugin was loaded from; an unchanged key reuses the loaded plugin.
#[derive(Clone, PartialEq, Eq, Hash)]
struct LoadKey {
    name: String,
    digest: String,
    config: String,
    root_id: String,
    env: Vec<(String, String)>,
    fail_open: bool,
}

/// The waypoint's WasmPlugins.
pub struct WasmFilters {
    /// Created with the first plugin: a waypoint without plugins reserves no Wasm memory.
    runtime: OnceLock<Runtime>,
    hooks: PluginHooks,
    /// The waypoint's namespace: Service targets are services of this namespace.
    namespace: String,
    loaded: Mutex<HashMap<LoadKey, Arc<Plugin>>>,
    current: ArcSwap<Vec<Attached>>,
    /// Modules downloaded from http(s) URLs and OCI registries.
    remote: RemoteModules,
    /// The WasmPlugins of the last update: a plugin that differs is a new "resource
    /// version", when `imagePullPolicy: Always` pulls its module again. Its lock also makes
    /// updates and retries take turns.
    applied: Mutex<Applied>,
    status: ArcSwap<Vec<PluginStatus>>,
    /// The earliest retry, apart from `applied`: an update holds that lock for as long as its
    /// downloads and compiles take, and the retry task must not wait on it to learn this.
    next_retry: Mutex<Option<Instant>>,
    /// Woken when a retry is scheduled.
    retry_scheduled: Notify,
}

impl WasmFilters {
    pub fn new(hooks: PluginHooks, namespace: impl Into<String>) -> Self {
        WasmFilters {
            runtime: OnceLock::new(),
            hooks,
            namespace: namespace.into(),
            loaded: Mutex::new(HashMap::new()),
            current: ArcSwap::from_pointee(Vec::new()),
            remote: RemoteModules::default(),
            applied: Mutex::new(Applied::default()),
            status: ArcSwap::from_pointee(Vec::new()),
            next_retry: Mutex::new(None),
            retry_scheduled: Notify::new(),
        }
    }

    /// The Wasm runtime, if any plugin was ever loaded (its metrics go on `/metrics`).
    pub fn runtime(&self) -> Option<&Runtime> {
        self.runtime.get()
    }

    fn runtime_or_start(&self) -> Result<&Runtime, RuntimeError> {
        if let Some(runtime) = self.runtime.get() {
            return Ok(runtime);
        }
        let runtime = Runtime::new(RuntimeConfig::default())?;
        Ok(self.runtime.get_or_init(|| runtime))
    }

    /// Makes `plugins` (all WasmPlugins of the waypoint's configuration) the ones in force.
    /// Plugins that target something else are skipped; ones that fail to load keep their
    /// previous version, and the errors are returned for the operator. Modules that could not
    /// be fetched for now are fetched again by [`retry`](Self::retry).
    pub fn update(&self, plugins: &[WasmPlugin], me: &WaypointName) -> Vec<WasmPluginError> {
        let mut applied = self.applied.lock().expect("applied plugins lock");
        applied.me = Some(me.clone());
        self.apply(&mut applied, plugins.to_vec(), me, false)
    }

    /// Fetches again, until they load, the modules that could not be fetched, each after its
    /// backoff. Runs as long as the waypoint does.
    pub async fn retry(self: Arc<Self>) {
        loop {
            let next = *self.next_retry.lock().expect("next retry lock");
            let Some(at) = next else {
                self.retry_scheduled.notified().await;
                continue;
            };
            tokio::select! {
                () = tokio::time::sleep_until(at.into()) => {}
                // An update in between may have loaded the plugin or moved its retry.
                () = self.retry_scheduled.notified() => continue,
            }
            for error in off_the_runtime(|| self.retry_due()) {
                tracing::warn!(%error, "WasmPlugin still not loaded");
            }
        }
    }

    /// Loads the plugins whose retry is due (the rest stay as they are).
    fn retry_due(&self) -> Vec<WasmPluginError> {
        let mut applied = self.applied.lock().expect("applied plugins lock");
        let Some(me) = applied.me.clone() else {
            return Vec::new();
        };
        let plugins = applied.plugins.clone();
        self.apply(&mut applied, plugins, &me, true)
    }

    /// Each configured plugin's state.
    pub fn status(&self) -> Arc<Vec<PluginStatus>> {
        self.status.load_full()
    }

    /// `plugins` in force; `retrying`: only those whose retry is due are loaded again.
    fn apply(
        &self,
        applied: &mut Applied,
        plugins: Vec<WasmPlugin>,
        me: &WaypointName,
        retrying: bool,
    ) -> Vec<WasmPluginError> {
        let previous = self.current.load_full();
        let old_status = self.status.load_full();
        let now = Instant::now();
        let mut attached = Vec::new();
        let mut errors = Vec::new();
        let mut keep = Vec::new();
        let mut status = Vec::new();
        let mut retries = HashMap::new();
        for wasm in &plugins {
            let Some(services) = targets(wasm, me) else {
                continue;
            };
            let name = plugin_name(wasm);
            let mut entry = Attached {
                plugin: Err(Arc::from("not loaded")),
                name: name.clone(),
                phase: wasm.spec.phase,
                priority: wasm.spec.priority.unwrap_or(0),
                services,
                ports: wasm
                    .spec
                    .matches
                    .iter()
                    .flat_map(|m| m.ports.iter().copied())
                    .collect(),
            };
            let old = previous.iter().find(|a| a.name == name);
            let edited = !applied.plugins.iter().any(|p| p == wasm);
            // A change starts the backoff over.
            let retry = applied.retries.get(&name).copied().filter(|_| !edited);
            if retrying && retry.is_none_or(|r| r.at > now) {
                // Not due: what is in force stays, and so does its state.
                if let Some(old) = old {
                    attached.push(old.clone());
                }
                if let Some(retry) = retry {
                    retries.insert(name.clone(), retry);
                }
                status.extend(old_status.iter().find(|s| s.name == name).cloned());
                continue;
            }
            // A module never fetched is pulled whatever the policy says.
            let changed = edited || retry.is_some();
            let failures = retry.map_or(0, |r| r.failures);
            match off_the_runtime(|| self.load(wasm, changed)) {
                Ok((key, plugin)) => {
                    if failures > 0 {
                        tracing::info!(plugin = %name, failures, "WasmPlugin loaded after failed fetches");
                    }
                    keep.push(key);
                    entry.plugin = Ok(plugin);
                    attached.push(entry);
                    status.push(PluginStatus {
                        name,
                        state: PluginState::Running,
                        in_force: true,
                        failures: 0,
                        last_error: None,
                    });
                }
                Err(error) => {
                    // The version in force stays; with none, a fail-closed plugin refuses its
                    // requests and a fail-open one is left out.
                    let old = old.filter(|a| a.plugin.is_ok());
                    if let Some(old) = old {
                        entry.plugin = old.plugin.clone();
                        attached.push(entry);
                    } else if wasm.spec.fail_strategy != ManifestFailStrategy::FailOpen {
                        entry.plugin = Err(Arc::from(error.to_string()));
                        attached.push(entry);
                    }
                    let failures = failures + 1;
                    let state = if error.is_transient() {
                        let at = now + backoff(failures);
                        retries.insert(name.clone(), Retry { failures, at });
                        PluginState::Retrying
                    } else {
                        PluginState::Failed
                    };
                    status.push(PluginStatus {
                        name,
                        state,
                        in_force: old.is_some(),
                        failures,
                        last_error: Some(error.to_string()),
                    });
                    errors.push(error);
                }
            }
        }
        attached.sort_by_key(|a| (phase_rank(a.phase), -a.priority));
        let in_use: Vec<(&str, Option<&str>)> = plugins
            .iter()
            .map(|p| (p.spec.url.as_str(), p.spec.sha256.as_deref()))
            .collect();
        self.remote.retain(&in_use);
        let mut loaded = self.loaded.lock().expect("plugin cache lock");
        let in_force: Vec<Arc<Plugin>> = attached
            .iter()
            .filter_map(|a| a.plugin.clone().ok())
            .collect();
        loaded.retain(|key, plugin| {
            keep.contains(key) || in_force.iter().any(|p| Arc::ptr_eq(p, plugin))
        });
        drop(loaded);
        self.current.store(Arc::new(attached));
        self.status.store(Arc::new(status));
        let next = retries.values().map(|r| r.at).min();
        *self.next_retry.lock().expect("next retry lock") = next;
        applied.plugins = plugins;
        applied.retries = retries;
        if next.is_some() {
            self.retry_scheduled.notify_one();
        }
        errors
    }

    /// Each plugin's state and failures in Prometheus' text format: `ambit_wasm_plugin_state`
    /// (1 for the state it is in), `ambit_wasm_plugin_in_force`, `ambit_wasm_plugin_failures`
    /// and `ambit_wasm_plugin_last_error` (its text in the `error` label, 1 while it stands).
    pub fn render_status(&self) -> String {
        let status = self.status.load();
        let mut out = String::new();
        if status.is_empty() {
            return out;
        }
        let plugin = |p: &PluginStatus| format!("plugin=\"{}\"", label(&p.name));
        gauge(
            &mut out,
            "ambit_wasm_plugin_state",
            "Each WasmPlugin's state: 1 for the state it is in.",
            status.iter().flat_map(|p| {
                PluginState::ALL.map(|state| {
                    let labels = format!("{},state=\"{}\"", plugin(p), state.as_str());
                    (labels, u64::from(p.state == state))
                })
            }),
        );
        gauge(
            &mut out,
            "ambit_wasm_plugin_in_force",
            "1 while some version of the WasmPlugin serves requests.",
            status.iter().map(|p| (plugin(p), u64::from(p.in_force))),
        );
        gauge(
            &mut out,
            "ambit_wasm_plugin_failures",
            "Failed loads of the WasmPlugin since it last loaded or changed.",
            status.iter().map(|p| (plugin(p), u64::from(p.failures))),
        );
        gauge(
            &mut out,
            "ambit_wasm_plugin_last_error",
            "Why the WasmPlugin's last load failed.",
            status.iter().filter_map(|p| {
                let error = p.last_error.as_deref()?;
                Some((format!("{},error=\"{}\"", plugin(p), label(error)), 1))
            }),
        );
        out
    }

    /// Loads `wasm`; `changed`: it differs from (or was not in) the previous update.
    fn load(
        &self,
        wasm: &WasmPlugin,
        changed: bool,
    ) -> Result<(LoadKey, Arc<Plugin>), WasmPluginError> {
        let name = plugin_name(wasm);
        if wasm.spec.plugin_type == ambit_local::manifest::WasmPluginType::Network {
            return Err(WasmPluginError::Network { plugin: name });
        }
        let module = self.module(&name, wasm, changed)?;
        let digest = hex(&Sha256::digest(&module));
        let config = wasm
            .spec
            .plugin_config
            .as_ref()
            .map(|c| c.to_string())
            .unwrap_or_default();
        let env: Vec<(String, String)> = wasm
            .spec
            .vm_env
            .iter()
            .map(|e| {
                // `valueFrom: HOST` passes the proxy's own variable through.
                let value = if e.from_host {
                    std::env::var(&e.name).unwrap_or_default()
                } else {
                    e.value.clone()
                };
                (e.name.clone(), value)
            })
            .collect();
        let key = LoadKey {
            name: name.clone(),
            digest,
            config: config.clone(),
            root_id: wasm.spec.plugin_name.clone().unwrap_or_default(),
            env: env.clone(),
            fail_open: wasm.spec.fail_strategy == ManifestFailStrategy::FailOpen,
        };
        if let Some(plugin) = self.loaded.lock().expect("plugin cache lock").get(&key) {
            return Ok((key, plugin.clone()));
        }
        let mut plugin_config = PluginConfig::new(name);
        plugin_config.root_id = key.root_id.clone();
        plugin_config.configuration = config.into_bytes();
        plugin_config.environment = env;
        plugin_config.fail_strategy = if key.fail_open {
            FailStrategy::FailOpen
        } else {
            FailStrategy::FailClose
        };
        let runtime = self.runtime_or_start()?;
        let plugin = Plugin::load(runtime, &module, plugin_config, self.hooks.clone())?;
        tracing::info!(plugin = %plugin.name(), abi = ?plugin.abi(), "WasmPlugin loaded");
        self.loaded
            .lock()
            .expect("plugin cache lock")
            .insert(key.clone(), plugin.clone());
        Ok((key, plugin))
    }

    /// The module's bytes, from a file or (cached) from an http(s) server or OCI registry. The
    /// plugin's `sha256` names the module of a file or URL, and the manifest of an image: a
    /// file's is checked here, the others by the fetcher.
    fn module(
        &self,
        name: &str,
        wasm: &WasmPlugin,
        changed: bool,
    ) -> Result<bytes::Bytes, WasmPluginError> {
        let url = wasm.spec.url.as_str();
        let path = match url.split_once("://") {
            Some(("file", path)) => PathBuf::from(path),
            None if url.starts_with('/') => PathBuf::from(url),
            Some(("http" | "https" | "oci", _)) | None => {
                if wasm.spec.image_pull_secret.is_some() {
                    tracing::warn!(plugin = %name, "imagePullSecret is not supported: pulling anonymously");
                }
                let pull = Pull {
                    sha256: wasm.spec.sha256.as_deref(),
                    policy: PullPolicy::from_manifest(wasm.spec.image_pull_policy.as_deref()),
                    changed,
                };
                return self
                    .remote
                    .module(url, pull)
                    .map_err(|source| WasmPluginError::Fetch {
                        plugin: name.to_owned(),
                        source,
                    });
            }
            Some(_) => {
                return Err(WasmPluginError::UnsupportedUrl {
                    plugin: name.to_owned(),
                    url: url.to_owned(),
                })
            }
        };
        let module = std::fs::read(&path).map_err(|source| WasmPluginError::Read {
            plugin: name.to_owned(),
            path,
            source,
        })?;
        if let Some(expected) = &wasm.spec.sha256 {
            let actual = hex(&Sha256::digest(&module));
            if !expected.eq_ignore_ascii_case(&actual) {
                return Err(WasmPluginError::Digest {
                    plugin: name.to_owned(),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        Ok(module.into())
    }

    /// The plugins for a request to `service` (namespace, name; `None` for a workload) on
    /// `port`, in chain order.
    pub fn select(&self, service: Option<(&str, &str)>, port: u16) -> Selected {
        let current = self.current.load();
        let mut selected = Selected::default();
        if current.is_empty() {
            return selected;
        }
        for attached in current.iter() {
            let service_ok = match (&attached.services, service) {
                (None, _) => true,
                (Some(names), Some((namespace, name))) => {
                    namespace == self.namespace && names.iter().any(|n| n == name)
                }
                (Some(_), None) => false,
            };
            let port_ok = attached.ports.is_empty() || attached.ports.contains(&port);
            if !(service_ok && port_ok) {
                continue;
            }
            let plugin = match &attached.plugin {
                Ok(plugin) => plugin.clone(),
                Err(reason) => {
                    selected
                        .unavailable
                        .get_or_insert_with(|| (attached.name.clone(), reason.clone()));
                    continue;
                }
            };
            match attached.phase {
                WasmPhase::Authn | WasmPhase::Authz => selected.before_authz.push(plugin),
                WasmPhase::Stats | WasmPhase::Unspecified => selected.after_authz.push(plugin),
            }
        }
        selected
    }
}

/// Runs `work` (a download, a compile: up to seconds) without stalling the other tasks of the
/// Tokio worker it is called on: they move to another worker meanwhile.
fn off_the_runtime<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

fn plugin_name(wasm: &WasmPlugin) -> String {
    format!("{}.{}", wasm.metadata.namespace, wasm.metadata.name)
}

/// `Some(None)`: the plugin targets this waypoint; `Some(Some(services))`: those services
/// behind it; `None`: not for this waypoint (another namespace, another Gateway, or a
/// workload `selector`, which waypoints ignore as Istio does).
fn targets(wasm: &WasmPlugin, me: &WaypointName) -> Option<Option<Vec<String>>> {
    if wasm.metadata.namespace != me.namespace || wasm.spec.target_refs.is_empty() {
        return None;
    }
    let mut services = Vec::new();
    for target in &wasm.spec.target_refs {
        match target.kind.as_str() {
            "Gateway" if target.name == me.gateway => return Some(None),
            "Service" => services.push(target.name.clone()),
            _ => {}
        }
    }
    (!services.is_empty()).then_some(Some(services))
}

/// Istio's order: AUTHN, AUTHZ, STATS, then plugins with no phase.
fn phase_rank(phase: WasmPhase) -> u8 {
    match phase {
        WasmPhase::Authn => 0,
        WasmPhase::Authz => 1,
        WasmPhase::Stats => 2,
        WasmPhase::Unspecified => 3,
    }
}

/// The plugin states a waypoint's `/metrics` text reports (what
/// [`WasmFilters::render_status`] wrote), for tools that read a waypoint from outside.
pub fn parse_status(metrics: &str) -> Vec<PluginStatus> {
    let mut plugins: Vec<PluginStatus> = Vec::new();
    for line in metrics.lines() {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        if !name.starts_with("ambit_wasm_plugin_") {
            continue;
        }
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let labels = parse_labels(labels);
        let label = |key: &str| {
            labels
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let Some(plugin) = label("plugin") else {
            continue;
        };
        let index = match plugins.iter().position(|p| p.name == plugin) {
            Some(index) => index,
            None => {
                plugins.push(PluginStatus {
                    name: plugin.to_owned(),
                    state: PluginState::Running,
                    in_force: false,
                    failures: 0,
                    last_error: None,
                });
                plugins.len() - 1
            }
        };
        let entry = &mut plugins[index];
        let value = value.trim();
        match name {
            "ambit_wasm_plugin_state" if value == "1" => {
                if let Some(state) = label("state").and_then(PluginState::parse) {
                    entry.state = state;
                }
            }
            "ambit_wasm_plugin_in_force" => entry.in_force = value == "1",
            "ambit_wasm_plugin_failures" => entry.failures = value.parse().unwrap_or(0),
            "ambit_wasm_plugin_last_error" => entry.last_error = label("error").map(str::to_owned),
            _ => {}
        }
    }
    plugins
}

/// `key="value",...` with Prometheus' escapes undone.
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').to_owned(), value));
        rest = &after[end..];
    }
    labels
}

/// The wait after `failures` failed fetches: 1 s, 2 s, 4 s, 8 s, then 10 s.
fn backoff(failures: u32) -> Duration {
    RETRY_INITIAL
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(RETRY_MAX)
}

/// One gauge family in Prometheus' text format: `samples` are (labels, value).
fn gauge(out: &mut String, name: &str, help: &str, samples: impl Iterator<Item = (String, u64)>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_from_one_second_to_ten() {
        let waits: Vec<u64> = (1..=6).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 10, 10]);
        assert_eq!(backoff(u32::MAX), RETRY_MAX);
    }

    #[test]
    fn the_status_reads_back_from_the_metrics_text() {
        let filters = WasmFilters::new(PluginHooks::default(), "default");
        let status = vec![
            PluginStatus {
                name: "default.a".into(),
                state: PluginState::Retrying,
                in_force: false,
                failures: 3,
                last_error: Some("x: \"connecting\" failed\\\nagain, {a=b}".into()),
            },
            PluginStatus {
                name: "default.b".into(),
                state: PluginState::Running,
                in_force: true,
                failures: 0,
                last_error: None,
            },
        ];
        filters.status.store(Arc::new(status.clone()));
        let text = format!("other{{plugin=\"x\"}} 1\n{}", filters.render_status());
        assert_eq!(parse_status(&text), status);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a \"b\"\\\nc"), r#"a \"b\"\\\nc"#);
    }
}
