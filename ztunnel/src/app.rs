//! Assembles a running ztunnel: certificates, state source, in-pod workload manager and the
//! operator endpoints. Used by the binary and, in process, by tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_mesh::hbone;
use ambit_mesh::identity::CertificateManager;
use ambit_mesh::state::local::{self, LocalConfig};
use ambit_mesh::state::StateStore;
use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState, Endpoints};
use crate::config::Config;
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
    pub async fn start(config: Config, hbone_settings: hbone::Settings) -> anyhow::Result<Self> {
        config.validate()?;
        let ca_dir = config.ca_dir.as_ref().expect("validated");
        let ttl = Duration::from_secs(config.secret_ttl_seconds);
        let certificates =
            Arc::new(CertificateManager::with_local_ca(ca_dir, ttl).context("loading the CA")?);
        let state_path = config.local_xds_path.clone().expect("validated");
        let state = Arc::new(StateStore::new(LocalConfig::load(&state_path)?));
        let metrics = Arc::new(Metrics::default());
        let connections = Arc::new(ConnectionTracker::new(state.clone()));
        let context = Arc::new(ProxyContext {
            state: state.clone(),
            certificates: certificates.clone(),
            hbone: hbone_settings,
            network: config.network.clone(),
            metrics: metrics.clone(),
            connections: connections.clone(),
            enforce_waypoint: config.enforce_waypoint,
        });
        let manager = WorkloadManager::new(context, config.inpod_uds.clone());
        let inpod = manager.status();
        let admin_state = Arc::new(AdminState {
            state: state.clone(),
            certificates: certificates.clone(),
            inpod: inpod.clone(),
            metrics: metrics.clone(),
        });
        let mut tasks = vec![
            tokio::spawn(local::watch(state_path, state.clone(), STATE_POLL)),
            tokio::spawn(manager.run()),
            tokio::spawn(connections.watch()),
        ];
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
            tasks,
        })
    }
}
