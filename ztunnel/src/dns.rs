//! The DNS proxy, as Istio's ztunnel runs it: per enrolled pod, UDP and TCP on
//! `127.0.0.1:15053` (and `[::1]:15053` when the pod has IPv6 loopback) inside the pod's network
//! namespace. With DNS capture on, the in-pod rules REDIRECT the app's DNS (port 53, UDP and TCP)
//! there; a locally generated packet REDIRECTed in `nat OUTPUT` is rewritten to the loopback
//! address, so a localhost-bound socket receives it and the app's own namespace stays the only way
//! in (nothing outside the pod can reach the proxy).
//!
//! Answers:
//! - A/AAAA for mesh names, from the current state snapshot: `<svc>.<ns>.svc.cluster.local` and
//!   any service `hostname` as written (wildcard hostnames `*.example.com` too) → the service's
//!   VIPs on this node's network (endpoint IPs for a headless Kubernetes service). A known name
//!   with no address of the asked family is an empty NOERROR, not NXDOMAIN.
//! - A/AAAA for other `cluster.local` names → NXDOMAIN at once: the mesh is authoritative there,
//!   which also ends the search-list walk (`<svc>.<ns>.<podns>.svc.cluster.local`, ...) without a
//!   round trip upstream. The exceptions are pod names, which the state does not hold and the
//!   cluster's DNS does: forwarded. They are a pod under a known service
//!   (`<pod>.<svc>.<ns>.svc.cluster.local`: StatefulSet pods, `hostname` + `subdomain`) and
//!   pod A records (`<a-b-c-d>.<ns>.pod.cluster.local`).
//! - Everything else (other names, other query types, as Istio does) is forwarded upstream with
//!   hickory-resolver to the servers of ztunnel's own `/etc/resolv.conf`, from ztunnel's own
//!   network namespace (the process's, not the pod's). No answer within
//!   [`UPSTREAM_TIMEOUT`] → SERVFAIL.
//!
//! Bad input (`ambit_mesh::dns::Server`'s checks): datagrams shorter than a header and DNS
//! responses are dropped, anything else that does not parse is answered FORMERR; a TCP length
//! prefix beyond [`MAX_TCP_MESSAGE`] closes the connection; slow TCP clients are cut off;
//! in-flight work per pod is bounded ([`LIMITS`]).

mod names;
mod server;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ambit_mesh::dns::{Forwarder, Limits, Server};
use ambit_mesh::state::StateStore;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::netns::PodNetns;
use crate::proxy::local::LocalWorkload;

/// Istio's in-pod DNS proxy port.
pub const DNS_PORT: u16 = 15053;
/// The cluster's DNS domain (Istio's `CLUSTER_DOMAIN` default).
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// TTL of the answers for mesh names: Istio's 30 s, short enough that clients follow VIP changes.
pub const MESH_TTL: u32 = 30;
/// How long a forwarded query may take before the client gets SERVFAIL. Stub resolvers retry
/// after 5 s by default; answering first keeps them from stacking retries on a dead upstream.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest DNS message accepted over TCP. Queries are a few hundred bytes even with EDNS
/// options; a larger length prefix is junk or an attempt to make ztunnel buffer for it.
pub const MAX_TCP_MESSAGE: usize = 4096;
/// Per pod: at most 256 queries at once over UDP, 64 TCP connections idle at most 10 s; UDP
/// messages up to 4096 bytes (the proxy is reached over the pod's loopback, where there is no
/// path MTU to respect).
pub const LIMITS: Limits = Limits {
    max_tcp_message: MAX_TCP_MESSAGE,
    max_udp_payload: 4096,
    max_udp_in_flight: 256,
    max_tcp_connections: 64,
    tcp_idle_timeout: Duration::from_secs(10),
};
/// Answers cached per pod: bounded so that many pods cannot add up to much.
const FORWARD_CACHE: u64 = 1024;

static UPSTREAM: OnceLock<Vec<SocketAddr>> = OnceLock::new();

/// Sets the upstream servers for every DNS proxy of this process instead of reading
/// `/etc/resolv.conf` (for embedding, and for tests that bring their own upstream). Fails, with
/// the servers in force, once they are decided: a proxy may already use them.
pub fn set_upstream(servers: Vec<SocketAddr>) -> Result<(), Vec<SocketAddr>> {
    let mut wanted = Some(servers);
    let current = UPSTREAM.get_or_init(|| wanted.take().expect("first initialisation"));
    match wanted {
        None => Ok(()),
        Some(wanted) if wanted == *current => Ok(()),
        Some(_) => Err(current.clone()),
    }
}

/// The upstream servers in force: on a cluster, the cluster's DNS service from ztunnel's own
/// `/etc/resolv.conf`, read once per process when the first pod's proxy starts.
pub fn upstream_servers() -> &'static [SocketAddr] {
    UPSTREAM.get_or_init(|| {
        let servers = ambit_mesh::dns::system_servers();
        tracing::info!(upstream = ?servers, "DNS proxy upstream servers");
        servers
    })
}

/// What a pod's DNS proxy needs from its pod proxy.
pub struct PodDns {
    pub state: Arc<StateStore>,
    /// The node's network: only VIPs on it are answered.
    pub network: String,
    pub metrics: Arc<Metrics>,
    /// The pod: its workload gives the metrics' source labels, and among services sharing a
    /// hostname, its own namespace's wins.
    pub local: Arc<LocalWorkload>,
}

/// Binds the pod's DNS sockets inside `netns` and starts serving them. The returned tasks own
/// the sockets and everything in flight: aborting them stops the proxy.
pub async fn start(netns: &PodNetns, pod: PodDns) -> std::io::Result<Vec<JoinHandle<()>>> {
    // Each pod has its own resolver (as in Istio's ztunnel): its connections and background
    // tasks live and die with the pod's proxy.
    let forwarder = Forwarder::new(upstream_servers(), UPSTREAM_TIMEOUT, FORWARD_CACHE);
    let server = Arc::new(Server::new(server::Handler::new(pod, forwarder), LIMITS));
    let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DNS_PORT);
    let mut tasks = Vec::new();
    let udp = netns.bind_udp(v4).await?;
    let tcp = netns.listen(v4).await?;
    tasks.push(tokio::spawn(server.clone().serve_udp(udp)));
    tasks.push(tokio::spawn(server.clone().serve_tcp(tcp)));
    // IPv6 capture REDIRECTs to [::1]; a pod without IPv6 loopback has nothing to bind, and
    // nothing will be redirected there either.
    let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), DNS_PORT);
    match (netns.bind_udp(v6).await, netns.listen(v6).await) {
        (Ok(udp), Ok(tcp)) => {
            tasks.push(tokio::spawn(server.clone().serve_udp(udp)));
            tasks.push(tokio::spawn(server.serve_tcp(tcp)));
        }
        (udp, tcp) => {
            let error = udp.err().or(tcp.err()).map(|e| e.to_string());
            tracing::debug!(error, "no DNS proxy on [::1] (no IPv6 loopback in the pod)");
        }
    }
    Ok(tasks)
}
