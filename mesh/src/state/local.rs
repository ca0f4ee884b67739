//! The local state source: a YAML file in Istio ztunnel's `LOCAL_XDS_PATH` format
//! (`workloads`, `services`, `policies`), reloaded when it changes.
//!
//! The file is a safety boundary: what it does not say is not served. So a file that is missing,
//! holds no document (empty, blanks or comments only, a bare `null`), is still being written,
//! or fails to parse or validate never replaces the state: the error (file, line, what is wrong)
//! is logged and the previous snapshot keeps serving. A state with nothing in it on purpose is a
//! mapping that says so, `workloads: []` (or `{}`), which [`LocalConfig::write`] produces.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Service, Snapshot, StateError, StateStore, Workload};
use crate::file::{self, FileError, FileWatch};
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
    #[error(
        "{path} holds no document (empty, or only comments): taken as a file still being written \
         or truncated, not as an empty state; write `workloads: []` to remove every workload"
    )]
    Empty { path: PathBuf },
    #[error("{path}: {source}")]
    Invalid { path: PathBuf, source: StateError },
    #[error("cannot write the state as YAML: {0}")]
    Serialize(#[source] serde_yaml::Error),
    #[error("writing the state: {0}")]
    Write(#[from] FileError),
}

impl LocalConfig {
    /// Parses YAML text; `path` only labels errors. Text without a document is refused.
    pub fn parse(text: &str, path: &Path) -> Result<Self, LocalError> {
        let config: Option<Self> = serde_yaml::from_str(text).map_err(|err| {
            let (line, column) = err.location().map_or((0, 0), |at| (at.line(), at.column()));
            LocalError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: err.to_string(),
            }
        })?;
        config.ok_or_else(|| LocalError::Empty {
            path: path.to_owned(),
        })
    }

    /// Writes the configuration to `path` atomically, for ztunnels and waypoints that poll it.
    /// Every key is written, so even an empty state is an explicit document.
    pub fn write(&self, path: &Path) -> Result<(), LocalError> {
        let text = serde_yaml::to_string(self).map_err(LocalError::Serialize)?;
        Ok(file::replace(path, text.as_bytes(), 0o644)?)
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

/// Watches `path` and swaps each valid new version into `store`, once the file has stopped
/// changing for one `interval` (see [`FileWatch`]). A missing or unusable file keeps the state.
pub async fn watch(path: PathBuf, store: Arc<StateStore>, interval: Duration) {
    // The caller loaded the file some time before this starts, and a version written in between
    // would otherwise never be read (a process restarted while its state changes): the first
    // settled look always reloads.
    let mut file = FileWatch::since(path, interval, None);
    loop {
        file.changed().await;
        let path = file.path();
        match LocalConfig::load(path) {
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
