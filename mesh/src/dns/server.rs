//! A DNS server's sockets: the UDP and TCP loops, and what happens to a message before and after
//! an [`Answer`] sees it.
//!
//! Before: datagrams shorter than a header and DNS responses are dropped (answering a response
//! could ping-pong with whatever sent it); anything else that does not parse is answered FORMERR;
//! opcodes other than QUERY get NOTIMP and messages without exactly one question FORMERR. After:
//! the answer is encoded, and cut to its header and question with TC set when it is larger than
//! the client can take over UDP (512 bytes, or its EDNS size up to [`Limits::max_udp_payload`]),
//! so the client asks again over TCP.
//!
//! Every query runs in a task of its socket's `JoinSet`, so aborting the socket's task drops the
//! queries in flight with it, and a panic on some unforeseen input costs that query only. A TCP
//! length prefix beyond [`Limits::max_tcp_message`] closes the connection; slow TCP clients are
//! cut off; queries in flight and connections are bounded.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, OpCode, Query, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;
use tokio::time::timeout;

/// A DNS header: anything shorter has no id to answer to.
pub const HEADER_LEN: usize = 12;
/// Without EDNS, a UDP answer is at most 512 bytes (RFC 1035).
pub const CLASSIC_UDP_PAYLOAD: u16 = 512;

/// How a query arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    /// `udp` or `tcp`, as Istio's metrics label it.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// What one server takes from its clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The largest message taken over TCP (at most 65535, the length prefix's range).
    pub max_tcp_message: usize,
    /// The largest UDP message taken or sent; advertised in our EDNS.
    pub max_udp_payload: u16,
    /// Queries being answered at once over UDP; more are dropped (the client retries).
    pub max_udp_in_flight: usize,
    /// Open TCP connections; more are closed at once.
    pub max_tcp_connections: usize,
    /// How long a TCP connection may sit between queries, and how long a query or answer may
    /// take to cross it, before it is closed.
    pub tcp_idle_timeout: Duration,
}

/// The answer to one question.
pub trait Answer: Send + Sync + 'static {
    /// Fills in `response` for `query`, the message's one question. The response's id, opcode,
    /// flags (RD copied, RA set), question and EDNS are set; its code is NOERROR.
    fn answer(
        &self,
        query: &Query,
        transport: Transport,
        response: &mut Message,
    ) -> impl Future<Output = ()> + Send;
}

/// An [`Answer`] on sockets.
pub struct Server<A> {
    answer: A,
    limits: Limits,
}

impl<A: Answer> Server<A> {
    pub fn new(answer: A, limits: Limits) -> Self {
        Server { answer, limits }
    }

    /// What answers the questions.
    pub fn answerer(&self) -> &A {
        &self.answer
    }

    /// The encoded answer to one message, or `None` when it deserves none.
    pub async fn handle(&self, bytes: &[u8], transport: Transport) -> Option<Vec<u8>> {
        if bytes.len() < HEADER_LEN {
            tracing::debug!(target: "dns", len = bytes.len(), "dropping a message shorter than a DNS header");
            return None;
        }
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
        let max_udp_payload = self.limits.max_udp_payload.max(CLASSIC_UDP_PAYLOAD);
        let limit = match transport {
            Transport::Tcp => usize::from(u16::MAX),
            Transport::Udp => usize::from(
                request
                    .edns
                    .as_ref()
                    .map_or(CLASSIC_UDP_PAYLOAD, Edns::max_payload)
                    .clamp(CLASSIC_UDP_PAYLOAD, max_udp_payload),
            ),
        };
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.metadata.checking_disabled = request.metadata.checking_disabled;
        response.queries = request.queries.clone();
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(max_udp_payload);
            response.set_edns(edns);
        }
        if request.metadata.op_code != OpCode::Query {
            response.metadata.response_code = ResponseCode::NotImp;
        } else if let [query] = request.queries.as_slice() {
            self.answer.answer(query, transport, &mut response).await;
        } else {
            // Nobody sends several questions in one message; what the answer would mean is
            // unclear (RFC 9619).
            response.metadata.response_code = ResponseCode::FormErr;
        }
        encode(response, limit)
    }

    /// Serves `socket` until aborted.
    pub async fn serve_udp(self: Arc<Self>, socket: UdpSocket) {
        let socket = Arc::new(socket);
        let mut in_flight = JoinSet::new();
        // A larger datagram is cut to this size, fails to parse and gets FORMERR.
        let mut buffer =
            vec![0u8; usize::from(self.limits.max_udp_payload.max(CLASSIC_UDP_PAYLOAD))];
        loop {
            tokio::select! {
                received = socket.recv_from(&mut buffer) => {
                    let (len, peer) = match received {
                        Ok(received) => received,
                        Err(error) => {
                            // Errors here are per datagram (e.g. a queued ICMP error); pause so a
                            // persistent one cannot spin the loop.
                            tracing::debug!(target: "dns", %error, "DNS UDP receive failed");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    if in_flight.len() >= self.limits.max_udp_in_flight {
                        tracing::debug!(target: "dns", %peer, "too many DNS queries in flight: dropping one");
                        continue;
                    }
                    let query = buffer[..len].to_vec();
                    let (server, socket) = (self.clone(), socket.clone());
                    in_flight.spawn(async move {
                        if let Some(answer) = server.handle(&query, Transport::Udp).await {
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

    /// Serves `listener` until aborted.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(error) => {
                            // Out of fds, typically: pause rather than spin.
                            tracing::debug!(target: "dns", %error, "DNS TCP accept failed");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    if connections.len() >= self.limits.max_tcp_connections {
                        tracing::debug!(target: "dns", "too many DNS TCP connections: closing one");
                        continue;
                    }
                    connections.spawn(self.clone().serve_connection(stream));
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    }

    /// Queries one after another on one connection (RFC 7766 framing: a 2-byte length, then the
    /// message), until the client closes, idles, or sends something unacceptable.
    async fn serve_connection(self: Arc<Self>, mut stream: TcpStream) {
        let idle = self.limits.tcp_idle_timeout;
        loop {
            let length = match timeout(idle, stream.read_u16()).await {
                Ok(Ok(length)) => usize::from(length),
                _ => return,
            };
            if !(HEADER_LEN..=self.limits.max_tcp_message).contains(&length) {
                tracing::debug!(target: "dns", length, "refusing a DNS TCP message of this length");
                return;
            }
            let mut message = vec![0u8; length];
            match timeout(idle, stream.read_exact(&mut message)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let Some(answer) = self.handle(&message, Transport::Tcp).await else {
                return;
            };
            let Ok(length) = u16::try_from(answer.len()) else {
                return;
            };
            let mut framed = Vec::with_capacity(answer.len() + 2);
            framed.extend_from_slice(&length.to_be_bytes());
            framed.extend_from_slice(&answer);
            match timeout(idle, stream.write_all(&framed)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    }
}

/// Encodes `answer`; past `limit` bytes, only its header and question with TC set.
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

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    /// Answers every question with 40 A records (an answer past 512 bytes).
    struct Many;

    impl Answer for Many {
        async fn answer(&self, query: &Query, _: Transport, response: &mut Message) {
            response.answers = (1..=40u8)
                .map(|i| {
                    let address = std::net::Ipv4Addr::new(10, 96, 1, i);
                    Record::from_rdata(query.name().clone(), 5, RData::from(address))
                })
                .collect();
        }
    }

    const LIMITS: Limits = Limits {
        max_tcp_message: 4096,
        max_udp_payload: 4096,
        max_udp_in_flight: 8,
        max_tcp_connections: 8,
        tcp_idle_timeout: Duration::from_secs(1),
    };

    fn query(name: &str, record_type: RecordType) -> Message {
        let mut message = Message::query();
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
        message
    }

    async fn ask(server: &Server<Many>, message: &Message, transport: Transport) -> Message {
        let bytes = server
            .handle(&message.to_vec().unwrap(), transport)
            .await
            .expect("an answer");
        Message::from_vec(&bytes).unwrap()
    }

    #[tokio::test]
    async fn big_udp_answers_are_truncated_unless_edns_or_tcp_allows_them() {
        let server = Server::new(Many, LIMITS);
        let plain = query("many.default.svc.cluster.local.", RecordType::A);
        let answer = ask(&server, &plain, Transport::Udp).await;
        assert!(answer.metadata.truncation);
        assert!(answer.answers.is_empty());
        assert_eq!(answer.queries, plain.queries);

        let answer = ask(&server, &plain, Transport::Tcp).await;
        assert!(!answer.metadata.truncation);
        assert_eq!(answer.answers.len(), 40);

        let mut with_edns = plain.clone();
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        with_edns.set_edns(edns);
        let answer = ask(&server, &with_edns, Transport::Udp).await;
        assert!(!answer.metadata.truncation);
        assert_eq!(answer.answers.len(), 40);
        assert_eq!(answer.edns.map(|e| e.max_payload()), Some(4096));
    }

    #[tokio::test]
    async fn other_opcodes_and_question_counts_are_refused_before_any_answer() {
        let server = Server::new(Many, LIMITS);
        let mut notify = query("a.test.", RecordType::A);
        notify.metadata.op_code = OpCode::Notify;
        let answer = ask(&server, &notify, Transport::Udp).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NotImp);
        assert!(answer.answers.is_empty());

        let mut two = query("a.test.", RecordType::A);
        two.add_query(Query::query(
            Name::from_ascii("b.test.").unwrap(),
            RecordType::A,
        ));
        let answer = ask(&server, &two, Transport::Udp).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);

        let none = Message::query();
        let answer = ask(&server, &none, Transport::Tcp).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);
    }

    #[tokio::test]
    async fn junk_is_formerr_or_dropped_never_a_panic() {
        let server = Server::new(Many, LIMITS);
        assert!(server.handle(b"", Transport::Udp).await.is_none());
        assert!(server.handle(&[0; 11], Transport::Udp).await.is_none());
        let mut response = [0u8; 12];
        response[2] = 0x80;
        assert!(server.handle(&response, Transport::Udp).await.is_none());
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
            if let Some(answer) = server.handle(&junk, Transport::Tcp).await {
                let answer = Message::from_vec(&answer).unwrap();
                assert_eq!(answer.metadata.id, 0x1234);
            }
        }
    }
}
