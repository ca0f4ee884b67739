//! The DNS proxy end to end in real network namespaces: Istio's in-pod rules installed with DNS
//! capture, the `sleep` pod's app asking a nameserver address that exists nowhere
//! ([`NAMESERVER`]), the rules REDIRECTing to ztunnel's proxy on 127.0.0.1:15053 inside the pod.
//! Queries leave from unmarked sockets made in the pod's namespace, as the app's would.
//!
//! Names outside the mesh go to a fake upstream on this process's loopback (set once for the
//! whole test binary with `dns::set_upstream`): tests never send DNS anywhere else. Needs root,
//! iproute2 and iptables.

use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use ambit_ztunnel::dns::{self, UPSTREAM_TIMEOUT};
use ambit_ztunnel::netns::PodNetns;
use ambit_ztunnel::testing::{
    app_call, app_connect, app_server, http_get, netns_exec, uid, Cluster, ClusterOptions, PodNet,
    VIP,
};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where the app thinks its nameserver is: no such host; the capture rule redirects port 53.
const NAMESERVER: &str = "10.96.0.53:53";

fn nameserver() -> SocketAddr {
    NAMESERVER.parse().unwrap()
}

// --- The fake upstream ----------------------------------------------------------------------

/// Answers `external.test` A with 192.0.2.7, `nxdomain.test` with NXDOMAIN, never answers
/// `black-hole.test`, REFUSES everything else, and logs every name it is asked.
struct Upstream {
    seen: Mutex<Vec<String>>,
}

fn upstream() -> &'static Upstream {
    static UPSTREAM: OnceLock<&'static Upstream> = OnceLock::new();
    UPSTREAM.get_or_init(|| {
        let upstream: &'static Upstream = Box::leak(Box::new(Upstream {
            seen: Mutex::new(Vec::new()),
        }));
        let socket = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        let address = socket.local_addr().unwrap();
        // A plain thread: it outlives every test's runtime.
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok((len, peer)) = socket.recv_from(&mut buffer) {
                let Ok(request) = Message::from_vec(&buffer[..len]) else {
                    continue;
                };
                let Some(query) = request.queries.first().cloned() else {
                    continue;
                };
                let name = query.name().to_lowercase().to_ascii();
                upstream.seen.lock().unwrap().push(name.clone());
                let mut answer = Message::response(request.metadata.id, OpCode::Query);
                answer.metadata.recursion_desired = request.metadata.recursion_desired;
                answer.metadata.recursion_available = true;
                answer.queries = request.queries.clone();
                if let Some(edns) = &request.edns {
                    answer.set_edns(edns.clone());
                }
                match (name.as_str(), query.query_type()) {
                    ("external.test.", RecordType::A) => answer.answers.push(Record::from_rdata(
                        query.name().clone(),
                        60,
                        RData::from(IpAddr::from([192, 0, 2, 7])),
                    )),
                    ("external.test.", _) => {}
                    ("nxdomain.test.", _) => {
                        answer.metadata.response_code = ResponseCode::NXDomain;
                    }
                    ("black-hole.test.", _) => continue,
                    _ => answer.metadata.response_code = ResponseCode::Refused,
                }
                let _ = socket.send_to(&answer.to_vec().unwrap(), peer);
            }
        });
        dns::set_upstream(vec![address]).expect("no DNS proxy started before the fake upstream");
        upstream
    })
}

async fn cluster() -> Cluster {
    upstream();
    Cluster::start_with(ClusterOptions {
        dns_capture: true,
        ..Default::default()
    })
    .await
}

// --- Queries from inside a pod --------------------------------------------------------------

/// An app in `pod` asking [`NAMESERVER`].
struct Client {
    pod: PodNet,
    netns: PodNetns,
}

impl Client {
    fn new(pod: &PodNet) -> Self {
        Client {
            pod: pod.clone(),
            netns: PodNetns::new(pod.open().into()).unwrap(),
        }
    }

    /// An unmarked UDP socket in the pod, connected to the nameserver (so ICMP errors show).
    async fn udp_socket(&self) -> tokio::net::UdpSocket {
        let socket = self
            .netns
            .run(|| {
                let socket = StdUdpSocket::bind("0.0.0.0:0").unwrap();
                socket.connect(NAMESERVER).unwrap();
                socket.set_nonblocking(true).unwrap();
                socket
            })
            .await
            .unwrap();
        tokio::net::UdpSocket::from_std(socket).unwrap()
    }

    /// Sends `bytes` over UDP; the answer if one comes within `wait`.
    async fn udp_exchange(&self, bytes: &[u8], wait: Duration) -> std::io::Result<Vec<u8>> {
        let socket = self.udp_socket().await;
        socket.send(bytes).await?;
        let mut buffer = vec![0u8; 65535];
        let len = tokio::time::timeout(wait, socket.recv(&mut buffer))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
        buffer.truncate(len);
        Ok(buffer)
    }

    async fn udp(&self, name: &str, record_type: RecordType) -> Message {
        let query = query(name, record_type);
        let bytes = self
            .udp_exchange(&query.to_vec().unwrap(), Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{name} {record_type} over UDP: {e}"));
        let answer = Message::from_vec(&bytes).unwrap();
        assert_eq!(answer.metadata.id, query.metadata.id);
        assert_eq!(answer.metadata.message_type, MessageType::Response);
        answer
    }

    async fn tcp(&self, name: &str, record_type: RecordType) -> Message {
        let query = query(name, record_type);
        let mut stream = app_connect(&self.pod, nameserver()).await.unwrap();
        let bytes = query.to_vec().unwrap();
        stream
            .write_all(&(bytes.len() as u16).to_be_bytes())
            .await
            .unwrap();
        stream.write_all(&bytes).await.unwrap();
        let answer = read_framed(&mut stream).await.expect("a framed answer");
        let answer = Message::from_vec(&answer).unwrap();
        assert_eq!(answer.metadata.id, query.metadata.id);
        answer
    }
}

fn client(pod: &PodNet) -> Client {
    Client::new(pod)
}

fn query(name: &str, record_type: RecordType) -> Message {
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
    message
}

async fn read_framed(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let exchange = async {
        let length = stream.read_u16().await.ok()?;
        let mut answer = vec![0u8; usize::from(length)];
        stream.read_exact(&mut answer).await.ok()?;
        Some(answer)
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}

fn addresses(answer: &Message) -> Vec<IpAddr> {
    answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn vip() -> IpAddr {
    VIP.parse().unwrap()
}

async fn metrics(cluster: &Cluster) -> String {
    http_get(cluster.ztunnels[0].stats_address, "/metrics").await
}

/// The value of the sample of `name` whose line has all of `labels`.
fn sample(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

// --- Tests ----------------------------------------------------------------------------------

#[tokio::test]
async fn mesh_names_resolve_over_udp_and_tcp_and_unknown_cluster_names_are_nxdomain() {
    let cluster = cluster().await;
    let client = client(&cluster.sleep);

    // The proxy listens on the pod's loopback only; the REDIRECT still reaches it.
    let listening = netns_exec(&cluster.sleep.netns, &["ss", "-Hlnu"]);
    assert!(listening.contains("127.0.0.1:15053"), "{listening}");
    assert!(!listening.contains("0.0.0.0:15053"), "{listening}");
    let loopback_v6 = netns_exec(&cluster.sleep.netns, &["ip", "-6", "addr", "show", "lo"]);
    if loopback_v6.contains("::1/128") {
        assert!(listening.contains("[::1]:15053"), "{listening}");
    }

    let answer = client
        .udp("echo.default.svc.cluster.local.", RecordType::A)
        .await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert!(answer.metadata.authoritative);
    assert_eq!(addresses(&answer), vec![vip()]);
    assert_eq!(answer.answers[0].ttl, dns::MESH_TTL);

    // Names are case-insensitive, and the answer keeps the case asked (0x20 randomisation).
    let answer = client
        .udp("Echo.DEFAULT.svc.Cluster.Local.", RecordType::A)
        .await;
    assert_eq!(addresses(&answer), vec![vip()]);
    assert_eq!(
        answer.answers[0].name.to_ascii(),
        "Echo.DEFAULT.svc.Cluster.Local."
    );

    let answer = client
        .tcp("echo.default.svc.cluster.local.", RecordType::A)
        .await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&answer), vec![vip()]);

    // No IPv6 VIP: the name exists, with no AAAA records.
    let answer = client
        .udp("echo.default.svc.cluster.local.", RecordType::AAAA)
        .await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert!(answer.answers.is_empty());

    // EDNS is answered with EDNS.
    let mut with_edns = query("echo.default.svc.cluster.local.", RecordType::A);
    with_edns.set_edns(Edns::new());
    let bytes = client
        .udp_exchange(&with_edns.to_vec().unwrap(), Duration::from_secs(5))
        .await
        .unwrap();
    let answer = Message::from_vec(&bytes).unwrap();
    assert!(answer.edns.is_some());
    assert_eq!(addresses(&answer), vec![vip()]);

    // Unknown names under the cluster domain, including what a pod's search list makes of
    // `echo.default` (`echo.default.default.svc.cluster.local`), are NXDOMAIN at once.
    for name in [
        "nope.default.svc.cluster.local.",
        "echo.default.default.svc.cluster.local.",
        "echo.default.svc.default.svc.cluster.local.",
    ] {
        let start = Instant::now();
        let answer = client.udp(name, RecordType::A).await;
        assert_eq!(
            answer.metadata.response_code,
            ResponseCode::NXDomain,
            "{name}"
        );
        assert!(start.elapsed() < Duration::from_millis(500), "{name}");
        let answer = client.tcp(name, RecordType::AAAA).await;
        assert_eq!(
            answer.metadata.response_code,
            ResponseCode::NXDomain,
            "{name}"
        );
    }
    let seen = upstream().seen.lock().unwrap().clone();
    assert!(
        !seen.iter().any(|name| name.ends_with("cluster.local.")),
        "cluster.local names never go upstream: {seen:?}"
    );

    // Counted with Istio's labels.
    let metrics = metrics(&cluster).await;
    let source = [
        "source_canonical_service=\"sleep\"",
        "source_canonical_revision=\"latest\"",
    ];
    let count = |query_type: &str, protocol: &str| {
        let query_type = format!("request_query_type=\"{query_type}\"");
        let protocol = format!("request_protocol=\"{protocol}\"");
        let mut labels = vec![query_type.as_str(), protocol.as_str()];
        labels.extend(source);
        sample(&metrics, "istio_dns_requests_total", &labels)
    };
    assert_eq!(count("a", "udp"), 6.0, "{metrics}");
    assert_eq!(count("a", "tcp"), 1.0, "{metrics}");
    assert_eq!(count("aaaa", "udp"), 1.0, "{metrics}");
    assert_eq!(count("aaaa", "tcp"), 3.0, "{metrics}");
    assert_eq!(
        sample(&metrics, "istio_dns_upstream_requests_total", &[]),
        0.0
    );
}

#[tokio::test]
async fn other_names_are_forwarded_and_a_silent_upstream_gets_servfail_in_time() {
    let cluster = cluster().await;
    let client = client(&cluster.sleep);

    let answer = client.udp("external.test.", RecordType::A).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert!(!answer.metadata.authoritative);
    assert_eq!(addresses(&answer), vec![IpAddr::from([192, 0, 2, 7])]);
    let answer = client.tcp("external.test.", RecordType::A).await;
    assert_eq!(addresses(&answer), vec![IpAddr::from([192, 0, 2, 7])]);

    let answer = client.udp("nxdomain.test.", RecordType::A).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
    let answer = client.udp("refused.test.", RecordType::A).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::Refused);
    // Types other than A/AAAA are upstream's business, as in Istio.
    let answer = client.udp("external.test.", RecordType::TXT).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert!(answer.answers.is_empty());

    let start = Instant::now();
    let answer = client.udp("black-hole.test.", RecordType::A).await;
    let elapsed = start.elapsed();
    assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
    assert!(
        elapsed >= UPSTREAM_TIMEOUT - Duration::from_millis(100)
            && elapsed < UPSTREAM_TIMEOUT + Duration::from_secs(1),
        "SERVFAIL after the upstream timeout, not before nor much later: {elapsed:?}"
    );
    // The proxy is not stuck behind the silent upstream.
    let answer = client
        .udp("echo.default.svc.cluster.local.", RecordType::A)
        .await;
    assert_eq!(addresses(&answer), vec![vip()]);

    let metrics = metrics(&cluster).await;
    let a_udp = ["request_query_type=\"a\"", "request_protocol=\"udp\""];
    // external, nxdomain, refused, black-hole.
    assert_eq!(
        sample(&metrics, "istio_dns_upstream_requests_total", &a_udp),
        4.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "istio_dns_upstream_requests_total",
            &["request_query_type=\"txt\""]
        ),
        1.0
    );
    // refused and black-hole: no usable answer. NXDOMAIN is an answer.
    assert_eq!(
        sample(&metrics, "istio_dns_upstream_failures_total", &a_udp),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "istio_dns_upstream_request_duration_seconds_count",
            &a_udp
        ),
        4.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("istio_dns_upstream_request_duration_seconds_bucket{")
            && metrics.contains("le=\"0.0005\""),
        "a histogram with Istio's buckets: {metrics}"
    );
    assert_eq!(
        sample(&metrics, "istio_dns_requests_total", &a_udp),
        5.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn garbage_gets_formerr_or_nothing_and_the_next_query_works() {
    let cluster = cluster().await;
    let client = client(&cluster.sleep);
    let quiet = Duration::from_millis(300);

    // Shorter than a header: no id to answer to.
    assert!(client.udp_exchange(b"\x12\x34\x00", quiet).await.is_err());
    // A header announcing a question that is not there: FORMERR, with the id.
    let truncated = b"\xbe\xef\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07exam";
    let answer = Message::from_vec(&client.udp_exchange(truncated, quiet).await.unwrap()).unwrap();
    assert_eq!(answer.metadata.id, 0xbeef);
    assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);
    // A response is never answered (no ping-pong).
    let mut response = query("echo.default.svc.cluster.local.", RecordType::A);
    response.metadata.message_type = MessageType::Response;
    assert!(client
        .udp_exchange(&response.to_vec().unwrap(), quiet)
        .await
        .is_err());
    // Two questions: FORMERR. Another opcode: NOTIMP.
    let mut two = query("echo.default.svc.cluster.local.", RecordType::A);
    two.add_query(Query::query(
        Name::from_str("external.test.").unwrap(),
        RecordType::A,
    ));
    let answer = Message::from_vec(
        &client
            .udp_exchange(&two.to_vec().unwrap(), quiet)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);
    let mut status = query("echo.default.svc.cluster.local.", RecordType::A);
    status.metadata.op_code = OpCode::Status;
    let answer = Message::from_vec(
        &client
            .udp_exchange(&status.to_vec().unwrap(), quiet)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(answer.metadata.response_code, ResponseCode::NotImp);

    // Random junk, query-shaped or not, in bulk.
    let socket = client.udp_socket().await;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..300 {
        let len = (next() % 600) as usize;
        let mut junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if round % 2 == 0 && junk.len() > 12 {
            // A plausible header (QR clear, one question) in front of junk.
            junk[2] &= 0x07;
            junk[4..6].copy_from_slice(&[0, 1]);
        }
        socket.send(&junk).await.unwrap();
    }
    let answer = client
        .udp("echo.default.svc.cluster.local.", RecordType::A)
        .await;
    assert_eq!(addresses(&answer), vec![vip()]);

    // TCP: a length beyond what a query can be, or shorter than a header, closes the
    // connection unanswered.
    for prefix in [[0xff, 0xff], [0x00, 0x03], [0x00, 0x00]] {
        let mut stream = app_connect(&cluster.sleep, nameserver()).await.unwrap();
        stream.write_all(&prefix).await.unwrap();
        stream.write_all(&[0u8; 64]).await.unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
            .await
            .expect("the proxy closes the connection");
        assert!(closed.is_err() || rest.is_empty(), "{prefix:?}: {rest:?}");
    }
    // Junk framed correctly: FORMERR, and the connection goes on.
    let mut stream = app_connect(&cluster.sleep, nameserver()).await.unwrap();
    stream
        .write_all(&(truncated.len() as u16).to_be_bytes())
        .await
        .unwrap();
    stream.write_all(truncated).await.unwrap();
    let answer = Message::from_vec(&read_framed(&mut stream).await.unwrap()).unwrap();
    assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);
    let good = query("echo.default.svc.cluster.local.", RecordType::A)
        .to_vec()
        .unwrap();
    stream
        .write_all(&(good.len() as u16).to_be_bytes())
        .await
        .unwrap();
    stream.write_all(&good).await.unwrap();
    let answer = Message::from_vec(&read_framed(&mut stream).await.unwrap()).unwrap();
    assert_eq!(addresses(&answer), vec![vip()]);

    let answer = client
        .tcp("echo.default.svc.cluster.local.", RecordType::A)
        .await;
    assert_eq!(addresses(&answer), vec![vip()]);
}

#[tokio::test]
async fn the_resolved_vip_goes_through_the_mesh_and_the_proxy_leaves_with_the_pod() {
    let mut cluster = cluster().await;
    app_server(&cluster.echo, 8080).await;
    let client = client(&cluster.sleep);

    let answer = client
        .udp("echo.default.svc.cluster.local.", RecordType::A)
        .await;
    let [resolved] = addresses(&answer)[..] else {
        panic!("one address: {answer:?}");
    };
    let reply = app_call(
        &cluster.sleep,
        SocketAddr::new(resolved, 80),
        b"over the mesh",
    )
    .await
    .unwrap();
    let expected = format!("peer={}\nover the mesh", cluster.sleep.ip);
    assert_eq!(String::from_utf8_lossy(&reply), expected);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let metrics = metrics(&cluster).await;
    assert!(
        sample(
            &metrics,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"source\"",
                "destination_service=\"echo.default.svc.cluster.local\"",
                "connection_security_policy=\"mutual_tls\"",
            ]
        ) >= 1.0,
        "{metrics}"
    );

    // The pod leaves: its DNS sockets close with its other listeners.
    let sleep_uid = uid(&cluster.sleep);
    cluster.agents[0].del(&sleep_uid).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let listening = netns_exec(&cluster.sleep.netns, &["ss", "-Hlnu"]);
        if !listening.contains(":15053") {
            break;
        }
        assert!(Instant::now() < deadline, "still listening: {listening}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listening = netns_exec(&cluster.sleep.netns, &["ss", "-Hlnt"]);
    assert!(!listening.contains(":15053"), "{listening}");
}

/// The state file is a safety boundary: emptied, deleted, or cut short by a writer that died
/// half-way, it never replaces the last good state, so names keep resolving and service traffic
/// keeps crossing the mesh. The explicit empty document does take effect.
#[tokio::test]
async fn an_emptied_deleted_or_truncated_state_file_keeps_names_and_traffic() {
    let cluster = cluster().await;
    app_server(&cluster.echo, 8080).await;
    let client = client(&cluster.sleep);
    let good = std::fs::read_to_string(&cluster.state_path).unwrap();
    // Cut inside the `echo` workload: what an interrupted in-place write leaves.
    let truncated = &good[..good.find("canonicalRevision").expect("echo's revision") + 12];
    let resolves_and_serves = async |what: &str| {
        let answer = client
            .udp("echo.default.svc.cluster.local.", RecordType::A)
            .await;
        assert_eq!(addresses(&answer), vec![vip()], "after {what}");
        let reply = app_call(&cluster.sleep, SocketAddr::new(vip(), 80), b"still here")
            .await
            .unwrap_or_else(|e| panic!("after {what}: {e}"));
        assert!(reply.ends_with(b"still here"), "after {what}");
    };
    resolves_and_serves("start").await;
    // Two poll intervals and more: each bad file had every chance to be taken.
    let settle = Duration::from_millis(1600);
    for (what, text) in [
        ("emptied", ""),
        ("comments only", "# regenerated below\n"),
        ("truncated", truncated),
    ] {
        // In place, as `cat >` or an editor would.
        std::fs::write(&cluster.state_path, text).unwrap();
        tokio::time::sleep(settle).await;
        resolves_and_serves(what).await;
    }
    std::fs::remove_file(&cluster.state_path).unwrap();
    tokio::time::sleep(settle).await;
    resolves_and_serves("deleted").await;
    assert_eq!(cluster.ztunnels[0].state.load().workloads().count(), 3);

    // An empty state on purpose is taken: the name is gone.
    std::fs::write(&cluster.state_path, "workloads: []\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = client
            .udp("echo.default.svc.cluster.local.", RecordType::A)
            .await;
        if answer.metadata.response_code == ResponseCode::NXDomain {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the explicit empty state was not taken"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
