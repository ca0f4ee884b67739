//! The waypoint's settings: Istio's environment variable names where Istio has one, each also a
//! flag.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ambit_mesh::identity::{Identity, IdentityError};
use clap::Parser;

use crate::l7::WaypointName;
use crate::proxy::ProxySettings;

/// The L7 waypoint proxy of the Ambit mesh (Istio ambient compatible).
#[derive(Clone, Debug, Parser)]
#[command(name = "ambit-waypoint", version)]
pub struct Config {
    /// Workloads, services and policies from a YAML file in Istio ztunnel's local format;
    /// reloaded when it changes.
    #[arg(long, env = "LOCAL_XDS_PATH")]
    pub local_xds_path: Option<PathBuf>,

    /// HTTPRoutes and AuthorizationPolicies (with `targetRefs`) for this waypoint: a
    /// multi-document YAML file of Kubernetes objects, reloaded when it changes. Without it the
    /// waypoint applies Istio's default route and no L7 policy.
    #[arg(long, env = "AMBIT_WAYPOINT_CONFIG")]
    pub waypoint_config: Option<PathBuf>,

    /// The waypoint's Gateway, which AuthorizationPolicies name in `targetRefs` (default: the
    /// service account, as istiod names a waypoint's service account after its Gateway).
    #[arg(long, env = "AMBIT_GATEWAY_NAME")]
    pub gateway_name: Option<String>,

    /// Istio `cacerts` directory for the built-in CA (ca-cert.pem, ca-key.pem, root-cert.pem,
    /// cert-chain.pem).
    #[arg(long, env = "AMBIT_CA_DIR")]
    pub ca_dir: Option<PathBuf>,

    /// The waypoint's namespace (its identity's `ns`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// The waypoint's service account (its identity's `sa`); istiod names it after the Gateway.
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "waypoint")]
    pub service_account: String,

    #[arg(long, env = "TRUST_DOMAIN", default_value = ambit_mesh::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// The network addresses resolve in.
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,

    /// Where HBONE is accepted (Istio's waypoint listener port 15008).
    #[arg(long, env = "AMBIT_HBONE_ADDRESS", default_value = "0.0.0.0:15008")]
    pub hbone_address: SocketAddr,

    /// Prometheus `/metrics` and `/stats/prometheus`.
    #[arg(long, env = "AMBIT_STATS_ADDRESS", default_value = "0.0.0.0:15020")]
    pub stats_address: SocketAddr,

    /// `/healthz/ready`.
    #[arg(long, env = "AMBIT_READINESS_ADDRESS", default_value = "0.0.0.0:15021")]
    pub readiness_address: SocketAddr,

    /// Per-request timeout in milliseconds; 0 (Istio's default route) means none.
    #[arg(long, env = "AMBIT_REQUEST_TIMEOUT_MS", default_value_t = 0)]
    pub request_timeout_ms: u64,

    /// Retries on connect failure (Istio's default: 2).
    #[arg(long, env = "AMBIT_RETRIES", default_value_t = 2)]
    pub retries: u32,

    /// How long a client on a port without a declared protocol may stay silent before the
    /// connection is proxied at L4 as a server-first protocol (declare such ports
    /// `appProtocol: tcp` instead).
    #[arg(
        long,
        env = "AMBIT_PROTOCOL_DETECTION_TIMEOUT_MS",
        default_value_t = 1000
    )]
    pub protocol_detection_timeout_ms: u64,

    /// Proxies in front of the mesh whose `x-forwarded-for` entries `remoteIpBlocks` trusts
    /// (Istio's `gatewayTopology.numTrustedProxies`); 0 trusts none.
    #[arg(long, env = "AMBIT_NUM_TRUSTED_PROXIES", default_value_t = 0)]
    pub num_trusted_proxies: usize,

    /// Streams one upstream HTTP/2 connection carries at once before another is opened
    /// (Istio's DestinationRule `connectionPool.http.maxConcurrentStreams`).
    #[arg(long, env = "AMBIT_MAX_CONCURRENT_STREAMS", default_value_t = 100)]
    pub max_concurrent_streams: usize,

    /// Workload certificate lifetime, in seconds (Istio's SECRET_TTL).
    #[arg(long, env = "SECRET_TTL_SECONDS", default_value_t = 86400)]
    pub secret_ttl_seconds: u64,
}

/// Settings that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no state source: set LOCAL_XDS_PATH to a workloads/services/policies file")]
    NoStateSource,
    #[error("no certificate source: set --ca-dir (AMBIT_CA_DIR) to an Istio cacerts directory")]
    NoCertificateSource,
    #[error("the waypoint's identity is invalid: {0}")]
    Identity(#[from] IdentityError),
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.local_xds_path.is_none() {
            return Err(ConfigError::NoStateSource);
        }
        if self.ca_dir.is_none() {
            return Err(ConfigError::NoCertificateSource);
        }
        self.identity()?;
        Ok(())
    }

    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub fn identity(&self) -> Result<Identity, IdentityError> {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// This waypoint's Gateway, for policy `targetRefs`.
    pub fn waypoint_name(&self) -> WaypointName {
        WaypointName {
            namespace: self.namespace.clone(),
            gateway: self
                .gateway_name
                .clone()
                .unwrap_or_else(|| self.service_account.clone()),
        }
    }

    pub fn proxy_settings(&self) -> ProxySettings {
        ProxySettings {
            request_timeout: (self.request_timeout_ms > 0)
                .then(|| Duration::from_millis(self.request_timeout_ms)),
            retries: self.retries,
            protocol_detection_timeout: Duration::from_millis(self.protocol_detection_timeout_ms),
            num_trusted_proxies: self.num_trusted_proxies,
            h2_max_concurrent_streams: self.max_concurrent_streams,
            ..Default::default()
        }
    }
}
