//! The waypoint's data path: HBONE in ([`inbound`]: an HTTP server inside each tunnel, or L4
//! proxying ([`tcp`]) for ports that carry something else, [`sniff`]ed when undeclared), the
//! per-request phase sequence ([`pipeline`]: Wasm (authn/authz) → authorize → route → request
//! filters → Wasm → forward → response filters → telemetry), the Wasm filter chain on a request
//! ([`plugins`]) and the calls filters make ([`calls`]), the route filters ([`filters`]), forwarding with
//! retries and timeouts ([`forward`]), endpoints, outlier ejection and pooled upstream
//! connections ([`upstream`]), and bodies measured or buffered for replay ([`body`]).

pub mod body;
pub mod calls;
pub mod filters;
pub mod forward;
pub mod inbound;
pub mod pipeline;
pub mod plugins;
pub mod sniff;
pub mod tcp;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use ambit_mesh::hbone::client::Client;
use ambit_mesh::identity::Identity;
use ambit_mesh::state::StateStore;

use crate::l7::L7Store;
use crate::metrics::Metrics;
use crate::wasm::WasmFilters;

/// Behaviour that is not configured per route: Istio's defaults unless said otherwise.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// Whole-request timeout (until response headers) when the route sets none; `None` is
    /// Istio's default (no timeout).
    pub request_timeout: Option<Duration>,
    /// Retries after the first attempt under Istio's default policy (2), on connect failure and
    /// refused streams, each to a different endpoint when the service has one.
    pub retries: u32,
    /// Base interval between retries (Envoy's default: 25 ms), with exponential backoff and
    /// full jitter.
    pub retry_backoff: Duration,
    /// Largest request body kept in memory so that it can be sent again (retries, mirrors).
    pub body_buffer_limit: usize,
    /// Consecutive 5xx or connect failures that eject an endpoint (Envoy's default: 5).
    pub outlier_consecutive_errors: u32,
    /// How long an ejection lasts the first time; longer with each ejection (Envoy's 30 s).
    pub outlier_base_ejection: Duration,
    /// Idle upstream HTTP/1.1 connections kept per endpoint (HTTP/2 keeps one, multiplexed).
    pub pool_max_idle: usize,
    /// How long an idle upstream connection is kept.
    pub pool_idle_timeout: Duration,
    /// PING interval on upstream HTTP/2 connections, idle or not.
    pub h2_keepalive_interval: Duration,
    /// How long a PING may go unanswered before the HTTP/2 connection is closed.
    pub h2_keepalive_timeout: Duration,
    /// Streams one upstream HTTP/2 connection carries at once before the next request opens
    /// another connection (Envoy's `max_concurrent_streams`, Istio's DestinationRule
    /// `connectionPool.http.maxConcurrentStreams`). The default, 100, is what HTTP/2 clients
    /// assume before the server's SETTINGS and below what common servers advertise, so requests
    /// do not queue behind a server's limit either.
    pub h2_max_concurrent_streams: usize,
    /// How long a tunnel to a port without a declared protocol may stay silent before it is
    /// taken for a server-first protocol and proxied at L4.
    pub protocol_detection_timeout: Duration,
    /// Proxies in front of the mesh whose `x-forwarded-for` entries are trusted, counted from
    /// the right (Istio's `gatewayTopology.numTrustedProxies`); they decide `remote.ip` and
    /// `remoteIpBlocks`. 0, the default, trusts none: `remote.ip` is the source address.
    pub num_trusted_proxies: usize,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            request_timeout: None,
            retries: 2,
            retry_backoff: Duration::from_millis(25),
            body_buffer_limit: 64 * 1024,
            outlier_consecutive_errors: 5,
            outlier_base_ejection: Duration::from_secs(30),
            pool_max_idle: 32,
            pool_idle_timeout: Duration::from_secs(60),
            // ztunnel's HBONE values: a dead endpoint is noticed within 30 s.
            h2_keepalive_interval: Duration::from_secs(10),
            h2_keepalive_timeout: Duration::from_secs(20),
            h2_max_concurrent_streams: 100,
            protocol_detection_timeout: Duration::from_secs(1),
            num_trusted_proxies: 0,
        }
    }
}

/// What every tunnel and request of one waypoint shares.
pub struct Context {
    /// The waypoint's own identity: served on 15008, presented to endpoints.
    pub identity: Identity,
    pub state: Arc<StateStore>,
    /// Routes and policies in force.
    pub l7: Arc<L7Store>,
    /// Pooled HBONE connections towards endpoints.
    pub client: Client,
    pub metrics: Arc<Metrics>,
    /// The network addresses resolve in.
    pub network: String,
    pub settings: ProxySettings,
    /// Endpoint choice, outlier ejection and idle upstream connections.
    pub upstreams: upstream::Upstreams,
    /// WasmPlugins in force.
    pub wasm: Arc<WasmFilters>,
    /// The waypoint's shutdown: HTTP connections inside tunnels are closed gracefully once it
    /// starts.
    pub drain: ambit_mesh::lifecycle::Drain,
}
