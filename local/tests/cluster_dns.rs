//! The cluster DNS on real sockets (UDP and TCP on this host's loopback): every query type the
//! Kubernetes DNS specification names, forwarding to an upstream that answers and to one that
//! never does, and bad input (junk datagrams, 64 KiB TCP messages, half-sent messages) answered or
//! refused with the server still serving afterwards.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_local::control::{ClusterState, RunningPod};
use ambit_local::dns::{ClusterDns, Zone, ZoneSource};
use ambit_local::manifest::parse;
use ambit_mesh::dns::{Forwarder, Limits, Server};
use hickory_proto::op::{Edns, Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: default, labels: {app: web}}
spec:
  containers: [{name: c, image: ambit/echo}]
"#;

const LIMITS: Limits = Limits {
    max_tcp_message: u16::MAX as usize,
    max_udp_payload: 1232,
    max_udp_in_flight: 64,
    max_tcp_connections: 16,
    tcp_idle_timeout: Duration::from_secs(2),
};

/// An upstream on loopback: `external.test` A → 192.0.2.7, nothing for anything else (a black
/// hole).
fn upstream() -> SocketAddr {
    let socket = StdUdpSocket::bind("127.0.0.1:0").unwrap();
    let address = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok((len, peer)) = socket.recv_from(&mut buffer) {
            let Ok(request) = Message::from_vec(&buffer[..len]) else {
                continue;
            };
            let Some(query) = request.queries.first() else {
                continue;
            };
            if query.name().to_lowercase().to_ascii() != "external.test." {
                continue;
            }
            let mut answer = Message::response(request.metadata.id, OpCode::Query);
            answer.metadata.recursion_available = true;
            answer.queries = request.queries.clone();
            if query.query_type() == RecordType::A {
                answer.answers.push(Record::from_rdata(
                    query.name().clone(),
                    60,
                    RData::from(IpAddr::from([192, 0, 2, 7])),
                ));
            }
            let _ = socket.send_to(&answer.to_vec().unwrap(), peer);
        }
    });
    address
}

/// The server on UDP and TCP on one loopback port.
async fn start(upstream: SocketAddr) -> SocketAddr {
    let mut cluster = ClusterState::new();
    cluster.apply(&parse(MANIFESTS).unwrap()).unwrap();
    let pods = [RunningPod {
        namespace: "default".into(),
        name: "web-0".into(),
        ip: "10.244.1.2".parse().unwrap(),
        node: "node1".into(),
        enrolled: false,
        ready: true,
    }];
    let vips = BTreeMap::from([(
        ("default".to_owned(), "web".to_owned()),
        "10.96.0.11".parse::<IpAddr>().unwrap(),
    )]);
    let zone = Zone::build(&ZoneSource {
        cluster: &cluster,
        pods: &pods,
        vips: &vips,
        reverse_ranges: &[(10, 244), (10, 96)],
    });
    let forwarder = Forwarder::new(&[upstream], Duration::from_millis(500), 0);
    let server = Arc::new(Server::new(ClusterDns::new(zone, forwarder), LIMITS));
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let address = udp.local_addr().unwrap();
    let tcp = tokio::net::TcpListener::bind(address).await.unwrap();
    tokio::spawn(server.clone().serve_udp(udp));
    tokio::spawn(server.serve_tcp(tcp));
    address
}

fn query(name: &str, record_type: RecordType) -> Message {
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
    message
}

async fn udp(server: SocketAddr, bytes: &[u8]) -> Option<Message> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(bytes, server).await.unwrap();
    let mut buffer = vec![0u8; 65535];
    let len = tokio::time::timeout(Duration::from_secs(3), socket.recv(&mut buffer))
        .await
        .ok()?
        .unwrap();
    Some(Message::from_vec(&buffer[..len]).expect("a DNS message"))
}

async fn ask(server: SocketAddr, name: &str, record_type: RecordType) -> Message {
    udp(server, &query(name, record_type).to_vec().unwrap())
        .await
        .unwrap_or_else(|| panic!("no answer to {name} {record_type}"))
}

/// One framed message over a new TCP connection; the answer, or `None` if the server closed.
async fn tcp(server: SocketAddr, bytes: &[u8]) -> Option<Message> {
    let mut stream = TcpStream::connect(server).await.unwrap();
    stream
        .write_all(&u16::try_from(bytes.len()).unwrap().to_be_bytes())
        .await
        .unwrap();
    stream.write_all(bytes).await.unwrap();
    let length = tokio::time::timeout(Duration::from_secs(3), stream.read_u16())
        .await
        .expect("the server answers or closes")
        .ok()?;
    let mut answer = vec![0u8; usize::from(length)];
    stream.read_exact(&mut answer).await.unwrap();
    Some(Message::from_vec(&answer).unwrap())
}

#[tokio::test]
async fn every_query_type_of_the_specification_is_answered_over_udp_and_tcp() {
    let server = start(upstream()).await;
    let cases: &[(&str, RecordType, ResponseCode, usize)] = &[
        (
            "web.default.svc.cluster.local.",
            RecordType::A,
            ResponseCode::NoError,
            1,
        ),
        (
            "web.default.svc.cluster.local.",
            RecordType::AAAA,
            ResponseCode::NoError,
            0,
        ),
        (
            "web.default.svc.cluster.local.",
            RecordType::CNAME,
            ResponseCode::NoError,
            0,
        ),
        (
            "web.default.svc.cluster.local.",
            RecordType::ANY,
            ResponseCode::NoError,
            1,
        ),
        (
            "_http._tcp.web.default.svc.cluster.local.",
            RecordType::SRV,
            ResponseCode::NoError,
            1,
        ),
        (
            "11.0.96.10.in-addr.arpa.",
            RecordType::PTR,
            ResponseCode::NoError,
            1,
        ),
        (
            "2.1.244.10.in-addr.arpa.",
            RecordType::PTR,
            ResponseCode::NoError,
            1,
        ),
        (
            "10-244-1-2.default.pod.cluster.local.",
            RecordType::A,
            ResponseCode::NoError,
            1,
        ),
        (
            "dns-version.cluster.local.",
            RecordType::TXT,
            ResponseCode::NoError,
            1,
        ),
        ("cluster.local.", RecordType::SOA, ResponseCode::NoError, 1),
        ("cluster.local.", RecordType::NS, ResponseCode::NoError, 0),
        (
            "nope.default.svc.cluster.local.",
            RecordType::A,
            ResponseCode::NXDomain,
            0,
        ),
        (
            "nope.default.svc.cluster.local.",
            RecordType::SRV,
            ResponseCode::NXDomain,
            0,
        ),
        (
            "9.9.96.10.in-addr.arpa.",
            RecordType::PTR,
            ResponseCode::NXDomain,
            0,
        ),
        ("external.test.", RecordType::A, ResponseCode::NoError, 1),
    ];
    for &(name, record_type, code, answers) in cases {
        let started = Instant::now();
        let over_udp = ask(server, name, record_type).await;
        let elapsed = started.elapsed();
        let over_tcp = tcp(server, &query(name, record_type).to_vec().unwrap())
            .await
            .expect("an answer over TCP");
        for answer in [&over_udp, &over_tcp] {
            assert_eq!(answer.metadata.response_code, code, "{name} {record_type}");
            assert_eq!(
                answer.answers.len(),
                answers,
                "{name} {record_type}: {answer:?}"
            );
            assert!(answer.metadata.recursion_available);
        }
        if name.ends_with("cluster.local.") || name.ends_with("in-addr.arpa.") {
            assert!(over_udp.metadata.authoritative, "{name}");
            assert!(
                elapsed < Duration::from_millis(100),
                "{name} {record_type} took {elapsed:?}"
            );
        }
    }
    let srv = ask(
        server,
        "_http._tcp.web.default.svc.cluster.local.",
        RecordType::SRV,
    )
    .await;
    match &srv.answers[0].data {
        RData::SRV(srv) => {
            assert_eq!(srv.port, 80);
            assert_eq!(srv.target.to_ascii(), "web.default.svc.cluster.local.");
        }
        other => panic!("not SRV: {other:?}"),
    }
}

#[tokio::test]
async fn an_upstream_that_never_answers_is_servfail_fast() {
    let silent = StdUdpSocket::bind("127.0.0.1:0").unwrap();
    let server = start(silent.local_addr().unwrap()).await;
    let started = Instant::now();
    let answer = ask(server, "black-hole.test.", RecordType::A).await;
    let elapsed = started.elapsed();
    assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
    assert!(
        elapsed < Duration::from_secs(2),
        "SERVFAIL took {elapsed:?}"
    );
    // Cluster names do not wait on upstream.
    let started = Instant::now();
    let answer = ask(server, "web.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(answer.answers.len(), 1);
    assert!(started.elapsed() < Duration::from_millis(100));
    drop(silent);
}

#[tokio::test]
async fn bad_input_is_answered_or_refused_and_the_server_keeps_serving() {
    let server = start(upstream()).await;

    // Junk datagrams: FORMERR when there is a header to answer, silence otherwise.
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for junk in [
        vec![],
        vec![0u8; 5],
        vec![0xff; 12],
        vec![0x12, 0x34, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 63, b'a'],
        vec![
            0x12, 0x34, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ],
        // A compression pointer to itself.
        vec![
            0x12, 0x34, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1,
        ],
    ] {
        socket.send_to(&junk, server).await.unwrap();
    }
    let answer = udp(
        server,
        &[
            0x12, 0x34, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1,
        ],
    )
    .await
    .expect("FORMERR");
    assert_eq!(answer.metadata.id, 0x1234);
    assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);

    // A whole 64 KiB query over TCP: a question and padding records up to the largest length.
    let mut big = query("web.default.svc.cluster.local.", RecordType::A);
    let owner = Name::from_ascii("pad.test.").unwrap();
    while big.to_vec().unwrap().len() < 65_000 {
        big.additionals.push(Record::from_rdata(
            owner.clone(),
            0,
            RData::TXT(TXT::new(vec!["x".repeat(250)])),
        ));
    }
    let bytes = big.to_vec().unwrap();
    assert!(bytes.len() > 64_000 && bytes.len() <= 65_535);
    let answer = tcp(server, &bytes)
        .await
        .expect("an answer to a 64 KiB query");
    assert_eq!(answer.answers.len(), 1);
    // 64 KiB of junk over TCP: FORMERR, or the connection closed; nothing else.
    if let Some(answer) = tcp(server, &vec![0x5a; 65_535]).await {
        assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);
    }
    // A length prefix and then silence, a half message, and a too-short message: closed.
    let mut half = TcpStream::connect(server).await.unwrap();
    half.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
    assert!(tcp(server, &[0u8; 4]).await.is_none());

    // EDNS with a large size over UDP, then the ordinary query: all still answered.
    let mut with_edns = query("web.default.svc.cluster.local.", RecordType::A);
    let mut edns = Edns::new();
    edns.set_max_payload(65_000);
    with_edns.set_edns(edns);
    let answer = udp(server, &with_edns.to_vec().unwrap()).await.unwrap();
    assert_eq!(answer.edns.map(|e| e.max_payload()), Some(1232));
    let answer = ask(server, "web.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(answer.answers.len(), 1);
    drop(half);
}
