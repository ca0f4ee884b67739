//! WasmPlugins in the waypoint: which plugins apply to a request (targetRefs, ports), in which
//! order (phase, then priority), and loading them into the process's one Wasm runtime. Modules
//! come from files (`file://` or an absolute path, `sha256` checked) or are [fetched](remote)
//! and cached as Istio's agent does: `https://`/`http://` URLs, and OCI images (`oci://`, or a
//! url without a scheme), with `sha256` and `imagePullPolicy` as Istio reads them. A changed
//! plugin is loaded beside the old one and swapped in; requests in flight keep the plugin they
//! started with. A plugin that fails to load (or whose module cannot be fetched) leaves the
//! previous version (if any) in force and is reported.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use ambit_local::manifest::{FailStrategy as ManifestFailStrategy, WasmPhase, WasmPlugin};
use ambit_wasm_host::runtime::RuntimeError;
use ambit_wasm_host::{FailStrategy, Plugin, PluginConfig, PluginHooks, Runtime, RuntimeConfig};
use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

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
    /// The WasmPlugins of the last update, by name: a plugin that differs is a new "resource
    /// version", when `imagePullPolicy: Always` pulls its module again.
    applied: Mutex<HashMap<String, WasmPlugin>>,
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
            applied: Mutex::new(HashMap::new()),
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
    /// previous version, and the errors are returned for the operator.
    pub fn update(&self, plugins: &[WasmPlugin], me: &WaypointName) -> Vec<WasmPluginError> {
        let previous = self.current.load_full();
        let mut attached = Vec::new();
        let mut errors = Vec::new();
        let mut keep = Vec::new();
        let mut applied = self.applied.lock().expect("applied plugins lock");
        for wasm in plugins {
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
            let changed = applied.get(&name) != Some(wasm);
            match off_the_runtime(|| self.load(wasm, changed)) {
                Ok((key, plugin)) => {
                    keep.push(key);
                    entry.plugin = Ok(plugin);
                    attached.push(entry);
                }
                Err(error) => {
                    // The version in force stays; with none, a fail-closed plugin refuses its
                    // requests and a fail-open one is left out.
                    let old = previous.iter().find(|a| a.name == name && a.plugin.is_ok());
                    if let Some(old) = old {
                        entry.plugin = old.plugin.clone();
                        attached.push(entry);
                    } else if wasm.spec.fail_strategy != ManifestFailStrategy::FailOpen {
                        entry.plugin = Err(Arc::from(error.to_string()));
                        attached.push(entry);
                    }
                    errors.push(error);
                }
            }
        }
        attached.sort_by_key(|a| (phase_rank(a.phase), -a.priority));
        *applied = plugins
            .iter()
            .map(|wasm| (plugin_name(wasm), wasm.clone()))
            .collect();
        drop(applied);
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
        errors
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
