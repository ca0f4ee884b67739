//! ambit-ztunnel: the per-node L4 tunnel. Each enrolled pod's network namespace is handed to it
//! over ZDS; it listens inside the pod on 15001/15006/15008 and carries the pod's TCP over HBONE
//! with mTLS, L4 authorization and telemetry.

pub mod admin;
pub mod app;
pub mod config;
pub mod dns;
pub mod inpod;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod proxy;

#[cfg(feature = "testing")]
pub mod testing;
