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
//!   round trip upstream. The exception is a pod name under a known service
//!   (`<pod>.<svc>.<ns>.svc.cluster.local`, StatefulSet pods), which the state does not hold and
//!   the cluster's DNS does: forwarded.
//! - Everything else (other names, other query types, as Istio does) is forwarded upstream with
//!   hickory-resolver to the servers of ztunnel's own `/etc/resolv.conf`, from ztunnel's own
//!   network namespace (the process's, not the pod's). No answer within
//!   [`UPSTREAM_TIMEOUT`] → SERVFAIL.
//!
//! Bad input: datagrams shorter than a header and DNS responses are dropped, anything else that
//! does not parse is answered FORMERR; a TCP length prefix beyond [`MAX_TCP_MESSAGE`] closes the
//! connection; slow TCP clients are cut off; in-flight work per pod is bounded.

mod forward;
mod names;
mod server;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ambit_mesh::state::StateStore;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::netns::PodNetns;
use crate::proxy::local::LocalWorkload;

pub use forward::{set_upstream, upstream_servers};

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
/// Queries being answered at once per pod over UDP; more are dropped (the client retries).
pub const MAX_UDP_IN_FLIGHT: usize = 256;
/// Open TCP connections per pod; more are closed at once.
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// How long a TCP connection may sit between queries, and how long a query or answer may take
/// to cross it, before it is closed.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

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
    let handler = Arc::new(server::Handler::new(pod, forward::Forwarder::new()));
    let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DNS_PORT);
    let mut tasks = Vec::new();
    let udp = netns.bind_udp(v4).await?;
    let tcp = netns.listen(v4).await?;
    tasks.push(tokio::spawn(server::serve_udp(handler.clone(), udp)));
    tasks.push(tokio::spawn(server::serve_tcp(handler.clone(), tcp)));
    // IPv6 capture REDIRECTs to [::1]; a pod without IPv6 loopback has nothing to bind, and
    // nothing will be redirected there either.
    let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), DNS_PORT);
    match (netns.bind_udp(v6).await, netns.listen(v6).await) {
        (Ok(udp), Ok(tcp)) => {
            tasks.push(tokio::spawn(server::serve_udp(handler.clone(), udp)));
            tasks.push(tokio::spawn(server::serve_tcp(handler, tcp)));
        }
        (udp, tcp) => {
            let error = udp.err().or(tcp.err()).map(|e| e.to_string());
            tracing::debug!(error, "no DNS proxy on [::1] (no IPv6 loopback in the pod)");
        }
    }
    Ok(tasks)
}
