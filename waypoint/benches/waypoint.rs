//! The waypoint on the request path, beside the same client and app without it: request rate and
//! CPU per request, latency at a fixed rate, and the waypoint's memory per open connection.
//!
//! Run: `cargo bench -p ambit-waypoint --bench waypoint` (the Wasm filter is built for
//! `wasm32-wasip1` on first use, by `ambit_wasm_host::testing::build_filter`).
//!
//! Everything is on loopback with real sockets, TLS, HBONE and HTTP, as in
//! `tests/support/l7mesh.rs`: two echo pods (`echo-a`, `echo-b` of service `echo`, VIP
//! 10.96.1.10:80 → 8080), each an HBONE server on `127.78.201.<n>:15008` in front of a small
//! HTTP/1.1 app (a 200 with a short body), and a client (`default/sleep`) that opens one HBONE
//! tunnel per client connection and speaks HTTP/1.1 with keep-alive inside it. Its tunnels share
//! pooled HTTP/2 connections (100 streams each), as a source ztunnel's would. The paths:
//!
//! - **direct**: client → HBONE → pod → app; connection `i` goes to pod `i % 2` (the baseline:
//!   the same client, TLS, HBONE and app, without the waypoint);
//! - **waypoint**: client → HBONE (`:authority` the VIP) → waypoint (HTTP server in the tunnel,
//!   routing, telemetry) → pooled HBONE + HTTP/1.1 to an echo pod → app;
//! - **waypoint + 1 filter**: the same with one WasmPlugin, `ambit-filter-headers` removing,
//!   setting and adding request headers and removing and setting response headers;
//! - **waypoint + 3 filters**: three such WasmPlugins in a chain;
//! - **HTTP/2 direct** / **HTTP/2 waypoint**: the client speaks HTTP/2 (prior knowledge) inside
//!   its tunnel instead, one request at a time per connection; the app serves HTTP/2 directly,
//!   the waypoint forwards over HTTP/1.1 as it always does.
//!
//! Rows:
//!
//! - **REQUESTS/S**: `AMBIT_BENCH_CONNS` client connections, each sending GET requests one after
//!   another (closed loop) for `AMBIT_BENCH_SECONDS` after 1 s of warm-up. Client, waypoint, pods
//!   and apps share this process and its Tokio runtime (one worker per core), so on a small
//!   machine each rate is bounded by all of them together; beside it is the CPU time the whole
//!   process used per request (`process_cpu_time`), and how much of it the waypoint adds.
//! - **LATENCY**: one connection, one request every 1/`AMBIT_BENCH_RATE` s for
//!   `AMBIT_BENCH_SECONDS` after 1 s of warm-up; each request timed from its send to the end of its
//!   response body (the timer's ~1 ms granularity delays sends, it is never timed). Requests go
//!   one at a time (HTTP/1.1 does not pipeline), so one slower than the interval holds the next
//!   back, untimed: the `slow` column counts them (a handful at most for the figures to hold).
//! - **L4**: the service's port 5432, declared `appProtocol: tcp`, where each pod runs a TCP echo
//!   server: the waypoint proxies it byte for byte. One tunnel; `bulk` streams 128 MiB through it
//!   and back (MiB/s counts the bytes sent one way) while `ping-pong` sends 64 bytes and waits for
//!   them, one round trip at a time for `AMBIT_BENCH_SECONDS`. Direct is the same tunnel to a pod.
//! - **NEIGHBOUR**: a second service `other` (VIP 10.96.1.11, the same pods) under paced load
//!   (8 connections, 50 requests/s each) beside `echo` at `AMBIT_BENCH_CONNS` closed-loop
//!   connections for `AMBIT_BENCH_SECONDS` (after 2 s for `other`'s load, and a looping
//!   filter's circuit, to settle): `echo`'s requests/s and p99 with no plugin, then with
//!   `test-hostile` looping in `proxy_on_request_headers` as a WasmPlugin on `other` only
//!   (FAIL_CLOSE: `other` answers 500), and the ratio of the two.
//! - **GRPC**: the service's port 9090, declared `appProtocol: grpc`, where each pod runs a gRPC
//!   echo server (hyper's HTTP/2 server: every request's messages back as they come, then
//!   `grpc-status: 0` in trailers); the client is hyper's HTTP/2 client with gRPC framing, so both
//!   peers cost little beside the waypoint. `unary`: `AMBIT_BENCH_CONNS` calls at a time (100-byte
//!   messages) on one HTTP/2 connection, as one gRPC channel multiplexes them, closed loop for
//!   `AMBIT_BENCH_SECONDS` after 1 s of warm-up; calls/s and each call's latency (send to
//!   trailers). `bidi`: one stream sending 100 MiB in 16 KiB messages while reading the echo;
//!   MiB/s counts one way. Direct is the same client to a pod's port 9090; through the waypoint
//!   the upstream is HTTP/2 as the port declares.
//! - **MEMORY**: the waypoint alone in a child process (this binary again; its CA written to a
//!   temporary directory), so its VmRSS is the waypoint's and nothing else's: just started, after
//!   one request, with `AMBIT_BENCH_MEMORY_CONNS` client connections open (each with one request
//!   done, held open), after they close, and with as many open again (memory the allocator kept
//!   is reused, a leak would grow). Without a filter and with one filter.
//!
//! Environment:
//! - `AMBIT_BENCH_SECONDS`: seconds per rate and latency measurement (default 5).
//! - `AMBIT_BENCH_CONNS`: concurrent client connections for requests/s (default 16).
//! - `AMBIT_BENCH_RATE`: requests per second in the latency rows (default 500).
//! - `AMBIT_BENCH_MEMORY_CONNS`: connections held open for the memory rows (default 1000).
//! - `AMBIT_BENCH_ONLY`: `throughput`, `latency`, `l4`, `neighbour`, `grpc` or `memory` to run
//!   just that group.
//! - `AMBIT_BENCH_THREADS`: Tokio worker threads in this process (default: the machine's cores).

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Poll};
use std::time::{Duration, Instant};

use ambit_mesh::hbone::client::{Client, TunnelRequest};
use ambit_mesh::hbone::server::Server;
use ambit_mesh::hbone::{ConnectHeaders, Settings, HBONE_PORT};
use ambit_mesh::identity::{CertificateAuthority, CertificateManager, Identity};
use ambit_mesh::state::local::LocalConfig;
use ambit_mesh::state::StateStore;
use ambit_mesh::testing::bench::{env_size, process_cpu_time, MIB};
use ambit_mesh::testing::{self, TcpForwarder};
use ambit_wasm_host::testing::build_filter;
use ambit_waypoint::app::{Options, Waypoint};
use ambit_waypoint::l7::WaypointName;
use ambit_waypoint::proxy::ProxySettings;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// The pods live on `127.78.NET.0/24` (tests use small nets).
const NET: u8 = 201;
const PODS: [&str; 2] = ["echo-a", "echo-b"];
const VIP: &str = "10.96.1.10:80";
/// The service port declared TCP, and the pods' echo port behind it.
const TCP_VIP: &str = "10.96.1.10:5432";
const TCP_PORT: u16 = 5432;
/// Bytes the L4 bulk row streams through and back.
const BULK_BYTES: usize = 128 * 1024 * 1024;
/// The service port declared gRPC, and the pods' gRPC echo port behind it.
const GRPC_VIP: &str = "10.96.1.10:9090";
const GRPC_PORT: u16 = 9090;
/// Payload of each unary call's message, and of each message of the bidi stream.
const UNARY_MESSAGE: usize = 100;
const BIDI_MESSAGE: usize = 16 * 1024;
/// Payload bytes the bidi row streams through and back.
const BIDI_BYTES: usize = 100 * 1024 * 1024;
const HOST: &str = "echo.default.svc.cluster.local";
/// The neighbour rows' second service, on the same pods.
const OTHER_VIP: &str = "10.96.1.11:80";
const OTHER_HOST: &str = "other.default.svc.cluster.local";
const CLIENT_ADDR: &str = "10.9.9.9:40000";
/// Set (to the CA directory) in the memory test's child, which runs only a waypoint.
const CHILD_ENV: &str = "AMBIT_BENCH_WAYPOINT_CHILD";
/// The child's L7 configuration file, when it runs a filter.
const CHILD_L7_ENV: &str = "AMBIT_BENCH_WAYPOINT_L7";
/// Connections opened at a time for the memory rows.
const OPEN_CONCURRENCY: usize = 64;
/// The header filter's configuration (as in wasm-host's bench): a small rewrite both ways.
const REWRITE: &str = r#"{"request": {"remove": ["x-debug"], "set": {"x-env": "prod"}, "add": {"x-via": "ambit"}}, "response": {"remove": ["server"], "set": {"x-frame-options": "DENY"}}}"#;

struct Config {
    seconds: u64,
    conns: usize,
    rate: u64,
    memory_conns: usize,
    threads: usize,
    cores: usize,
    only: Option<String>,
}

impl Config {
    fn from_env() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let number = |name, default: u64| env_size(name).unwrap_or(default).max(1);
        Config {
            seconds: number("AMBIT_BENCH_SECONDS", 5),
            conns: number("AMBIT_BENCH_CONNS", 16) as usize,
            rate: number("AMBIT_BENCH_RATE", 500),
            memory_conns: number("AMBIT_BENCH_MEMORY_CONNS", 1000) as usize,
            threads: number("AMBIT_BENCH_THREADS", cores as u64) as usize,
            cores,
            only: std::env::var("AMBIT_BENCH_ONLY").ok(),
        }
    }

    fn runs_group(&self, group: &str) -> bool {
        self.only.as_deref().is_none_or(|only| only == group)
    }
}

fn main() {
    if let Ok(ca_dir) = std::env::var(CHILD_ENV) {
        // As the waypoint binary runs: `#[tokio::main]`, one worker per core.
        tokio::runtime::Runtime::new()
            .expect("build the Tokio runtime")
            .block_on(waypoint_child(Path::new(&ca_dir)));
        return;
    }
    let config = Config::from_env();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads)
        .enable_all()
        .build()
        .expect("build the Tokio runtime")
        .block_on(run(config));
}

async fn run(config: Config) {
    let started = Instant::now();
    let ca = testing::ca();
    let bench = Bench::start(ca.clone()).await;
    let filter = build_filter("ambit-filter-headers");
    println!(
        "Ambit waypoint: client, waypoint, pods and apps in this process on loopback; HTTP/1.1 \
         keep-alive in one HBONE tunnel per client connection"
    );
    println!(
        "machine: {} cores; Tokio worker threads: {} (shared by all of them); load average \
         before: {}",
        config.cores,
        config.threads,
        load_average()
    );
    println!(
        "filter: {} ({} KiB), config {REWRITE}",
        filter.display(),
        std::fs::metadata(&filter).map_or(0, |m| m.len() / 1024)
    );
    println!();
    let configs = [
        ("waypoint", None),
        ("waypoint + 1 filter", Some(l7_config(&filter, 1))),
        ("waypoint + 3 filters", Some(l7_config(&filter, 3))),
    ];

    if config.runs_group("throughput") {
        println!(
            "REQUESTS/S: {} connections, closed loop, {} s after 1 s warm-up; CPU = this whole \
             process's CPU time per request (client + waypoint + pods + apps)",
            config.conns, config.seconds
        );
        println!(
            "  {:<24}{:>12}{:>16}{:>18}{:>10}",
            "path", "requests/s", "CPU µs/request", "added by waypoint", "errors"
        );
        let direct = bench.throughput(None, Http::One, &config).await;
        direct.print("direct (baseline)", None);
        for (name, l7) in &configs {
            let waypoint = bench.waypoint(l7.as_deref()).await;
            let rate = bench.throughput(Some(&waypoint), Http::One, &config).await;
            rate.print(name, Some(&direct));
        }
        let direct = bench.throughput(None, Http::Two, &config).await;
        direct.print("HTTP/2 direct (baseline)", None);
        let waypoint = bench.waypoint(None).await;
        bench
            .throughput(Some(&waypoint), Http::Two, &config)
            .await
            .print("HTTP/2 waypoint", Some(&direct));
        println!();
    }

    if config.runs_group("latency") {
        println!(
            "LATENCY: one connection, {} requests/s for {} s after 1 s warm-up, each timed from \
             send to the end of the response",
            config.rate, config.seconds
        );
        println!(
            "  {:<24}{:>10}{:>10}{:>10}{:>10}{:>10}{:>8}",
            "path", "p50", "p99", "p99.9", "max", "mean", "slow"
        );
        let direct = bench.latency(None, Http::One, &config).await;
        direct.print("direct (baseline)", None);
        for (name, l7) in &configs[..2] {
            let waypoint = bench.waypoint(l7.as_deref()).await;
            bench
                .latency(Some(&waypoint), Http::One, &config)
                .await
                .print(name, Some(&direct));
        }
        let direct = bench.latency(None, Http::Two, &config).await;
        direct.print("HTTP/2 direct (baseline)", None);
        let waypoint = bench.waypoint(None).await;
        bench
            .latency(Some(&waypoint), Http::Two, &config)
            .await
            .print("HTTP/2 waypoint", Some(&direct));
        println!();
    }

    if config.runs_group("l4") {
        println!(
            "L4: port {TCP_PORT} declared tcp, TCP echo pods; one tunnel: bulk = {} MiB through \
             and back, ping-pong = 64-byte round trips one at a time for {} s",
            BULK_BYTES / MIB as usize,
            config.seconds
        );
        println!(
            "  {:<24}{:>12}{:>16}{:>14}{:>12}",
            "path", "bulk MiB/s", "round trips/s", "RTT p50", "RTT p99"
        );
        let direct = bench.l4(None, &config).await;
        direct.print("direct (baseline)");
        let waypoint = bench.waypoint(None).await;
        bench
            .l4(Some(waypoint.address), &config)
            .await
            .print("waypoint (L4)");
        println!();
    }

    if config.runs_group("neighbour") {
        println!(
            "NEIGHBOUR: echo at {} closed-loop connections for {} s, beside service other at 8 \
             connections x 50 requests/s (after 2 s to settle)",
            config.conns, config.seconds
        );
        println!(
            "  {:<40}{:>12}{:>12}{:>14}",
            "other's plugins", "echo req/s", "echo p99", "other 500s"
        );
        let clean = bench.neighbour(&bench.waypoint(None).await, &config).await;
        clean.print("none");
        let looping = bench
            .neighbour(&bench.waypoint(Some(&looping_config())).await, &config)
            .await;
        looping.print("test-hostile looping (FAIL_CLOSE)");
        println!(
            "  ratio looping / none: req/s {:.2}, p99 {:.2}",
            looping.per_second / clean.per_second,
            looping.p99.as_secs_f64() / clean.p99.as_secs_f64()
        );
        println!();
    }

    if config.runs_group("grpc") {
        println!(
            "GRPC: port {GRPC_PORT} declared grpc, gRPC echo pods (hyper HTTP/2); unary = {} calls \
             at a time ({UNARY_MESSAGE}-byte messages) on one HTTP/2 connection, closed loop, {} s \
             after 1 s warm-up; bidi = one stream echoing {} MiB in {} KiB messages",
            config.conns,
            config.seconds,
            BIDI_BYTES / MIB as usize,
            BIDI_MESSAGE / 1024
        );
        println!(
            "  {:<24}{:>10}{:>12}{:>12}{:>8}{:>14}",
            "path", "calls/s", "p50", "p99", "errors", "bidi MiB/s"
        );
        let direct = bench.grpc(None, &config).await;
        direct.print("direct (baseline)");
        let waypoint = bench.waypoint(None).await;
        let through = bench.grpc(Some(waypoint.address), &config).await;
        through.print("waypoint");
        println!(
            "  ratio waypoint / direct: calls/s {:.2}, p50 {:.2}, p99 {:.2}, bidi MiB/s {:.2}",
            through.per_second / direct.per_second,
            through.latencies.quantile(0.5).as_secs_f64()
                / direct.latencies.quantile(0.5).as_secs_f64(),
            through.latencies.quantile(0.99).as_secs_f64()
                / direct.latencies.quantile(0.99).as_secs_f64(),
            through.bidi / direct.bidi
        );
        println!();
    }

    if config.runs_group("memory") {
        let dir = std::env::temp_dir().join(format!("ambit-waypoint-bench-{}", std::process::id()));
        ca.save(&dir.join("ca")).expect("save the CA");
        println!(
            "MEMORY: VmRSS of a child process running only the waypoint (no client, pod or app \
             in it); N = {} client connections opened {OPEN_CONCURRENCY} at a time, each with one \
             request done, then held open; per conn = (N open - 1 request) / N; N again = as many \
             opened again after they closed",
            config.memory_conns
        );
        println!(
            "  {:<24}{:>10}{:>12}{:>12}{:>12}{:>12}{:>12}",
            "waypoint", "started", "1 request", "N open", "per conn", "closed", "N again"
        );
        for (name, l7) in &configs[..2] {
            let l7_path = l7.as_ref().map(|yaml| {
                let path = dir.join("l7.yaml");
                std::fs::write(&path, yaml).expect("write the L7 configuration");
                path
            });
            bench
                .memory(&dir.join("ca"), l7_path.as_deref(), config.memory_conns)
                .await
                .print(name);
        }
        let _ = std::fs::remove_dir_all(&dir);
        println!();
    }
    println!(
        "total time {:.0} s; load average after: {}",
        started.elapsed().as_secs_f64(),
        load_average()
    );
}

/// An L7 configuration file with `count` header-rewriting WasmPlugins on the waypoint.
fn l7_config(filter: &Path, count: usize) -> String {
    (0..count)
        .map(|i| {
            format!(
                "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: \
                 headers-{i}, namespace: default}}\nspec:\n  targetRefs: [{{kind: Gateway, group: \
                 gateway.networking.k8s.io, name: waypoint}}]\n  url: file://{}\n  pluginConfig: \
                 {REWRITE}\n",
                filter.display()
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// A WasmPlugin looping in `proxy_on_request_headers`, on service `other` only.
fn looping_config() -> String {
    format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: looping, \
         namespace: default}}\nspec:\n  targetRefs: [{{kind: Service, group: \"\", name: other}}]\n  \
         url: file://{}\n  failStrategy: FAIL_CLOSE\n  pluginConfig: {{\"mode\": \"loop\"}}\n",
        build_filter("test-hostile").display()
    )
}

// --- The mesh ---

fn pod_ip(host: usize) -> IpAddr {
    IpAddr::from([127, 78, NET, host as u8 + 1])
}

fn waypoint_name() -> WaypointName {
    WaypointName {
        namespace: "default".into(),
        gateway: "waypoint".into(),
    }
}

fn waypoint_identity() -> Identity {
    testing::identity("default", "waypoint")
}

/// The two echo pods behind the `echo` service, and the client workload.
fn state() -> StateStore {
    let mut workloads = String::new();
    for (i, name) in PODS.iter().enumerate() {
        workloads.push_str(&format!(
            r#"
- uid: cluster1//v1/Pod/default/{name}
  name: {name}
  namespace: default
  serviceAccount: echo
  workloadIps: ["{}"]
  protocol: HBONE
  services:
    default/echo.default.svc.cluster.local:
      80: 8080
      5432: 5432
      9090: 9090
    default/other.default.svc.cluster.local:
      80: 8080
"#,
            pod_ip(i)
        ));
    }
    let yaml = format!(
        r#"
workloads:{workloads}
- uid: cluster1//v1/Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: ["10.9.9.9"]
  protocol: HBONE
services:
- {{name: echo, namespace: default, hostname: {HOST}, vips: ["/10.96.1.10"], ports: {{80: 8080, 5432: 5432, 9090: 9090}}, appProtocols: {{80: http11, 5432: tcp, 9090: grpc}}}}
- {{name: other, namespace: default, hostname: {OTHER_HOST}, vips: ["/10.96.1.11"], ports: {{80: 8080}}, appProtocols: {{80: http11}}}}
"#
    );
    let path = Path::new("bench.yaml");
    StateStore::new(
        LocalConfig::parse(&yaml, path)
            .expect("bench state parses")
            .into_snapshot(path)
            .expect("bench state is valid"),
    )
}

async fn start_waypoint(
    certificates: Arc<CertificateManager>,
    l7_path: Option<PathBuf>,
) -> Waypoint {
    let local = SocketAddr::from(([127, 0, 0, 1], 0));
    Waypoint::start_with(
        Options {
            identity: waypoint_identity(),
            network: String::new(),
            hbone_address: local,
            stats_address: local,
            readiness_address: local,
            proxy: ProxySettings::default(),
            hbone: Settings::default(),
            name: waypoint_name(),
            l7_path,
        },
        certificates,
        Arc::new(state()),
    )
    .await
    .expect("start the waypoint")
}

/// The memory test's child: a waypoint and nothing else, until its stdin closes.
async fn waypoint_child(ca_dir: &Path) {
    let certificates = Arc::new(
        CertificateManager::with_local_ca(ca_dir, Duration::from_secs(3600)).expect("load the CA"),
    );
    let l7_path = std::env::var_os(CHILD_L7_ENV).map(PathBuf::from);
    let waypoint = start_waypoint(certificates, l7_path).await;
    println!("{}", waypoint.hbone_address);
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {}
    })
    .await;
}

/// The app: a 200 with a short body and a few headers, for any request.
async fn app(name: &'static str, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let _ = request.into_body().collect().await;
    Response::builder()
        .header("content-type", "text/plain")
        .header("server", "echo")
        .header("cache-control", "no-store")
        .body(Full::new(Bytes::from(name)))
        .expect("app response")
}

/// Starts the pods' apps and HBONE servers.
async fn start_pods(certificates: &Arc<CertificateManager>) {
    for (i, name) in PODS.into_iter().enumerate() {
        let listener = TcpListener::bind(SocketAddr::new(pod_ip(i), 8080))
            .await
            .expect("bind the app (is 127.78.201.0/24 free?)");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| async move {
                        Ok::<_, Infallible>(app(name, request).await)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let echo = TcpListener::bind(SocketAddr::new(pod_ip(i), TCP_PORT))
            .await
            .expect("bind the TCP echo app");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = echo.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        let grpc = TcpListener::bind(SocketAddr::new(pod_ip(i), GRPC_PORT))
            .await
            .expect("bind the gRPC echo app");
        tokio::spawn(async move {
            while let Ok((stream, _)) = grpc.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|request: Request<Incoming>| async {
                        let echo = GrpcEcho {
                            request: request.into_body(),
                            done: false,
                        };
                        Response::builder()
                            .header("content-type", "application/grpc")
                            .body(echo)
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let listener = TcpListener::bind(SocketAddr::new(pod_ip(i), HBONE_PORT))
            .await
            .expect("bind the pod's HBONE port");
        let server = Server::new(
            testing::identity("default", "echo"),
            certificates.clone(),
            Arc::new(TcpForwarder::default()),
            Settings::default(),
        );
        tokio::spawn(server.serve(listener));
    }
}

struct Bench {
    certificates: Arc<CertificateManager>,
    client: Arc<Client>,
}

impl Bench {
    async fn start(ca: Arc<CertificateAuthority>) -> Bench {
        let certificates = testing::manager(ca, Duration::from_secs(3600));
        start_pods(&certificates).await;
        Bench {
            client: Arc::new(Client::new(certificates.clone(), Settings::default())),
            certificates,
        }
    }

    /// A waypoint in this process with `l7` (YAML) as its configuration file.
    async fn waypoint(&self, l7: Option<&str>) -> InProcessWaypoint {
        let path = l7.map(|yaml| {
            let path = std::env::temp_dir().join(format!(
                "ambit-waypoint-bench-{}-l7.yaml",
                std::process::id()
            ));
            std::fs::write(&path, yaml).expect("write the L7 configuration");
            path
        });
        let waypoint = start_waypoint(self.certificates.clone(), path.clone()).await;
        InProcessWaypoint {
            address: waypoint.hbone_address,
            expect_filter: l7.is_some(),
            _waypoint: waypoint,
            path,
        }
    }

    /// Requests/s and CPU per request over `config.conns` connections.
    async fn throughput(
        &self,
        waypoint: Option<&InProcessWaypoint>,
        http: Http,
        config: &Config,
    ) -> Rate {
        let address = waypoint.map(|w| w.address);
        let mut connections = Vec::new();
        for i in 0..config.conns {
            let mut connection = connect(&self.client, address, i, http).await;
            let headers = connection.get().await.expect("first request");
            if let Some(waypoint) = waypoint {
                waypoint.check(&headers);
            }
            connections.push(connection);
        }
        let done = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        for mut connection in connections {
            let (done, errors, stop) = (done.clone(), errors.clone(), stop.clone());
            tasks.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match connection.get().await {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (cpu, requests, failed) = (
            process_cpu_time(),
            done.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed),
        );
        let wall = Instant::now();
        tokio::time::sleep(Duration::from_secs(config.seconds)).await;
        let requests = done.load(Ordering::Relaxed) - requests;
        let failed = errors.load(Ordering::Relaxed) - failed;
        let wall = wall.elapsed();
        let cpu = process_cpu_time()
            .zip(cpu)
            .map(|(end, start)| end.saturating_sub(start));
        stop.store(true, Ordering::Relaxed);
        while tasks.join_next().await.is_some() {}
        Rate {
            per_second: requests as f64 / wall.as_secs_f64(),
            cpu_per_request: cpu.map(|cpu| cpu.as_secs_f64() / requests.max(1) as f64),
            errors: failed,
        }
    }

    /// `echo` in a closed loop beside paced load on `other`, through `waypoint`.
    async fn neighbour(&self, waypoint: &InProcessWaypoint, config: &Config) -> Neighbour {
        let address = Some(waypoint.address);
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let mut others = JoinSet::new();
        for i in 0..8 {
            let mut connection =
                connect_to(&self.client, address, i, Http::One, OTHER_VIP, OTHER_HOST).await;
            let (stop, failed) = (stop.clone(), failed.clone());
            others.spawn(async move {
                let mut ticks = tokio::time::interval(Duration::from_millis(20));
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !stop.load(Ordering::Relaxed) {
                    ticks.tick().await;
                    if connection.get().await.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let failed_before = failed.load(Ordering::Relaxed);
        let measuring = Arc::new(AtomicBool::new(true));
        let mut echoes = JoinSet::new();
        for i in 0..config.conns {
            let mut connection = connect(&self.client, address, i, Http::One).await;
            let measuring = measuring.clone();
            echoes.spawn(async move {
                let mut samples = Vec::new();
                while measuring.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    connection.get().await.expect("echo is served beside other");
                    samples.push(started.elapsed());
                }
                samples
            });
        }
        let wall = Instant::now();
        tokio::time::sleep(Duration::from_secs(config.seconds)).await;
        measuring.store(false, Ordering::Relaxed);
        let wall = wall.elapsed();
        let mut samples = Vec::new();
        while let Some(done) = echoes.join_next().await {
            samples.extend(done.expect("echo task"));
        }
        let other_failed = failed.load(Ordering::Relaxed) - failed_before;
        stop.store(true, Ordering::Relaxed);
        while others.join_next().await.is_some() {}
        let latencies = Latencies::new(samples, Duration::MAX);
        Neighbour {
            per_second: latencies.sorted.len() as f64 / wall.as_secs_f64(),
            p99: latencies.quantile(0.99),
            other_failed,
        }
    }

    /// Paced requests on one connection.
    async fn latency(
        &self,
        waypoint: Option<&InProcessWaypoint>,
        http: Http,
        config: &Config,
    ) -> Latencies {
        let mut connection = connect(&self.client, waypoint.map(|w| w.address), 0, http).await;
        let headers = connection.get().await.expect("first request");
        if let Some(waypoint) = waypoint {
            waypoint.check(&headers);
        }
        let interval = Duration::from_secs_f64(1.0 / config.rate as f64);
        let warm_up = config.rate as usize;
        let count = (config.rate * config.seconds) as usize;
        let mut ticks = tokio::time::interval(interval);
        let mut samples = Vec::with_capacity(count);
        for i in 0..warm_up + count {
            ticks.tick().await;
            let sent = Instant::now();
            connection.get().await.expect("request");
            if i >= warm_up {
                samples.push(sent.elapsed());
            }
        }
        Latencies::new(samples, interval)
    }

    /// The child waypoint's VmRSS as connections come and go.
    async fn memory(&self, ca_dir: &Path, l7_path: Option<&Path>, conns: usize) -> Memory {
        let mut command = Command::new(std::env::current_exe().expect("this binary"));
        command
            .env(CHILD_ENV, ca_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(path) = l7_path {
            command.env(CHILD_L7_ENV, path);
        }
        let mut child = ChildWaypoint(command.spawn().expect("start the child waypoint"));
        let stdout = child.0.stdout.take().expect("child stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the child's address");
        let address: SocketAddr = line.trim().parse().expect("the child prints its address");
        let pid = child.0.id();
        let settle = || tokio::time::sleep(Duration::from_millis(500));
        settle().await;
        let started = rss(pid);

        let mut first = connect(&self.client, Some(address), 0, Http::One).await;
        let headers = first.get().await.expect("first request");
        assert_eq!(
            headers.contains_key("x-frame-options"),
            l7_path.is_some(),
            "the filter runs exactly when configured"
        );
        drop(first);
        settle().await;
        let one_request = rss(pid);

        let held = self.open_connections(address, conns).await;
        settle().await;
        let open = rss(pid);
        drop(held);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let closed = rss(pid);
        let held = self.open_connections(address, conns).await;
        settle().await;
        let again = rss(pid);
        drop(held);
        drop(child);
        Memory {
            started,
            one_request,
            open,
            closed,
            again,
            conns,
        }
    }

    /// `count` connections to the waypoint at `address`, each with one request done.
    async fn open_connections(&self, address: SocketAddr, count: usize) -> Vec<Connection> {
        let mut held = Vec::with_capacity(count);
        let mut opening = JoinSet::new();
        for i in 0..count {
            if opening.len() >= OPEN_CONCURRENCY {
                let connection = opening.join_next().await.expect("a task");
                held.push(connection.expect("connection"));
            }
            let client = self.client.clone();
            opening.spawn(async move {
                let mut connection = connect(&client, Some(address), i, Http::One).await;
                connection.get().await.expect("request");
                connection
            });
        }
        while let Some(connection) = opening.join_next().await {
            held.push(connection.expect("connection"));
        }
        held
    }
}

/// A client connection: one tunnel, an HTTP/1.1 handshake inside it. `waypoint` `None` goes
/// straight to pod `index % 2`.
/// A tunnel to `vip` through the waypoint, or to pod `index % 2` on `port` directly.
fn tunnel_request(
    waypoint: Option<SocketAddr>,
    index: usize,
    vip: &str,
    port: u16,
) -> TunnelRequest {
    match waypoint {
        Some(address) => TunnelRequest {
            source: testing::identity("default", "sleep"),
            destination_identities: vec![waypoint_identity()],
            hbone_address: address,
            target: vip.parse().expect("VIP"),
            headers: ConnectHeaders {
                forwarded_for: Some(CLIENT_ADDR.parse().expect("client address")),
                ..Default::default()
            },
        },
        None => {
            let pod = pod_ip(index % PODS.len());
            TunnelRequest {
                source: testing::identity("default", "sleep"),
                destination_identities: vec![testing::identity("default", "echo")],
                hbone_address: SocketAddr::new(pod, HBONE_PORT),
                target: SocketAddr::new(pod, port),
                headers: ConnectHeaders {
                    forwarded_for: Some(CLIENT_ADDR.parse().expect("client address")),
                    ..Default::default()
                },
            }
        }
    }
}

async fn connect(
    client: &Client,
    waypoint: Option<SocketAddr>,
    index: usize,
    http: Http,
) -> Connection {
    connect_to(client, waypoint, index, http, VIP, HOST).await
}

async fn connect_to(
    client: &Client,
    waypoint: Option<SocketAddr>,
    index: usize,
    http: Http,
    vip: &str,
    host: &'static str,
) -> Connection {
    let request = tunnel_request(waypoint, index, vip, 8080);
    let tunnel = TokioIo::new(client.connect(&request).await.expect("tunnel"));
    let sender = match http {
        Http::One => {
            let (sender, connection) = hyper::client::conn::http1::handshake(tunnel)
                .await
                .expect("HTTP/1.1 handshake");
            tokio::spawn(connection);
            Sender::One(sender)
        }
        Http::Two => {
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), tunnel)
                    .await
                    .expect("HTTP/2 handshake");
            tokio::spawn(connection);
            Sender::Two(sender)
        }
    };
    Connection { sender, host }
}

/// What the client speaks inside its tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Http {
    One,
    /// HTTP/2 with prior knowledge, one request at a time on each connection.
    Two,
}

enum Sender {
    One(SendRequest<Empty<Bytes>>),
    Two(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

/// Kills and reaps the child waypoint when dropped.
struct ChildWaypoint(Child);

impl Drop for ChildWaypoint {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct InProcessWaypoint {
    address: SocketAddr,
    expect_filter: bool,
    _waypoint: Waypoint,
    path: Option<PathBuf>,
}

impl InProcessWaypoint {
    /// The filter's response header is there exactly when a filter is configured.
    fn check(&self, headers: &http::HeaderMap) {
        assert_eq!(
            headers.contains_key("x-frame-options"),
            self.expect_filter,
            "the filter runs exactly when configured: {headers:?}"
        );
    }
}

impl Drop for InProcessWaypoint {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

struct Connection {
    sender: Sender,
    /// The service's host name, sent as `host` / `:authority`.
    host: &'static str,
}

impl Connection {
    /// One GET, its whole response read; the response headers.
    async fn get(&mut self) -> Result<http::HeaderMap, String> {
        // HTTP/2 carries the authority in the URI (`:authority`); HTTP/1.1 in origin form.
        let uri = match self.sender {
            Sender::One(_) => "/api/v1/items?page=2".to_owned(),
            Sender::Two(_) => format!("http://{}/api/v1/items?page=2", self.host),
        };
        let request = Request::get(uri)
            .header("host", self.host)
            .header("user-agent", "ambit-bench")
            .header("accept", "*/*")
            .header("x-debug", "1")
            .body(Empty::new())
            .expect("request");
        let response = match &mut self.sender {
            Sender::One(sender) => {
                sender.ready().await.map_err(|e| e.to_string())?;
                sender.send_request(request).await
            }
            Sender::Two(sender) => {
                sender.ready().await.map_err(|e| e.to_string())?;
                sender.send_request(request).await
            }
        }
        .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        body.collect().await.map_err(|e| e.to_string())?;
        if parts.status != StatusCode::OK {
            return Err(format!("status {}", parts.status));
        }
        Ok(parts.headers)
    }
}

/// The pods' gRPC echo: each request's messages back as they arrive, then `grpc-status: 0`.
struct GrpcEcho {
    request: Incoming,
    done: bool,
}

impl Body for GrpcEcho {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        while !self.done {
            match ready!(Pin::new(&mut self.request).poll_frame(cx)) {
                Some(Ok(frame)) if frame.is_data() => return Poll::Ready(Some(Ok(frame))),
                Some(Ok(_trailers)) => {}
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => {
                    self.done = true;
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
            }
        }
        Poll::Ready(None)
    }
}

/// A request body of `left` copies of one gRPC message, produced as fast as flow control takes
/// them.
struct Repeated {
    message: Bytes,
    left: usize,
}

impl Body for Repeated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        self.left -= 1;
        Poll::Ready(Some(Ok(Frame::data(self.message.clone()))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact((self.left * self.message.len()) as u64)
    }
}

type GrpcSender = hyper::client::conn::http2::SendRequest<UnsyncBoxBody<Bytes, Infallible>>;

/// One length-prefixed, uncompressed gRPC message of `size` payload bytes.
fn grpc_message(size: usize) -> Bytes {
    let mut message = Vec::with_capacity(5 + size);
    message.push(0);
    message.extend_from_slice(&(size as u32).to_be_bytes());
    message.resize(5 + size, 0x61);
    Bytes::from(message)
}

/// One gRPC call with `body`: the echoed bytes once `grpc-status: 0` ended them.
async fn grpc_call(
    sender: &mut GrpcSender,
    method: &str,
    body: UnsyncBoxBody<Bytes, Infallible>,
) -> Result<usize, String> {
    let request = Request::post(format!("http://{HOST}:{GRPC_PORT}/bench.Echo/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .expect("gRPC request");
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let mut body = response.into_body();
    let mut echoed = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Some(data) = frame.data_ref() {
            echoed += data.len();
        } else if let Some(trailers) = frame.trailers_ref() {
            return match trailers.get("grpc-status") {
                Some(status) if status == "0" => Ok(echoed),
                status => Err(format!("grpc-status {status:?}")),
            };
        }
    }
    Err("the response ended without trailers".into())
}

impl Bench {
    /// Unary calls/s and latency, then one bidi stream's throughput, over one HTTP/2
    /// connection to the gRPC port.
    async fn grpc(&self, waypoint: Option<SocketAddr>, config: &Config) -> GrpcFigures {
        let request = tunnel_request(waypoint, 0, GRPC_VIP, GRPC_PORT);
        let tunnel = TokioIo::new(self.client.connect(&request).await.expect("gRPC tunnel"));
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), tunnel)
                .await
                .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        let message = grpc_message(UNARY_MESSAGE);
        let unary = |message: &Bytes| Full::new(message.clone()).boxed_unsync();
        let echoed = grpc_call(&mut sender, "Unary", unary(&message)).await;
        assert_eq!(echoed, Ok(message.len()), "the first call is echoed");

        let measuring = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let mut calls = JoinSet::new();
        for _ in 0..config.conns {
            let (measuring, stop, errors) = (measuring.clone(), stop.clone(), errors.clone());
            let (mut sender, message) = (sender.clone(), message.clone());
            calls.spawn(async move {
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let result = grpc_call(&mut sender, "Unary", unary(&message)).await;
                    if !measuring.load(Ordering::Relaxed) {
                        continue;
                    }
                    match result {
                        Ok(n) if n == message.len() => samples.push(started.elapsed()),
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                samples
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        measuring.store(true, Ordering::Relaxed);
        let wall = Instant::now();
        tokio::time::sleep(Duration::from_secs(config.seconds)).await;
        measuring.store(false, Ordering::Relaxed);
        let wall = wall.elapsed();
        stop.store(true, Ordering::Relaxed);
        let mut samples = Vec::new();
        while let Some(done) = calls.join_next().await {
            samples.extend(done.expect("call task"));
        }
        let per_second = samples.len() as f64 / wall.as_secs_f64();

        let count = BIDI_BYTES / BIDI_MESSAGE;
        let stream = Repeated {
            message: grpc_message(BIDI_MESSAGE),
            left: count,
        };
        let started = Instant::now();
        let echoed = grpc_call(&mut sender, "Bidi", stream.boxed_unsync()).await;
        let bidi = BIDI_BYTES as f64 / MIB as f64 / started.elapsed().as_secs_f64();
        assert_eq!(
            echoed,
            Ok(count * (5 + BIDI_MESSAGE)),
            "the bidi stream is echoed whole"
        );
        GrpcFigures {
            latencies: Latencies::new(samples, Duration::MAX),
            per_second,
            errors: errors.load(Ordering::Relaxed),
            bidi,
        }
    }

    /// Bulk throughput and ping-pong round trips over one tunnel to the TCP echo port.
    async fn l4(&self, waypoint: Option<SocketAddr>, config: &Config) -> L4Figures {
        let request = tunnel_request(waypoint, 0, TCP_VIP, TCP_PORT);
        let tunnel = self.client.connect(&request).await.expect("L4 tunnel");
        let (mut read, mut write) = tokio::io::split(tunnel);
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            let chunk = vec![0x5a; 64 * 1024];
            for _ in 0..BULK_BYTES / chunk.len() {
                write.write_all(&chunk).await.expect("bulk write");
            }
            write
        });
        let mut buf = vec![0; 64 * 1024];
        let mut echoed = 0;
        while echoed < BULK_BYTES {
            let n = read.read(&mut buf).await.expect("bulk read");
            assert!(n > 0, "the echo closed after {echoed} bytes");
            echoed += n;
        }
        let bulk = BULK_BYTES as f64 / MIB as f64 / started.elapsed().as_secs_f64();
        let mut write = writer.await.expect("writer");

        let ping = [0x42u8; 64];
        let mut pong = [0u8; 64];
        let mut rtts = Vec::new();
        let until = Instant::now() + Duration::from_secs(config.seconds);
        while Instant::now() < until {
            let sent = Instant::now();
            write.write_all(&ping).await.expect("ping");
            read.read_exact(&mut pong).await.expect("pong");
            rtts.push(sent.elapsed());
        }
        assert_eq!(pong, ping, "the echo changed the bytes");
        let round_trips = rtts.len() as f64 / config.seconds as f64;
        rtts.sort();
        let at = |q: f64| rtts[((rtts.len() - 1) as f64 * q) as usize];
        L4Figures {
            bulk,
            round_trips,
            p50: at(0.5),
            p99: at(0.99),
        }
    }
}

// --- Figures ---

struct L4Figures {
    /// MiB/s sent one way (and echoed back).
    bulk: f64,
    round_trips: f64,
    p50: Duration,
    p99: Duration,
}

impl L4Figures {
    fn print(&self, name: &str) {
        println!(
            "  {name:<24}{:>12.0}{:>16.0}{:>11} µs{:>9} µs",
            self.bulk,
            self.round_trips,
            self.p50.as_micros(),
            self.p99.as_micros()
        );
    }
}

struct GrpcFigures {
    /// Unary calls.
    latencies: Latencies,
    per_second: f64,
    errors: u64,
    /// MiB/s sent one way (and echoed back) on the bidi stream.
    bidi: f64,
}

impl GrpcFigures {
    fn print(&self, name: &str) {
        let micros = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
        println!(
            "  {name:<24}{:>10.0}{:>12}{:>12}{:>8}{:>14.0}",
            self.per_second,
            micros(self.latencies.quantile(0.5)),
            micros(self.latencies.quantile(0.99)),
            self.errors,
            self.bidi
        );
    }
}

struct Rate {
    per_second: f64,
    cpu_per_request: Option<f64>,
    errors: u64,
}

impl Rate {
    fn print(&self, name: &str, baseline: Option<&Rate>) {
        let micros =
            |seconds: Option<f64>| seconds.map_or("?".into(), |s| format!("{:.1}", s * 1e6));
        let added = baseline
            .and_then(|b| self.cpu_per_request.zip(b.cpu_per_request))
            .map_or(String::from("-"), |(a, b)| {
                format!("{:+.1} µs", (a - b) * 1e6)
            });
        println!(
            "  {name:<24}{:>12.0}{:>16}{:>18}{:>10}",
            self.per_second,
            micros(self.cpu_per_request),
            added,
            self.errors
        );
    }
}

struct Latencies {
    sorted: Vec<Duration>,
    /// Requests slower than the interval between sends.
    slow: usize,
}

impl Latencies {
    fn new(mut samples: Vec<Duration>, interval: Duration) -> Self {
        samples.sort();
        Latencies {
            slow: samples.iter().filter(|&&d| d > interval).count(),
            sorted: samples,
        }
    }

    fn quantile(&self, q: f64) -> Duration {
        let n = self.sorted.len();
        self.sorted[((q * n as f64).ceil() as usize).clamp(1, n) - 1]
    }

    fn row(&self) -> [Duration; 5] {
        [
            self.quantile(0.5),
            self.quantile(0.99),
            self.quantile(0.999),
            *self.sorted.last().expect("samples"),
            self.sorted.iter().sum::<Duration>() / self.sorted.len() as u32,
        ]
    }

    fn print(&self, name: &str, baseline: Option<&Latencies>) {
        let cells: Vec<String> = self
            .row()
            .iter()
            .map(|d| format!("{:.0} µs", d.as_secs_f64() * 1e6))
            .collect();
        println!(
            "  {name:<24}{:>10}{:>10}{:>10}{:>10}{:>10}{:>8}",
            cells[0], cells[1], cells[2], cells[3], cells[4], self.slow
        );
        if let Some(baseline) = baseline {
            let added: Vec<String> = self
                .row()
                .iter()
                .zip(baseline.row())
                .map(|(a, b)| format!("{:+.0} µs", (a.as_secs_f64() - b.as_secs_f64()) * 1e6))
                .collect();
            println!(
                "  {:<24}{:>10}{:>10}{:>10}{:>10}{:>10}",
                "  added vs direct", added[0], added[1], added[2], added[3], added[4]
            );
        }
    }
}

struct Neighbour {
    per_second: f64,
    p99: Duration,
    /// `other`'s requests answered other than 200 while `echo` was measured.
    other_failed: u64,
}

impl Neighbour {
    fn print(&self, name: &str) {
        println!(
            "  {name:<40}{:>12.0}{:>9.0} µs{:>14}",
            self.per_second,
            self.p99.as_secs_f64() * 1e6,
            self.other_failed
        );
    }
}

struct Memory {
    started: Option<u64>,
    one_request: Option<u64>,
    open: Option<u64>,
    closed: Option<u64>,
    again: Option<u64>,
    conns: usize,
}

impl Memory {
    fn print(&self, name: &str) {
        let mib = |bytes: Option<u64>| {
            bytes.map_or("?".into(), |b| format!("{:.1} MiB", b as f64 / MIB as f64))
        };
        let per_conn = self
            .open
            .zip(self.one_request)
            .map_or("?".into(), |(open, idle)| {
                format!(
                    "{:.1} KiB",
                    (open as f64 - idle as f64) / self.conns as f64 / 1024.0
                )
            });
        println!(
            "  {name:<24}{:>10}{:>12}{:>12}{:>12}{:>12}{:>12}",
            mib(self.started),
            mib(self.one_request),
            mib(self.open),
            per_conn,
            mib(self.closed),
            mib(self.again)
        );
    }
}

/// A process's VmRSS in bytes.
fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
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
