//! HBONE against plain TCP on loopback: bulk throughput (1 and 8 streams) and tunnel setup rate.
//!
//! Run: `cargo bench -p ambit-mesh --features testing --bench hbone`. Prints one line per
//! measurement: the plain-TCP baseline, the HBONE figure and their ratio (HBONE / plain).
//!
//! Plain TCP goes straight from the client to a sink on 127.0.0.1; HBONE goes client -> mTLS +
//! HTTP/2 -> Ambit's HBONE server (`testing::hbone_server` with `testing::TcpForwarder`) -> the
//! same sink. Client, server and sink share one Tokio runtime, so on a small machine every figure
//! is bounded by the CPU of all three together. Each line also gives the CPU time the process
//! spent per GB or per connection: on a shared or busy machine that is steadier than the rates.
//!
//! Environment (sizes take a K, M or G suffix, binary):
//! - `AMBIT_BENCH_BYTES`: bytes sent per throughput measurement, split evenly over the streams
//!   (default 1G).
//! - `AMBIT_BENCH_TUNNELS`: tunnels per setup-rate measurement on a pooled connection, and plain TCP
//!   connections for its baseline (default 2000).
//! - `AMBIT_BENCH_CONNECTIONS`: tunnels each on a new HBONE connection (default 300, or
//!   `AMBIT_BENCH_TUNNELS` if that is smaller).
//! - `AMBIT_BENCH_RUNS`: measured runs per figure, after one warm-up; the median is printed
//!   (default 3).
//! - `AMBIT_BENCH_WRITE_BUFFER`: bytes per write from the sender (default 256K).
//! - `AMBIT_BENCH_ONLY`: `throughput` or `setup` to run just that group.
//! - `AMBIT_BENCH_VERBOSE`: set to print every run's figure (to stderr).
//! - `AMBIT_BENCH_THREADS`: Tokio worker threads (default: the machine's cores).
//! - `AMBIT_BENCH_STREAM_WINDOW`, `AMBIT_BENCH_CONNECTION_WINDOW`,
//!   `AMBIT_BENCH_MAX_FRAME`: override the HBONE [`Settings`] (client and server alike).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_mesh::hbone::client::{Client, TunnelRequest};
use ambit_mesh::hbone::{ConnectHeaders, Settings};
use ambit_mesh::identity::{CertificateManager, Identity};
use ambit_mesh::testing::bench::{env_size, process_cpu_time, size, GIB, KIB, MIB};
use ambit_mesh::testing::{self, TcpForwarder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Streams in the concurrent throughput measurements.
const PARALLEL: usize = 8;

/// A byte stream the benchmark can send over: a TCP socket or an HBONE tunnel.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type BoxIo = Box<dyn Io>;

#[derive(Clone)]
struct Config {
    bytes: u64,
    tunnels: usize,
    connections: usize,
    runs: usize,
    write_buffer: usize,
    threads: usize,
    cores: usize,
    only: Option<String>,
    verbose: bool,
    settings: Settings,
}

impl Config {
    fn from_env() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let tunnels = env_size("AMBIT_BENCH_TUNNELS").map_or(2000, |n| n as usize);
        let defaults = Settings::default();
        let settings = Settings {
            stream_window: env_size("AMBIT_BENCH_STREAM_WINDOW")
                .map_or(defaults.stream_window, |n| n as u32),
            connection_window: env_size("AMBIT_BENCH_CONNECTION_WINDOW")
                .map_or(defaults.connection_window, |n| n as u32),
            max_frame_size: env_size("AMBIT_BENCH_MAX_FRAME")
                .map_or(defaults.max_frame_size, |n| n as u32),
            ..defaults
        };
        Config {
            bytes: env_size("AMBIT_BENCH_BYTES").unwrap_or(GIB).max(1),
            tunnels: tunnels.max(1),
            connections: env_size("AMBIT_BENCH_CONNECTIONS")
                .map_or(tunnels.min(300), |n| n as usize)
                .max(1),
            runs: env_size("AMBIT_BENCH_RUNS")
                .map_or(3, |n| n as usize)
                .max(1),
            write_buffer: env_size("AMBIT_BENCH_WRITE_BUFFER")
                .map_or(256 * KIB as usize, |n| n as usize)
                .max(1),
            threads: env_size("AMBIT_BENCH_THREADS")
                .map_or(cores, |n| n as usize)
                .max(1),
            cores,
            only: std::env::var("AMBIT_BENCH_ONLY").ok(),
            verbose: std::env::var_os("AMBIT_BENCH_VERBOSE").is_some(),
            settings,
        }
    }
}

fn main() {
    let config = Config::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads)
        .enable_all()
        .build()
        .expect("build the Tokio runtime");
    runtime.block_on(run(&config));
}

async fn run(config: &Config) {
    let s = &config.settings;
    println!("Ambit HBONE benchmark over 127.0.0.1");
    println!(
        "machine: {} cores; Tokio worker threads: {} (client, HBONE server and sink share them)",
        config.cores, config.threads
    );
    println!(
        "throughput: {} per measurement, split over the streams; writes of {}; \
         median of {} run(s) after 1 warm-up; GB = 10^9 bytes",
        size(config.bytes),
        size(config.write_buffer as u64),
        config.runs
    );
    println!(
        "setup rate: {} tunnels on a pooled connection, {} on new connections, \
         {} plain TCP connections; each connects, echoes 1 byte, closes; one at a time",
        config.tunnels, config.connections, config.tunnels
    );
    println!(
        "HBONE settings: stream window {}, connection window {}, max frame {}",
        size(s.stream_window.into()),
        size(s.connection_window.into()),
        size(s.max_frame_size.into()),
    );
    println!(
        "ratio = HBONE / plain TCP; in brackets, the CPU time all threads of this process spent \
         per GB or per connection, plain vs HBONE"
    );
    println!();

    let bench = Bench::start(config).await;

    let runs = |group: &str| config.only.as_deref().is_none_or(|only| only == group);
    if runs("throughput") {
        bench.throughputs().await;
    }
    if runs("setup") {
        bench.setup_rates().await;
    }
}

/// Everything the measurements talk to: a sink, a 1-byte echo server, and an HBONE server in front
/// of both, with certificates already issued.
struct Bench {
    config: Config,
    sink: SocketAddr,
    ping: SocketAddr,
    hbone: SocketAddr,
    server_identity: Identity,
    certificates: Arc<CertificateManager>,
    chunk: Arc<[u8]>,
}

/// Where a throughput measurement sends its bytes.
enum Path {
    Plain(SocketAddr),
    /// Stream `i` uses `requests[i % len]`: one source identity shares one pooled connection.
    Hbone {
        client: Client,
        requests: Vec<TunnelRequest>,
    },
}

impl Bench {
    async fn start(config: &Config) -> Bench {
        let certificates = testing::manager(testing::ca(), Duration::from_secs(3600));
        let server_identity = testing::identity("bench", "server");
        let forwarder = Arc::new(TcpForwarder::default());
        let hbone = testing::hbone_server(
            server_identity.clone(),
            certificates.clone(),
            forwarder,
            config.settings.clone(),
        )
        .await;
        // Issue every certificate now so no measurement includes CA signing.
        certificates
            .fetch(&server_identity)
            .await
            .expect("server certificate");
        for i in 0..PARALLEL {
            certificates
                .fetch(&source(i))
                .await
                .expect("client certificate");
        }
        let chunk: Vec<u8> = (0..config.write_buffer).map(|i| (i % 251) as u8).collect();
        Bench {
            config: config.clone(),
            sink: sink_server().await,
            ping: ping_server().await,
            hbone,
            server_identity,
            certificates,
            chunk: chunk.into(),
        }
    }

    /// The plain baselines are measured once and shared by the HBONE variants.
    async fn throughputs(&self) {
        let plain_1 = self.throughput(&self.plain(), 1).await;
        let hbone_1 = self.throughput(&self.hbone(1), 1).await;
        throughput_line("throughput 1 stream", plain_1, hbone_1);

        let plain_8 = self.throughput(&self.plain(), PARALLEL).await;
        let hbone_8_shared = self.throughput(&self.hbone(1), PARALLEL).await;
        throughput_line("throughput 8 streams, 1 conn", plain_8, hbone_8_shared);
        let hbone_8_own = self.throughput(&self.hbone(PARALLEL), PARALLEL).await;
        throughput_line("throughput 8 streams, 8 conns", plain_8, hbone_8_own);
    }

    async fn setup_rates(&self) {
        let plain_connect = self.plain_connect_rate(self.config.tunnels).await;
        let new_stream = self.hbone_stream_rate(self.config.tunnels).await;
        rate_line("tunnel setup, pooled conn", plain_connect, new_stream);
        let new_connection = self.hbone_connection_rate(self.config.connections).await;
        rate_line("tunnel setup, new conn", plain_connect, new_connection);
    }

    fn plain(&self) -> Path {
        Path::Plain(self.sink)
    }

    /// A fresh client whose streams use `sources` distinct identities (so as many connections).
    fn hbone(&self, sources: usize) -> Path {
        let requests = (0..sources).map(|i| self.request(i, self.sink)).collect();
        Path::Hbone {
            client: Client::new(self.certificates.clone(), self.config.settings.clone()),
            requests,
        }
    }

    fn request(&self, source_index: usize, target: SocketAddr) -> TunnelRequest {
        TunnelRequest {
            source: source(source_index),
            destination_identities: vec![self.server_identity.clone()],
            hbone_address: self.hbone,
            target,
            headers: ConnectHeaders::default(),
        }
    }

    /// Bytes per second moving `config.bytes` over `streams` concurrent streams into the sink, and
    /// CPU seconds per GB: one warm-up (which also opens the pooled connections), then the median
    /// of the runs.
    async fn throughput(&self, path: &Path, streams: usize) -> Figure {
        let warm_up = (self.config.bytes / 4).clamp(1, 256 * MIB);
        self.transfer(path, streams, warm_up).await;
        let units = self.config.bytes as f64 / 1e9;
        let mut samples = Vec::new();
        for _ in 0..self.config.runs {
            let sample = self.transfer(path, streams, self.config.bytes).await;
            if self.config.verbose {
                let figure = sample.figure(units);
                eprint!("  {streams} stream(s): {:.2} GB/s", figure.per_second);
                match figure.cpu_per_unit {
                    Some(cpu) => eprintln!(", {cpu:.2} CPU s/GB"),
                    None => eprintln!(),
                }
            }
            samples.push(sample);
        }
        if let Path::Hbone { client, requests } = path {
            for request in requests {
                assert_eq!(
                    client.pooled_connections(request),
                    1,
                    "each source identity should ride one pooled connection"
                );
            }
        }
        Figure::median(&samples, units)
    }

    /// Opens the streams, then times sending `total` bytes over them until the sink has confirmed
    /// every byte on every stream.
    async fn transfer(&self, path: &Path, streams: usize, total: u64) -> Sample {
        let mut opened = Vec::with_capacity(streams);
        for i in 0..streams {
            let stream: BoxIo = match path {
                Path::Plain(addr) => {
                    let socket = TcpStream::connect(addr).await.expect("connect to sink");
                    socket.set_nodelay(true).expect("nodelay");
                    Box::new(socket)
                }
                Path::Hbone { client, requests } => Box::new(
                    client
                        .connect(&requests[i % requests.len()])
                        .await
                        .expect("open HBONE tunnel"),
                ),
            };
            let share = total / streams as u64 + u64::from((i as u64) < total % streams as u64);
            opened.push((stream, share));
        }
        let start = Sample::start();
        let senders: Vec<_> = opened
            .into_iter()
            .map(|(stream, share)| tokio::spawn(send_to_sink(stream, share, self.chunk.clone())))
            .collect();
        for sender in senders {
            sender.await.expect("sender task");
        }
        start.end()
    }

    /// Plain TCP connections per second: connect, echo one byte, close.
    async fn plain_connect_rate(&self, count: usize) -> Figure {
        let ping = self.ping;
        self.rate(count, || async move {
            let mut socket = TcpStream::connect(ping).await.expect("connect to ping");
            socket.set_nodelay(true).expect("nodelay");
            echo_one_byte(&mut socket).await;
        })
        .await
    }

    /// Tunnels per second on one already open HBONE connection.
    async fn hbone_stream_rate(&self, count: usize) -> Figure {
        let client = Client::new(self.certificates.clone(), self.config.settings.clone());
        let request = self.request(0, self.ping);
        // Dial the connection first; every measured (and warm-up) tunnel then reuses it.
        let mut first = client.connect(&request).await.expect("open HBONE tunnel");
        echo_one_byte(&mut first).await;
        drop(first);
        let (client, request) = (&client, &request);
        let rate = self
            .rate(count, || async move {
                let mut tunnel = client.connect(request).await.expect("open HBONE tunnel");
                assert!(tunnel.reused_connection());
                echo_one_byte(&mut tunnel).await;
            })
            .await;
        assert_eq!(client.pooled_connections(request), 1);
        rate
    }

    /// Tunnels per second when each needs a new HBONE connection (TCP, mTLS and HTTP/2
    /// handshakes): a fresh client per tunnel, certificates already issued.
    async fn hbone_connection_rate(&self, count: usize) -> Figure {
        let request = &self.request(0, self.ping);
        self.rate(count, || async move {
            let client = Client::new(self.certificates.clone(), self.config.settings.clone());
            let mut tunnel = client.connect(request).await.expect("open HBONE tunnel");
            assert!(!tunnel.reused_connection());
            echo_one_byte(&mut tunnel).await;
        })
        .await
    }

    /// Operations per second over `count` sequential operations, and CPU seconds per operation,
    /// after a warm-up of a tenth.
    async fn rate<F, Fut, T>(&self, count: usize, operation: F) -> Figure
    where
        F: Fn() -> Fut,
        Fut: Future<Output = T>,
    {
        for _ in 0..(count / 10).max(1) {
            operation().await;
        }
        let mut samples = Vec::new();
        for _ in 0..self.config.runs {
            let start = Sample::start();
            for _ in 0..count {
                operation().await;
            }
            let sample = start.end();
            if self.config.verbose {
                let figure = sample.figure(count as f64);
                eprint!("  {:.0} per second", figure.per_second);
                match figure.cpu_per_unit {
                    Some(cpu) => eprintln!(", {:.0} CPU µs each", cpu * 1e6),
                    None => eprintln!(),
                }
            }
            samples.push(sample);
        }
        Figure::median(&samples, count as f64)
    }
}

/// One timed run: wall-clock time and the CPU time the whole process used meanwhile.
struct Sample {
    wall: Duration,
    cpu: Option<Duration>,
}

/// A run under way.
struct Started {
    wall: Instant,
    cpu: Option<Duration>,
}

impl Sample {
    fn start() -> Started {
        Started {
            cpu: process_cpu_time(),
            wall: Instant::now(),
        }
    }

    /// Rate and CPU cost for `units` of work done in this run.
    fn figure(&self, units: f64) -> Figure {
        Figure {
            per_second: units / self.wall.as_secs_f64(),
            cpu_per_unit: self.cpu.map(|cpu| cpu.as_secs_f64() / units),
        }
    }
}

impl Started {
    fn end(self) -> Sample {
        let wall = self.wall.elapsed();
        let cpu = process_cpu_time()
            .zip(self.cpu)
            .map(|(end, start)| end.saturating_sub(start));
        Sample { wall, cpu }
    }
}

/// Units of work per second, and CPU seconds (all threads) per unit when the OS tells.
#[derive(Clone, Copy)]
struct Figure {
    per_second: f64,
    cpu_per_unit: Option<f64>,
}

impl Figure {
    /// The median rate and, separately, the median CPU cost of the samples.
    fn median(samples: &[Sample], units: f64) -> Figure {
        let figures: Vec<Figure> = samples.iter().map(|s| s.figure(units)).collect();
        let middle = |mut values: Vec<f64>| {
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        let cpu: Option<Vec<f64>> = figures.iter().map(|f| f.cpu_per_unit).collect();
        Figure {
            per_second: middle(figures.iter().map(|f| f.per_second).collect()),
            cpu_per_unit: cpu.map(middle),
        }
    }
}

/// `spiffe://cluster.local/ns/bench/sa/client-<i>`.
fn source(i: usize) -> Identity {
    testing::identity("bench", &format!("client-{i}"))
}

/// Writes `bytes` bytes, half-closes, and waits for the sink's count, which must match.
async fn send_to_sink(mut stream: BoxIo, bytes: u64, chunk: Arc<[u8]>) {
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..n]).await.expect("send");
        left -= n as u64;
    }
    stream.shutdown().await.expect("half-close");
    let mut count = [0; 8];
    stream
        .read_exact(&mut count)
        .await
        .expect("read the sink's count");
    assert_eq!(
        u64::from_be_bytes(count),
        bytes,
        "the sink received a different number of bytes"
    );
}

async fn echo_one_byte<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    stream.write_all(&[42]).await.expect("send the byte");
    let mut back = [0];
    stream.read_exact(&mut back).await.expect("echoed byte");
    assert_eq!(back, [42]);
}

/// Reads and discards until EOF, then answers with the byte count (u64, big endian) and closes.
async fn sink_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
    let addr = listener.local_addr().expect("sink address");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = vec![0; 256 * KIB as usize];
                let mut count = 0u64;
                loop {
                    match socket.read(&mut buffer).await {
                        Ok(0) => break,
                        Ok(n) => count += n as u64,
                        Err(_) => return,
                    }
                }
                let _ = socket.write_all(&count.to_be_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    addr
}

/// Echoes the first byte of each connection, then waits for the peer to go.
async fn ping_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind ping");
    let addr = listener.local_addr().expect("ping address");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = socket.set_nodelay(true);
                let mut byte = [0];
                if socket.read_exact(&mut byte).await.is_err() {
                    return;
                }
                if socket.write_all(&byte).await.is_err() {
                    return;
                }
                let mut rest = [0; 64];
                while let Ok(n) = socket.read(&mut rest).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn throughput_line(name: &str, plain: Figure, hbone: Figure) {
    println!(
        "{name:<31} plain TCP {:>6.2} GB/s   HBONE {:>6.2} GB/s   ratio {:.2}{}",
        plain.per_second,
        hbone.per_second,
        hbone.per_second / plain.per_second,
        cpu_note(plain, hbone, 1.0, "CPU s/GB", 2)
    );
}

fn rate_line(name: &str, plain: Figure, hbone: Figure) {
    println!(
        "{name:<31} plain TCP {:>6.0} conn/s HBONE {:>6.0} tun/s   ratio {:.2}{}",
        plain.per_second,
        hbone.per_second,
        hbone.per_second / plain.per_second,
        cpu_note(plain, hbone, 1e6, "CPU µs each", 0)
    );
}

/// `   (CPU s/GB 0.41 vs 1.90)`: what each unit of work cost in CPU time, when known.
fn cpu_note(plain: Figure, hbone: Figure, scale: f64, unit: &str, decimals: usize) -> String {
    match (plain.cpu_per_unit, hbone.cpu_per_unit) {
        (Some(plain), Some(hbone)) => format!(
            "   ({unit} {:.decimals$} vs {:.decimals$})",
            plain * scale,
            hbone * scale
        ),
        _ => String::new(),
    }
}
