//! `ambit_local::fuzzing::manifest`; the checks are there, shared with the corpus replay test.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ambit_local::fuzzing::manifest(data));
