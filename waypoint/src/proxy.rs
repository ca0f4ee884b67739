//! The waypoint's data path: HBONE in ([`inbound`]: an HTTP server inside each tunnel), endpoint
//! choice, retries and HBONE out ([`forward`]), with streamed bodies measured for telemetry
//! ([`body`]).

pub mod body;
pub mod forward;
pub mod inbound;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use ambit_mesh::hbone::client::Client;
use ambit_mesh::identity::Identity;
use ambit_mesh::state::StateStore;

use crate::metrics::Metrics;

/// Routing behaviour that is Istio's default route until HTTPRoute support exists.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// Whole-request timeout (until response headers); `None` is Istio's default (no timeout).
    pub request_timeout: Option<Duration>,
    /// Retries after the first attempt (Istio's default: 2), on connect failure and refused
    /// streams, each to a different endpoint when the service has one.
    pub retries: u32,
    /// Wait before the first retry, doubled for each further one (Envoy's default: 25 ms).
    pub retry_backoff: Duration,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            request_timeout: None,
            retries: 2,
            retry_backoff: Duration::from_millis(25),
        }
    }
}

/// What every tunnel and request of one waypoint shares.
pub struct Context {
    /// The waypoint's own identity: served on 15008, presented to endpoints.
    pub identity: Identity,
    pub state: Arc<StateStore>,
    /// Pooled HBONE connections towards endpoints.
    pub client: Client,
    pub metrics: Arc<Metrics>,
    /// The network addresses resolve in.
    pub network: String,
    pub settings: ProxySettings,
    /// Round-robin position over a service's healthy endpoints.
    pub next_pick: AtomicUsize,
}
