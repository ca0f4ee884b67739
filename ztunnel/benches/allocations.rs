//! Heap allocations per tunnelled connection, both ztunnels together: a counting global allocator
//! counts every allocation in this process while connections go `sleep` → VIP:80 → source
//! ztunnel → HBONE → destination ztunnel → `echo`, each opening, exchanging 1 KiB each way and
//! closing, one at a time. The same clients and server do the same over the direct path
//! (`direct` → `plain`, no ztunnel) in the same run; the difference per connection is what the
//! two ztunnels allocated. Then a bulk transfer over one tunnelled connection gives allocations
//! per MiB moved.
//!
//! Run (as root): `cargo bench -p ambit-ztunnel --features testing --bench allocations`.
//! Environment: `AMBIT_BENCH_CONNS` (connections per path, default 1000), `AMBIT_BENCH_BYTES`
//! (bulk bytes, default 256M; 0 skips it). For instruction counts, run the binary under
//! `valgrind --tool=callgrind` twice with different counts: the difference divided by the extra
//! connections (or bytes) is the cost of one, free of the cluster's setup.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_mesh::testing::bench::{allocations, env_size, size, CountingAllocator, MIB};
use ambit_ztunnel::netns::PodNetns;
use ambit_ztunnel::testing::{Cluster, PodNet, VIP};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const MESSAGE: usize = 1024;
const PORT: u16 = 8080;
/// First byte from the client: exchange one message, or sink everything.
const MODE_ECHO: u8 = b'E';
const MODE_SINK: u8 = b'S';

fn main() {
    let conns = env_size("AMBIT_BENCH_CONNS")
        .map_or(1000, |n| n as usize)
        .max(1);
    let bytes = env_size("AMBIT_BENCH_BYTES").unwrap_or(256 * MIB);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run(conns, bytes));
}

struct Path {
    netns: PodNetns,
    target: SocketAddr,
}

impl Path {
    fn new(pod: &PodNet, target: SocketAddr) -> Self {
        Path {
            netns: PodNetns::new(pod.open().into()).expect("pod namespace"),
            target,
        }
    }

    /// Sockets made in the pod beforehand, so the namespace thread's hop is not counted.
    async fn sockets(&self, count: usize) -> Vec<std::net::TcpStream> {
        self.netns
            .run(move || {
                (0..count)
                    .map(|_| {
                        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
                            .expect("socket");
                        socket.set_nonblocking(true).expect("nonblocking");
                        socket.set_tcp_nodelay(true).expect("nodelay");
                        socket.into()
                    })
                    .collect()
            })
            .await
            .expect("sockets")
    }
}

async fn connect(socket: std::net::TcpStream, target: SocketAddr) -> TcpStream {
    tokio::time::timeout(
        Duration::from_secs(10),
        TcpSocket::from_std_stream(socket).connect(target),
    )
    .await
    .expect("connect in time")
    .expect("connect")
}

/// One connection: mode byte + 1 KiB, 1 KiB back, then both sides close.
async fn exchange(socket: std::net::TcpStream, target: SocketAddr, request: &[u8]) {
    let mut stream = connect(socket, target).await;
    stream.write_all(request).await.expect("request");
    let mut response = [0; MESSAGE];
    stream.read_exact(&mut response).await.expect("response");
    stream.shutdown().await.expect("half-close");
    let mut rest = [0; 16];
    assert_eq!(stream.read(&mut rest).await.expect("close"), 0);
}

/// The server in `echo` and `plain`; counts connections it finished.
async fn server(pod: &PodNet, finished: Arc<AtomicUsize>) {
    let (listener, netns) = ambit_ztunnel::testing::app_listener(pod, PORT).await;
    tokio::spawn(async move {
        let _netns = netns;
        while let Ok((mut socket, _)) = listener.accept().await {
            let finished = finished.clone();
            tokio::spawn(async move {
                let mut mode = [0];
                if socket.read_exact(&mut mode).await.is_ok() {
                    let echo = mode[0] == MODE_ECHO;
                    if echo {
                        let mut message = [0; MESSAGE];
                        if socket.read_exact(&mut message).await.is_ok() {
                            let _ = socket.write_all(&message).await;
                        }
                    }
                    let mut sink = vec![0; if echo { 16 } else { 256 * 1024 }];
                    let mut total = 0u64;
                    while let Ok(n) = socket.read(&mut sink).await {
                        if n == 0 {
                            break;
                        }
                        total += n as u64;
                    }
                    if !echo {
                        let _ = socket.write_all(&total.to_be_bytes()).await;
                    }
                    let _ = socket.shutdown().await;
                }
                finished.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
}

async fn wait_for(counter: &AtomicUsize, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter.load(Ordering::SeqCst) < count {
        assert!(
            Instant::now() < deadline,
            "server finished too few connections"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Allocations per connection over `path`, `count` connections one at a time.
async fn per_connection(path: &Path, count: usize, finished: &AtomicUsize) -> f64 {
    let mut request = vec![0x5a; 1 + MESSAGE];
    request[0] = MODE_ECHO;
    let sockets = path.sockets(count).await;
    let before_finished = finished.load(Ordering::SeqCst);
    // Let the last round's closes settle before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = allocations();
    for socket in sockets {
        exchange(socket, path.target, &request).await;
    }
    wait_for(finished, before_finished + count).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    (allocations() - start) as f64 / count as f64
}

async fn run(conns: usize, bytes: u64) {
    let mut cluster = Cluster::start().await;
    let direct_pod = cluster.topology.add_pod(0, "direct");
    let echo_done = Arc::new(AtomicUsize::new(0));
    let plain_done = Arc::new(AtomicUsize::new(0));
    server(&cluster.echo, echo_done.clone()).await;
    server(&cluster.plain, plain_done.clone()).await;
    let ambit = Path::new(
        &cluster.sleep,
        SocketAddr::new(VIP.parse().expect("VIP"), 80),
    );
    let direct = Path::new(&direct_pod, SocketAddr::new(cluster.plain.ip.into(), PORT));

    // Warm up: certificates issued, the HBONE connection pooled, every label set registered.
    per_connection(&ambit, 20, &echo_done).await;
    per_connection(&direct, 20, &plain_done).await;

    println!("Heap allocations per connection (open, 1 KiB each way, close), {conns} connections one at a time");
    let direct_allocs = per_connection(&direct, conns, &plain_done).await;
    let ambit_allocs = per_connection(&ambit, conns, &echo_done).await;
    println!("  direct (clients and server only)      {direct_allocs:>8.1}");
    println!("  through both ztunnels                 {ambit_allocs:>8.1}");
    println!(
        "  added by the two ztunnels             {:>8.1}",
        ambit_allocs - direct_allocs
    );

    if bytes > 0 {
        let chunk = vec![0xa5; 256 * 1024];
        let socket = ambit.sockets(1).await.pop().expect("socket");
        let mut stream = connect(socket, ambit.target).await;
        stream.write_all(&[MODE_SINK]).await.expect("mode");
        let start = allocations();
        let started = Instant::now();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            stream.write_all(&chunk[..n]).await.expect("send");
            left -= n as u64;
        }
        stream.shutdown().await.expect("half-close");
        let mut count = [0; 8];
        stream.read_exact(&mut count).await.expect("sink count");
        assert_eq!(u64::from_be_bytes(count), bytes);
        let elapsed = started.elapsed();
        let allocs = allocations() - start;
        println!(
            "Bulk: {} over one tunnelled connection in {:.2} s: {:.1} allocations per MiB",
            size(bytes),
            elapsed.as_secs_f64(),
            allocs as f64 / (bytes as f64 / MIB as f64)
        );
    }
    drop(cluster);
}
