//! The filter SDK (`ambit-sdk`) and test kit (`ambit-filter-test`) as they travel inside the
//! `ambit` binary, so `ambit filter new` makes crates that build with nothing but a Rust
//! toolchain and crates.io. Unpacked once per SDK tag into the user's cache
//! (`$XDG_CACHE_HOME/ambit/sdk/<tag>`, else `~/.cache/...`), or into a crate (`--vendor`).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Why the SDK could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    #[error("neither XDG_CACHE_HOME nor HOME is set: pass --vendor to put the SDK in the crate")]
    NoCache,
    #[error("unpacking the filter SDK into {dir}: {source}")]
    Write {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// The two crates, each file as (path in the crate, contents).
pub const CRATES: [(&str, &[(&str, &str)]); 2] = [
    (
        "ambit-sdk",
        &[
            ("Cargo.toml", include_str!("../../../sdk/Cargo.toml")),
            (
                "src/callbacks.rs",
                include_str!("../../../sdk/src/callbacks.rs"),
            ),
            (
                "src/callout.rs",
                include_str!("../../../sdk/src/callout.rs"),
            ),
            ("src/config.rs", include_str!("../../../sdk/src/config.rs")),
            (
                "src/headers.rs",
                include_str!("../../../sdk/src/headers.rs"),
            ),
            ("src/lib.rs", include_str!("../../../sdk/src/lib.rs")),
            (
                "src/metrics.rs",
                include_str!("../../../sdk/src/metrics.rs"),
            ),
            (
                "src/properties.rs",
                include_str!("../../../sdk/src/properties.rs"),
            ),
            (
                "src/response.rs",
                include_str!("../../../sdk/src/response.rs"),
            ),
            ("src/shared.rs", include_str!("../../../sdk/src/shared.rs")),
        ],
    ),
    (
        "ambit-filter-test",
        &[
            (
                "Cargo.toml",
                include_str!("../../../sdk/testkit/Cargo.toml"),
            ),
            (
                "src/calls.rs",
                include_str!("../../../sdk/testkit/src/calls.rs"),
            ),
            (
                "src/client.rs",
                include_str!("../../../sdk/testkit/src/client.rs"),
            ),
            (
                "src/filter.rs",
                include_str!("../../../sdk/testkit/src/filter.rs"),
            ),
            (
                "src/headers.rs",
                include_str!("../../../sdk/testkit/src/headers.rs"),
            ),
            (
                "src/lib.rs",
                include_str!("../../../sdk/testkit/src/lib.rs"),
            ),
            (
                "src/metrics.rs",
                include_str!("../../../sdk/testkit/src/metrics.rs"),
            ),
            (
                "src/module.rs",
                include_str!("../../../sdk/testkit/src/module.rs"),
            ),
            (
                "src/outcome.rs",
                include_str!("../../../sdk/testkit/src/outcome.rs"),
            ),
            (
                "src/protocol.rs",
                include_str!("../../../sdk/testkit/src/protocol.rs"),
            ),
            (
                "src/request.rs",
                include_str!("../../../sdk/testkit/src/request.rs"),
            ),
        ],
    ),
];

/// The workspace's lock file: a new crate starts from the versions Ambit is tested with.
pub const CARGO_LOCK: &str = include_str!("../../../Cargo.lock");

/// `<version>-<first 12 hex digits of the files' sha256>`: a changed SDK never reuses the
/// directory of another with the same version.
pub fn tag() -> String {
    let mut hash = Sha256::new();
    for (name, files) in CRATES {
        for (path, text) in files {
            hash.update(name.as_bytes());
            hash.update(path.as_bytes());
            hash.update((text.len() as u64).to_le_bytes());
            hash.update(text.as_bytes());
        }
    }
    let digest: String = hash
        .finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{}-{digest}", env!("CARGO_PKG_VERSION"))
}

/// Where this binary's SDK lives in the user's cache.
pub fn cache_dir() -> Result<PathBuf, SdkError> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(cache) => PathBuf::from(cache),
        None => PathBuf::from(std::env::var_os("HOME").ok_or(SdkError::NoCache)?).join(".cache"),
    };
    Ok(base.join("ambit").join("sdk").join(tag()))
}

/// Unpacks the SDK into the cache (once per tag: a complete directory is kept as is) and
/// returns the directory holding `ambit-sdk/` and `ambit-filter-test/`.
pub fn unpack_cached() -> Result<PathBuf, SdkError> {
    let dir = cache_dir()?;
    if dir.join(".complete").is_file() {
        return Ok(dir);
    }
    // Into a directory of our own first, then renamed: a concurrent `ambit` never sees half.
    let parent = dir.parent().expect("the cache dir has a parent");
    let staging = parent.join(format!(".{}-{}", tag(), std::process::id()));
    let write_error = |source| SdkError::Write {
        dir: dir.clone(),
        source,
    };
    let _ = std::fs::remove_dir_all(&staging);
    unpack(&staging)?;
    std::fs::write(staging.join(".complete"), "").map_err(write_error)?;
    match std::fs::rename(&staging, &dir) {
        Ok(()) => Ok(dir),
        // Another process got there first.
        Err(_) if dir.join(".complete").is_file() => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(dir)
        }
        Err(e) => Err(write_error(e)),
    }
}

/// Writes `ambit-sdk/` and `ambit-filter-test/` under `dir`.
pub fn unpack(dir: &Path) -> Result<(), SdkError> {
    for (name, files) in CRATES {
        for (path, text) in files {
            let file = dir.join(name).join(path);
            let error = |source| SdkError::Write {
                dir: dir.to_owned(),
                source,
            };
            std::fs::create_dir_all(file.parent().expect("files are in a crate")).map_err(error)?;
            std::fs::write(&file, text).map_err(error)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file added to either crate must be embedded too, or unpacked crates will not build.
    #[test]
    fn every_source_file_is_embedded() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        for ((name, files), dir) in CRATES.iter().zip(["sdk", "sdk/testkit"]) {
            let mut on_disk: Vec<String> = std::fs::read_dir(root.join(dir).join("src"))
                .unwrap()
                .map(|e| format!("src/{}", e.unwrap().file_name().to_string_lossy()))
                .collect();
            on_disk.push("Cargo.toml".into());
            on_disk.sort();
            let mut embedded: Vec<String> = files.iter().map(|(p, _)| (*p).to_owned()).collect();
            embedded.sort();
            assert_eq!(embedded, on_disk, "{name}: embed every file of {dir}");
        }
    }

    #[test]
    fn the_crates_are_standalone_and_versioned_like_ambit() {
        for (name, files) in CRATES {
            let manifest = files[0].1;
            assert!(
                !manifest.contains(".workspace"),
                "{name} inherits from the workspace"
            );
            assert!(
                manifest.contains(&format!("version = \"{}\"", env!("CARGO_PKG_VERSION"))),
                "{name}'s version differs from ambit's"
            );
        }
    }

    #[test]
    fn unpacks_once_per_tag() {
        let home = std::env::temp_dir().join(format!("ambit-filter-sdk-{}", std::process::id()));
        // Only this test reads XDG_CACHE_HOME in this process.
        std::env::set_var("XDG_CACHE_HOME", &home);
        let dir = unpack_cached().unwrap();
        assert!(dir.starts_with(home.join("ambit/sdk")));
        assert!(dir.join("ambit-sdk/src/lib.rs").is_file());
        assert!(dir.join("ambit-filter-test/src/protocol.rs").is_file());
        std::fs::write(dir.join("ambit-sdk/marker"), "").unwrap();
        assert_eq!(unpack_cached().unwrap(), dir);
        assert!(dir.join("ambit-sdk/marker").is_file(), "unpacked again");
        let _ = std::fs::remove_dir_all(&home);
    }
}
