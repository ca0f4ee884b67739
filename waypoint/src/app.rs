//! Assembles a running waypoint: certificates, state, the HBONE listener with its HTTP handler,
//! and the operator endpoints. Used by the binary and, in process, by tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_mesh::hbone::client::Client;
use ambit_mesh::hbone::server::Server;
use ambit_mesh::hbone::Settings;
use ambit_mesh::identity::{CertificateManager, Identity};
use ambit_mesh::lifecycle::Drain;
use ambit_mesh::state::local::{self, LocalConfig};
use ambit_mesh::state::StateStore;
use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::admin::{self, Endpoints};
use crate::config::Config;
use crate::l7::{self, L7Config, L7Store, WaypointName};
use crate::metrics::Metrics;
use crate::proxy::calls::MeshCalls;
use crate::proxy::inbound::Inbound;
use crate::proxy::upstream::Upstreams;
use crate::proxy::{Context, ProxySettings};
use crate::wasm::WasmFilters;
use ambit_wasm_host::PluginHooks;

/// How often the local state file is checked for changes.
const STATE_POLL: Duration = Duration::from_millis(500);
/// How often the L7 configuration file is checked for changes.
pub const L7_POLL: Duration = Duration::from_millis(500);

/// Where a waypoint listens and how it behaves, once certificates and state are at hand.
#[derive(Clone, Debug)]
pub struct Options {
    pub identity: Identity,
    pub network: String,
    pub hbone_address: SocketAddr,
    pub stats_address: SocketAddr,
    pub readiness_address: SocketAddr,
    pub proxy: ProxySettings,
    pub hbone: Settings,
    /// The waypoint's Gateway, for policy `targetRefs`.
    pub name: WaypointName,
    /// The L7 configuration file, watched for changes; `None`: no routes, no L7 policy.
    pub l7_path: Option<std::path::PathBuf>,
}

/// A started waypoint; dropping it stops everything it runs.
pub struct Waypoint {
    pub identity: Identity,
    pub state: Arc<StateStore>,
    pub certificates: Arc<CertificateManager>,
    pub metrics: Arc<Metrics>,
    /// Routes and policies in force.
    pub l7: Arc<L7Store>,
    pub hbone_address: SocketAddr,
    pub stats_address: SocketAddr,
    pub readiness_address: SocketAddr,
    /// Started by the binary on SIGTERM/SIGINT: readiness drops, the HBONE listener closes,
    /// connections get GOAWAY and run on (see [`ambit_mesh::lifecycle`]).
    pub drain: Drain,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Waypoint {
    /// Validates `config`, loads the CA and the state file (watched for changes), and starts.
    pub async fn start(config: Config, hbone: Settings) -> anyhow::Result<Self> {
        config.validate()?;
        let ca_dir = config.ca_dir.as_ref().expect("validated");
        let ttl = Duration::from_secs(config.secret_ttl_seconds);
        let certificates =
            Arc::new(CertificateManager::with_local_ca(ca_dir, ttl).context("loading the CA")?);
        let state_path = config.local_xds_path.clone().expect("validated");
        let state = Arc::new(StateStore::new(LocalConfig::load(&state_path)?));
        let options = Options {
            identity: config.identity()?,
            network: config.network.clone(),
            hbone_address: config.hbone_address,
            stats_address: config.stats_address,
            readiness_address: config.readiness_address,
            proxy: config.proxy_settings(),
            hbone,
            name: config.waypoint_name(),
            l7_path: config.waypoint_config.clone(),
        };
        let mut waypoint = Self::start_with(options, certificates, state.clone()).await?;
        waypoint
            .tasks
            .push(tokio::spawn(local::watch(state_path, state, STATE_POLL)));
        Ok(waypoint)
    }

    /// Starts with the given certificates and state (tests set the state directly). The L7
    /// configuration file, when given, must load: a waypoint never starts on a broken one.
    pub async fn start_with(
        options: Options,
        certificates: Arc<CertificateManager>,
        state: Arc<StateStore>,
    ) -> anyhow::Result<Self> {
        let calls = Arc::new(MeshCalls::default());
        let hooks = PluginHooks {
            http: calls.clone(),
            log: None,
        };
        let wasm = Arc::new(WasmFilters::new(hooks, options.name.namespace.clone()));
        let metrics = Arc::new(Metrics::default().with_wasm(wasm.clone()));
        let l7_seen = options.l7_path.as_deref().and_then(l7::fingerprint);
        let config = match &options.l7_path {
            Some(path) => L7Config::load(path, &options.name)?,
            None => L7Config::default(),
        };
        let l7 = Arc::new(L7Store::with_plugins(
            config,
            wasm.clone(),
            options.name.clone(),
        ));
        let context = Arc::new(Context {
            identity: options.identity.clone(),
            state: state.clone(),
            l7: l7.clone(),
            client: Client::new(certificates.clone(), options.hbone.clone()),
            metrics: metrics.clone(),
            network: options.network.clone(),
            settings: options.proxy.clone(),
            upstreams: Upstreams::new(options.proxy.clone()),
            wasm: wasm.clone(),
            drain: Drain::default(),
        });
        calls.bind(&context);
        let drain = context.drain.clone();
        let hbone_listener = TcpListener::bind(options.hbone_address)
            .await
            .with_context(|| format!("binding HBONE on {}", options.hbone_address))?;
        let hbone_address = hbone_listener.local_addr()?;
        let server = Server::with_drain(
            options.identity.clone(),
            certificates.clone(),
            Arc::new(Inbound::new(context)),
            options.hbone.clone(),
            drain.clone(),
        );
        let mut tasks = vec![
            tokio::spawn(async move {
                if let Err(err) = server.serve(hbone_listener).await {
                    tracing::error!(error = %err, "HBONE listener failed");
                }
            }),
            tokio::spawn(wasm.clone().retry()),
        ];
        if let Some(path) = options.l7_path.clone() {
            tasks.push(tokio::spawn(l7::watch(
                path,
                options.name.clone(),
                l7.clone(),
                L7_POLL,
                l7_seen,
            )));
        }
        let mut bind = async |address: SocketAddr, endpoints: Endpoints| {
            let listener = TcpListener::bind(address)
                .await
                .with_context(|| format!("binding {endpoints:?} endpoints on {address}"))?;
            let bound = listener.local_addr()?;
            tasks.push(tokio::spawn(admin::serve(
                listener,
                endpoints,
                metrics.clone(),
                drain.clone(),
            )));
            anyhow::Ok(bound)
        };
        let stats_address = bind(options.stats_address, Endpoints::Stats).await?;
        let readiness_address = bind(options.readiness_address, Endpoints::Readiness).await?;
        tracing::info!(identity = %options.identity, %hbone_address, %stats_address, %readiness_address, "waypoint started");
        Ok(Waypoint {
            identity: options.identity,
            state,
            certificates,
            metrics,
            l7,
            hbone_address,
            stats_address,
            readiness_address,
            drain,
            tasks,
        })
    }
}
