//! The host functions a proxy-wasm module imports: the ABI's `env.proxy_*` ([`env`]) and the WASI
//! calls filters' standard libraries make ([`wasi`]), over bounds-checked guest memory
//! ([`memory`]). A guest's bad pointer or malformed input is answered with a status, never a trap;
//! only failures of the guest's own code (its allocator trapping) end the callback.

mod env;
mod memory;
mod wasi;

use wasmtime::Linker;

use crate::context::HostState;

/// Logs whatever the guest wrote to stdout/stderr and did not end with a newline: called after
/// every callback, so output is never held across requests.
pub(crate) fn flush_output(state: &mut HostState) {
    if state.stdout.is_empty() && state.stderr.is_empty() {
        return;
    }
    wasi::flush_lines(state, 1, true);
    wasi::flush_lines(state, 2, true);
}

/// Adds every host function to the linker; called once per runtime.
pub(crate) fn define(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    env::define(linker)?;
    wasi::define(linker, "wasi_snapshot_preview1")?;
    wasi::define(linker, "wasi_unstable")?;
    Ok(())
}
