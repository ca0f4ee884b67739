//! The manifest fuzz target's committed corpus (`fuzz/corpus/manifest`), replayed on the stable
//! toolchain through the entry point cargo-fuzz runs.

use std::path::PathBuf;

#[test]
fn manifest_corpus() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/manifest");
    assert!(ambit_mesh::fuzzing::replay(&dir, ambit_local::fuzzing::manifest) > 0);
}
