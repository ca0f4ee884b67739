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

    /// istiod's xDS address, e.g. https://istiod.istio-system.svc:15012 (http:// for a
    /// plaintext control plane): workloads, services and policies over delta ADS instead of
    /// LOCAL_XDS_PATH. Empty (the default, unlike Istio's) means local mode. Also read from the
    /// environment: XDS_ROOT_CA (root file for istiod's certificate), AUTH_TOKEN (bearer token
    /// file), POD_NAME, POD_NAMESPACE and INSTANCE_IP (ztunnel's node id),
    /// ISTIO_META_CLUSTER_ID (wins over CLUSTER_ID).
    #[arg(long, env = "XDS_ADDRESS", default_value = "")]
    pub xds_address: String,

    /// The Istio CA address (istiod, e.g. https://istiod.istio-system.svc:15012): workload
    /// certificates from `IstioCertificateService` instead of the built-in CA (--ca-dir).
    /// Empty (the default) means the built-in CA. Also read from the environment: CA_ROOT_CA
    /// (root file for the CA's serving certificate), AUTH_TOKEN, ISTIO_META_CLUSTER_ID.
    #[arg(long, env = "CA_ADDRESS", default_value = "")]
    pub ca_address: String,

    /// Sent to istiod as `clusterid`; ISTIO_META_CLUSTER_ID overrides it, as in Istio.
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

/// Settings that cannot work together, or are missing.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("both XDS_ADDRESS={0:?} and LOCAL_XDS_PATH are set: choose istiod or the local file")]
    TwoStateSources(String),
    #[error("both CA_ADDRESS={0:?} and --ca-dir (AMBIT_CA_DIR) are set: choose the Istio CA or the built-in one")]
    TwoCertificateSources(String),
    #[error("no state source: set XDS_ADDRESS to istiod, or LOCAL_XDS_PATH to a workloads/services/policies file")]
    NoStateSource,
    #[error("no certificate source: set CA_ADDRESS to the Istio CA, or --ca-dir (AMBIT_CA_DIR) to an Istio cacerts directory")]
    NoCertificateSource,
    #[error("XDS_ADDRESS is set but {0} is empty: istiod identifies ztunnel by its pod (set POD_NAME, POD_NAMESPACE, INSTANCE_IP, as Istio's manifests do)")]
    MissingPodInfo(&'static str),
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        match (self.xds_address.is_empty(), &self.local_xds_path) {
            (false, Some(_)) => return Err(ConfigError::TwoStateSources(self.xds_address.clone())),
            (true, None) => return Err(ConfigError::NoStateSource),
            _ => {}
        }
        match (self.ca_address.is_empty(), &self.ca_dir) {
            (false, Some(_)) => {
                return Err(ConfigError::TwoCertificateSources(self.ca_address.clone()))
            }
            (true, None) => return Err(ConfigError::NoCertificateSource),
            _ => {}
        }
        Ok(())
    }
}

/// What talking to istiod needs besides the addresses, under Istio ztunnel's environment
/// variable names. Environment only (no flags), so `Config` keeps its shape.
#[derive(Clone, Debug, Parser)]
#[command(name = "ambit-ztunnel", no_binary_name = true)]
pub struct IstioEnv {
    /// PEM roots for istiod's xDS serving certificate (a file path; Istio also takes `SYSTEM`
    /// or inline PEM, Ambit does not).
    #[arg(env = "XDS_ROOT_CA", default_value = DEFAULT_ROOT_CERT)]
    pub xds_root_ca: PathBuf,
    /// PEM roots for the CA's serving certificate.
    #[arg(env = "CA_ROOT_CA", default_value = DEFAULT_ROOT_CERT)]
    pub ca_root_ca: PathBuf,
    /// The projected service-account token sent as `authorization: Bearer`, re-read per call.
    #[arg(env = "AUTH_TOKEN", default_value = DEFAULT_TOKEN)]
    pub auth_token: PathBuf,
    #[arg(env = "ISTIO_META_CLUSTER_ID")]
    pub istio_meta_cluster_id: Option<String>,
    #[arg(env = "POD_NAME", default_value = "")]
    pub pod_name: String,
    #[arg(env = "POD_NAMESPACE", default_value = "")]
    pub pod_namespace: String,
    #[arg(env = "INSTANCE_IP", default_value = "")]
    pub instance_ip: String,
}

/// Where Istio mounts the mesh root in the ztunnel pod.
pub const DEFAULT_ROOT_CERT: &str = "/var/run/secrets/istio/root-cert.pem";
/// Where Istio projects ztunnel's `istio-ca` audience token.
pub const DEFAULT_TOKEN: &str = "/var/run/secrets/tokens/istio-token";

impl IstioEnv {
    /// Reads the environment.
    pub fn from_env() -> Result<Self, clap::Error> {
        IstioEnv::try_parse_from(std::iter::empty::<String>())
    }

    /// The `clusterid` to send istiod.
    pub fn cluster_id(&self, config: &Config) -> String {
        self.istio_meta_cluster_id
            .clone()
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| config.cluster_id.clone())
    }

    /// Checks what xDS needs, when `config` uses it.
    pub fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        if config.xds_address.is_empty() {
            return Ok(());
        }
        for (name, value) in [
            ("POD_NAME", &self.pod_name),
            ("POD_NAMESPACE", &self.pod_namespace),
            ("INSTANCE_IP", &self.instance_ip),
        ] {
            if value.is_empty() {
                return Err(ConfigError::MissingPodInfo(name));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("ambit-ztunnel").chain(args.iter().copied()))
            .unwrap()
    }

    #[test]
    fn istiod_or_local_sources_but_not_both_nor_neither() {
        let local = config(&["--local-xds-path", "s.yaml", "--ca-dir", "ca"]);
        local.validate().unwrap();
        let istiod = config(&[
            "--xds-address",
            "https://istiod:15012",
            "--ca-address",
            "https://istiod:15012",
        ]);
        istiod.validate().unwrap();
        let both = config(&[
            "--xds-address",
            "https://istiod:15012",
            "--local-xds-path",
            "s.yaml",
            "--ca-dir",
            "ca",
        ]);
        assert!(matches!(
            both.validate(),
            Err(ConfigError::TwoStateSources(_))
        ));
        let both = config(&[
            "--local-xds-path",
            "s.yaml",
            "--ca-dir",
            "ca",
            "--ca-address",
            "https://istiod:15012",
        ]);
        assert!(matches!(
            both.validate(),
            Err(ConfigError::TwoCertificateSources(_))
        ));
        assert!(matches!(
            config(&["--ca-dir", "ca"]).validate(),
            Err(ConfigError::NoStateSource)
        ));
        assert!(matches!(
            config(&["--local-xds-path", "s.yaml"]).validate(),
            Err(ConfigError::NoCertificateSource)
        ));
    }

    #[test]
    fn xds_needs_the_pod_identity_and_cluster_id_prefers_istio_meta() {
        let istiod = config(&[
            "--xds-address",
            "https://istiod:15012",
            "--ca-address",
            "https://istiod:15012",
        ]);
        let mut env = IstioEnv {
            xds_root_ca: DEFAULT_ROOT_CERT.into(),
            ca_root_ca: DEFAULT_ROOT_CERT.into(),
            auth_token: DEFAULT_TOKEN.into(),
            istio_meta_cluster_id: None,
            pod_name: "ztunnel-x".into(),
            pod_namespace: "istio-system".into(),
            instance_ip: String::new(),
        };
        let err = env.validate(&istiod).unwrap_err();
        assert!(err.to_string().contains("INSTANCE_IP"), "{err}");
        env.instance_ip = "10.0.0.1".into();
        env.validate(&istiod).unwrap();
        assert_eq!(env.cluster_id(&istiod), "Kubernetes");
        env.istio_meta_cluster_id = Some("east".into());
        assert_eq!(env.cluster_id(&istiod), "east");
    }
}
