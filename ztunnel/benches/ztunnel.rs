//! ztunnel end to end in network namespaces, against the same two nodes without Ambit: bulk
//! throughput (1 and 8 connections), request/response latency at a fixed rate (persistent
//! connection and a new connection per request) and memory per open tunnelled connection.
//!
//! Run (as root): `cargo bench -p ambit-ztunnel --features testing --bench ztunnel`.
//!
//! The cluster is `testing::Cluster`: in-process ztunnels on two "nodes", `sleep` (node 1,
//! enrolled) and `echo` (node 2, enrolled, behind the service VIP 10.96.0.10:80 → 8080), `plain`
//! (node 2, never enrolled). One more pod, `direct`, is added on node 1 and never enrolled. The
//! paths compared:
//!
//! - **Ambit**: `sleep` → VIP:80 → in-pod redirect → source ztunnel → HBONE (mTLS + HTTP/2) →
//!   destination ztunnel → `echo`:8080.
//! - **direct**: `direct` → `plain`:8080, plain TCP over the same nodes, veths and bridge.
//! - **capture only** (for attribution): `sleep` → `plain`:8080: redirected to the source ztunnel,
//!   which forwards plain TCP (the destination is not in the mesh), no HBONE.
//!
//! App sockets are created inside the pods' namespaces (unmarked, so the in-pod rules apply) by
//! `PodNetns::run`, as an app's would be. For throughput and latency every client, server and
//! both ztunnels share this process and its Tokio runtime, so on a small machine each figure is
//! bounded by the CPU of all of them together; the CPU time the process spent per GB is printed
//! beside the rates.
//!
//! Memory is this process's VmRSS with the memory test's clients and server in a child process
//! (this binary again, driven over its stdin), so the figure is both ztunnels' and nothing else's;
//! it is still two ztunnels, an upper bound for one node. The child also keeps this process's fd
//! table to the ztunnels' two fds per connection: where the hard `RLIMIT_NOFILE` cannot be raised
//! (no `CAP_SYS_RESOURCE`), that decides how many connections fit, and the output says so.
//!
//! The memory test's connections are closed with resets: closed with FIN, the destination
//! ztunnel's upstream sockets (which close first) sit in TIME_WAIT in the echo pod, bound to
//! sleep's address by ztunnel's `bind(client ip, 0)`; with some 14k of those, every further
//! bind() scans the port range and inbound connects crawl. `AMBIT_BENCH_CLOSE=fin` shows it.
//!
//! Environment (sizes take a K, M or G suffix, binary):
//! - `AMBIT_BENCH_BYTES`: bytes per throughput measurement, split over the connections
//!   (default 512M).
//! - `AMBIT_BENCH_RUNS`: measured throughput runs, after one warm-up; the median is printed
//!   (default 3).
//! - `AMBIT_BENCH_RATE`: requests per second in the latency measurements (default 1000).
//! - `AMBIT_BENCH_SECONDS`: seconds per latency measurement, after 1 s of warm-up (default 10).
//! - `AMBIT_BENCH_CONNS`: connections held open for the memory figure (default 10000).
//! - `AMBIT_BENCH_OPEN_CONCURRENCY`: connections opened at a time for it (default 64).
//! - `AMBIT_BENCH_CLOSE`: `reset` (default) or `fin`: how the memory test's connections close
//!   (see above).
//! - `AMBIT_BENCH_ONLY`: `memory`, `throughput` or `latency` to run just that group.
//! - `AMBIT_BENCH_THREADS`: Tokio worker threads (default: the machine's cores).
//! - `AMBIT_BENCH_VERBOSE`: set to print every run's figure (to stderr).

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_mesh::hbone::Settings;
use ambit_mesh::testing::bench::{env_size, process_cpu_time, size, KIB, MIB};
use ambit_ztunnel::netns::PodNetns;
use ambit_ztunnel::testing::{Cluster, VIP};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;

/// Connections in the concurrent throughput measurement.
const PARALLEL: usize = 8;
/// Request and response size in the latency measurements and the memory test's exchange.
const MESSAGE: usize = 1024;
/// Bytes per write from the throughput sender and per read in the sink.
const WRITE_SIZE: usize = 256 * KIB as usize;
/// The port the bench server listens on in `echo` and `plain` (the VIP maps 80 to it).
const SERVER_PORT: u16 = 8080;

/// The first byte a client sends picks what the server does with the connection.
const MODE_SINK: u8 = b'S';
const MODE_REQUEST_RESPONSE: u8 = b'R';
const MODE_HOLD: u8 = b'H';

/// `AMBIT_BENCH_CLOSE=fin`, in the process that holds the memory test's connections.
static FIN_CLOSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Clone)]
struct Config {
    bytes: u64,
    runs: usize,
    rate: u64,
    seconds: u64,
    conns: usize,
    open_concurrency: usize,
    threads: usize,
    cores: usize,
    only: Option<String>,
    verbose: bool,
    /// Close the memory test's connections with FIN instead of a reset.
    fin_close: bool,
}

impl Config {
    fn from_env() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Config {
            bytes: env_size("AMBIT_BENCH_BYTES").unwrap_or(512 * MIB).max(1),
            runs: env_size("AMBIT_BENCH_RUNS")
                .map_or(3, |n| n as usize)
                .max(1),
            rate: env_size("AMBIT_BENCH_RATE").unwrap_or(1000).max(1),
            seconds: env_size("AMBIT_BENCH_SECONDS").unwrap_or(10).max(1),
            conns: env_size("AMBIT_BENCH_CONNS").map_or(10_000, |n| n as usize),
            open_concurrency: env_size("AMBIT_BENCH_OPEN_CONCURRENCY")
                .map_or(64, |n| n as usize)
                .max(1),
            threads: env_size("AMBIT_BENCH_THREADS")
                .map_or(cores, |n| n as usize)
                .max(1),
            cores,
            only: std::env::var("AMBIT_BENCH_ONLY").ok(),
            verbose: std::env::var_os("AMBIT_BENCH_VERBOSE").is_some(),
            fin_close: match std::env::var("AMBIT_BENCH_CLOSE").as_deref() {
                Ok("fin") => true,
                Ok("reset") | Err(_) => false,
                Ok(other) => panic!("AMBIT_BENCH_CLOSE={other}: use fin or reset"),
            },
        }
    }

    fn runs_group(&self, group: &str) -> bool {
        self.only.as_deref().is_none_or(|only| only == group)
    }
}

fn main() {
    if let Ok(role) = std::env::var(APPS_CHILD) {
        apps_child(&role);
        return;
    }
    let config = Config::from_env();
    // Each tunnelled connection the memory test holds costs 2 fds here (the source ztunnel's
    // accepted socket, the destination ztunnel's upstream) and 1 per 50 for pooled HBONE
    // connections; its apps are in a child. The new-connection latency run makes its sockets ahead.
    let latency_sockets = (config.rate * (config.seconds + 1)) as usize;
    let wanted = (2 * config.conns + config.conns / 50 + latency_sockets + 4096) as u64;
    let fd_limit = raise_fd_limit(wanted);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads)
        .enable_all()
        .build()
        .expect("build the Tokio runtime");
    runtime.block_on(run(config, fd_limit));
}

/// What `raise_fd_limit` achieved.
struct FdLimit {
    before: u64,
    now: u64,
    wanted: u64,
    error: Option<String>,
}

/// Raises `RLIMIT_NOFILE` (soft and hard) to `wanted`, capped by `fs.nr_open`. Raising the hard
/// limit needs `CAP_SYS_RESOURCE`; without it the soft limit goes up to the hard one.
///
/// `nix::sys::resource` needs nix's `resource` feature, which the workspace does not enable, so
/// this calls libc (re-exported by nix) directly.
fn raise_fd_limit(wanted: u64) -> FdLimit {
    use nix::libc;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return FdLimit {
            before: 0,
            now: 0,
            wanted,
            error: Some(io::Error::last_os_error().to_string()),
        };
    }
    let before = limit.rlim_cur;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let target = wanted.min(nr_open);
    let mut error = None;
    if target > limit.rlim_cur {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: target.max(limit.rlim_max),
        };
        // SAFETY: setrlimit only reads the struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        } else {
            error = Some(io::Error::last_os_error().to_string());
            let soft = libc::rlimit {
                rlim_cur: target.min(limit.rlim_max),
                rlim_max: limit.rlim_max,
            };
            // SAFETY: as above.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } == 0 {
                limit = soft;
            }
        }
    }
    FdLimit {
        before,
        now: limit.rlim_cur,
        wanted,
        error,
    }
}

async fn run(config: Config, fd_limit: FdLimit) {
    println!(
        "Ambit ztunnel end to end: two nodes in network namespaces, both ztunnels in this process"
    );
    println!(
        "machine: {} cores; Tokio worker threads: {}, shared by both ztunnels and (except in \
         MEMORY) the test clients and servers",
        config.cores, config.threads
    );
    let s = Settings::default();
    println!(
        "ztunnel HBONE settings (defaults): stream window {}, connection window {}, max frame {}, \
         {} streams per pooled connection",
        size(s.stream_window.into()),
        size(s.connection_window.into()),
        size(s.max_frame_size.into()),
        s.client_max_streams
    );
    println!(
        "Ambit:  sleep (node 1) -> {VIP}:80 -> source ztunnel -> HBONE mTLS -> destination \
         ztunnel -> echo:{SERVER_PORT} (node 2)"
    );
    println!(
        "direct: direct (node 1, not enrolled) -> plain:{SERVER_PORT} (node 2, not enrolled), \
         plain TCP over the same nodes"
    );
    println!(
        "capture only: sleep -> plain:{SERVER_PORT}, redirected to the source ztunnel, which \
         forwards plain TCP (no HBONE)"
    );
    let limit_note = match &fd_limit.error {
        Some(err) => format!(" (raising the hard limit failed: {err})"),
        None => String::new(),
    };
    println!(
        "RLIMIT_NOFILE: {} -> {} (wanted {}){limit_note}",
        fd_limit.before, fd_limit.now, fd_limit.wanted
    );
    if config.fin_close {
        println!(
            "AMBIT_BENCH_CLOSE=fin: held connections close with FIN, leaving TIME_WAIT sockets in \
             the echo pod"
        );
    }
    println!();

    let started = Instant::now();
    let bench = Bench::start(config.clone()).await;
    println!(
        "cluster up in {:.1} s; load average before: {}",
        started.elapsed().as_secs_f64(),
        load_average()
    );
    println!();

    // Memory first: the idle figure should not include what earlier tests left in the allocator.
    // Its apps run in a child process, whose servers are gone before this process's start.
    if config.runs_group("memory") {
        bench.memory(&fd_limit).await;
        println!();
    }
    bench.serve_and_warm_up().await;
    if config.runs_group("throughput") {
        bench.throughputs().await;
        println!();
    }
    if config.runs_group("latency") {
        bench.latencies().await;
        println!();
    }
    println!(
        "total time {:.0} s; load average after: {}",
        started.elapsed().as_secs_f64(),
        load_average()
    );
}

/// A client pod and where its connections go.
struct Path {
    netns: Arc<PodNetns>,
    target: SocketAddr,
}

impl Path {
    /// `count` unconnected TCP sockets created inside the client pod (unmarked, non-blocking, no
    /// Nagle): the pod's rules apply to them as to its app's.
    async fn sockets(&self, count: usize) -> io::Result<Vec<std::net::TcpStream>> {
        self.netns
            .run(move || {
                (0..count)
                    .map(|_| {
                        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
                        socket.set_nonblocking(true)?;
                        socket.set_tcp_nodelay(true)?;
                        Ok(socket.into())
                    })
                    .collect()
            })
            .await
            .map_err(io::Error::other)?
    }

    async fn connect(&self) -> io::Result<TcpStream> {
        let socket = self.sockets(1).await?.pop().expect("one socket");
        connect(socket, self.target).await
    }
}

async fn connect(socket: std::net::TcpStream, target: SocketAddr) -> io::Result<TcpStream> {
    let connecting = TcpSocket::from_std_stream(socket).connect(target);
    tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect to {target}")))?
}

/// The cluster, the bench servers in `echo` and `plain`, and the three paths.
struct Bench {
    config: Config,
    /// Also keeps the namespaces and ztunnels alive: dropping it tears them down.
    cluster: Cluster,
    ambit: Path,
    direct: Path,
    capture: Path,
    echo: Arc<PodNetns>,
    plain: Arc<PodNetns>,
    /// Connections each server currently serves.
    echo_active: Arc<AtomicUsize>,
    plain_active: Arc<AtomicUsize>,
    chunk: Arc<[u8]>,
}

impl Bench {
    /// The cluster with one more pod, `direct`; no bench server runs yet.
    async fn start(config: Config) -> Bench {
        let mut cluster = Cluster::start().await;
        let direct_pod = cluster.topology.add_pod(0, "direct");
        let netns = |pod: &ambit_ztunnel::testing::PodNet| {
            Arc::new(PodNetns::new(pod.open().into()).expect("pod namespace"))
        };
        let sleep = netns(&cluster.sleep);
        let direct = netns(&direct_pod);
        let plain_target = SocketAddr::new(cluster.plain.ip.into(), SERVER_PORT);
        Bench {
            ambit: Path {
                netns: sleep.clone(),
                target: SocketAddr::new(VIP.parse().expect("VIP"), 80),
            },
            direct: Path {
                netns: direct,
                target: plain_target,
            },
            capture: Path {
                netns: sleep,
                target: plain_target,
            },
            echo: netns(&cluster.echo),
            plain: netns(&cluster.plain),
            config,
            cluster,
            echo_active: Arc::default(),
            plain_active: Arc::default(),
            chunk: (0..WRITE_SIZE).map(|i| (i % 251) as u8).collect(),
        }
    }

    /// Starts the bench servers in `echo` and `plain`, then makes one exchange per path:
    /// certificates are issued and the HBONE connection is pooled before anything is measured.
    async fn serve_and_warm_up(&self) {
        bench_server(&self.echo, SERVER_PORT, self.echo_active.clone()).await;
        bench_server(&self.plain, SERVER_PORT, self.plain_active.clone()).await;
        for path in [&self.ambit, &self.direct, &self.capture] {
            let stream = hold(path.connect().await.expect("warm-up connect"))
                .await
                .expect("warm-up exchange");
            drop(stream);
        }
        self.wait_for_servers(0).await;
    }

    /// Waits until the servers serve `count` connections between them (closes have propagated).
    async fn wait_for_servers(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = self.echo_active.load(Ordering::Acquire)
                + self.plain_active.load(Ordering::Acquire);
            if now == count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "servers still serve {now} connections, expected {count}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // --- Throughput ---

    async fn throughputs(&self) {
        let c = &self.config;
        println!(
            "THROUGHPUT: {} per measurement, one-way into a discarding sink in the destination pod, \
             split over the connections;",
            size(c.bytes)
        );
        println!(
            "  timed from the first byte until the sink has counted every byte of every connection; \
             writes of {}; median of {} run(s) after 1 warm-up",
        size(WRITE_SIZE as u64),
            c.runs
        );
        println!(
            "  MB = 10^6 bytes. After each line: the CPU time all threads of this process spent \
             per GB and its minor page faults"
        );
        println!(
            "  per GB (median run), direct vs Ambit, and the slowest and fastest Ambit run. The \
             {PARALLEL} Ambit connections share one"
        );
        println!(
            "  pooled HBONE connection.{}",
            if c.runs_group("memory") {
                " This runs after MEMORY, whose freed memory the allocator still holds (fewer \
                 page faults)."
            } else {
                ""
            }
        );
        println!("  {:<30}{:>26}{:>26}{:>8}", "", "direct", "Ambit", "ratio");
        for streams in [1, PARALLEL] {
            let direct = self.throughput(&self.direct, streams).await;
            let ambit = self.throughput(&self.ambit, streams).await;
            let name = if streams == 1 {
                "1 connection".to_owned()
            } else {
                format!("{streams} connections")
            };
            println!(
                "  {name:<30}{:>26}{:>26}{:>8.2}{}",
                rate(direct.per_second),
                rate(ambit.per_second),
                ambit.per_second / direct.per_second,
                cpu_note(direct, ambit)
            );
            let capture = self.throughput(&self.capture, streams).await;
            println!(
                "  {:<30}{:>26}{:>26}{:>8.2}{}",
                format!("  {name}, capture only"),
                "",
                rate(capture.per_second),
                capture.per_second / direct.per_second,
                cpu_note(direct, capture)
            );
        }
    }

    /// Bytes per second moving `config.bytes` over `streams` connections into the sink, and CPU
    /// seconds per GB: one warm-up, then the median of the runs.
    async fn throughput(&self, path: &Path, streams: usize) -> Figure {
        let warm_up = (self.config.bytes / 4).clamp(1, 128 * MIB);
        self.transfer(path, streams, warm_up).await;
        let units = self.config.bytes as f64 / 1e9;
        let mut samples = Vec::new();
        for _ in 0..self.config.runs {
            let sample = self.transfer(path, streams, self.config.bytes).await;
            if self.config.verbose {
                let figure = sample.figure(units);
                eprintln!(
                    "  {} -> {}, {streams} conn(s): {}, {:.2} CPU s/GB",
                    path.netns.inode(),
                    path.target,
                    rate(figure.per_second),
                    figure.cpu_per_unit.unwrap_or(f64::NAN)
                );
            }
            samples.push(sample);
        }
        self.wait_for_servers(0).await;
        Figure::median(&samples, units)
    }

    /// Opens the connections (each confirmed end to end by the sink), then times sending `total`
    /// bytes over them until the sink has confirmed every byte on every connection.
    async fn transfer(&self, path: &Path, streams: usize, total: u64) -> Sample {
        let mut opened = Vec::with_capacity(streams);
        for i in 0..streams {
            let mut stream = path.connect().await.expect("connect to the sink");
            stream.write_all(&[MODE_SINK]).await.expect("mode");
            let mut ready = [0];
            stream.read_exact(&mut ready).await.expect("sink ready");
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

    // --- Latency ---

    async fn latencies(&self) {
        let c = &self.config;
        println!(
            "LATENCY: {MESSAGE} B request, {MESSAGE} B response, {} req/s for {} s ({} samples) \
             after 1 s of warm-up;",
            c.rate,
            c.seconds,
            c.rate * c.seconds
        );
        println!(
            "  persistent: requests sent on schedule over one connection, not waiting for \
             responses (open loop), each timed from its write to its whole response;"
        );
        println!(
            "  new connection: on schedule, each from connect() (socket made beforehand) to its \
             whole response, then closed"
        );
        println!(
            "  {:<28}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "", "p50", "p99", "p99.9", "max", "mean"
        );
        let persistent_direct = self.latency(&self.direct, false).await;
        let persistent_ambit = self.latency(&self.ambit, false).await;
        let persistent_capture = self.latency(&self.capture, false).await;
        latency_lines(
            "persistent",
            &persistent_direct,
            &persistent_ambit,
            Some(&persistent_capture),
        );
        let new_direct = self.latency(&self.direct, true).await;
        let new_ambit = self.latency(&self.ambit, true).await;
        latency_lines("new connection", &new_direct, &new_ambit, None);
    }

    /// Latencies of `rate × seconds` requests after a second of warm-up.
    async fn latency(&self, path: &Path, new_connections: bool) -> Latencies {
        let warm_up = self.config.rate as usize;
        let measured = (self.config.rate * self.config.seconds) as usize;
        let interval = Duration::from_secs_f64(1.0 / self.config.rate as f64);
        let mut samples = if new_connections {
            new_connection_latencies(path, warm_up + measured, interval).await
        } else {
            persistent_latencies(path, warm_up + measured, interval).await
        };
        self.wait_for_servers(0).await;
        samples.drain(..warm_up);
        Latencies::new(samples)
    }

    // --- Memory ---

    /// RSS of this process (both ztunnels) idle, then with N tunnelled connections held open by
    /// a child process (the test apps), then after closing them, and once more with N open again
    /// now that the allocator recycles freed memory.
    async fn memory(&self, fd_limit: &FdLimit) {
        let requested = self.config.conns;
        println!(
            "MEMORY: VmRSS of this process, which runs both ztunnels (node 1's and node 2's); the \
             test clients and servers"
        );
        println!(
            "  run in a child process. So every figure covers two ztunnels: an upper bound for one \
             node's. Kernel socket"
        );
        println!(
            "  buffers are not in RSS. Each connection goes sleep -> VIP:80 -> echo, sends 1 B + \
             {MESSAGE} B, gets the {MESSAGE} B"
        );
        println!(
            "  back (proving the tunnel end to end), then stays open and idle; {} opened at a time",
            self.config.open_concurrency
        );
        let apps = match Apps::spawn(self) {
            Ok(apps) => apps,
            Err(err) => {
                println!("  !! cannot start the apps child process: {err}");
                return;
            }
        };
        // The first tunnel issues certificates and opens the pooled HBONE connection.
        if let Err(err) = apps.open(1).await.and(apps.close().await) {
            println!("  !! warm-up tunnel failed: {err}");
            return;
        }
        settle().await;
        let idle = rss();
        let fds_idle = fd_count();
        // Per tunnelled connection this process holds 2 fds (the source ztunnel's accepted socket,
        // the destination ztunnel's upstream socket), plus 2 per 100 for the pooled HBONE
        // connections (100 streams each); the child holds 2 (client and server).
        let fits = (fd_limit.now as i64 - fds_idle - 256).max(0) * 100 / 202;
        let fits_child = (fd_limit.now as i64 - 256).max(0) / 2;
        let fits = (fits.min(fits_child) / 100 * 100) as usize;
        let n = requested.min(fits);
        let row = |label: &str, value: String, per_k: String| {
            let line = format!("  {label:<50}{value:>12}{per_k:>18}");
            println!("{}", line.trim_end());
        };
        row(
            "idle, cluster up (after one warm-up tunnel)",
            mib(idle),
            String::new(),
        );
        if n < requested {
            println!(
                "  !! {requested} connections asked for, {n} measured: RLIMIT_NOFILE is {} and \
                 the two in-process ztunnels",
                fd_limit.now
            );
            println!(
                "     need 2 fds per tunnelled connection between them (+{fds_idle} open now)"
            );
            if let Some(err) = &fd_limit.error {
                println!(
                    "     The limit cannot be raised here: setrlimit: {err} (a hard limit above \
                     {} needs CAP_SYS_RESOURCE)",
                    fd_limit.now
                );
            }
        }

        let rounds = ["fresh memory", "again (allocator recycling)"];
        for (round, name) in rounds.into_iter().enumerate() {
            let opened = match apps.open(n).await {
                Ok(opened) => opened,
                Err(err) => {
                    println!("  !! opening tunnelled connections failed: {err}");
                    return;
                }
            };
            settle().await;
            let held = rss();
            let fds = fd_count();
            row(
                &format!("+ {} tunnelled, {name}", opened.count),
                format!("{:+.1} MiB", (held - idle) as f64 / MIB as f64),
                format!("{} per 1k", mib(per_thousand(held - idle, opened.count))),
            );
            println!(
                "      opened in {:.1} s ({:.0}/s); {:.2} fds each in this process; the apps' \
                 RSS grew {} per 1k",
                opened.elapsed.as_secs_f64(),
                opened.count as f64 / opened.elapsed.as_secs_f64(),
                (fds - fds_idle) as f64 / opened.count.max(1) as f64,
                mib(per_thousand(opened.child_rss_growth, opened.count)),
            );
            if let Some(err) = &opened.error {
                println!("      !! stopped early: {err}");
            }
            if let Some(count) = listen_overflows(&self.ambit.netns).await.filter(|&c| c > 0) {
                println!(
                    "      !! {count} listen queue overflows so far in the sleep pod (SYNs \
                     dropped and retransmitted)"
                );
            }
            if let Err(err) = apps.close().await {
                println!("  !! closing failed: {err}");
                return;
            }
            settle().await;
            row(
                "      after closing them all",
                format!("{:+.1} MiB", (rss() - idle) as f64 / MIB as f64),
                String::new(),
            );
            if round == 0 {
                println!(
                    "      (freed memory stays with the allocator: RSS does not go back down)"
                );
            }
        }
        println!(
            "  Each tunnelled connection has two splices (source ztunnel: app <-> HBONE stream; \
             destination ztunnel:"
        );
        println!(
            "  HBONE stream <-> app); a socket's read buffer starts at 1 KiB, grows with the \
             flow and is freed while idle."
        );
        apps.exit().await;
    }
}

/// Opens `count` connections on `path`, each confirmed by an echoed message, with at most
/// `concurrency` in flight; stops at the first failure and says why.
async fn open_held(
    path: &Path,
    count: usize,
    concurrency: usize,
) -> (Vec<TcpStream>, Option<String>) {
    let mut held = Vec::with_capacity(count);
    let mut in_flight = JoinSet::new();
    let mut error = None;
    let mut started = 0;
    let mut sockets = Vec::new();
    loop {
        if error.is_none() && started < count && in_flight.len() < concurrency {
            if sockets.is_empty() {
                match path.sockets((count - started).min(512)).await {
                    Ok(made) => sockets = made,
                    Err(err) => {
                        error = Some(format!("after {started}: socket(): {err}"));
                        continue;
                    }
                }
            }
            let socket = sockets.pop().expect("a socket");
            let target = path.target;
            in_flight.spawn(async move { hold(connect(socket, target).await?).await });
            started += 1;
            continue;
        }
        match in_flight.join_next().await {
            Some(Ok(Ok(stream))) => held.push(stream),
            Some(Ok(Err(err))) => {
                error.get_or_insert_with(|| format!("after {}: {err}", held.len()));
            }
            Some(Err(join)) => panic!("opening task: {join}"),
            None => break,
        }
    }
    (held, error)
}

/// Sends the hold mode byte and a message, and waits for the message to come back.
///
/// Unless `AMBIT_BENCH_CLOSE=fin`, held connections are closed with a reset at both ends
/// (`SO_LINGER` 0): closed normally, the destination ztunnel's upstream sockets would each sit in
/// TIME_WAIT for 60 s in the echo pod, bound to sleep's address, and make later inbound connects
/// slow (see the module doc).
async fn hold(mut stream: TcpStream) -> io::Result<TcpStream> {
    if !FIN_CLOSE.load(Ordering::Relaxed) {
        socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
    }
    let mut message = vec![0x5a; 1 + MESSAGE];
    message[0] = MODE_HOLD;
    stream.write_all(&message).await?;
    let mut back = vec![0; MESSAGE];
    tokio::time::timeout(Duration::from_secs(20), stream.read_exact(&mut back))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no echo within 20 s"))??;
    if back != message[1..] {
        return Err(io::Error::other("the echo differs from what was sent"));
    }
    Ok(stream)
}

/// Lets connection handling and frees settle before RSS is read.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// VmRSS of this process in bytes.
fn rss() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: i64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

fn fd_count() -> i64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count() as i64)
}

fn per_thousand(bytes: i64, connections: usize) -> i64 {
    if connections == 0 {
        0
    } else {
        bytes * 1000 / connections as i64
    }
}

/// `TcpExt: ListenOverflows` of the pod's namespace, read from its own thread there.
async fn listen_overflows(netns: &PodNetns) -> Option<u64> {
    let text = netns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/netstat"))
        .await
        .ok()?
        .ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = lines.next()?;
    let values = lines.next()?;
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "ListenOverflows")
        .and_then(|(_, value)| value.parse().ok())
}

// --- The memory test's apps, in a child process ---

/// Set (to `<sleep netns>,<echo netns>,<target>,<concurrency>,<fin|reset>`) in the child that runs
/// the memory test's clients and server, so their fds and memory are not this process's.
const APPS_CHILD: &str = "AMBIT_BENCH_APPS_CHILD";

/// The child process, driven one line at a time: `open <n>` answers
/// `opened <count> <micros> <rss growth> <error or ->`, `close` answers `closed`.
struct Apps {
    process: Arc<std::sync::Mutex<AppsProcess>>,
}

struct AppsProcess {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl AppsProcess {
    fn line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut self.stdout, &mut line)? == 0 {
            return Err(io::Error::other(format!(
                "the apps child exited ({:?})",
                self.child.try_wait()
            )));
        }
        Ok(line.trim_end().to_owned())
    }

    fn ask(&mut self, command: &str) -> io::Result<String> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::other("closed"))?;
        std::io::Write::write_all(stdin, format!("{command}\n").as_bytes())?;
        std::io::Write::flush(stdin)?;
        self.line()
    }
}

impl Drop for AppsProcess {
    fn drop(&mut self) {
        // EOF on its stdin makes the child exit; it is killed if it has not within 10 s.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `open` reported.
struct Opened {
    count: usize,
    elapsed: Duration,
    child_rss_growth: i64,
    error: Option<String>,
}

impl Apps {
    fn spawn(bench: &Bench) -> io::Result<Apps> {
        let role = format!(
            "{},{},{},{},{}",
            bench.cluster.sleep.netns,
            bench.cluster.echo.netns,
            bench.ambit.target,
            bench.config.open_concurrency,
            if bench.config.fin_close {
                "fin"
            } else {
                "reset"
            }
        );
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .env(APPS_CHILD, role)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut process = AppsProcess {
            stdin: child.stdin.take(),
            stdout: std::io::BufReader::new(child.stdout.take().expect("piped stdout")),
            child,
        };
        let ready = process.line()?;
        if ready != "ready" {
            return Err(io::Error::other(format!("the apps child said {ready:?}")));
        }
        Ok(Apps {
            process: Arc::new(std::sync::Mutex::new(process)),
        })
    }

    /// Sends a command from a blocking thread: the ztunnels in this runtime keep running.
    async fn ask(&self, command: String) -> io::Result<String> {
        let process = self.process.clone();
        tokio::task::spawn_blocking(move || process.lock().expect("apps lock").ask(&command))
            .await
            .map_err(io::Error::other)?
    }

    async fn open(&self, count: usize) -> io::Result<Opened> {
        let answer = self.ask(format!("open {count}")).await?;
        let mut fields = answer.splitn(5, ' ');
        let parse = |field: Option<&str>| -> io::Result<i64> {
            field
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| io::Error::other(format!("the apps child said {answer:?}")))
        };
        if fields.next() != Some("opened") {
            return Err(io::Error::other(format!("the apps child said {answer:?}")));
        }
        let count = parse(fields.next())? as usize;
        let micros = parse(fields.next())?;
        let child_rss_growth = parse(fields.next())?;
        let error = fields.next().filter(|e| *e != "-").map(str::to_owned);
        if count == 0 {
            return Err(io::Error::other(
                error.unwrap_or_else(|| "none opened".into()),
            ));
        }
        Ok(Opened {
            count,
            elapsed: Duration::from_micros(micros as u64),
            child_rss_growth,
            error,
        })
    }

    async fn close(&self) -> io::Result<()> {
        match self.ask("close".into()).await?.as_str() {
            "closed" => Ok(()),
            other => Err(io::Error::other(format!("the apps child said {other:?}"))),
        }
    }

    /// Ends the child, and with it its server's listener.
    async fn exit(self) {
        let process = self.process;
        let _ = tokio::task::spawn_blocking(move || drop(process)).await;
    }
}

/// The child process: a hold server in `echo`, clients in `sleep`, commands from stdin.
fn apps_child(role: &str) {
    let fields: Vec<&str> = role.split(',').collect();
    let [sleep, echo, target, concurrency, close] = fields[..] else {
        panic!("{APPS_CHILD}={role}: expected sleep netns, echo netns, target, concurrency, close");
    };
    FIN_CLOSE.store(close == "fin", Ordering::Relaxed);
    let target: SocketAddr = target.parse().expect("target address");
    let concurrency: usize = concurrency.parse().expect("concurrency");
    // Two fds per connection here (client and server): take all the hard limit allows.
    raise_fd_limit(u64::MAX);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("build the Tokio runtime");
    runtime.block_on(async move {
        let open = |name: &str| {
            let file = std::fs::File::open(format!("/var/run/netns/{name}")).expect("netns");
            Arc::new(PodNetns::new(file.into()).expect("pod namespace"))
        };
        let active = Arc::new(AtomicUsize::new(0));
        bench_server(&open(echo), SERVER_PORT, active.clone()).await;
        let path = Path {
            netns: open(sleep),
            target,
        };
        let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let answer = |text: String| {
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{text}");
            let _ = stdout.flush();
        };
        answer("ready".into());
        let mut held = Vec::new();
        while let Some(line) = lines.recv().await {
            let mut words = line.split_whitespace();
            match (
                words.next(),
                words.next().and_then(|n| n.parse::<usize>().ok()),
            ) {
                (Some("open"), Some(count)) => {
                    let before = rss();
                    let started = Instant::now();
                    let (streams, error) = open_held(&path, count, concurrency).await;
                    let elapsed = started.elapsed().as_micros();
                    held.extend(streams);
                    let error = error.map_or("-".to_owned(), |e| e.replace('\n', " "));
                    answer(format!(
                        "opened {} {elapsed} {} {error}",
                        held.len(),
                        rss() - before
                    ));
                }
                (Some("close"), _) => {
                    held.clear();
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while active.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let left = active.load(Ordering::Acquire);
                    answer(if left == 0 {
                        "closed".into()
                    } else {
                        format!("{left} connections still open after 60 s")
                    });
                }
                _ => answer(format!("unknown command {line:?}")),
            }
        }
    });
}

/// `/proc/loadavg`'s three averages: other work on the machine skews every figure.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".into())
}

// --- The bench server ---

/// Listens on `port` inside the pod (an app's socket, unmarked) and serves each connection by
/// its first byte: sink, request/response or hold; `counter` counts the connections in service.
async fn bench_server(netns: &PodNetns, port: u16, counter: Arc<AtomicUsize>) {
    let listener = netns
        .run(move || -> io::Result<std::net::TcpListener> {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
            socket.listen(4096)?;
            Ok(socket.into())
        })
        .await
        .expect("pod thread")
        .expect("bench server listens");
    let listener = TcpListener::from_std(listener).expect("register the listener");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((socket, _)) => {
                    let guard = Active::new(counter.clone());
                    tokio::spawn(async move {
                        serve(socket).await;
                        drop(guard);
                    });
                }
                Err(err) => {
                    eprintln!("bench server accept: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
}

/// Counts a connection in service until dropped.
struct Active(Arc<AtomicUsize>);

impl Active {
    fn new(counter: Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Active(counter)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn serve(mut socket: TcpStream) {
    let _ = socket.set_nodelay(true);
    let mut mode = [0];
    if socket.read_exact(&mut mode).await.is_err() {
        return;
    }
    match mode[0] {
        // Say ready, read and discard until EOF, answer with the count (u64, big endian).
        MODE_SINK => {
            if socket.write_all(&[1]).await.is_err() {
                return;
            }
            let mut buffer = vec![0; WRITE_SIZE];
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
        }
        // Answer each message with a message until EOF.
        MODE_REQUEST_RESPONSE => {
            let mut message = vec![0; MESSAGE];
            while socket.read_exact(&mut message).await.is_ok() {
                if socket.write_all(&message).await.is_err() {
                    return;
                }
            }
        }
        // Echo one message, then wait for the client to go.
        MODE_HOLD => {
            // Reset rather than FIN at the end: see `hold`.
            if !FIN_CLOSE.load(Ordering::Relaxed) {
                let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
            }
            let mut message = vec![0; MESSAGE];
            if socket.read_exact(&mut message).await.is_err()
                || socket.write_all(&message).await.is_err()
            {
                return;
            }
            drop(message);
            let mut rest = [0; 64];
            while let Ok(n) = socket.read(&mut rest).await {
                if n == 0 {
                    break;
                }
            }
        }
        other => eprintln!("bench server: unknown mode {other}"),
    }
}

// --- Throughput helpers ---

/// Writes `bytes` bytes, half-closes, and waits for the sink's count, which must match.
async fn send_to_sink(mut stream: TcpStream, bytes: u64, chunk: Arc<[u8]>) {
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

/// One timed run: wall-clock time and the CPU time the whole process used meanwhile.
struct Sample {
    wall: Duration,
    cpu: Option<Duration>,
    faults: Option<u64>,
}

struct Started {
    wall: Instant,
    cpu: Option<Duration>,
    faults: Option<u64>,
}

impl Sample {
    fn start() -> Started {
        Started {
            cpu: process_cpu_time(),
            faults: minor_faults(),
            wall: Instant::now(),
        }
    }

    fn figure(&self, units: f64) -> Figure {
        let per_second = units / self.wall.as_secs_f64();
        Figure {
            per_second,
            slowest: per_second,
            fastest: per_second,
            cpu_per_unit: self.cpu.map(|cpu| cpu.as_secs_f64() / units),
            faults_per_unit: self.faults.map(|faults| faults as f64 / units),
        }
    }
}

impl Started {
    fn end(self) -> Sample {
        let wall = self.wall.elapsed();
        let cpu = process_cpu_time()
            .zip(self.cpu)
            .map(|(end, start)| end.saturating_sub(start));
        let faults = minor_faults()
            .zip(self.faults)
            .map(|(end, start)| end.saturating_sub(start));
        Sample { wall, cpu, faults }
    }
}

/// GB per second (median, slowest and fastest run), and per GB the CPU seconds (all threads)
/// and minor page faults of the whole process, when the OS tells.
#[derive(Clone, Copy)]
struct Figure {
    per_second: f64,
    slowest: f64,
    fastest: f64,
    cpu_per_unit: Option<f64>,
    faults_per_unit: Option<f64>,
}

impl Figure {
    /// The median rate and, separately, the median CPU cost and page faults of the samples.
    fn median(samples: &[Sample], units: f64) -> Figure {
        let figures: Vec<Figure> = samples.iter().map(|s| s.figure(units)).collect();
        let middle = |mut values: Vec<f64>| {
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        let rates: Vec<f64> = figures.iter().map(|f| f.per_second).collect();
        let cpu: Option<Vec<f64>> = figures.iter().map(|f| f.cpu_per_unit).collect();
        let faults: Option<Vec<f64>> = figures.iter().map(|f| f.faults_per_unit).collect();
        Figure {
            per_second: middle(rates.clone()),
            slowest: rates.iter().copied().fold(f64::INFINITY, f64::min),
            fastest: rates.iter().copied().fold(0.0, f64::max),
            cpu_per_unit: cpu.map(middle),
            faults_per_unit: faults.map(middle),
        }
    }
}

/// Minor page faults of this process so far (`/proc/self/stat`, field 10).
fn minor_faults() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from its end.
    let after_name = &stat[stat.rfind(')')? + 2..];
    after_name.split_whitespace().nth(7)?.parse().ok()
}

/// `1234 MB/s (9.87 Gbit/s)` from GB per second.
fn rate(gb_per_second: f64) -> String {
    format!(
        "{:.0} MB/s ({:.2} Gbit/s)",
        gb_per_second * 1000.0,
        gb_per_second * 8.0
    )
}

/// `  CPU s/GB 0.41 vs 2.60; faults/GB 20 vs 31k; runs 650-700 MB/s`: what each GB cost the
/// process, baseline vs other, and the spread of the other's runs.
fn cpu_note(baseline: Figure, other: Figure) -> String {
    let mut notes = Vec::new();
    if let (Some(a), Some(b)) = (baseline.cpu_per_unit, other.cpu_per_unit) {
        notes.push(format!("CPU s/GB {a:.2} vs {b:.2}"));
    }
    if let (Some(a), Some(b)) = (baseline.faults_per_unit, other.faults_per_unit) {
        notes.push(format!("faults/GB {} vs {}", count(a), count(b)));
    }
    notes.push(format!(
        "runs {:.0}-{:.0} MB/s",
        other.slowest * 1000.0,
        other.fastest * 1000.0
    ));
    format!("   {}", notes.join("; "))
}

/// `850`, `31k`, `1.2M`.
fn count(value: f64) -> String {
    match value {
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e4 => format!("{:.0}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

// --- Latency helpers ---

/// Open loop over one connection: a writer sends a message every `interval` (catching up at once
/// when the timer is late) without waiting for responses; the reader times each response from
/// its request's write.
async fn persistent_latencies(path: &Path, count: usize, interval: Duration) -> Vec<Duration> {
    let mut stream = path.connect().await.expect("connect");
    stream
        .write_all(&[MODE_REQUEST_RESPONSE])
        .await
        .expect("mode");
    let (mut read, mut write) = stream.into_split();
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let writer = tokio::spawn(async move {
        let request = vec![0x5a; MESSAGE];
        let mut ticks = tokio::time::interval(interval);
        for _ in 0..count {
            ticks.tick().await;
            sent_tx.send(Instant::now()).expect("reader alive");
            write.write_all(&request).await.expect("send request");
        }
        write
    });
    let mut samples = Vec::with_capacity(count);
    let mut response = vec![0; MESSAGE];
    for _ in 0..count {
        tokio::time::timeout(Duration::from_secs(10), read.read_exact(&mut response))
            .await
            .expect("a response within 10 s")
            .expect("read response");
        let received = Instant::now();
        let sent = sent_rx.recv().await.expect("send time");
        samples.push(received - sent);
    }
    let write = writer.await.expect("writer task");
    drop(read.reunite(write).expect("same stream"));
    samples
}

/// A new connection every `interval`: each timed from connect() to its whole response. Sockets
/// are made in the pod beforehand so the namespace thread's hop is not timed.
async fn new_connection_latencies(path: &Path, count: usize, interval: Duration) -> Vec<Duration> {
    let mut sockets = path.sockets(count).await.expect("sockets");
    let target = path.target;
    let mut request = vec![0x5a; 1 + MESSAGE];
    request[0] = MODE_REQUEST_RESPONSE;
    let request: Arc<[u8]> = request.into();
    let mut tasks = JoinSet::new();
    let mut samples = vec![Duration::ZERO; count];
    let mut ticks = tokio::time::interval(interval);
    for i in 0..count {
        ticks.tick().await;
        let socket = sockets.pop().expect("a socket per request");
        let request = request.clone();
        tasks.spawn(async move {
            let start = Instant::now();
            let mut stream = connect(socket, target).await.expect("connect");
            stream.write_all(&request).await.expect("send request");
            let mut response = vec![0; MESSAGE];
            tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut response))
                .await
                .expect("a response within 10 s")
                .expect("read response");
            (i, start.elapsed())
        });
        // Reap finished ones as we go so the set stays small.
        while let Some(done) = tasks.try_join_next() {
            let (i, latency) = done.expect("request task");
            samples[i] = latency;
        }
    }
    while let Some(done) = tasks.join_next().await {
        let (i, latency) = done.expect("request task");
        samples[i] = latency;
    }
    samples
}

struct Latencies {
    sorted: Vec<Duration>,
}

impl Latencies {
    fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        Latencies { sorted: samples }
    }

    fn quantile(&self, q: f64) -> Duration {
        let n = self.sorted.len();
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        self.sorted[rank - 1]
    }

    fn mean(&self) -> Duration {
        self.sorted.iter().sum::<Duration>() / self.sorted.len() as u32
    }

    fn row(&self) -> [Duration; 5] {
        [
            self.quantile(0.5),
            self.quantile(0.99),
            self.quantile(0.999),
            *self.sorted.last().expect("samples"),
            self.mean(),
        ]
    }
}

fn latency_lines(name: &str, direct: &Latencies, ambit: &Latencies, capture: Option<&Latencies>) {
    let micros = |d: &Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
    let line = |label: String, row: [Duration; 5]| {
        let cells: Vec<String> = row.iter().map(micros).collect();
        println!(
            "  {label:<28}{:>10}{:>10}{:>10}{:>10}{:>10}",
            cells[0], cells[1], cells[2], cells[3], cells[4]
        );
    };
    line(format!("{name}, direct"), direct.row());
    line(format!("{name}, Ambit"), ambit.row());
    let (d, a) = (direct.row(), ambit.row());
    let added: Vec<String> = d
        .iter()
        .zip(a.iter())
        .map(|(d, a)| format!("{:+.0} µs", (a.as_secs_f64() - d.as_secs_f64()) * 1e6))
        .collect();
    println!(
        "  {:<28}{:>10}{:>10}{:>10}{:>10}{:>10}",
        "  added by Ambit", added[0], added[1], added[2], added[3], added[4]
    );
    if let Some(capture) = capture {
        line(format!("{name}, capture only"), capture.row());
    }
}

// --- Formatting ---

fn mib(bytes: i64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}
