//! The node agent's library: what `ambit-cni` does to a pod, kept apart from the binary so that it
//! can be tested on real network namespaces. Today that is the in-pod redirect rules.

pub mod rules;
