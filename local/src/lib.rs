//! The local mesh's embedded control plane: what `ambit mesh` uses instead of a Kubernetes API
//! server and istiod.
//!
//! - [`manifest`] reads the YAML users would `kubectl apply` (Namespace, ServiceAccount, Pod,
//!   Deployment, Service, AuthorizationPolicy, PeerAuthentication, Gateway, HTTPRoute, GRPCRoute,
//!   WasmPlugin) into typed, validated objects, with errors that name the object and the field.
//! - [`control`] keeps the cluster's desired state ([`control::ClusterState`], the "API server":
//!   atomic apply, delete, label) and translates it into ztunnel's configuration the way istiod
//!   does ([`control::ztunnel_config`]).
//!
//! - [`dns`] is the cluster DNS: the Kubernetes DNS specification's records for the cluster's
//!   Services and pods, other names forwarded upstream.
//! - [`topology`] builds the network the runner puts pods on: nodes and pods as network
//!   namespaces joined by veth pairs, routed as a CNI would.
//!
//! Only [`topology`] touches the host; the `ambit mesh` runner owns processes, network namespaces
//! and addresses, and feeds the running pods and service VIPs back in.

pub mod control;
pub mod dns;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod manifest;
pub mod services;
pub mod topology;
