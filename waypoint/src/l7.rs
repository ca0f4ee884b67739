//! The waypoint's L7 configuration: the HTTPRoutes and AuthorizationPolicies that apply to it,
//! read from a multi-document YAML file of Kubernetes objects as users write them
//! (`AMBIT_WAYPOINT_CONFIG`), checked by the local mesh's strict manifest parser, and compiled
//! into an immutable [`L7Config`] ([`routes::RouteTable`] + [`authz::PolicyTable`]) that the data
//! path reads lock-free from an [`L7Store`].
//!
//! The file is polled like the state file, and like it is a safety boundary: a waypoint never
//! serves without the policies it last had. A file that is missing (deleted, or not written
//! yet), holds no Kubernetes object at all (empty, blanks or comments only: a truncated or
//! half-written file), is still changing, or does not parse or compile never replaces the
//! configuration in force (the error is logged, naming the object and field), and a waypoint
//! whose file is unusable at start does not start. A configuration with nothing in it on purpose
//! is an empty Kubernetes `List` ([`EMPTY_CONFIG`]).

pub mod authz;
pub mod routes;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ambit_local::manifest::{self, ManifestError, Object, WasmPlugin};
use ambit_mesh::file::FileWatch;
pub use ambit_mesh::file::{fingerprint, Fingerprint};
use arc_swap::ArcSwap;

pub use authz::PolicyTable;
pub use routes::RouteTable;

use crate::wasm::WasmFilters;

/// Why an L7 configuration file was not taken.
#[derive(Debug, thiserror::Error)]
pub enum L7Error {
    #[error("reading the waypoint configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "waypoint configuration {path} holds no Kubernetes object (empty, or only comments): \
         taken as a file still being written or truncated, not as \"no policies\"; an empty \
         configuration is `apiVersion: v1`, `kind: List`, `items: []`"
    )]
    Empty { path: PathBuf },
    #[error("waypoint configuration {path}: {source}")]
    Manifest {
        path: PathBuf,
        source: Box<ManifestError>,
    },
    #[error("waypoint configuration {path}: {object}: {field}: {message}")]
    Compile {
        path: PathBuf,
        /// `HTTPRoute default/reviews`.
        object: String,
        field: String,
        message: String,
    },
}

/// The configuration with no routes, policies or plugins, on purpose: an empty Kubernetes `List`
/// (what `kubectl get -o yaml` prints when nothing matches).
pub const EMPTY_CONFIG: &str = "apiVersion: v1\nkind: List\nitems: []\n";

/// Who this waypoint is, for deciding which policies target it.
#[derive(Clone, Debug, Default)]
pub struct WaypointName {
    pub namespace: String,
    /// The waypoint's Gateway (`AMBIT_GATEWAY_NAME`).
    pub gateway: String,
}

/// One compiled, immutable L7 configuration.
#[derive(Debug, Default)]
pub struct L7Config {
    pub routes: RouteTable,
    pub policies: PolicyTable,
    /// WasmPlugins as written; [`crate::wasm::WasmFilters`] decides which apply and loads them.
    pub plugins: Vec<WasmPlugin>,
}

/// A compile problem, before the file it came from is known.
#[derive(Debug)]
pub struct CompileError {
    pub object: String,
    pub field: String,
    pub message: String,
}

impl L7Config {
    /// Parses and compiles a configuration text. Kinds other than HTTPRoute and
    /// AuthorizationPolicy are accepted and ignored (the file may be a whole namespace's
    /// manifests); AuthorizationPolicies without `targetRefs` are for ztunnel and ignored too.
    /// Text with no document at all is refused (see the module doc).
    pub fn parse(text: &str, path: &Path, me: &WaypointName) -> Result<Self, L7Error> {
        let objects = manifest::parse_documents(text, manifest::DEFAULT_NAMESPACE)
            .map_err(|source| L7Error::Manifest {
                path: path.to_owned(),
                source: Box::new(source),
            })?
            .ok_or_else(|| L7Error::Empty {
                path: path.to_owned(),
            })?;
        Self::compile(&objects, me).map_err(|e| L7Error::Compile {
            path: path.to_owned(),
            object: e.object,
            field: e.field,
            message: e.message,
        })
    }

    pub fn compile(objects: &[Object], me: &WaypointName) -> Result<Self, CompileError> {
        let mut routes = Vec::new();
        let mut policies = Vec::new();
        let mut plugins = Vec::new();
        for object in objects {
            match object {
                Object::WasmPlugin(plugin) => plugins.push(plugin.clone()),
                Object::HttpRoute(route) | Object::GrpcRoute(route) => routes.push(route),
                Object::AuthorizationPolicy(policy) if !policy.spec.target_refs.is_empty() => {
                    policies.push(policy)
                }
                other => {
                    tracing::debug!(object = %other.object_ref(), "not an L7 object; ignored")
                }
            }
        }
        Ok(L7Config {
            routes: RouteTable::compile(&routes)?,
            policies: PolicyTable::compile(&policies, me),
            plugins,
        })
    }

    /// Reads and compiles the file at `path`. A missing file is an error like any other: the
    /// policies it held may have been deleted with it.
    pub fn load(path: &Path, me: &WaypointName) -> Result<Self, L7Error> {
        let text = std::fs::read_to_string(path).map_err(|source| L7Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path, me)
    }
}

/// The configuration in force, swapped atomically, read lock-free per request. Every new
/// configuration also brings the waypoint's WasmPlugins up to date.
#[derive(Default)]
pub struct L7Store {
    current: ArcSwap<L7Config>,
    wasm: Option<(Arc<WasmFilters>, WaypointName)>,
}

impl L7Store {
    pub fn new(config: L7Config) -> Self {
        L7Store {
            current: ArcSwap::from_pointee(config),
            wasm: None,
        }
    }

    /// A store that keeps `wasm` in step with each configuration, starting with `config`'s.
    pub fn with_plugins(config: L7Config, wasm: Arc<WasmFilters>, me: WaypointName) -> Self {
        let mut store = L7Store::new(L7Config::default());
        store.wasm = Some((wasm, me));
        store.replace(config);
        store
    }

    pub fn load(&self) -> Arc<L7Config> {
        self.current.load_full()
    }

    /// Swaps `config` in; its WasmPlugins are loaded first, so a request never sees routes
    /// that expect a plugin not yet running.
    pub fn replace(&self, config: L7Config) {
        if let Some((wasm, me)) = &self.wasm {
            for error in wasm.update(&config.plugins, me) {
                tracing::error!(%error, "WasmPlugin not applied");
            }
        }
        self.current.store(Arc::new(config));
    }
}

/// Polls `path` every `interval` and swaps in each change that compiles, once the file has
/// stopped changing (see [`FileWatch`]); one that does not, or a deleted file, is logged and the
/// previous configuration stays. `loaded` is the file's [`fingerprint`] taken before the
/// configuration in force was read: a version written since (while a waypoint starts) is not
/// missed.
pub async fn watch(
    path: PathBuf,
    me: WaypointName,
    store: Arc<L7Store>,
    interval: Duration,
    loaded: Fingerprint,
) {
    let mut file = FileWatch::since(path, interval, loaded);
    loop {
        file.changed().await;
        let path = file.path();
        match L7Config::load(path, &me) {
            Ok(config) => {
                tracing::info!(path = %path.display(), routes = config.routes.len(), policies = config.policies.len(), "waypoint configuration reloaded");
                store.replace(config);
            }
            Err(err) => tracing::error!(
                error = %err,
                "waypoint configuration not reloaded; keeping the previous one"
            ),
        }
    }
}
