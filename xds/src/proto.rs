//! The protobuf messages Ambit exchanges with istiod, written by hand with prost derives.
//!
//! Field numbers, types and enum values follow the `.proto` files Istio's ztunnel compiles
//! (`workload.proto`, `authorization.proto`, `citadel.proto`, its trimmed `xds.proto`) and the
//! upstream Envoy / Google definitions they come from, so the bytes on the wire are the same as
//! Istio's. Only fields the trimmed upstream files carry are modelled; prost skips the others.

pub mod ca;
pub mod envoy;
pub mod google;
pub mod security;
pub mod workload;

/// The xDS type URL of `istio.workload.Address` (workloads and services).
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// The xDS type URL of `istio.security.Authorization` (L4 policies).
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";

/// Packs a message into an `Any` with its type URL.
pub fn to_any<M: prost::Message>(type_url: &str, message: &M) -> google::Any {
    google::Any {
        type_url: type_url.to_owned(),
        value: message.encode_to_vec(),
    }
}
