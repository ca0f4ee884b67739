//! The cluster DNS on the mesh's network: kube-dns's address, [`CLUSTER_DNS`]:53 (UDP and TCP),
//! answered on every node, as NodeLocal DNSCache does on a cluster. Each node namespace holds the
//! address on its loopback; a pod's query leaves by its default route to its node, which
//! delivers it locally. Pods outside the mesh reach it that way; enrolled pods' queries are
//! captured by ztunnel's DNS proxy, which answers mesh services itself and forwards the rest here
//! through a listener on this host's loopback (ztunnel's upstream sockets live in the daemon's own
//! namespace, where node addresses are not reachable).
//!
//! The answers are `ambit_local::dns`'s, the zone replaced after every change. Names outside the
//! cluster go to this host's `/etc/resolv.conf` servers (or [`UPSTREAM_ENV`]'s), SERVFAIL after
//! [`UPSTREAM_TIMEOUT`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ambit_local::dns::{ClusterDns, Zone, ZoneSource};
use ambit_mesh::dns::{Forwarder, Limits, Server};
use ambit_ztunnel::netns::PodNetns;
use anyhow::Context;
use tokio::task::JoinHandle;

/// kube-dns' usual VIP: the nameserver of every pod's resolv.conf.
pub const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Overrides the upstream servers: comma-separated `ip:port` (tests point it at a server of
/// their own, or at one that never answers).
pub const UPSTREAM_ENV: &str = "AMBIT_MESH_DNS_UPSTREAM";
/// How long a forwarded query may take. Shorter than ztunnel's proxy's 2 s, so that an enrolled
/// pod gets this server's SERVFAIL rather than its proxy's timeout, and well inside a stub
/// resolver's 5 s retry.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(1500);
/// Pods' queries cross a veth: answers over UDP stay within 1232 bytes (the DNS flag day's
/// size); TCP takes a whole 64 KiB message.
const LIMITS: Limits = Limits {
    max_tcp_message: u16::MAX as usize,
    max_udp_payload: 1232,
    max_udp_in_flight: 1024,
    max_tcp_connections: 256,
    tcp_idle_timeout: Duration::from_secs(10),
};
/// Forwarded answers cached.
const FORWARD_CACHE: u64 = 4096;

/// The running cluster DNS: its sockets' tasks, stopped when dropped.
pub struct DnsServer {
    server: Arc<Server<ClusterDns>>,
    /// Where ztunnel's DNS proxies forward to.
    pub loopback: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl DnsServer {
    /// Starts the server on this host's loopback, with an empty zone.
    pub async fn start() -> anyhow::Result<DnsServer> {
        let upstream = upstream()?;
        tracing::info!(?upstream, "cluster DNS upstream servers");
        let forwarder = Forwarder::new(&upstream, UPSTREAM_TIMEOUT, FORWARD_CACHE);
        let server = Arc::new(Server::new(
            ClusterDns::new(Zone::default(), forwarder),
            LIMITS,
        ));
        // One port for both transports: the UDP socket picks it, the TCP listener takes it too.
        let mut last_error = None;
        for _ in 0..8 {
            let udp = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
            let loopback = udp.local_addr()?;
            match tokio::net::TcpListener::bind(loopback).await {
                Ok(tcp) => {
                    let tasks = vec![
                        tokio::spawn(server.clone().serve_udp(udp)),
                        tokio::spawn(server.clone().serve_tcp(tcp)),
                    ];
                    return Ok(DnsServer {
                        server,
                        loopback,
                        tasks,
                    });
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("tried")).context("binding the cluster DNS on 127.0.0.1")
    }

    /// Serves [`CLUSTER_DNS`]:53 inside a node's namespace (which must hold the address).
    pub async fn serve_node(&mut self, netns_path: &str) -> anyhow::Result<()> {
        let fd: std::os::fd::OwnedFd = std::fs::File::open(netns_path)
            .with_context(|| format!("opening {netns_path}"))?
            .into();
        let netns = PodNetns::new(fd).with_context(|| format!("entering {netns_path}"))?;
        let address = SocketAddr::from((CLUSTER_DNS, 53));
        let udp = netns.bind_udp(address).await.with_context(|| {
            format!("binding the cluster DNS on {address} (udp) in {netns_path}")
        })?;
        let tcp = netns.listen(address).await.with_context(|| {
            format!("binding the cluster DNS on {address} (tcp) in {netns_path}")
        })?;
        self.tasks
            .push(tokio::spawn(self.server.clone().serve_udp(udp)));
        self.tasks
            .push(tokio::spawn(self.server.clone().serve_tcp(tcp)));
        Ok(())
    }

    /// Answers from the cluster as `source` describes it from now on.
    pub fn update(&self, source: &ZoneSource<'_>) {
        self.server.answerer().replace(Zone::build(source));
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// [`UPSTREAM_ENV`]'s servers, else this host's; never the cluster DNS itself.
fn upstream() -> anyhow::Result<Vec<SocketAddr>> {
    let servers = match std::env::var(UPSTREAM_ENV) {
        Ok(list) => list
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim()
                    .parse::<SocketAddr>()
                    .with_context(|| format!("{UPSTREAM_ENV}={list:?}: expected ip:port[,ip:port]"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        Err(_) => ambit_mesh::dns::system_servers(),
    };
    Ok(servers
        .into_iter()
        .filter(|s| s.ip() != IpAddr::V4(CLUSTER_DNS))
        .collect())
}
