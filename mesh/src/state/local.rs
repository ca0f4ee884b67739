//! The local state source: a YAML file in Istio ztunnel's `LOCAL_XDS_PATH` format
//! (`workloads`, `services`, `policies`), reloaded when it changes.
//!
//! A file that fails to parse or validate never replaces the state: the error (file, line, what is
//! wrong) is logged and the previous snapshot keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{Service, Snapshot, StateError, StateStore, Workload};
use crate::rbac::Authorization;

/// The file's top level.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub policies: Vec<Authorization>,
}

/// Why a local configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {source}")]
    Invalid { path: PathBuf, source: StateError },
}

impl LocalConfig {
    /// Parses YAML text; `path` only labels errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, LocalError> {
        serde_yaml::from_str(text).map_err(|err| {
            let (line, column) = err.location().map_or((0, 0), |at| (at.line(), at.column()));
            LocalError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: err.to_string(),
            }
        })
    }

    /// Parses and validates the file into a snapshot.
    pub fn load(path: &Path) -> Result<Snapshot, LocalError> {
        let text = std::fs::read_to_string(path).map_err(|source| LocalError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)?.into_snapshot(path)
    }

    pub fn into_snapshot(self, path: &Path) -> Result<Snapshot, LocalError> {
        Snapshot::build(self.workloads, self.services, self.policies).map_err(|source| {
            LocalError::Invalid {
                path: path.to_owned(),
                source,
            }
        })
    }
}

/// Watches `path` and swaps each valid new version into `store`. Polls the file's modification
/// time (and identity, so a ConfigMap-style symlink swap is seen) every `interval`.
pub async fn watch(path: PathBuf, store: Arc<StateStore>, interval: Duration) {
    // No baseline: the caller loaded the file some time before this starts, and a version
    // written in between would otherwise never be read (a process restarted while its state
    // changes). The first look always reloads.
    let mut last_seen = None;
    loop {
        tokio::time::sleep(interval).await;
        let now = fingerprint(&path);
        if now == last_seen {
            continue;
        }
        last_seen = now;
        match LocalConfig::load(&path) {
            Ok(snapshot) => {
                tracing::info!(path = %path.display(), "local state reloaded");
                store.replace(snapshot);
            }
            Err(err) => {
                tracing::error!(error = %err, "local state not reloaded; keeping the previous state")
            }
        }
    }
}

fn fingerprint(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.ino(), meta.size()))
}
