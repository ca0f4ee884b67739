//! Finding a running pod's network namespace from its IP addresses, as istio-cni does for pods that
//! were already running when the agent saw them (no CNI call tells it the namespace then).
//!
//! Candidates are every namespace file in the configured directories (`/var/run/netns`, where
//! containerd and CRI-O pin their sandboxes' namespaces) and every `/proc/<pid>/ns/net` (the
//! node's `/proc`, mounted at `/host/proc` in the agent's pod). Each distinct namespace (device
//! and inode) is entered on a short-lived thread and its interface addresses are read; the one
//! holding one of the pod's IPs is the pod's. The node's own namespace is never a candidate: a
//! pod IP found there would be a host-network pod, and rules there would capture the node.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::ifaddrs::getifaddrs;

use crate::rules::netns::with_netns;

/// Why a namespace could not be found. "Not there (yet)" is not an error: [`NetnsLocator::find`]
/// returns `Ok(None)`.
#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error("cannot list network namespaces in {}: {source} (is the directory mounted into the agent's pod?)", dir.display())]
    List {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "more than one network namespace holds the pod's address {ip}: {} and {}; refusing to \
         guess (a stale sandbox of a deleted pod?)",
        first.display(),
        second.display()
    )]
    Ambiguous {
        ip: IpAddr,
        first: PathBuf,
        second: PathBuf,
    },
}

/// Where to look for pod network namespaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsLocator {
    /// The node's `/proc` (`/host/proc` in the agent's pod), or `None` not to scan processes.
    pub proc_dir: Option<PathBuf>,
    /// Directories of pinned namespace files, searched before `/proc` because their paths stay
    /// valid as long as the sandbox does.
    pub netns_dirs: Vec<PathBuf>,
}

impl Default for NetnsLocator {
    fn default() -> Self {
        NetnsLocator {
            proc_dir: Some("/proc".into()),
            netns_dirs: vec!["/var/run/netns".into()],
        }
    }
}

impl NetnsLocator {
    /// The path of the one namespace holding any of `ips`, or `None` if none does. Blocking:
    /// it reads directories and enters namespaces; call it from a blocking thread.
    pub fn find(&self, ips: &[IpAddr]) -> Result<Option<PathBuf>, LocateError> {
        if ips.is_empty() {
            return Ok(None);
        }
        let mut seen = HashSet::new();
        // Our own namespace is the node's (the agent runs with hostNetwork): never a pod's.
        if let Ok(own) = fs::metadata("/proc/self/ns/net") {
            seen.insert((own.dev(), own.ino()));
        }
        let mut found: Option<(IpAddr, PathBuf)> = None;
        for path in self.candidates()? {
            // Namespaces come and go while we look: a vanished one is simply not the pod's.
            let Ok(file) = File::open(&path) else {
                continue;
            };
            let Ok(meta) = file.metadata() else { continue };
            if !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            let addresses = match addresses_in(&file) {
                Ok(addresses) => addresses,
                Err(error) => {
                    tracing::debug!(path = %path.display(), %error, "cannot read the addresses of a namespace; skipping it");
                    continue;
                }
            };
            let Some(ip) = ips.iter().find(|ip| addresses.contains(ip)) else {
                continue;
            };
            if let Some((_, first)) = &found {
                return Err(LocateError::Ambiguous {
                    ip: *ip,
                    first: first.clone(),
                    second: path,
                });
            }
            found = Some((*ip, path));
        }
        Ok(found.map(|(_, path)| path))
    }

    /// Namespace files: the pinned ones first, then one per process.
    fn candidates(&self) -> Result<Vec<PathBuf>, LocateError> {
        let mut paths = Vec::new();
        for dir in &self.netns_dirs {
            match fs::read_dir(dir) {
                Ok(entries) => {
                    let mut files: Vec<PathBuf> =
                        entries.flatten().map(|entry| entry.path()).collect();
                    files.sort();
                    paths.extend(files);
                }
                // No sandbox pinned yet on this node.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(LocateError::List {
                        dir: dir.clone(),
                        source,
                    })
                }
            }
        }
        if let Some(proc_dir) = &self.proc_dir {
            let entries = fs::read_dir(proc_dir).map_err(|source| LocateError::List {
                dir: proc_dir.clone(),
                source,
            })?;
            let mut pids: Vec<u32> = entries
                .flatten()
                .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                .collect();
            pids.sort_unstable();
            paths.extend(
                pids.into_iter()
                    .map(|pid| proc_dir.join(pid.to_string()).join("ns/net")),
            );
        }
        Ok(paths)
    }
}

/// The addresses on the interfaces of the namespace `netns`.
fn addresses_in(netns: &File) -> io::Result<HashSet<IpAddr>> {
    with_netns(netns.as_fd(), || {
        let mut addresses = HashSet::new();
        for interface in getifaddrs().map_err(io::Error::from)? {
            let Some(address) = interface.address else {
                continue;
            };
            if let Some(v4) = address.as_sockaddr_in() {
                addresses.insert(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = address.as_sockaddr_in6() {
                addresses.insert(IpAddr::V6(v6.ip()));
            }
        }
        Ok(addresses)
    })
}

/// True if `path` still opens (a CNI-provided namespace path disappears with its sandbox).
pub fn exists(path: &Path) -> bool {
    File::open(path).is_ok()
}
