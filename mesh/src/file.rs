//! Files one process writes and another polls (the ztunnel state file, waypoint configurations,
//! CNI configuration, the local mesh's records): written so a reader never sees half of one, and
//! watched so a reader never takes one that is still being written.
//!
//! Writers: [`replace`] writes a temporary file in the same directory, flushes it to disk and
//! renames it over the target, so a reader opens either the old file or the new one, whole, and a
//! crash or full disk leaves the old file in place. Readers: [`FileWatch`] reports a change only
//! once the file has looked the same for a whole poll interval, so a writer that rewrites in place
//! (an editor, `cat >`) is not caught half-way.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Why a file could not be replaced; the target is untouched in every case.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot write {} (temporary file for {}): {source}", temp.display(), path.display())]
    Write {
        path: PathBuf,
        temp: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot rename {} over {}: {source}", temp.display(), path.display())]
    Rename {
        path: PathBuf,
        temp: PathBuf,
        source: std::io::Error,
    },
}

/// Replaces `path` with `contents` atomically, the new file created with permission bits `mode`
/// (subject to the umask). The temporary file is `.<name>.<pid>.<n>.tmp` beside it, removed
/// again on failure.
pub fn replace(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let temp = path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
        .and_then(|mut file| {
            file.write_all(contents)?;
            // On disk before the rename: after a crash the name points at the whole new file or
            // at the old one, never at an empty one.
            file.sync_all()
        });
    if let Err(source) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(FileError::Write {
            path: path.to_owned(),
            temp,
            source,
        });
    }
    std::fs::rename(&temp, path).map_err(|source| {
        let _ = std::fs::remove_file(&temp);
        FileError::Rename {
            path: path.to_owned(),
            temp,
            source,
        }
    })
}

/// Modification time, inode and size (following symlinks, so a ConfigMap-style swap of the
/// link's target counts): a rewrite in place or a rename over the file changes it, even within
/// one mtime tick. `None` while the file does not exist.
/// What tells one version of a file from the next (`None`: no file): modification time, inode and
/// size, so a rewrite in place or a rename over the file changes it even within one mtime tick.
pub type Fingerprint = Option<(SystemTime, u64, u64)>;

pub fn fingerprint(path: &Path) -> Fingerprint {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.ino(), meta.size()))
}

/// Polls one file for changes that have settled.
pub struct FileWatch {
    path: PathBuf,
    interval: Duration,
    /// What the last poll saw.
    seen: Fingerprint,
    /// What the last reported change (or the caller's own first read) saw.
    reported: Fingerprint,
}

impl FileWatch {
    /// Starts from the file as it is now, which the caller has just read.
    pub fn new(path: PathBuf, interval: Duration) -> Self {
        let now = fingerprint(&path);
        Self::since(path, interval, now)
    }

    /// Starts from the version `read` (taken before the caller read the file; `None` when it is
    /// not known): a version written since is reported once it settles.
    pub fn since(path: PathBuf, interval: Duration, read: Fingerprint) -> Self {
        FileWatch {
            seen: fingerprint(&path),
            reported: read,
            path,
            interval,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns once the file differs from what was last reported and has stayed unchanged for one
    /// poll interval; a file that disappeared counts as a change too (readers decide what a
    /// missing file means). Cancel-safe.
    pub async fn changed(&mut self) {
        loop {
            tokio::time::sleep(self.interval).await;
            let now = fingerprint(&self.path);
            let settled = now == self.seen;
            self.seen = now;
            if settled && now != self.reported {
                self.reported = now;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ambit-file-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn replace_swaps_whole_files_and_leaves_nothing_behind() {
        let dir = dir("replace");
        let path = dir.join("state.yaml");
        std::fs::write(&path, "old").unwrap();
        let before = std::fs::metadata(&path).unwrap().ino();
        replace(&path, b"new contents", 0o600).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new contents");
        let meta = std::fs::metadata(&path).unwrap();
        // A new inode: a reader holding the old file open keeps reading the old contents.
        assert_ne!(meta.ino(), before);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.yaml")]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_failed_replace_keeps_the_old_file() {
        let dir = dir("replace-fails");
        let path = dir.join("config.yaml");
        std::fs::write(&path, "old").unwrap();
        // The rename fails: the target is now a non-empty directory.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir_all(path.join("x")).unwrap();
        let err = replace(&path, b"new", 0o644).unwrap_err();
        assert!(matches!(err, FileError::Rename { .. }), "{err}");
        assert!(err.to_string().contains("config.yaml"), "{err}");
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_is_reported_once_it_has_settled() {
        let dir = dir("watch");
        let path = dir.join("state.yaml");
        std::fs::write(&path, "one").unwrap();
        let interval = Duration::from_millis(100);
        let mut watch = FileWatch::new(path.clone(), interval);
        // A writer still appending at each poll is not reported...
        let writer = {
            let path = path.clone();
            async move {
                for part in ["a", "bb", "ccc", "dddd"] {
                    let mut file = std::fs::OpenOptions::new()
                        .append(true)
                        .open(&path)
                        .unwrap();
                    file.write_all(part.as_bytes()).unwrap();
                    tokio::time::sleep(interval).await;
                }
            }
        };
        let started = tokio::time::Instant::now();
        let ((), ()) = tokio::join!(writer, watch.changed());
        // ... until its last write has stood for a whole interval.
        assert!(started.elapsed() >= interval * 4, "{:?}", started.elapsed());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "oneabbcccdddd");
        // Deletion is a change too, reported once.
        std::fs::remove_file(&path).unwrap();
        tokio::time::timeout(interval * 3, watch.changed())
            .await
            .unwrap();
        assert!(tokio::time::timeout(interval * 5, watch.changed())
            .await
            .is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
