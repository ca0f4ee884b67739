//! One pod's DNS proxy: the UDP and TCP loops, and the answer to one message.
//!
//! Every query runs in a task of its socket's `JoinSet`, so aborting the socket's task (the pod
//! went away) drops the queries in flight with it, and a panic on some unforeseen input costs
//! that query only.

use std::sync::Arc;
use std::time::Instant;

use hickory_proto::op::{Edns, Message, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;
use tokio::time::timeout;

use super::forward::Forwarder;
use super::names::{Family, IndexCache, Lookup, Resolution};
use super::{
    PodDns, MAX_TCP_CONNECTIONS, MAX_TCP_MESSAGE, MAX_UDP_IN_FLIGHT, MESH_TTL, TCP_IDLE_TIMEOUT,
};
use crate::metrics::DnsLabels;

/// A DNS header: anything shorter has no id to answer to.
const HEADER_LEN: usize = 12;
/// The largest UDP message taken or sent; advertised in our EDNS. The proxy is reached over the
/// pod's loopback, where there is no path MTU to respect.
const MAX_UDP_PAYLOAD: u16 = 4096;
/// Without EDNS, a UDP answer is at most 512 bytes (RFC 1035).
const CLASSIC_UDP_PAYLOAD: u16 = 512;

/// How a query arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// Answers one pod's queries.
pub(super) struct Handler {
    pod: PodDns,
    forwarder: Forwarder,
    index: IndexCache,
}

impl Handler {
    pub fn new(pod: PodDns, forwarder: Forwarder) -> Self {
        Handler {
            pod,
            forwarder,
            index: IndexCache::default(),
        }
    }

    /// The encoded answer to one message, or `None` when it deserves none.
    pub async fn handle(&self, bytes: &[u8], transport: Transport) -> Option<Vec<u8>> {
        if bytes.len() < HEADER_LEN {
            tracing::debug!(target: "dns", len = bytes.len(), "dropping a message shorter than a DNS header");
            return None;
        }
        // QR set: a response. Answering it could ping-pong with whatever sent it.
        if bytes[2] & 0x80 != 0 {
            tracing::debug!(target: "dns", "dropping a DNS response sent as a query");
            return None;
        }
        let request = match Message::from_vec(bytes) {
            Ok(request) => request,
            Err(error) => {
                tracing::debug!(target: "dns", %error, "malformed DNS query: FORMERR");
                let id = u16::from_be_bytes([bytes[0], bytes[1]]);
                let op_code = OpCode::from_u8((bytes[2] >> 3) & 0x0f);
                let answer = Message::error_msg(id, op_code, ResponseCode::FormErr);
                return encode(answer, usize::from(CLASSIC_UDP_PAYLOAD));
            }
        };
        let limit = match transport {
            Transport::Tcp => usize::from(u16::MAX),
            Transport::Udp => usize::from(
                request
                    .edns
                    .as_ref()
                    .map_or(CLASSIC_UDP_PAYLOAD, Edns::max_payload)
                    .clamp(CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD),
            ),
        };
        let answer = self.answer(&request, transport).await;
        encode(answer, limit)
    }

    async fn answer(&self, request: &Message, transport: Transport) -> Message {
        let mut answer = Message::response(request.metadata.id, request.metadata.op_code);
        answer.metadata.recursion_desired = request.metadata.recursion_desired;
        answer.metadata.recursion_available = true;
        answer.metadata.checking_disabled = request.metadata.checking_disabled;
        answer.queries = request.queries.clone();
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(MAX_UDP_PAYLOAD);
            answer.set_edns(edns);
        }
        if request.metadata.op_code != OpCode::Query {
            answer.metadata.response_code = ResponseCode::NotImp;
            return answer;
        }
        // Nobody sends several questions in one message; what the answer would mean is unclear.
        let [query] = request.queries.as_slice() else {
            answer.metadata.response_code = ResponseCode::FormErr;
            return answer;
        };
        let labels = DnsLabels {
            query_type: query.query_type().to_string(),
            protocol: transport.label(),
            source: self.pod.local.find(&self.pod.state.load()).ok(),
        };
        self.pod.metrics.dns_request(&labels);
        let name = query.name();
        let family = match query.query_type() {
            RecordType::A => Some(Family::V4),
            RecordType::AAAA => Some(Family::V6),
            _ => None,
        };
        let resolution = match family {
            Some(family) if query.query_class() == DNSClass::IN => {
                let host = name.to_lowercase().to_ascii();
                let host = host.trim_end_matches('.');
                let snapshot = self.pod.state.load();
                Lookup {
                    snapshot: &snapshot,
                    index: &self.index,
                    network: &self.pod.network,
                    namespace: &self.pod.local.pod.namespace,
                }
                .resolve(host, family)
            }
            _ => Resolution::Forward,
        };
        match resolution {
            Resolution::Addresses(addresses) => {
                answer.metadata.authoritative = true;
                // Owner name as asked: clients may randomise its case (0x20) and check it.
                answer.answers = addresses
                    .into_iter()
                    .map(|address| Record::from_rdata(name.clone(), MESH_TTL, RData::from(address)))
                    .collect();
                tracing::debug!(target: "dns", %name, answers = answer.answers.len(), "mesh name");
            }
            Resolution::NoSuchName => {
                answer.metadata.authoritative = true;
                answer.metadata.response_code = ResponseCode::NXDomain;
                tracing::debug!(target: "dns", %name, "not in the mesh: NXDOMAIN");
            }
            Resolution::Forward => {
                self.pod.metrics.dns_upstream_request(&labels);
                let start = Instant::now();
                let forwarded = self
                    .forwarder
                    .forward(name.clone(), query.query_type())
                    .await;
                self.pod
                    .metrics
                    .dns_upstream_duration(&labels, start.elapsed());
                match forwarded {
                    Ok(forwarded) => {
                        tracing::debug!(target: "dns", %name, code = %forwarded.code, answers = forwarded.answers.len(), "forwarded");
                        answer.metadata.response_code = forwarded.code;
                        answer.answers = forwarded.answers;
                        answer.authorities = forwarded.authorities;
                    }
                    Err(error) => {
                        self.pod.metrics.dns_upstream_failure(&labels);
                        tracing::debug!(target: "dns", %name, code = %error.code, reason = %error.reason, "forwarding failed");
                        answer.metadata.response_code = error.code;
                    }
                }
            }
        }
        answer
    }
}

/// Encodes `answer`; past `limit` bytes, only its header and question with TC set, so the client
/// asks again over TCP.
fn encode(answer: Message, limit: usize) -> Option<Vec<u8>> {
    match answer.to_vec() {
        Ok(bytes) if bytes.len() <= limit => Some(bytes),
        Ok(_) => answer.truncate().to_vec().ok(),
        Err(error) => {
            tracing::warn!(target: "dns", %error, "cannot encode a DNS answer: SERVFAIL");
            let mut failure = Message::error_msg(
                answer.metadata.id,
                answer.metadata.op_code,
                ResponseCode::ServFail,
            );
            failure.queries = answer.queries;
            failure.to_vec().ok()
        }
    }
}

/// Serves the pod's UDP socket until aborted.
pub(super) async fn serve_udp(handler: Arc<Handler>, socket: UdpSocket) {
    let socket = Arc::new(socket);
    let mut in_flight = JoinSet::new();
    // A larger datagram is cut to this size, fails to parse and gets FORMERR.
    let mut buffer = vec![0u8; usize::from(MAX_UDP_PAYLOAD)];
    loop {
        tokio::select! {
            received = socket.recv_from(&mut buffer) => {
                let (len, peer) = match received {
                    Ok(received) => received,
                    Err(error) => {
                        // Errors here are per datagram (e.g. a queued ICMP error); pause so a
                        // persistent one cannot spin the loop.
                        tracing::debug!(target: "dns", %error, "DNS UDP receive failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                if in_flight.len() >= MAX_UDP_IN_FLIGHT {
                    tracing::debug!(target: "dns", %peer, "too many DNS queries in flight: dropping one");
                    continue;
                }
                let query = buffer[..len].to_vec();
                let (handler, socket) = (handler.clone(), socket.clone());
                in_flight.spawn(async move {
                    if let Some(answer) = handler.handle(&query, Transport::Udp).await {
                        if let Err(error) = socket.send_to(&answer, peer).await {
                            tracing::debug!(target: "dns", %peer, %error, "cannot send a DNS answer");
                        }
                    }
                });
            }
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    }
}

/// Serves the pod's TCP listener until aborted.
pub(super) async fn serve_tcp(handler: Arc<Handler>, listener: TcpListener) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // Out of fds, typically: pause rather than spin.
                        tracing::debug!(target: "dns", %error, "DNS TCP accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                if connections.len() >= MAX_TCP_CONNECTIONS {
                    tracing::debug!(target: "dns", "too many DNS TCP connections: closing one");
                    continue;
                }
                connections.spawn(serve_connection(handler.clone(), stream));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Queries one after another on one connection (RFC 7766 framing: a 2-byte length, then the
/// message), until the client closes, idles, or sends something unacceptable.
async fn serve_connection(handler: Arc<Handler>, mut stream: TcpStream) {
    loop {
        let length = match timeout(TCP_IDLE_TIMEOUT, stream.read_u16()).await {
            Ok(Ok(length)) => usize::from(length),
            _ => return,
        };
        if !(HEADER_LEN..=MAX_TCP_MESSAGE).contains(&length) {
            tracing::debug!(target: "dns", length, "refusing a DNS TCP message of this length");
            return;
        }
        let mut message = vec![0u8; length];
        match timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut message)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let Some(answer) = handler.handle(&message, Transport::Tcp).await else {
            return;
        };
        let Ok(length) = u16::try_from(answer.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(answer.len() + 2);
        framed.extend_from_slice(&length.to_be_bytes());
        framed.extend_from_slice(&answer);
        match timeout(TCP_IDLE_TIMEOUT, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::local::LocalWorkload;
    use crate::proxy::PodInfo;
    use ambit_mesh::state::{NetworkAddress, Service, Snapshot, StateStore};
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    /// A handler whose state has `many`, a service with 40 VIPs (an answer past 512 bytes).
    fn handler() -> Handler {
        let many = Service {
            name: "many".into(),
            namespace: "default".into(),
            hostname: "many.default.svc.cluster.local".into(),
            vips: (1..=40)
                .map(|i| NetworkAddress {
                    network: String::new(),
                    address: format!("10.96.1.{i}").parse().unwrap(),
                })
                .collect(),
            ports: Default::default(),
            app_protocols: Default::default(),
            subject_alt_names: Vec::new(),
            waypoint: None,
        };
        let snapshot = Snapshot::build(Vec::new(), vec![many], Vec::new()).unwrap();
        Handler::new(
            PodDns {
                state: Arc::new(StateStore::new(snapshot)),
                network: String::new(),
                metrics: Default::default(),
                local: Arc::new(LocalWorkload {
                    pod: PodInfo {
                        uid: "pod".into(),
                        name: "pod".into(),
                        namespace: "default".into(),
                        service_account: "default".into(),
                    },
                    node: String::new(),
                }),
            },
            Forwarder::unreachable(),
        )
    }

    fn query(name: &str, record_type: RecordType) -> Message {
        let mut message = Message::query();
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
        message
    }

    async fn ask(handler: &Handler, message: &Message, transport: Transport) -> Message {
        let bytes = handler
            .handle(&message.to_vec().unwrap(), transport)
            .await
            .expect("an answer");
        Message::from_vec(&bytes).unwrap()
    }

    #[tokio::test]
    async fn big_udp_answers_are_truncated_unless_edns_or_tcp_allows_them() {
        let handler = handler();
        let plain = query("many.default.svc.cluster.local.", RecordType::A);
        let answer = ask(&handler, &plain, Transport::Udp).await;
        assert!(answer.metadata.truncation);
        assert!(answer.answers.is_empty());
        assert_eq!(answer.queries, plain.queries);

        let answer = ask(&handler, &plain, Transport::Tcp).await;
        assert!(!answer.metadata.truncation);
        assert_eq!(answer.answers.len(), 40);

        let mut with_edns = plain.clone();
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        with_edns.set_edns(edns);
        let answer = ask(&handler, &with_edns, Transport::Udp).await;
        assert!(!answer.metadata.truncation);
        assert_eq!(answer.answers.len(), 40);
        assert_eq!(answer.edns.map(|e| e.max_payload()), Some(MAX_UDP_PAYLOAD));
    }

    #[tokio::test]
    async fn a_failed_forward_is_servfail_and_counted() {
        let handler = handler();
        let answer = ask(
            &handler,
            &query("example.org.", RecordType::A),
            Transport::Udp,
        )
        .await;
        assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
        assert!(answer.metadata.recursion_available);
        let metrics = handler.pod.metrics.render();
        for name in [
            "istio_dns_requests_total",
            "istio_dns_upstream_requests_total",
            "istio_dns_upstream_failures_total",
            "istio_dns_upstream_request_duration_seconds_bucket",
        ] {
            assert!(
                metrics.lines().any(|l| l.starts_with(name)
                    && l.contains("request_query_type=\"a\"")
                    && l.contains("request_protocol=\"udp\"")
                    && l.contains("source_canonical_service=\"unknown\"")),
                "{name} in {metrics}"
            );
        }
    }

    #[tokio::test]
    async fn junk_is_formerr_or_dropped_never_a_panic() {
        let handler = handler();
        assert!(handler.handle(b"", Transport::Udp).await.is_none());
        assert!(handler.handle(&[0; 11], Transport::Udp).await.is_none());
        let mut response = [0u8; 12];
        response[2] = 0x80;
        assert!(handler.handle(&response, Transport::Udp).await.is_none());
        // Every byte pattern of a header with a question count and a few bytes of name.
        for seed in 0..2000u32 {
            let mut junk = vec![
                0x12,
                0x34,
                (seed % 0x80) as u8,
                (seed / 7) as u8,
                0,
                1,
                0,
                0,
            ];
            junk.extend(
                (0..(seed % 40)).map(|i| (seed.wrapping_mul(31).wrapping_add(i * 17)) as u8),
            );
            if junk.len() < HEADER_LEN {
                continue;
            }
            if let Some(answer) = handler.handle(&junk, Transport::Tcp).await {
                let answer = Message::from_vec(&answer).unwrap();
                assert_eq!(answer.metadata.id, 0x1234);
            }
        }
    }
}
