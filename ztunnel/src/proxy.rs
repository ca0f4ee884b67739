//! The per-pod proxy: for each enrolled pod, listeners inside the pod's network namespace on
//! 15001 (outbound capture), 15006 (inbound plaintext) and 15008 (inbound HBONE), and the DNS
//! proxy on 127.0.0.1:15053 (see [`crate::dns`]).
//!
//! Phases of a connection, outbound: accept on 15001 → original destination → resolve in the state
//! (service VIP, workload, or outside the mesh) → HBONE to the destination's 15008 as the pod, or
//! plain TCP → splice. Inbound: accept (HBONE verified by mTLS, or plaintext) → authorize → connect
//! to the app from inside the pod, with the client's address as source → splice.
//!
//! Waypoints: traffic addressed to a service with a waypoint (or directly to a pod with a
//! workload waypoint) goes over HBONE to the waypoint instead, `:authority` still the original
//! destination; inbound, such traffic must come from the waypoint (`AMBIT_ENFORCE_WAYPOINT`).

pub mod connections;
mod inbound;
pub mod local;
mod outbound;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use ambit_mesh::hbone;
use ambit_mesh::identity::{CertificateManager, Identity, DEFAULT_TRUST_DOMAIN};
use ambit_mesh::lifecycle::{self, Drain};
use ambit_mesh::state::{
    GatewayAddress, GatewayDestination, HealthStatus, Snapshot, StateStore, Workload,
};
use tokio::task::JoinHandle;

use crate::netns::{NetnsError, PodNetns};
use local::LocalWorkload;

/// Istio's in-pod ports.
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
pub use ambit_mesh::hbone::HBONE_PORT;

/// Why a pod's proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("pod {uid}: {source}")]
    Netns { uid: String, source: NetnsError },
    #[error("pod {uid}: cannot listen on port {port} inside the pod: {source}")]
    Listen {
        uid: String,
        port: u16,
        source: std::io::Error,
    },
    #[error("pod {uid}: no identity: {reason}")]
    Identity { uid: String, reason: String },
}

/// What every pod proxy on the node shares.
pub struct ProxyContext {
    pub state: Arc<StateStore>,
    pub certificates: Arc<CertificateManager>,
    pub hbone: hbone::Settings,
    /// The node's network (Istio `NETWORK`); addresses resolve within it.
    pub network: String,
    /// The node's name (`NODE_NAME`): enrolled pods' workloads are looked for among its own.
    pub node: String,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Live inbound connections, re-checked when policy changes.
    pub connections: Arc<connections::ConnectionTracker>,
    /// Inbound HBONE that bypassed the destination's waypoint is refused (see
    /// [`crate::config::Config::enforce_waypoint`]).
    pub enforce_waypoint: bool,
    /// ztunnel's shutdown: listeners close, open connections run until its deadline.
    pub drain: Drain,
}

/// What ZDS says about a pod when it is added: `uid` is the node agent's key for it, the rest
/// its `WorkloadInfo`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
}

/// One enrolled pod's listeners; dropping it stops them (established connections are dropped
/// with their tasks, as a deleted pod's would be).
pub struct PodProxy {
    pub info: PodInfo,
    pub identity: Identity,
    netns: Arc<PodNetns>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl PodProxy {
    /// Opens the pod's listeners inside its namespace and starts serving them.
    pub async fn start(
        context: Arc<ProxyContext>,
        info: PodInfo,
        netns: PodNetns,
    ) -> Result<PodProxy, ProxyError> {
        let uid = info.uid.clone();
        let local = Arc::new(LocalWorkload {
            pod: info.clone(),
            node: context.node.clone(),
        });
        let identity = pod_identity(&context, &local).map_err(|reason| ProxyError::Identity {
            uid: uid.clone(),
            reason,
        })?;
        let netns = Arc::new(netns);
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let listen = |port| {
            let netns = netns.clone();
            let uid = uid.clone();
            async move {
                netns
                    .listen(SocketAddr::new(any, port))
                    .await
                    .map_err(|source| ProxyError::Listen { uid, port, source })
            }
        };
        let outbound = listen(OUTBOUND_PORT).await?;
        let plaintext = listen(INBOUND_PLAINTEXT_PORT).await?;
        let hbone_listener = listen(HBONE_PORT).await?;

        let client = hbone::client::Client::with_connector(
            context.certificates.clone(),
            context.hbone.clone(),
            Arc::new(NetnsConnector(netns.clone())),
        );
        let pod = Arc::new(Pod {
            context: context.clone(),
            uid: uid.clone(),
            local: local.clone(),
            identity: identity.clone(),
            netns: netns.clone(),
            client,
        });
        // Last of the fallible steps: its tasks start at once, and only the returned PodProxy
        // aborts them.
        let dns_tasks = crate::dns::start(
            &netns,
            crate::dns::PodDns {
                state: context.state.clone(),
                network: context.network.clone(),
                metrics: context.metrics.clone(),
                local: local.clone(),
            },
        )
        .await
        .map_err(|source| ProxyError::Listen {
            uid: uid.clone(),
            port: crate::dns::DNS_PORT,
            source,
        })?;
        let mut tasks = vec![
            tokio::spawn(outbound::serve(pod.clone(), outbound)),
            tokio::spawn(inbound::serve_plaintext(pod.clone(), plaintext)),
            tokio::spawn(inbound::serve_hbone(pod, hbone_listener)),
        ];
        tasks.extend(dns_tasks);
        tasks.push(tokio::spawn(report_workload(context.clone(), local)));
        tracing::info!(pod = %uid, identity = %identity, netns = netns.inode(), "pod proxy started");
        Ok(PodProxy {
            info,
            identity,
            netns,
            tasks,
        })
    }

    pub fn netns_inode(&self) -> u64 {
        self.netns.inode()
    }
}

/// One pod as its connection handlers see it.
pub(crate) struct Pod {
    pub context: Arc<ProxyContext>,
    pub uid: String,
    /// How its workload is found in the state.
    pub local: Arc<LocalWorkload>,
    pub identity: Identity,
    pub netns: Arc<PodNetns>,
    /// HBONE connections opened from inside this pod, so their source address is the pod's.
    pub client: hbone::client::Client,
}

/// Opens HBONE connections from inside a pod's namespace.
struct NetnsConnector(Arc<PodNetns>);

impl hbone::client::Connector for NetnsConnector {
    fn connect(
        &self,
        address: SocketAddr,
    ) -> ambit_mesh::identity::BoxFuture<'_, std::io::Result<tokio::net::TcpStream>> {
        Box::pin(self.0.connect(address))
    }
}

/// Accepts on one of a pod's capture listeners and serves each connection with `handle`. The
/// connection tasks belong to this one: when the pod leaves (its task is aborted), they end too.
/// When ztunnel drains, the listener closes and the open connections run to their end.
async fn accept_loop<F, Fut>(
    pod: Arc<Pod>,
    listener: tokio::net::TcpListener,
    what: &'static str,
    handle: F,
) where
    F: Fn(Arc<Pod>, tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let drain = &pod.context.drain;
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = drain.started() => break,
        };
        match accepted {
            Ok((stream, client)) => {
                let open = drain.track();
                let connection = handle(pod.clone(), stream, client);
                connections.spawn(async move {
                    connection.await;
                    drop(open);
                });
            }
            Err(err) => {
                if !lifecycle::accept_failed(&err, what).await {
                    tracing::error!(pod = %pod.uid, error = %err, "{what} listener failed");
                    return;
                }
            }
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// The pod's identity: from its workload when the state has it, else from what ZDS said (the
/// workload's service account and namespace are the pod's by construction; only a trust domain
/// other than the default comes from the state).
fn pod_identity(context: &ProxyContext, local: &LocalWorkload) -> Result<Identity, String> {
    if let Ok(workload) = local.find(&context.state.load()) {
        return workload.identity().map_err(|e| e.to_string());
    }
    Identity::new(
        DEFAULT_TRUST_DOMAIN,
        &local.pod.namespace,
        local.service_account(),
    )
    .map_err(|e| e.to_string())
}

/// Says once, for the operator, whether the pod's workload reached the state within the wait:
/// connections fail until it does, and this line says why.
async fn report_workload(context: Arc<ProxyContext>, local: Arc<LocalWorkload>) {
    match local.wait(&context.state, local::WAIT).await {
        Ok((_, workload)) => {
            tracing::info!(pod = %local.pod.uid, workload = %workload.uid, "pod matched to its workload")
        }
        Err(err) => tracing::warn!(
            pod = %local.pod.uid, error = %err,
            "pod has no workload after {}s; its connections are refused until the control plane delivers one",
            local::WAIT.as_secs()
        ),
    }
}

/// A waypoint ([`GatewayAddress`]) resolved in one snapshot, for an outbound connection.
#[derive(Debug)]
pub(crate) struct Waypoint {
    /// The waypoint pod that takes this connection.
    pub workload: Arc<Workload>,
    /// `<waypoint ip>:<hboneMtlsPort>`.
    pub hbone_address: SocketAddr,
    /// Who may answer there: the pod's identity, plus the waypoint service's SANs when the
    /// waypoint is reached through its service.
    pub identities: Vec<Identity>,
}

/// Finds the waypoint pod behind `gateway`: the workload at its address, or one of the healthy
/// endpoints of the waypoint service it names by VIP or hostname (chosen by `pick`, to spread
/// connections).
pub(crate) fn resolve_waypoint(
    snapshot: &Snapshot,
    gateway: &GatewayAddress,
    pick: usize,
) -> Result<Waypoint, String> {
    let key = match &gateway.destination {
        GatewayDestination::Address(address) => {
            if let Some(workload) = snapshot.workload_by_ip(&address.network, address.address) {
                return waypoint_at(workload.clone(), Vec::new(), gateway);
            }
            // Istio usually gives the waypoint *service's* VIP here.
            snapshot
                .service_by_vip(&address.network, address.address)
                .ok_or_else(|| format!("waypoint {address} is not a known workload or VIP"))?
                .key()
        }
        GatewayDestination::Hostname(name) => format!("{}/{}", name.namespace, name.hostname),
    };
    let service = snapshot.service(&key).ok_or_else(|| {
        format!("waypoint {key} is not a known service (the waypoint is missing or not ready)")
    })?;
    let healthy: Vec<&Arc<Workload>> = snapshot
        .endpoints(&key)
        .iter()
        .filter(|w| w.status == HealthStatus::Healthy && !w.workload_ips.is_empty())
        .collect();
    if healthy.is_empty() {
        return Err(format!("waypoint service {key} has no healthy endpoint"));
    }
    let sans = service
        .subject_alt_names
        .iter()
        .filter_map(|san| san.parse().ok())
        .collect();
    waypoint_at(healthy[pick % healthy.len()].clone(), sans, gateway)
}

fn waypoint_at(
    workload: Arc<Workload>,
    sans: Vec<Identity>,
    gateway: &GatewayAddress,
) -> Result<Waypoint, String> {
    let ip = *workload
        .workload_ips
        .first()
        .ok_or_else(|| format!("waypoint workload {} has no address", workload.uid))?;
    let mut identities: Vec<Identity> = workload.identity().into_iter().collect();
    identities.extend(sans);
    Ok(Waypoint {
        hbone_address: SocketAddr::new(ip, gateway.hbone_mtls_port),
        workload,
        identities,
    })
}

/// Whether `gateway` designates `workload` itself (a waypoint's own traffic, or traffic to the
/// waypoint's own service, never loops through the waypoint).
pub(crate) fn is_waypoint(
    snapshot: &Snapshot,
    gateway: &GatewayAddress,
    workload: &Workload,
) -> bool {
    match &gateway.destination {
        GatewayDestination::Address(address) => {
            (workload.network == address.network
                && workload.workload_ips.contains(&address.address))
                || snapshot
                    .service_by_vip(&address.network, address.address)
                    .is_some_and(|service| workload.services.contains_key(&service.key()))
        }
        GatewayDestination::Hostname(name) => workload
            .services
            .contains_key(&format!("{}/{}", name.namespace, name.hostname)),
    }
}
