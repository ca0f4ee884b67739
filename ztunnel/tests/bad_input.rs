//! ztunnel under bad input, in real network namespaces: malformed or out-of-order ZDS messages,
//! fds that are missing, doubled or not a network namespace, a corrupt state file, garbage on a
//! pod's HBONE port, and a node agent that goes away. Each bad input is refused or outlived, and
//! afterwards the same ztunnel still serves everyone else: a call from `sleep` through the `echo`
//! service's VIP still works.
//!
//! The ZDS tests play the node agent with a raw `SOCK_SEQPACKET` socket (nix `sendmsg`), because
//! Ambit's own [`ZdsConnection`](ambit_mesh::zds::ZdsConnection) only ever sends well-formed
//! requests. Needs root, iproute2 and iptables, like `tests/inpod.rs`.

use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_mesh::state::local::LocalConfig;
use ambit_mesh::zds::proto::{
    workload_request::Payload, workload_response, AddWorkload, DelWorkload, KeepWorkload,
    SnapshotSent, Version, WorkloadRequest, WorkloadResponse, ZdsHello,
};
use ambit_mesh::zds::{WorkloadInfo, ZdsServer};
use ambit_ztunnel::netns::PodNetns;
use ambit_ztunnel::testing::{app_call, app_server, uid, Cluster, PodNet, VIP};
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use nix::sys::time::TimeVal;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `echo`'s node: the ztunnel that gets the bad input is the one serving the VIP's endpoint, so
/// the VIP call really goes through it.
const ECHO_NODE: usize = 1;

/// Longer than two polls of the state file (every 500 ms), so a write has surely been read.
const STATE_SETTLE: Duration = Duration::from_millis(1200);

// --- Helpers ---

/// A fresh directory under the system temp dir, removed on drop; unique per test, since tests run
/// in parallel in one process.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "ambit-bad-input-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn vip() -> SocketAddr {
    format!("{VIP}:80").parse().unwrap()
}

/// The proof that runs after every bad input: `sleep` → VIP → `echo` still works end to end, and
/// the server still sees the client's own address (HBONE, not some fallback).
async fn assert_serving(cluster: &Cluster, why: &str) {
    let payload = format!("still serving after {why}");
    let reply = app_call(&cluster.sleep, vip(), payload.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("VIP call after {why}: {e}"));
    let expected = format!("peer={}\n{payload}", cluster.sleep.ip);
    assert_eq!(
        String::from_utf8_lossy(&reply),
        expected,
        "VIP call after {why}"
    );
}

/// `echo`'s entry in its ztunnel's pod list: its netns inode, which changes only if the proxy
/// was started again with another namespace.
fn echo_inode(cluster: &Cluster) -> u64 {
    let pods = cluster.ztunnels[ECHO_NODE].inpod.pods();
    let echo = pods
        .iter()
        .find(|p| p.uid == uid(&cluster.echo))
        .unwrap_or_else(|| panic!("echo is gone from its ztunnel: {pods:?}"));
    assert_eq!(echo.state, "running", "{echo:?}");
    echo.netns_inode
}

fn request(payload: Payload) -> Vec<u8> {
    WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec()
}

fn add(pod_uid: &str, name: &str, service_account: &str) -> Vec<u8> {
    request(Payload::Add(AddWorkload {
        uid: pod_uid.to_owned(),
        workload_info: Some(WorkloadInfo {
            name: name.to_owned(),
            namespace: "default".into(),
            service_account: service_account.to_owned(),
        }),
    }))
}

fn add_echo(cluster: &Cluster) -> Vec<u8> {
    add(&uid(&cluster.echo), "echo", "echo")
}

fn del(pod_uid: &str) -> Vec<u8> {
    request(Payload::Del(DelWorkload {
        uid: pod_uid.to_owned(),
    }))
}

/// A ZDS uid no node agent ever handed over, and the WDS uid of a workload no pod matches.
const GHOST: &str = "0b5ad5e1-9e0d-4c57-8f3a-7d1c9a6f2e00";
const GHOST_WORKLOAD: &str = "Kubernetes//Pod/default/ghost";

/// A pipe whose open copies in this process can be counted exactly (by its inode, through
/// /proc/self/fd), even while other tests open and close fds: proof that ztunnel closed every
/// descriptor of a refused message.
struct TrackedPipe {
    read: OwnedFd,
    _write: OwnedFd,
    link: PathBuf,
}

impl TrackedPipe {
    fn new() -> TrackedPipe {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", read.as_raw_fd())).unwrap();
        TrackedPipe {
            read,
            _write: write,
            link,
        }
    }

    /// A copy to hand over; ours stay open.
    fn copy(&self) -> OwnedFd {
        self.read.try_clone().unwrap()
    }

    fn assert_only_ours_open(&self, why: &str) {
        assert_eq!(
            open_copies(&self.link),
            2,
            "{why}: ztunnel kept a copy of the fd it refused"
        );
    }
}

/// How many fds in this process point at `link` (a /proc/self/fd target).
fn open_copies(link: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target == link)
        .count()
}

// --- A raw node agent ---

/// A blocking `SOCK_SEQPACKET` socket whose reads give up after 5 s, so a missing answer fails
/// the test instead of hanging it.
fn seqpacket() -> OwnedFd {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    socket::setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(5, 0)).unwrap();
    fd
}

fn listen(path: &Path) -> OwnedFd {
    let fd = seqpacket();
    socket::bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    socket::listen(&fd, Backlog::new(8).unwrap()).unwrap();
    fd
}

/// The node agent's end of one ZDS connection, speaking raw packets. The socket is blocking, so
/// every exchange runs on the blocking pool: the ztunnel answering it runs on the test's own
/// (single-threaded) runtime.
struct RawAgent {
    fd: Arc<OwnedFd>,
    _listener: OwnedFd,
}

impl RawAgent {
    /// Accepts ztunnel on `listener` and checks its hello.
    async fn accept(listener: OwnedFd) -> RawAgent {
        let (fd, listener, hello) = tokio::task::spawn_blocking(move || {
            let raw = socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)
                .expect("ztunnel connects to the node agent within 5 s");
            // SAFETY: accept4 just returned this descriptor; nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            socket::setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(5, 0)).unwrap();
            let hello = recv_packet(&fd);
            (fd, listener, hello)
        })
        .await
        .unwrap();
        let hello = ZdsHello::decode(&hello[..]).expect("ztunnel's first packet is a ZdsHello");
        assert_eq!(hello.version, Version::V1 as i32);
        RawAgent {
            fd: Arc::new(fd),
            _listener: listener,
        }
    }

    /// Sends `bytes` as one packet with `fds` attached, and returns the error text of ztunnel's
    /// answer ("" is an ack).
    async fn send(&self, bytes: &[u8], fds: Vec<OwnedFd>) -> String {
        let fd = self.fd.clone();
        let bytes = bytes.to_vec();
        let answer = tokio::task::spawn_blocking(move || {
            let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
            let rights = [ControlMessage::ScmRights(&raw)];
            let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
            let iov = [std::io::IoSlice::new(&bytes)];
            let sent =
                socket::sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                    .unwrap();
            assert_eq!(sent, bytes.len());
            // Our copies close here; ztunnel holds its own from the moment the packet is queued.
            drop(fds);
            recv_packet(&fd)
        })
        .await
        .unwrap();
        let response =
            WorkloadResponse::decode(&answer[..]).expect("ztunnel answers with a WorkloadResponse");
        match response.payload {
            Some(workload_response::Payload::Ack(ack)) => ack.error,
            None => panic!("a WorkloadResponse without an Ack"),
        }
    }

    async fn expect_ack(&self, bytes: &[u8], fds: Vec<OwnedFd>, what: &str) {
        let error = self.send(bytes, fds).await;
        assert_eq!(error, "", "{what} is acked");
    }

    /// Sends a bad request and returns the nack's reason, failing if it was acked.
    async fn expect_nack(&self, bytes: &[u8], fds: Vec<OwnedFd>, what: &str) -> String {
        let error = self.send(bytes, fds).await;
        assert!(!error.is_empty(), "{what} was acked");
        error
    }
}

fn recv_packet(fd: &OwnedFd) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = socket::recvmsg::<()>(fd.as_raw_fd(), &mut iov, None, MsgFlags::empty())
        .expect("ztunnel answers within 5 s");
    assert!(!msg.flags.contains(MsgFlags::MSG_TRUNC));
    let len = msg.bytes;
    assert!(len > 0, "ztunnel closed the ZDS connection");
    buf.truncate(len);
    buf
}

/// A cluster whose `echo` node is driven by a [`RawAgent`] that has already handed `echo` over
/// and ended the snapshot, with an app server in `echo` that the VIP call reaches.
struct RawCluster {
    cluster: Cluster,
    agent: RawAgent,
    /// Holds the agent's socket; also a place for the test's own scratch files.
    dir: TempDir,
}

impl RawCluster {
    async fn start() -> RawCluster {
        let dir = TempDir::new("zds");
        let socket = dir.0.join("agent.sock");
        // Listening before ztunnel starts: its connect then succeeds at once, without backoff.
        let listener = listen(&socket);
        let cluster = Cluster::start_with_agent_at(ECHO_NODE, &socket).await;
        let agent = RawAgent::accept(listener).await;
        agent
            .expect_ack(
                &add_echo(&cluster),
                vec![cluster.echo.open().into()],
                "AddWorkload for echo",
            )
            .await;
        agent
            .expect_ack(
                &request(Payload::SnapshotSent(SnapshotSent {})),
                vec![],
                "SnapshotSent",
            )
            .await;
        assert!(cluster.ztunnels[ECHO_NODE].inpod.is_ready());
        app_server(&cluster.echo, 8080).await;
        assert_serving(&cluster, "start").await;
        RawCluster {
            cluster,
            agent,
            dir,
        }
    }
}

// --- 1. Malformed ZDS packets ---

#[tokio::test]
async fn a_malformed_zds_packet_is_nacked_and_the_connection_stays_usable() {
    let RawCluster { cluster, agent, .. } = RawCluster::start().await;
    let inode = echo_inode(&cluster);

    // Field 1 (AddWorkload) claims 127 bytes but 22 follow: no protobuf decoder accepts this.
    let reason = agent
        .expect_nack(b"\x0a\x7fthis is not a protobuf", vec![], "garbage")
        .await;
    assert!(
        reason.contains("not a valid WorkloadRequest"),
        "the nack says what was wrong: {reason}"
    );

    // Valid protobuf, but only an unknown field: nothing this side can act on.
    let reason = agent
        .expect_nack(&[0x48, 0x01], vec![], "an unknown-field-only request")
        .await;
    assert!(reason.contains("carries no payload"), "{reason}");

    // Longer than the 1024 bytes both Istio ends read: cut by the kernel, so refused as a whole.
    let reason = agent
        .expect_nack(&[0xab; 2000], vec![], "an oversized packet")
        .await;
    assert!(reason.contains("longer than 1024 bytes"), "{reason}");

    // Garbage carrying an fd: refused, and the fd closed rather than leaked.
    let pipe = TrackedPipe::new();
    let reason = agent
        .expect_nack(b"\xff\xff\xff\xff", vec![pipe.copy()], "garbage with an fd")
        .await;
    assert!(reason.contains("not a valid WorkloadRequest"), "{reason}");
    pipe.assert_only_ours_open("garbage with an fd");

    assert_serving(&cluster, "malformed ZDS packets").await;

    // The same connection still takes requests: a Del of an unknown pod and a repeated Add of
    // echo (same netns, so nothing restarts).
    agent.expect_ack(&del(GHOST), vec![], "DelWorkload").await;
    agent
        .expect_ack(
            &add_echo(&cluster),
            vec![cluster.echo.open().into()],
            "AddWorkload for echo again",
        )
        .await;
    assert_eq!(echo_inode(&cluster), inode);
    assert_serving(&cluster, "good requests on the same connection").await;
}

// --- 2. AddWorkload with no fd, or two ---

#[tokio::test]
async fn an_add_workload_without_exactly_one_fd_is_nacked_with_the_count() {
    let RawCluster { cluster, agent, .. } = RawCluster::start().await;
    let inode = echo_inode(&cluster);

    let reason = agent
        .expect_nack(
            &add(GHOST, "ghost", "ghost"),
            vec![],
            "AddWorkload without an fd",
        )
        .await;
    assert!(
        reason.contains("carried 0 file descriptors") && reason.contains(GHOST),
        "{reason}"
    );

    // Two fds, for a pod that is running: refused before the manager sees it, so echo's proxy is
    // untouched, and neither fd is kept.
    let pipe = TrackedPipe::new();
    let reason = agent
        .expect_nack(
            &add_echo(&cluster),
            vec![cluster.echo.open().into(), pipe.copy()],
            "AddWorkload with two fds",
        )
        .await;
    assert!(reason.contains("carried 2 file descriptors"), "{reason}");
    pipe.assert_only_ours_open("AddWorkload with two fds");

    // Only AddWorkload may carry an fd.
    let pipe = TrackedPipe::new();
    let reason = agent
        .expect_nack(&del(GHOST), vec![pipe.copy()], "DelWorkload with an fd")
        .await;
    assert!(
        reason.contains("only AddWorkload may carry one"),
        "{reason}"
    );
    pipe.assert_only_ours_open("DelWorkload with an fd");

    let pods = cluster.ztunnels[ECHO_NODE].inpod.pods();
    assert_eq!(pods.len(), 1, "no pod was added: {pods:?}");
    assert_eq!(echo_inode(&cluster), inode);
    assert_serving(&cluster, "AddWorkload with the wrong fd count").await;
    agent.expect_ack(&del(GHOST), vec![], "DelWorkload").await;
}

// --- 3. AddWorkload whose fd is not a network namespace ---

#[tokio::test]
async fn an_add_workload_whose_fd_is_not_a_netns_is_nacked() {
    let RawCluster {
        cluster,
        agent,
        dir,
    } = RawCluster::start().await;
    let inode = echo_inode(&cluster);

    let file_path = dir.0.join("not-a-netns");
    std::fs::write(&file_path, b"just a file").unwrap();
    let file = std::fs::File::open(&file_path).unwrap();
    let file_link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap();
    let pipe = TrackedPipe::new();
    // A namespace, but not a network one: fstat works on it, only the namespace type tells.
    let uts: OwnedFd = std::fs::File::open("/proc/self/ns/uts").unwrap().into();

    let cases: [(&str, OwnedFd); 3] = [
        ("a regular file", file.as_fd().try_clone_to_owned().unwrap()),
        ("a pipe", pipe.copy()),
        ("a UTS namespace", uts),
    ];
    for (what, fd) in cases {
        // A new pod, and echo's own uid: neither may start, nor disturb echo's running proxy.
        for (pod_uid, name) in [(GHOST, "ghost"), (uid(&cluster.echo).as_str(), "echo")] {
            let reason = agent
                .expect_nack(
                    &add(pod_uid, name, name),
                    vec![fd.try_clone().unwrap()],
                    &format!("AddWorkload for {name} with {what}"),
                )
                .await;
            assert!(
                reason.contains("not a network namespace") && reason.contains(pod_uid),
                "{what}: {reason}"
            );
        }
    }
    pipe.assert_only_ours_open("AddWorkload with a pipe");
    assert_eq!(
        open_copies(&file_link),
        1,
        "ztunnel kept the regular file open"
    );

    // A refused namespace is not queued for retry: it can never work.
    let pods = cluster.ztunnels[ECHO_NODE].inpod.pods();
    assert_eq!(pods.len(), 1, "only echo: {pods:?}");
    assert_eq!(echo_inode(&cluster), inode);
    assert!(cluster.ztunnels[ECHO_NODE].inpod.is_ready());
    assert_serving(&cluster, "AddWorkload with fds that are not netns").await;
}

/// Istio's ztunnel refuses an Add without `WorkloadInfo` ("workload_info is required"): the pod's
/// workload is found by it, never by the node agent's uid.
#[tokio::test]
async fn an_add_workload_without_workload_info_is_nacked() {
    let RawCluster { cluster, agent, .. } = RawCluster::start().await;
    let inode = echo_inode(&cluster);
    let pipe = TrackedPipe::new();
    let bare = request(Payload::Add(AddWorkload {
        uid: GHOST.to_owned(),
        workload_info: None,
    }));
    let reason = agent
        .expect_nack(&bare, vec![pipe.copy()], "AddWorkload without WorkloadInfo")
        .await;
    assert!(
        reason.contains(GHOST) && reason.contains("has no WorkloadInfo"),
        "{reason}"
    );
    pipe.assert_only_ours_open("AddWorkload without WorkloadInfo");
    assert_eq!(cluster.ztunnels[ECHO_NODE].inpod.pods().len(), 1);
    assert_eq!(echo_inode(&cluster), inode);
    assert_serving(&cluster, "AddWorkload without WorkloadInfo").await;
}

// --- 4. Requests out of order after the snapshot ---

#[tokio::test]
async fn keep_workload_or_a_second_snapshot_after_the_snapshot_is_nacked() {
    let RawCluster { cluster, agent, .. } = RawCluster::start().await;
    let inode = echo_inode(&cluster);

    let echo_uid = uid(&cluster.echo);
    let keep = request(Payload::Keep(KeepWorkload {
        uid: echo_uid.clone(),
    }));
    let reason = agent
        .expect_nack(&keep, vec![], "KeepWorkload after SnapshotSent")
        .await;
    assert!(
        reason.contains("KeepWorkload") && reason.contains("after the snapshot"),
        "{reason}"
    );

    // A second SnapshotSent names no pod: acted on, it would drain every pod on the node.
    let reason = agent
        .expect_nack(
            &request(Payload::SnapshotSent(SnapshotSent {})),
            vec![],
            "a second SnapshotSent",
        )
        .await;
    assert!(reason.contains("SnapshotSent"), "{reason}");

    assert_eq!(echo_inode(&cluster), inode);
    assert!(cluster.ztunnels[ECHO_NODE].inpod.is_ready());
    assert_serving(&cluster, "requests out of order").await;
    agent.expect_ack(&del(GHOST), vec![], "DelWorkload").await;
}

// --- 5. A corrupt state file ---

#[tokio::test]
async fn a_corrupt_state_file_keeps_the_previous_state() {
    let cluster = Cluster::start().await;
    app_server(&cluster.echo, 8080).await;
    assert_serving(&cluster, "start").await;
    let valid = std::fs::read_to_string(&cluster.state_path).unwrap();
    let before: Vec<_> = cluster.ztunnels.iter().map(|z| z.state.load()).collect();

    // Cut inside the first workload's quoted address list.
    let truncated = {
        let at = valid.find("workloadIps: [\"").unwrap() + "workloadIps: [\"10.0".len();
        valid[..at].to_owned()
    };
    let unknown_field = valid.replacen(
        "  canonicalName: sleep\n",
        "  canonicalName: sleep\n  colour: blue\n",
        1,
    );
    let duplicate_ip = {
        let ghost = format!(
            "- uid: {GHOST_WORKLOAD}\n  name: ghost\n  namespace: default\n  workloadIps: [\"{}\"]\n  \
             protocol: TCP\n  node: node-2\n",
            cluster.echo.ip
        );
        let services = valid.find("\nservices:").unwrap() + 1;
        format!("{}{ghost}{}", &valid[..services], &valid[services..])
    };

    for (what, text) in [
        ("truncated YAML", &truncated),
        ("an unknown field", &unknown_field),
        ("a duplicate workload IP", &duplicate_ip),
    ] {
        // The input really is invalid, so "unchanged" below means "refused", not "equal".
        let parsed = LocalConfig::parse(text, &cluster.state_path)
            .and_then(|config| config.into_snapshot(&cluster.state_path));
        assert!(parsed.is_err(), "{what} should not load");

        cluster.write_state(text);
        tokio::time::sleep(STATE_SETTLE).await;
        for (ztunnel, before) in cluster.ztunnels.iter().zip(&before) {
            assert!(
                Arc::ptr_eq(&ztunnel.state.load(), before),
                "{what} replaced the state"
            );
        }
        assert_serving(&cluster, what).await;
    }

    // A valid file after the bad ones is taken: one ALLOW naming sleep, so traffic still flows.
    cluster.set_policies(
        "policies:\n- name: allow-sleep\n  namespace: default\n  scope: Namespace\n  action: Allow\n  rules:\n  - - - principals: [!Exact \"cluster.local/ns/default/sa/sleep\"]\n",
    );
    cluster.wait_for_policies(1).await;
    for (ztunnel, before) in cluster.ztunnels.iter().zip(&before) {
        assert!(!Arc::ptr_eq(&ztunnel.state.load(), before));
    }
    assert_serving(&cluster, "a valid state file").await;
}

// --- 6. Garbage on a pod's HBONE port ---

/// Connects from inside `pod` (an unenrolled one: nothing captures its traffic) to `target`.
async fn connect_from(pod: &PodNet, target: SocketAddr) -> TcpStream {
    let netns = PodNetns::new(pod.open().into()).unwrap();
    let stream = netns
        .run(move || {
            let stream =
                std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
            stream.set_nonblocking(true).unwrap();
            stream
        })
        .await
        .unwrap();
    TcpStream::from_std(stream).unwrap()
}

/// Waits for the server to close `stream`, well before its 10 s handshake timeout could be the
/// reason. EOF and a reset both count; returns what was received before.
async fn assert_closed_by_server(stream: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut received = Vec::new();
    match tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut received)).await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            "{what}: {err}"
        ),
        Err(_) => panic!("{what}: the HBONE port kept the connection open"),
    }
    received
}

/// A real TLS 1.3 ClientHello as an HBONE client sends it (ALPN h2), from rustls.
fn client_hello(server: IpAddr) -> Vec<u8> {
    let mut config = rustls::ClientConfig::builder_with_provider(ambit_mesh::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::IpAddress(server.into());
    let mut connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    connection.write_tls(&mut hello).unwrap();
    hello
}

#[tokio::test]
async fn garbage_on_a_pods_hbone_port_closes_only_that_connection() {
    let cluster = Cluster::start().await;
    app_server(&cluster.echo, 8080).await;
    let inode = echo_inode(&cluster);
    let hbone = SocketAddr::new(IpAddr::V4(cluster.echo.ip), 15008);

    // Not TLS at all.
    let mut stream = connect_from(&cluster.plain, hbone).await;
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n\x00\x01\x02garbage")
        .await
        .unwrap();
    let received = assert_closed_by_server(&mut stream, "plain HTTP on 15008").await;
    assert!(
        !received.starts_with(b"HTTP/"),
        "nothing answers it as HTTP: {received:?}"
    );
    assert_serving(&cluster, "non-TLS bytes on 15008").await;

    // A real ClientHello, so the server engages, then junk where the client's encrypted flight
    // belongs: an application-data record whose ciphertext is noise.
    let mut stream = connect_from(&cluster.plain, hbone).await;
    stream
        .write_all(&client_hello(cluster.echo.ip.into()))
        .await
        .unwrap();
    let mut first = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(3), stream.read_exact(&mut first))
        .await
        .expect("the server answers the ClientHello")
        .unwrap();
    assert_eq!(first[0], 0x16, "a TLS handshake record (ServerHello)");
    let mut junk = vec![0x17, 0x03, 0x03, 0x00, 0x40];
    junk.extend_from_slice(&[0x5a; 0x40]);
    stream.write_all(&junk).await.unwrap();
    assert_closed_by_server(&mut stream, "junk after a ClientHello").await;

    assert_eq!(echo_inode(&cluster), inode);
    assert_serving(&cluster, "junk after a ClientHello on 15008").await;
}

// --- 7. The node agent goes away and comes back ---

/// A connection held open across the test, from `sleep` through the VIP to echo's app server.
struct LongLived(TcpStream);

impl LongLived {
    async fn open(cluster: &Cluster) -> LongLived {
        let netns = PodNetns::new(cluster.sleep.open().into()).unwrap();
        let target = vip();
        let stream = netns
            .run(move || {
                let stream =
                    std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
                stream.set_nonblocking(true).unwrap();
                stream
            })
            .await
            .unwrap();
        let mut long = LongLived(TcpStream::from_std(stream).unwrap());
        let greeting = format!("peer={}\n", cluster.sleep.ip);
        assert_eq!(long.read(greeting.len()).await, greeting.as_bytes());
        long
    }

    async fn read(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        tokio::time::timeout(Duration::from_secs(5), self.0.read_exact(&mut buf))
            .await
            .expect("the long-lived connection answers")
            .expect("the long-lived connection is still open");
        buf
    }

    async fn round_trip(&mut self, payload: &[u8]) {
        self.0.write_all(payload).await.unwrap();
        assert_eq!(self.read(payload.len()).await, payload);
    }
}

fn echo_info() -> WorkloadInfo {
    WorkloadInfo {
        name: "echo".into(),
        namespace: "default".into(),
        service_account: "echo".into(),
    }
}

#[tokio::test]
async fn the_node_agent_going_away_and_coming_back_restarts_nothing() {
    let mut cluster = Cluster::start().await;
    app_server(&cluster.echo, 8080).await;
    let mut long = LongLived::open(&cluster).await;
    long.round_trip(b"before the gap").await;
    let inode = echo_inode(&cluster);

    // The agent dies: its connection and its listener go, the socket file stays (nothing
    // unlinks it), so ztunnel's reconnects are refused until a new agent binds it again.
    let socket = cluster.servers[ECHO_NODE].path().to_owned();
    drop(cluster.agents.remove(ECHO_NODE));
    drop(cluster.servers.remove(ECHO_NODE));

    // The gap: the pod keeps serving, old and new connections alike.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_serving(&cluster, "the node agent went away").await;
    long.round_trip(b"during the gap").await;
    assert_eq!(echo_inode(&cluster), inode);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A new agent binds the same path and replays its snapshot: the same pod, the same netns
    // (through a new fd, as a restarted agent would open it).
    let server = ZdsServer::bind(&socket).unwrap();
    let started = Instant::now();
    let mut agent = tokio::time::timeout(Duration::from_secs(5), server.accept())
        .await
        .expect("ztunnel reconnects within its backoff")
        .unwrap();
    // About a second of refused attempts has grown the delay only to ~1.3 s: the new agent is
    // found promptly, not after the 15 s cap.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "ztunnel took {:?} to find the new agent",
        started.elapsed()
    );
    agent
        .add(
            &uid(&cluster.echo),
            echo_info(),
            cluster.echo.open().as_fd(),
        )
        .await
        .unwrap();
    agent.snapshot_sent().await.unwrap();
    assert!(cluster.ztunnels[ECHO_NODE].inpod.is_ready());

    let pods = cluster.ztunnels[ECHO_NODE].inpod.pods();
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(echo_inode(&cluster), inode, "echo's proxy was not replaced");
    long.round_trip(b"after the new snapshot").await;
    assert_serving(&cluster, "the node agent came back").await;
    cluster.agents.insert(ECHO_NODE, agent);
    cluster.servers.insert(ECHO_NODE, server);
}

/// A node agent that accepts and hangs up at once (crash-looping, say) must not be hammered:
/// the delay between attempts grows while no connection gets as far as a request.
#[tokio::test]
async fn a_node_agent_that_hangs_up_at_once_is_retried_with_backoff() {
    let mut cluster = Cluster::start().await;
    app_server(&cluster.echo, 8080).await;
    let socket = cluster.servers[ECHO_NODE].path().to_owned();
    drop(cluster.servers.remove(ECHO_NODE));
    std::fs::remove_file(&socket).unwrap();
    let listener = listen(&socket);
    // Only now does ztunnel lose its connection, and find the flapping agent.
    drop(cluster.agents.remove(ECHO_NODE));

    let window = Duration::from_millis(1500);
    let (listener, connections) = tokio::task::spawn_blocking(move || {
        // Short accept timeouts so the window is kept.
        socket::setsockopt(&listener, sockopt::ReceiveTimeout, &TimeVal::new(0, 50_000)).unwrap();
        let deadline = Instant::now() + window;
        let mut connections = 0;
        while Instant::now() < deadline {
            if let Ok(raw) = socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                // SAFETY: accept4 just returned this descriptor; dropping it hangs up.
                drop(unsafe { OwnedFd::from_raw_fd(raw) });
                connections += 1;
            }
        }
        (listener, connections)
    })
    .await
    .unwrap();
    // Doubling from 10 ms: 10+20+40+...+640 ms fills 1.27 s, so about 7 attempts. Resetting the
    // delay on every successful connect (the bug this guards) made dozens.
    assert!(
        (1..=12).contains(&connections),
        "{connections} connections in {window:?}"
    );
    assert_serving(&cluster, "a flapping node agent").await;

    // The agent recovers: ztunnel comes back within its (grown) delay and takes the snapshot.
    drop(listener);
    let server = ZdsServer::bind(&socket).unwrap();
    let mut agent = tokio::time::timeout(Duration::from_secs(5), server.accept())
        .await
        .expect("ztunnel reconnects to the recovered agent")
        .unwrap();
    agent
        .add(
            &uid(&cluster.echo),
            echo_info(),
            cluster.echo.open().as_fd(),
        )
        .await
        .unwrap();
    agent.snapshot_sent().await.unwrap();
    assert_serving(&cluster, "the node agent recovered").await;
    cluster.agents.insert(ECHO_NODE, agent);
    cluster.servers.insert(ECHO_NODE, server);
}
