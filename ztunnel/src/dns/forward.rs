//! Forwarding to the upstream resolvers with hickory-resolver.
//!
//! The upstream servers are those of ztunnel's own `/etc/resolv.conf` (on a cluster, the
//! cluster's DNS service), read once per process when the first pod's proxy starts. Queries leave
//! from ztunnel's own network namespace: the resolver's sockets are created on the runtime's
//! threads, which never enter a pod's namespace, so the in-pod rules never see them.
//!
//! Each pod has its own resolver (as in Istio's ztunnel): its connections and background tasks
//! live and die with the pod's proxy.

use std::net::SocketAddr;
use std::sync::OnceLock;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, Record, RecordType};
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::TokioResolver;

use super::UPSTREAM_TIMEOUT;

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

/// The upstream servers in force, read from `/etc/resolv.conf` on first use.
pub fn upstream_servers() -> &'static [SocketAddr] {
    UPSTREAM.get_or_init(|| {
        let servers: Vec<SocketAddr> = match hickory_resolver::system_conf::read_system_conf() {
            Ok((config, _)) => config
                .name_servers()
                .iter()
                .map(|server| {
                    let port = server.connections.first().map_or(53, |c| c.port);
                    SocketAddr::new(server.ip, port)
                })
                .collect(),
            Err(error) => {
                tracing::warn!(%error, "cannot read /etc/resolv.conf: DNS queries for names outside the mesh will fail");
                Vec::new()
            }
        };
        // Several entries for one address (UDP and TCP are one server here) would only double
        // the attempts.
        let mut unique = Vec::new();
        for server in servers {
            if !unique.contains(&server) {
                unique.push(server);
            }
        }
        tracing::info!(upstream = ?unique, "DNS proxy upstream servers");
        unique
    })
}

/// What upstream said, when it said something usable.
#[derive(Debug)]
pub(super) struct Forwarded {
    /// NOERROR with answers, NOERROR without (no such type), or NXDOMAIN.
    pub code: ResponseCode,
    pub answers: Vec<Record>,
    /// The zone's SOA on a negative answer, so the client may cache it as upstream meant.
    pub authorities: Vec<Record>,
}

/// Why upstream gave nothing usable; the client gets `code`.
#[derive(Debug)]
pub(super) struct ForwardError {
    pub code: ResponseCode,
    pub reason: String,
}

/// One pod's upstream resolver.
pub(super) struct Forwarder {
    resolver: Option<TokioResolver>,
}

impl Forwarder {
    pub fn new() -> Self {
        let servers = upstream_servers();
        let name_servers = servers
            .iter()
            .map(|server| {
                let mut udp = ConnectionConfig::udp();
                udp.port = server.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = server.port();
                NameServerConfig::new(server.ip(), true, vec![udp, tcp])
            })
            .collect();
        // Names arrive fully qualified (the client already applied its search list), so no
        // domain or search list of ours; the pod has its own /etc/hosts, ztunnel's is not its.
        let config = ResolverConfig::from_parts(None, Vec::new(), name_servers);
        let mut options = ResolverOpts::default();
        options.timeout = UPSTREAM_TIMEOUT;
        options.attempts = 1;
        options.use_hosts_file = ResolveHosts::Never;
        options.preserve_intermediates = true;
        options.ndots = 0;
        // One cache per pod: bounded so that many pods cannot add up to much.
        options.cache_size = 1024;
        let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(options)
            .build();
        let resolver = match resolver {
            Ok(resolver) => Some(resolver),
            Err(error) => {
                tracing::warn!(%error, "cannot build the DNS proxy's upstream resolver");
                None
            }
        };
        Forwarder { resolver }
    }

    /// A forwarder with no upstream at all: every forward fails (for tests that must not send
    /// DNS anywhere).
    #[cfg(test)]
    pub fn unreachable() -> Self {
        Forwarder { resolver: None }
    }

    /// Asks upstream for `name`/`record_type`, giving up after [`UPSTREAM_TIMEOUT`].
    pub async fn forward(
        &self,
        name: Name,
        record_type: RecordType,
    ) -> Result<Forwarded, ForwardError> {
        let servfail = |reason: String| ForwardError {
            code: ResponseCode::ServFail,
            reason,
        };
        let Some(resolver) = &self.resolver else {
            return Err(servfail("no upstream resolver".into()));
        };
        // The resolver has its own timeout per attempt; this bounds the whole lookup, whatever
        // the number of servers and transports it tries.
        let lookup = tokio::time::timeout(UPSTREAM_TIMEOUT, resolver.lookup(name, record_type))
            .await
            .map_err(|_| servfail(format!("no answer within {UPSTREAM_TIMEOUT:?}")))?;
        match lookup {
            Ok(lookup) => Ok(Forwarded {
                code: lookup.message().metadata.response_code,
                answers: lookup.answers().to_vec(),
                authorities: Vec::new(),
            }),
            // NXDOMAIN and "no records of this type" are answers, not failures.
            Err(NetError::Dns(DnsError::NoRecordsFound(none))) => Ok(Forwarded {
                code: none.response_code,
                answers: Vec::new(),
                authorities: none
                    .soa
                    .map(|soa| vec![soa.into_record_of_rdata()])
                    .unwrap_or_default(),
            }),
            // Upstream's own error code (REFUSED, SERVFAIL, ...) is passed on as is.
            Err(NetError::Dns(DnsError::ResponseCode(code))) => Err(ForwardError {
                code,
                reason: format!("upstream answered {code}"),
            }),
            Err(error) => Err(servfail(error.to_string())),
        }
    }
}
