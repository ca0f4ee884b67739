//! The node agent's library: what `ambit-cni` does to a pod, kept apart from the binary so that it
//! can be tested on real network namespaces: the in-pod redirect rules, and the enrollment logic
//! (which pods join the mesh, and handing them to ztunnel over ZDS).

pub mod agent;
pub mod rules;
