//! ambit-ztunnel: the per-node L4 tunnel. Each enrolled pod's netns is handed to it over ZDS;
//! it carries the pod's TCP over HBONE with mTLS, L4 authorization and telemetry.
//!
//! Not built yet: this binary only prints what it will be, so that nothing pretends to work.

fn main() {
    eprintln!("ambit-ztunnel: the per-node L4 tunnel (in-pod capture, HBONE, L4 policy).");
    eprintln!("usage: ambit-ztunnel (not implemented yet; see ARCHITECTURE.md for the plan)");
    std::process::exit(2);
}
