//! ambit-waypoint: the optional L7 proxy of the mesh. It accepts HBONE on 15008, serves HTTP
//! (HTTP/1.1 or HTTP/2) inside each tunnel, picks an endpoint of the addressed service, forwards
//! each request over HBONE to that endpoint's `podIP:15008` with Istio's default retry policy, and
//! records Istio's HTTP metrics with `reporter="waypoint"`.
//!
//! Not built yet: HTTPRoute, L7 AuthorizationPolicy, Wasm filters, xDS.

pub mod admin;
pub mod app;
pub mod config;
pub mod metrics;
pub mod proxy;
