//! The committed corpus of each of this crate's fuzz targets (`fuzz/corpus/<target>`), replayed
//! on the stable toolchain through the same entry points cargo-fuzz runs, so `cargo test` keeps
//! every input that once found new behaviour (and every past crash) passing.

use std::path::PathBuf;

use ambit_mesh::fuzzing;

fn corpus(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../fuzz/corpus/{target}"))
}

#[test]
fn zds_request_corpus() {
    assert!(fuzzing::replay(&corpus("zds_request"), fuzzing::zds_request) > 0);
}

#[test]
fn zds_response_corpus() {
    assert!(fuzzing::replay(&corpus("zds_response"), fuzzing::zds_response) > 0);
}

#[test]
fn hbone_connect_corpus() {
    assert!(fuzzing::replay(&corpus("hbone_connect"), fuzzing::hbone_connect) > 0);
}

#[test]
fn local_state_corpus() {
    assert!(fuzzing::replay(&corpus("local_state"), fuzzing::local_state) > 0);
}
