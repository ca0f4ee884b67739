//! Assembles a running ztunnel: certificates (built-in CA or the Istio CA), state source (the
//! local file or istiod's delta ADS), in-pod workload manager and the operator endpoints. Used by
//! the binary and, in process, by tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_mesh::hbone;
use ambit_mesh::identity::{CertificateManager, ManagerSettings};
use ambit_mesh::lifecycle::Drain;
use ambit_mesh::state::local::{self, LocalConfig};
use ambit_mesh::state::StateStore;
use ambit_xds::{
    AdsClient, AdsSettings, CaClient, CaClientSettings, ControlPlane, ControlPlaneConfig, NodeInfo,
};
use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState, Endpoints};
use crate::config::{Config, IstioEnv};
use crate::inpod::{InpodStatus, WorkloadManager};
use crate::metrics::Metrics;
use crate::proxy::connections::ConnectionTracker;
use crate::proxy::ProxyContext;

/// How often the local state file is checked for changes.
const STATE_POLL: Duration = Duration::from_millis(500);

/// A started ztunnel; dropping it stops everything it runs.
pub struct Ztunnel {
    pub state: Arc<StateStore>,
    pub certificates: Arc<CertificateManager>,
    pub metrics: Arc<Metrics>,
    pub inpod: Arc<InpodStatus>,
    pub admin_address: SocketAddr,
    pub stats_address: SocketAddr,
    pub readiness_address: SocketAddr,
    /// Started by the binary on SIGTERM/SIGINT, or by `/quitquitquit`: readiness drops, the pods'
    /// listeners close, open connections run on (see [`ambit_mesh::lifecycle`]).
    pub drain: Drain,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Ztunnel {
    /// Validates `config`, loads certificates and state, binds the endpoints and starts serving.
    /// Fails only on configuration errors: a missing node agent is retried in the background.
    /// Istio's control-plane settings come from the environment ([`IstioEnv`]).
    pub async fn start(config: Config, hbone_settings: hbone::Settings) -> anyhow::Result<Self> {
        let istio = IstioEnv::from_env().context("reading Istio's environment variables")?;
        Self::start_with(config, istio, hbone_settings).await
    }

    /// [`start`](Self::start) with the control-plane settings given rather than read from the
    /// environment (in-process tests).
    pub async fn start_with(
        config: Config,
        istio: IstioEnv,
        hbone_settings: hbone::Settings,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        istio.validate(&config)?;
        let ttl = Duration::from_secs(config.secret_ttl_seconds);
        let control_plane = |address: &str, root: &std::path::Path| {
            ControlPlane::new(ControlPlaneConfig {
                address: address.to_owned(),
                root_cert: Some(root.to_owned()),
                token_path: Some(istio.auth_token.clone()),
                cluster_id: istio.cluster_id(&config),
            })
        };
        let certificates = match &config.ca_dir {
            Some(ca_dir) => {
                Arc::new(CertificateManager::with_local_ca(ca_dir, ttl).context("loading the CA")?)
            }
            None => {
                let plane =
                    control_plane(&config.ca_address, &istio.ca_root_ca).context("CA_ADDRESS")?;
                let mut client = CaClient::new(plane, CaClientSettings::default());
                // Istio's CA ends its chains with the root; the mounted root is only a fallback.
                if istio.ca_root_ca.exists() {
                    client = client
                        .with_fallback_roots(&istio.ca_root_ca)
                        .context("CA_ROOT_CA")?;
                }
                let settings = ManagerSettings {
                    ttl,
                    ..Default::default()
                };
                Arc::new(CertificateManager::new(Arc::new(client), settings))
            }
        };
        let (state, state_task, state_ready) = match &config.local_xds_path {
            Some(state_path) => {
                let state = Arc::new(StateStore::new(LocalConfig::load(state_path)?));
                let watch = local::watch(state_path.clone(), state.clone(), STATE_POLL);
                (state, tokio::spawn(watch), None)
            }
            None => {
                let plane = control_plane(&config.xds_address, &istio.xds_root_ca)
                    .context("XDS_ADDRESS")?;
                let node = NodeInfo {
                    ip: istio.instance_ip.clone(),
                    pod_name: istio.pod_name.clone(),
                    pod_namespace: istio.pod_namespace.clone(),
                    node_name: config.node_name.clone(),
                    cluster_id: istio.cluster_id(&config),
                };
                let state = Arc::new(StateStore::default());
                let client = AdsClient::new(plane, node, AdsSettings::default(), state.clone());
                let ready = client.readiness();
                (state, tokio::spawn(client.run()), Some(ready))
            }
        };
        let metrics = Arc::new(Metrics::default());
        let drain = Drain::default();
        let connections = Arc::new(ConnectionTracker::new(state.clone()));
        let context = Arc::new(ProxyContext {
            state: state.clone(),
            certificates: certificates.clone(),
            hbone: hbone_settings,
            network: config.network.clone(),
            node: config.node_name.clone(),
            metrics: metrics.clone(),
            connections: connections.clone(),
            enforce_waypoint: config.enforce_waypoint,
            drain: drain.clone(),
        });
        let manager = WorkloadManager::new(context, config.inpod_uds.clone());
        let inpod = manager.status();
        let admin_state = Arc::new(AdminState {
            state: state.clone(),
            certificates: certificates.clone(),
            inpod: inpod.clone(),
            metrics: metrics.clone(),
            drain: drain.clone(),
        });
        // With istiod, pods are taken over ZDS only once the first xDS state is in: a pod proxied
        // against an empty state would pass everything through unencrypted. Readiness (the ZDS
        // snapshot) therefore also waits for xDS, as Istio's ztunnel's does.
        let inpod_task = tokio::spawn(async move {
            if let Some(mut ready) = state_ready {
                if ready.wait_for(|ready| *ready).await.is_err() {
                    return;
                }
            }
            manager.run().await
        });
        let mut tasks = vec![state_task, inpod_task, tokio::spawn(connections.watch())];
        let mut bind =
            async |address: SocketAddr, endpoints: Endpoints| -> anyhow::Result<SocketAddr> {
                let listener = TcpListener::bind(address)
                    .await
                    .with_context(|| format!("binding {endpoints:?} endpoints on {address}"))?;
                let bound = listener.local_addr()?;
                tasks.push(tokio::spawn(admin::serve(
                    listener,
                    endpoints,
                    admin_state.clone(),
                )));
                Ok(bound)
            };
        let admin_address = bind(config.admin_address, Endpoints::Admin).await?;
        let stats_address = bind(config.stats_address, Endpoints::Stats).await?;
        let readiness_address = bind(config.readiness_address, Endpoints::Readiness).await?;
        tracing::info!(%admin_address, %stats_address, %readiness_address, uds = %config.inpod_uds.display(), "ztunnel started");
        Ok(Ztunnel {
            state,
            certificates,
            metrics,
            inpod,
            admin_address,
            stats_address,
            readiness_address,
            drain,
            tasks,
        })
    }
}
