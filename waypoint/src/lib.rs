//! ambit-waypoint: the optional L7 proxy of the mesh. It accepts HBONE on 15008, serves HTTP
//! (HTTP/1.1 or HTTP/2) inside each tunnel, enforces L7 AuthorizationPolicy, routes each request
//! by the HTTPRoutes of the addressed Service (matches, redirects, rewrites, header changes,
//! mirrors, weighted backends, timeouts, retries), forwards it over HBONE to an endpoint's
//! `podIP:15008` on a kept-alive connection (outlier endpoints ejected), and records Istio's HTTP
//! metrics with `reporter="waypoint"`. Routes, policies and WasmPlugins come from [`l7`]; user
//! proxy-wasm filters run in the request path through [`wasm`] (on `ambit-wasm-host`).
//!
//! Not built yet: configuration from istiod (xDS/ECDS).

pub mod admin;
pub mod app;
pub mod config;
pub mod l7;
pub mod metrics;
pub mod proxy;
pub mod wasm;
