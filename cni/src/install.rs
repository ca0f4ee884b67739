//! Installing the chained plugin on the node, as istio-cni's install step does: the binary into
//! the CNI bin dir (`/opt/cni/bin`) and an entry at the end of the `plugins` of the node's primary
//! network configuration (the lexically first `.conflist`/`.conf`/`.json` in `/etc/cni/net.d`,
//! the one the runtime uses). A primary plugin that rewrites its file drops our entry, so the
//! agent re-checks it periodically ([`keep_installed`]).
//!
//! [`uninstall`] undoes both; the entry is found by its `type`, so nothing else is touched.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_mesh::file::{self, FileError};
use serde_json::{json, Value};

use crate::plugin::PLUGIN_TYPE;

/// Why installing or removing the plugin failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot {action} {}: {source} (is the host directory mounted into the agent's pod?)", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} (is the host directory mounted into the agent's pod?)")]
    Write(#[from] FileError),
    #[error("the CNI configuration {} is not valid JSON, so ambit-cni cannot chain itself into it: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> InstallError + 'a {
    move |source| InstallError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Our entry in the conflist: where the agent listens, and which namespaces to pass through.
pub fn plugin_entry(agent_socket: &Path, exclude_namespaces: &[String]) -> Value {
    json!({
        "type": PLUGIN_TYPE,
        "agent_socket": agent_socket,
        "exclude_namespaces": exclude_namespaces,
    })
}

/// Copies `binary` (this program) to `bin_dir/ambit-cni`, atomically (a runtime may be executing
/// the old one right now).
pub fn install_binary(binary: &Path, bin_dir: &Path) -> Result<(), InstallError> {
    let target = bin_dir.join(PLUGIN_TYPE);
    let temp = bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
    std::fs::copy(binary, &temp).map_err(io_error("copy the plugin binary to", &temp))?;
    std::fs::rename(&temp, &target).map_err(io_error("install the plugin binary as", &target))
}

/// The primary configuration: the file the runtime loads, lexically first.
fn primary_config(conf_dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let entries = match std::fs::read_dir(conf_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("list", conf_dir)(e)),
    };
    let mut configs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conflist" | "conf" | "json")
            )
        })
        .collect();
    configs.sort();
    Ok(configs.into_iter().next())
}

/// Appends `entry` to the primary configuration's plugins (replacing an older entry of ours),
/// converting a single-plugin `.conf` into a `.conflist`. Returns the file written, or `None` if
/// there is no primary configuration yet (the primary CNI has not installed itself) or it is
/// already as it should be.
pub fn chain(conf_dir: &Path, entry: &Value) -> Result<Option<PathBuf>, InstallError> {
    let Some(path) = primary_config(conf_dir)? else {
        return Ok(None);
    };
    let text = std::fs::read(&path).map_err(io_error("read", &path))?;
    let config: Value = serde_json::from_slice(&text).map_err(|source| InstallError::Parse {
        path: path.clone(),
        source,
    })?;
    let (mut list, target) = if config.get("plugins").is_some() {
        (config.clone(), path.clone())
    } else {
        // A single plugin: a list of it, under the name the runtime will now load.
        let list = json!({
            "cniVersion": config.get("cniVersion").cloned().unwrap_or(json!("1.0.0")),
            "name": config.get("name").cloned().unwrap_or(json!("k8s-pod-network")),
            "plugins": [config.clone()],
        });
        (list, path.with_extension("conflist"))
    };
    let plugins = list["plugins"].as_array_mut().expect("checked above");
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    plugins.push(entry.clone());
    if target == path && list == config {
        return Ok(None);
    }
    write_atomically(&target, &list)?;
    if target != path {
        std::fs::remove_file(&path).map_err(io_error("remove the converted", &path))?;
    }
    tracing::info!(config = %target.display(), "ambit-cni chained into the node's CNI configuration");
    Ok(Some(target))
}

/// Removes our entry from every configuration in `conf_dir`; returns the files changed.
pub fn unchain(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    let entries = match std::fs::read_dir(conf_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(changed),
        Err(e) => return Err(io_error("list", conf_dir)(e)),
    };
    for path in entries.flatten().map(|e| e.path()) {
        if path.extension().and_then(|e| e.to_str()) != Some("conflist") {
            continue;
        }
        let text = std::fs::read(&path).map_err(io_error("read", &path))?;
        let Ok(mut list) = serde_json::from_slice::<Value>(&text) else {
            continue;
        };
        let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
        if plugins.len() != before {
            write_atomically(&path, &list)?;
            changed.push(path);
        }
    }
    Ok(changed)
}

/// Removes the plugin from the node: the conflist entries first (so no runtime runs it any
/// more), then the binary.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<(), InstallError> {
    for path in unchain(conf_dir)? {
        tracing::info!(config = %path.display(), "ambit-cni removed from the CNI configuration");
    }
    let binary = bin_dir.join(PLUGIN_TYPE);
    match std::fs::remove_file(&binary) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("remove", &binary)(e)),
    }
}

/// Keeps our entry in the primary configuration, checking every `period`; errors are logged
/// and retried. `installed` says whether the entry is in place (readiness waits for it, as
/// istio-cni's does for its install).
pub async fn keep_installed(
    conf_dir: PathBuf,
    entry: Value,
    period: Duration,
    installed: tokio::sync::watch::Sender<bool>,
) {
    let mut waiting_logged = false;
    loop {
        let chained = match chain(&conf_dir, &entry) {
            Ok(_) if primary_config(&conf_dir).ok().flatten().is_none() => {
                if !waiting_logged {
                    tracing::info!(dir = %conf_dir.display(), "no primary CNI configuration yet; waiting for the network plugin to install itself");
                    waiting_logged = true;
                }
                false
            }
            Ok(_) => {
                waiting_logged = false;
                true
            }
            Err(error) => {
                tracing::warn!(%error, "cannot chain ambit-cni into the CNI configuration");
                false
            }
        };
        installed.send_if_modified(|was| std::mem::replace(was, chained) != chained);
        tokio::time::sleep(period).await;
    }
}

fn write_atomically(path: &Path, value: &Value) -> Result<(), InstallError> {
    let mut text = serde_json::to_vec_pretty(value).expect("JSON values serialize");
    text.push(b'\n');
    Ok(file::replace(path, &text, 0o644)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ambit-install-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entry() -> Value {
        plugin_entry(
            Path::new("/var/run/ambit/pluginevent.sock"),
            &["kube-system".into()],
        )
    }

    #[test]
    fn chains_into_the_first_conflist_once_and_unchains() {
        let dir = dir("conflist");
        let primary = json!({"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"ptp"},{"type":"portmap"}]});
        std::fs::write(dir.join("10-k8s.conflist"), primary.to_string()).unwrap();
        std::fs::write(dir.join("99-other.conflist"), primary.to_string()).unwrap();
        assert_eq!(
            chain(&dir, &entry()).unwrap(),
            Some(dir.join("10-k8s.conflist"))
        );
        assert_eq!(chain(&dir, &entry()).unwrap(), None, "idempotent");
        let list: Value =
            serde_json::from_slice(&std::fs::read(dir.join("10-k8s.conflist")).unwrap()).unwrap();
        let types: Vec<&str> = list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["ptp", "portmap", "ambit-cni"]);
        let other: Value =
            serde_json::from_slice(&std::fs::read(dir.join("99-other.conflist")).unwrap()).unwrap();
        assert_eq!(other, primary, "only the primary configuration is touched");

        std::fs::write(dir.join("ambit-cni"), b"x").unwrap();
        uninstall(&dir, &dir).unwrap();
        let list: Value =
            serde_json::from_slice(&std::fs::read(dir.join("10-k8s.conflist")).unwrap()).unwrap();
        assert_eq!(list, primary);
        assert!(!dir.join("ambit-cni").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn converts_a_single_plugin_conf() {
        let dir = dir("conf");
        std::fs::write(
            dir.join("10-bridge.conf"),
            json!({"cniVersion":"0.4.0","name":"bridge","type":"bridge"}).to_string(),
        )
        .unwrap();
        assert_eq!(
            chain(&dir, &entry()).unwrap(),
            Some(dir.join("10-bridge.conflist"))
        );
        assert!(!dir.join("10-bridge.conf").exists());
        let list: Value =
            serde_json::from_slice(&std::fs::read(dir.join("10-bridge.conflist")).unwrap())
                .unwrap();
        assert_eq!(list["cniVersion"], "0.4.0");
        assert_eq!(list["plugins"][0]["type"], "bridge");
        assert_eq!(list["plugins"][1]["type"], "ambit-cni");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn no_primary_configuration_yet() {
        let dir = dir("empty");
        assert_eq!(chain(&dir, &entry()).unwrap(), None);
        assert_eq!(chain(&dir.join("missing"), &entry()).unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
