//! ZDS over real `SOCK_SEQPACKET` sockets and real fds: both Ambit ends against each other, and
//! each end against a raw peer sending whatever a buggy or hostile counterpart might.

use std::fs::File;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ambit_mesh::zds::proto::{
    workload_request::Payload, workload_response, AddWorkload, DelWorkload, Version,
    WorkloadRequest, WorkloadResponse, ZdsHello,
};
use ambit_mesh::zds::{WorkloadEvent, WorkloadInfo, ZdsClient, ZdsError, ZdsServer};
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use nix::sys::stat::fstat;
use nix::sys::time::TimeVal;
use prost::Message;

/// A socket path in a fresh directory, removed when dropped.
struct TempSock {
    dir: PathBuf,
}

impl TempSock {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ambit-zds-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempSock { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("ztunnel.sock")
    }
}

impl Drop for TempSock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A blocking peer that speaks raw packets, to send what Ambit's own ends never would.
struct RawPeer {
    fd: OwnedFd,
}

fn raw_socket() -> OwnedFd {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    // A test bug must fail the test, not hang it.
    socket::setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(5, 0)).unwrap();
    fd
}

impl RawPeer {
    fn listen(path: &Path) -> OwnedFd {
        let fd = raw_socket();
        socket::bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        socket::listen(&fd, Backlog::new(8).unwrap()).unwrap();
        fd
    }

    fn accept(listener: &OwnedFd) -> RawPeer {
        let raw = socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC).unwrap();
        // SAFETY: accept4 just returned this descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        socket::setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(5, 0)).unwrap();
        RawPeer { fd }
    }

    fn connect(path: &Path) -> RawPeer {
        let fd = raw_socket();
        socket::connect(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        RawPeer { fd }
    }

    fn send(&self, data: &[u8], fds: &[RawFd]) {
        let iov = [std::io::IoSlice::new(data)];
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        let n = socket::sendmsg::<()>(self.fd.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
            .unwrap();
        assert_eq!(n, data.len());
    }

    fn recv(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg =
            socket::recvmsg::<()>(self.fd.as_raw_fd(), &mut iov, None, MsgFlags::empty()).unwrap();
        let n = msg.bytes;
        buf.truncate(n);
        buf
    }

    /// Connects a [`ZdsClient`] to a raw server and consumes its hello.
    async fn serve_client(path: &Path) -> (ZdsClient, RawPeer) {
        let listener = RawPeer::listen(path);
        let client = ZdsClient::connect(path).await.unwrap();
        let peer = RawPeer::accept(&listener);
        let hello = ZdsHello::decode(&peer.recv()[..]).unwrap();
        assert_eq!(hello.version, Version::V1 as i32);
        (client, peer)
    }

    fn recv_ack_error(&self) -> String {
        match WorkloadResponse::decode(&self.recv()[..]).unwrap().payload {
            Some(workload_response::Payload::Ack(ack)) => ack.error,
            None => panic!("response without ack"),
        }
    }
}

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "default".into(),
        service_account: "sa".into(),
    }
}

fn encode(payload: Payload) -> Vec<u8> {
    WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec()
}

/// A pipe whose open copies can be counted in /proc/self/fd by inode, so a leak check is exact
/// even while other tests open and close fds concurrently.
struct Tracked {
    read: OwnedFd,
    _write: OwnedFd,
    ino: u64,
}

impl Tracked {
    fn new() -> Self {
        let (read, write) = nix::unistd::pipe().unwrap();
        let ino = fstat(&read).unwrap().st_ino;
        Tracked {
            read,
            _write: write,
            ino,
        }
    }

    fn open_copies(&self) -> usize {
        let want = format!("pipe:[{}]", self.ino);
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.as_os_str() == want.as_str())
            .count()
    }
}

async fn pair(sock: &TempSock) -> (ZdsServer, ambit_mesh::zds::ZdsConnection, ZdsClient) {
    let server = ZdsServer::bind(sock.path()).unwrap();
    let (conn, client) = tokio::join!(server.accept(), ZdsClient::connect(sock.path()));
    (server, conn.unwrap(), client.unwrap())
}

#[tokio::test]
async fn hello_then_peer_hangup() {
    let sock = TempSock::new();
    let (_server, mut conn, client) = pair(&sock).await;
    drop(client);
    let err = conn.del("gone").await.unwrap_err();
    assert!(matches!(err, ZdsError::Closed), "{err}");
    assert!(!err.is_recoverable());
    let err = conn.del("gone").await.unwrap_err();
    assert!(matches!(err, ZdsError::Broken), "{err}");
}

#[tokio::test]
async fn add_delivers_the_pod_netns() {
    let sock = TempSock::new();
    let (_server, mut conn, mut client) = pair(&sock).await;
    let netns = File::open("/proc/self/ns/net").unwrap();
    let (sent, received) = tokio::join!(conn.add("uid-1", info("web"), netns.as_fd()), async {
        let event = client.next().await.unwrap();
        client.ack().await.unwrap();
        event
    });
    sent.unwrap();
    let WorkloadEvent::Add {
        uid,
        info: got,
        netns: got_fd,
    } = received
    else {
        panic!("expected Add, got {received:?}");
    };
    assert_eq!(uid, "uid-1");
    assert_eq!(got, Some(info("web")));
    let (want, have) = (fstat(&netns).unwrap(), fstat(&got_fd).unwrap());
    assert_eq!((have.st_dev, have.st_ino), (want.st_dev, want.st_ino));
    // A duplicate, not the same descriptor number.
    assert_ne!(got_fd.as_raw_fd(), netns.as_raw_fd());
}

#[tokio::test]
async fn keep_del_and_snapshot_round_trip() {
    let sock = TempSock::new();
    let (_server, mut conn, mut client) = pair(&sock).await;
    let answer = async {
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(format!("{:?}", client.next().await.unwrap()));
            client.ack().await.unwrap();
        }
        seen
    };
    let send = async {
        conn.keep("k").await.unwrap();
        conn.snapshot_sent().await.unwrap();
        conn.del("d").await.unwrap();
    };
    let ((), seen) = tokio::join!(send, answer);
    assert_eq!(
        seen,
        [
            r#"Keep { uid: "k" }"#,
            "SnapshotSent",
            r#"Del { uid: "d" }"#
        ]
    );
}

#[tokio::test]
async fn nack_text_reaches_the_node_agent() {
    let sock = TempSock::new();
    let (_server, mut conn, mut client) = pair(&sock).await;
    let (result, ()) = tokio::join!(conn.keep("pod-a"), async {
        client.next().await.unwrap();
        client.nack("proxy failed to start: boom").await.unwrap();
    });
    let err = result.unwrap_err();
    match &err {
        ZdsError::Nack { request, reason } => {
            assert_eq!(request, "KeepWorkload for uid pod-a");
            assert_eq!(reason, "proxy failed to start: boom");
        }
        other => panic!("expected a nack, got {other}"),
    }
    assert!(err.to_string().contains("boom"));
    // A nack leaves the connection in step.
    let (result, ()) = tokio::join!(conn.del("pod-a"), async {
        client.next().await.unwrap();
        client.ack().await.unwrap();
    });
    result.unwrap();
}

#[tokio::test]
async fn garbage_is_a_decode_error_and_the_stream_goes_on() {
    let sock = TempSock::new();
    let (mut client, peer) = RawPeer::serve_client(&sock.path()).await;

    // An unterminated varint cannot decode as any message.
    peer.send(&[0xff, 0xff, 0xff], &[]);
    let err = client.next().await.unwrap_err();
    assert!(matches!(err, ZdsError::Decode { .. }), "{err}");
    assert!(err.is_recoverable());
    client.nack(&err.to_string()).await.unwrap();
    assert!(peer
        .recv_ack_error()
        .contains("not a valid WorkloadRequest"));

    peer.send(
        &encode(Payload::Del(DelWorkload {
            uid: "after".into(),
        })),
        &[],
    );
    let event = client.next().await.unwrap();
    assert!(matches!(event, WorkloadEvent::Del { ref uid } if uid == "after"));
    client.ack().await.unwrap();
    assert_eq!(peer.recv_ack_error(), "");
}

#[tokio::test]
async fn wrong_fd_counts_are_refused_without_leaks() {
    let sock = TempSock::new();
    let (mut client, peer) = RawPeer::serve_client(&sock.path()).await;
    let pipe = Tracked::new();
    let before = pipe.open_copies();
    let add = encode(Payload::Add(AddWorkload {
        uid: "p".into(),
        workload_info: Some(info("p")),
    }));

    peer.send(&add, &[]);
    let err = client.next().await.unwrap_err();
    assert!(
        matches!(err, ZdsError::AddFdCount { count: 0, .. }),
        "{err}"
    );
    client.nack(&err.to_string()).await.unwrap();
    peer.recv();

    let fd = pipe.read.as_raw_fd();
    peer.send(&add, &[fd, fd]);
    let err = client.next().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "ZDS AddWorkload for uid p carried 2 file descriptors; exactly one (the pod netns) is \
         required"
    );
    client.nack(&err.to_string()).await.unwrap();
    assert!(peer.recv_ack_error().contains("carried 2 file descriptors"));
    assert_eq!(pipe.open_copies(), before, "received fds were leaked");

    // Only AddWorkload may carry an fd.
    peer.send(
        &encode(Payload::Del(DelWorkload { uid: "p".into() })),
        &[fd],
    );
    let err = client.next().await.unwrap_err();
    assert!(
        matches!(
            err,
            ZdsError::UnexpectedFds {
                message: "DelWorkload",
                count: 1
            }
        ),
        "{err}"
    );
    client.nack(&err.to_string()).await.unwrap();
    peer.recv();
    assert_eq!(pipe.open_copies(), before, "received fds were leaked");

    // Still in step afterwards.
    peer.send(&add, &[fd]);
    let event = client.next().await.unwrap();
    assert!(matches!(event, WorkloadEvent::Add { .. }));
    assert_eq!(pipe.open_copies(), before + 1);
    drop(event);
    assert_eq!(pipe.open_copies(), before);
}

#[tokio::test]
async fn oversized_packets_are_refused() {
    let sock = TempSock::new();
    let (mut client, peer) = RawPeer::serve_client(&sock.path()).await;
    let pipe = Tracked::new();
    let before = pipe.open_copies();

    let huge = encode(Payload::Add(AddWorkload {
        uid: "x".repeat(2000),
        workload_info: None,
    }));
    peer.send(&huge, &[pipe.read.as_raw_fd()]);
    let err = client.next().await.unwrap_err();
    assert!(matches!(err, ZdsError::Truncated { max: 1024 }), "{err}");
    client.nack(&err.to_string()).await.unwrap();
    peer.recv();
    assert_eq!(
        pipe.open_copies(),
        before,
        "fd of a truncated packet leaked"
    );

    peer.send(&encode(Payload::Del(DelWorkload { uid: "ok".into() })), &[]);
    assert!(matches!(
        client.next().await.unwrap(),
        WorkloadEvent::Del { .. }
    ));
}

#[tokio::test]
async fn node_agent_refuses_an_oversized_ack_and_oversized_requests() {
    let sock = TempSock::new();
    let server = ZdsServer::bind(sock.path()).unwrap();
    let peer = RawPeer::connect(&sock.path());
    peer.send(
        &ZdsHello {
            version: Version::V1 as i32,
        }
        .encode_to_vec(),
        &[],
    );
    let mut conn = server.accept().await.unwrap();

    let ztunnel = std::thread::spawn(move || {
        peer.recv();
        let long = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(
                ambit_mesh::zds::proto::Ack {
                    error: "e".repeat(3000),
                },
            )),
        };
        peer.send(&long.encode_to_vec(), &[]);
        peer
    });
    let err = conn.del("d").await.unwrap_err();
    assert!(matches!(err, ZdsError::Truncated { .. }), "{err}");
    let _peer = ztunnel.join().unwrap();

    let err = conn.keep(&"u".repeat(2000)).await.unwrap_err();
    assert!(matches!(err, ZdsError::TooLarge { .. }), "{err}");
}

#[tokio::test]
async fn wrong_hello_version_is_refused() {
    let sock = TempSock::new();
    let server = ZdsServer::bind(sock.path()).unwrap();

    let peer = RawPeer::connect(&sock.path());
    peer.send(&ZdsHello { version: 2 }.encode_to_vec(), &[]);
    let err = server.accept().await.err().unwrap();
    assert!(
        matches!(err, ZdsError::UnsupportedVersion { version: 2 }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "ztunnel's ZdsHello announced protocol version 2; only V1 (1) is supported"
    );
    // The refused connection is closed...
    assert!(peer.recv().is_empty());

    // ...and the server still accepts a good one.
    let (conn, client) = tokio::join!(server.accept(), ZdsClient::connect(sock.path()));
    conn.unwrap();
    client.unwrap();
}

#[tokio::test]
async fn a_missing_ack_times_out_and_the_connection_is_dropped() {
    let sock = TempSock::new();
    let (_server, mut conn, mut client) = pair(&sock).await;
    conn.set_ack_timeout(Duration::from_millis(100));
    let (result, event) = tokio::join!(conn.del("slow"), client.next());
    assert!(matches!(event.unwrap(), WorkloadEvent::Del { .. }));
    let err = result.unwrap_err();
    assert!(matches!(err, ZdsError::AckTimeout { .. }), "{err}");
    // A late ack would otherwise be read as the answer to the next request.
    client.ack().await.unwrap();
    assert!(matches!(
        conn.keep("next").await.unwrap_err(),
        ZdsError::Broken
    ));
}

#[tokio::test]
async fn bind_replaces_a_stale_socket_but_nothing_else() {
    let sock = TempSock::new();
    drop(ZdsServer::bind(sock.path()).unwrap());
    assert!(sock.path().exists(), "the old socket file stays behind");
    let server = ZdsServer::bind(sock.path()).unwrap();
    assert_eq!(server.path(), sock.path());
    drop(server);

    let file = sock.dir.join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let err = ZdsServer::bind(&file).err().unwrap();
    assert!(matches!(err, ZdsError::Socket { .. }), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}
