//! ambit-cni: the node agent (enrolls ambient pods, installs in-pod redirect rules, hands their
//! netns to ztunnel over ZDS) and the chained CNI plugin.
//!
//! Not built yet: this binary only prints what it will be, so that nothing pretends to work.

fn main() {
    eprintln!("ambit-cni: the node agent and chained CNI plugin.");
    eprintln!("usage: ambit-cni (not implemented yet; see ARCHITECTURE.md for the plan)");
    std::process::exit(2);
}
