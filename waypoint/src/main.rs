//! ambit-waypoint: the optional per-namespace L7 proxy: HBONE in, HTTP routing, retries,
//! timeouts, L7 policy, telemetry and proxy-wasm filters, HBONE out.
//!
//! Not built yet: this binary only prints what it will be, so that nothing pretends to work.

fn main() {
    eprintln!(
        "ambit-waypoint: the per-namespace L7 proxy (routing, retries, L7 policy, Wasm filters)."
    );
    eprintln!("usage: ambit-waypoint (not implemented yet; see ARCHITECTURE.md for the plan)");
    std::process::exit(2);
}
