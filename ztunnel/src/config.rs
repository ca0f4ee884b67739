//! ztunnel's settings: Istio's environment variable names where Istio has one, each also a flag.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// The per-node L4 tunnel of the Ambit mesh (Istio ambient compatible).
#[derive(Clone, Debug, Parser)]
#[command(name = "ambit-ztunnel", version)]
pub struct Config {
    /// Workloads, services and policies from a YAML file in Istio ztunnel's local format;
    /// reloaded when it changes.
    #[arg(long, env = "LOCAL_XDS_PATH")]
    pub local_xds_path: Option<PathBuf>,

    /// The node agent's ZDS socket (SOCK_SEQPACKET).
    #[arg(long, env = "INPOD_UDS", default_value = ambit_mesh::zds::DEFAULT_SOCKET_PATH)]
    pub inpod_uds: PathBuf,

    /// Istio `cacerts` directory for the built-in CA (ca-cert.pem, ca-key.pem, root-cert.pem,
    /// cert-chain.pem).
    #[arg(long, env = "AMBIT_CA_DIR")]
    pub ca_dir: Option<PathBuf>,

    /// istiod's xDS address. Not supported yet: set it empty and use LOCAL_XDS_PATH.
    #[arg(long, env = "XDS_ADDRESS", default_value = "")]
    pub xds_address: String,

    /// The Istio CA address. Not supported yet: set it empty and use --ca-dir.
    #[arg(long, env = "CA_ADDRESS", default_value = "")]
    pub ca_address: String,

    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// The node's network; addresses resolve within it.
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,

    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,

    /// Admin endpoint (`/config_dump`), localhost only.
    #[arg(long, env = "AMBIT_ADMIN_ADDRESS", default_value = "127.0.0.1:15000")]
    pub admin_address: SocketAddr,

    /// Prometheus `/metrics` and `/stats/prometheus`.
    #[arg(long, env = "AMBIT_STATS_ADDRESS", default_value = "0.0.0.0:15020")]
    pub stats_address: SocketAddr,

    /// `/healthz/ready`.
    #[arg(long, env = "AMBIT_READINESS_ADDRESS", default_value = "0.0.0.0:15021")]
    pub readiness_address: SocketAddr,

    /// Workload certificate lifetime, in seconds (Istio's SECRET_TTL).
    #[arg(long, env = "SECRET_TTL_SECONDS", default_value_t = 86400)]
    pub secret_ttl_seconds: u64,

    /// Refuse (401) inbound HBONE that skipped a required waypoint: when the connection was
    /// addressed to a service with a waypoint (`forwarded: host`), or directly to a pod with a
    /// workload waypoint, the peer must be that waypoint. Istio leaves this to an
    /// AuthorizationPolicy; `false` restores Istio's behaviour.
    #[arg(
        long,
        env = "AMBIT_ENFORCE_WAYPOINT",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub enforce_waypoint: bool,
}

/// Settings that cannot work together, or need what is not built yet.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("XDS_ADDRESS={0:?}: xDS from istiod is not supported yet; set XDS_ADDRESS= (empty) and LOCAL_XDS_PATH")]
    XdsUnsupported(String),
    #[error("CA_ADDRESS={0:?}: the Istio CA client is not supported yet; set CA_ADDRESS= (empty) and --ca-dir")]
    CaUnsupported(String),
    #[error("no state source: set LOCAL_XDS_PATH to a workloads/services/policies file")]
    NoStateSource,
    #[error("no certificate source: set --ca-dir (AMBIT_CA_DIR) to an Istio cacerts directory")]
    NoCertificateSource,
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.xds_address.is_empty() {
            return Err(ConfigError::XdsUnsupported(self.xds_address.clone()));
        }
        if !self.ca_address.is_empty() {
            return Err(ConfigError::CaUnsupported(self.ca_address.clone()));
        }
        if self.local_xds_path.is_none() {
            return Err(ConfigError::NoStateSource);
        }
        if self.ca_dir.is_none() {
            return Err(ConfigError::NoCertificateSource);
        }
        Ok(())
    }
}
