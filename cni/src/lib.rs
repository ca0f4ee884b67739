//! The node agent's library: what `ambit-cni` does to a pod, kept apart from the binary so that it
//! can be tested on real network namespaces: the in-pod redirect rules, the enrollment logic
//! (which pods join the mesh, and handing them to ztunnel over ZDS), the Kubernetes controller
//! that drives it, the chained CNI plugin and its installation on the node, and the health
//! endpoints the kubelet probes.

pub mod agent;
pub mod health;
pub mod install;
pub mod kubernetes;
pub mod locate;
pub mod plugin;
pub mod rules;
#[cfg(feature = "testing")]
pub mod testing;
