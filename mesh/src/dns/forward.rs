//! Forwarding to upstream resolvers with hickory-resolver.
//!
//! Queries leave from whatever network namespace the runtime's threads are in: the resolver's
//! sockets are created lazily on them, never on a thread that entered a pod's namespace.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, Record, RecordType};
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::TokioResolver;

/// The nameservers of this host's `/etc/resolv.conf`, each once (UDP and TCP are one server
/// here; several entries for one address would only double the attempts). Empty, with a warning,
/// when the file cannot be read.
pub fn system_servers() -> Vec<SocketAddr> {
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
    let mut unique = Vec::new();
    for server in servers {
        if !unique.contains(&server) {
            unique.push(server);
        }
    }
    unique
}

/// What upstream said, when it said something usable.
#[derive(Debug)]
pub struct Forwarded {
    /// NOERROR with answers, NOERROR without (no such type), or NXDOMAIN.
    pub code: ResponseCode,
    pub answers: Vec<Record>,
    /// The zone's SOA on a negative answer, so the client may cache it as upstream meant.
    pub authorities: Vec<Record>,
}

/// Why upstream gave nothing usable.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream DNS server configured")]
    NoUpstream,
    #[error("no answer from upstream within {0:?}")]
    Timeout(Duration),
    /// Upstream's own error code (REFUSED, SERVFAIL, ...), passed on as is.
    #[error("upstream answered {0}")]
    Upstream(ResponseCode),
    #[error("upstream DNS failed: {0}")]
    Failed(String),
}

impl ForwardError {
    /// The code the client gets.
    pub fn code(&self) -> ResponseCode {
        match self {
            ForwardError::Upstream(code) => *code,
            _ => ResponseCode::ServFail,
        }
    }
}

/// A resolver for names someone else answers.
pub struct Forwarder {
    resolver: Option<TokioResolver>,
    timeout: Duration,
}

impl Forwarder {
    /// Forwards to `servers`, each lookup bounded by `timeout`, answers cached (at most
    /// `cache_size` of them).
    pub fn new(servers: &[SocketAddr], timeout: Duration, cache_size: u64) -> Self {
        if servers.is_empty() {
            return Forwarder::unreachable();
        }
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
        // domain or search list of ours; the client has its own /etc/hosts, this host's is not
        // its.
        let config = ResolverConfig::from_parts(None, Vec::new(), name_servers);
        let mut options = ResolverOpts::default();
        options.timeout = timeout;
        options.attempts = 1;
        options.use_hosts_file = ResolveHosts::Never;
        options.preserve_intermediates = true;
        options.ndots = 0;
        options.cache_size = cache_size;
        let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(options)
            .build();
        let resolver = match resolver {
            Ok(resolver) => Some(resolver),
            Err(error) => {
                tracing::warn!(%error, "cannot build an upstream DNS resolver");
                None
            }
        };
        Forwarder { resolver, timeout }
    }

    /// A forwarder with no upstream at all: every forward fails at once (for tests that must
    /// not send DNS anywhere).
    pub fn unreachable() -> Self {
        Forwarder {
            resolver: None,
            timeout: Duration::ZERO,
        }
    }

    /// Asks upstream for `name`/`record_type`, giving up after the forwarder's timeout.
    pub async fn forward(
        &self,
        name: Name,
        record_type: RecordType,
    ) -> Result<Forwarded, ForwardError> {
        let Some(resolver) = &self.resolver else {
            return Err(ForwardError::NoUpstream);
        };
        // The resolver has its own timeout per attempt; this bounds the whole lookup, whatever
        // the number of servers and transports it tries.
        let lookup = tokio::time::timeout(self.timeout, resolver.lookup(name, record_type))
            .await
            .map_err(|_| ForwardError::Timeout(self.timeout))?;
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
            Err(NetError::Dns(DnsError::ResponseCode(code))) => Err(ForwardError::Upstream(code)),
            Err(error) => Err(ForwardError::Failed(error.to_string())),
        }
    }
}
