//! Towards endpoints: which endpoint takes an attempt (least request, Istio's default: of two
//! candidates, the one with fewer requests in flight; the first candidate goes round robin and
//! wins ties, so an idle service is served in turn; ejected endpoints sit out), outlier ejection (Envoy's consecutive-5xx detector
//! with its defaults: 5 in a row eject an endpoint for 30 s × the times it was ejected), and the
//! upstream HTTP/1.1 connections themselves: an HBONE tunnel to `podIP:15008` (plain TCP for
//! endpoints outside the mesh), kept alive and reused for later requests from the same client.
//! HTTP/2 upstreams (ports declared `http2`, `grpc` or `grpc-web`, and HTTP/2 requests on
//! undeclared ports, as Istio's clusters decide it) share a connection per pool key, its
//! streams multiplexed, kept alive with PINGs; once a connection carries
//! `h2_max_concurrent_streams` streams, the next request opens another (Envoy's
//! `max_concurrent_streams`), so requests never queue behind our own cap. A connection the
//! endpoint closes (GOAWAY) is replaced, and requests it refused unprocessed are retried.
//!
//! Pooled connections are keyed by the endpoint, the target and the client address the tunnel's
//! `forwarded` header names, because the destination ztunnel takes the client's address from
//! that header: a connection opened for one client must never carry another client's requests.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambit_mesh::hbone::client::{ClientError, TunnelRequest};
use ambit_mesh::hbone::server::Upstream as UpstreamIo;
use ambit_mesh::hbone::{ConnectHeaders, HBONE_PORT};
use ambit_mesh::state::AppProtocol;
use ambit_mesh::state::{HealthStatus, Protocol, Service, Snapshot, Workload};
use http::{Response, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1::SendRequest, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::body::{BoxBody, ReplayBody};
use super::filters::RequestHead;
use super::forward::upstream_request;
use super::inbound::TunnelInfo;
use super::{Context, ProxySettings};

/// How many picks may be spent looking for an endpoint not tried yet (Envoy's
/// `host_selection_retry_max_attempts`, as Istio sets it).
const HOST_SELECTION_ATTEMPTS: usize = 5;
/// The longest ejection, however often an endpoint was ejected (Envoy's `max_ejection_time`).
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// Where a request goes: a Service port (load balanced) or one workload (pod-addressed traffic:
/// policy only, no load balancing).
#[derive(Clone, Debug)]
pub enum Target {
    Service { service: Arc<Service>, port: u16 },
    Workload { workload: Arc<Workload>, port: u16 },
}

impl Target {
    /// The protocol requests go upstream in, as Istio's clusters decide it: ports declared
    /// `http2`, `grpc` or `grpc-web` speak HTTP/2 (prior knowledge), ports declared `http`
    /// HTTP/1.1, and undeclared ports (and pod-addressed traffic) the client's own protocol
    /// (Envoy's `USE_DOWNSTREAM_PROTOCOL`, which Istio sets for sniffed ports).
    pub fn upstream_protocol(&self, downstream: Version) -> UpstreamProtocol {
        let declared = match self {
            Target::Service { service, port } => service.app_protocols.get(port).copied(),
            Target::Workload { .. } => None,
        };
        match declared {
            Some(AppProtocol::Http2 | AppProtocol::Grpc) => UpstreamProtocol::Http2,
            Some(_) => UpstreamProtocol::Http1,
            None if downstream == Version::HTTP_2 => UpstreamProtocol::Http2,
            None => UpstreamProtocol::Http1,
        }
    }

    /// The addressed Service's (namespace, name), `None` for pod-addressed traffic, and the
    /// port: what policies and plugins are selected by.
    pub fn service_and_port(&self) -> (Option<(&str, &str)>, u16) {
        match self {
            Target::Service { service, port } => (
                Some((service.namespace.as_str(), service.name.as_str())),
                *port,
            ),
            Target::Workload { port, .. } => (None, *port),
        }
    }
}

/// The HTTP version spoken to an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    /// HTTP/1.1 on a connection of its own, never pooled: it becomes the upgraded stream
    /// (WebSocket; Envoy too upgrades over HTTP/1.1 only).
    Upgrade,
}

/// The endpoint chosen for one attempt.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub service: Option<Arc<Service>>,
    pub workload: Arc<Workload>,
    pub port: u16,
}

/// Why an attempt got no response.
#[derive(Debug)]
pub enum Failure {
    /// No connection to the endpoint; the request was not sent. `retryable`: another endpoint
    /// may do better (false for configuration problems).
    Connect { message: String, retryable: bool },
    /// The connection failed after the request was (partly) sent, before response headers.
    Reset(String),
    /// The client's request body broke off while it was being sent (malformed chunked framing,
    /// a reset): the endpoint is not to blame and no retry can help.
    ClientBody(String),
}

/// What a failed exchange on an upstream connection means for the attempt. Hyper reports an
/// error of the request body it was sending as a "user" error. An HTTP/2 stream the endpoint
/// refused (`REFUSED_STREAM`, or past the last stream of its GOAWAY) was never processed, so
/// another endpoint or connection may take it (Envoy's `refused-stream`, in Istio's default
/// retry policy).
fn exchange_failure(err: hyper::Error) -> Failure {
    if err.is_user() {
        return Failure::ClientBody(err.to_string());
    }
    let refused = std::error::Error::source(&err)
        .and_then(|e| e.downcast_ref::<h2::Error>())
        .and_then(h2::Error::reason)
        == Some(h2::Reason::REFUSED_STREAM);
    if refused {
        Failure::Connect {
            message: format!("the endpoint refused the stream: {err}"),
            retryable: true,
        }
    } else {
        Failure::Reset(err.to_string())
    }
}

/// One endpoint's outlier record.
#[derive(Debug, Default)]
struct Health {
    consecutive_errors: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

type PoolKey = (String, SocketAddr, Option<IpAddr>, Option<String>);

struct Idle {
    sender: SendRequest<BoxBody>,
    since: Instant,
}

/// One pool key's HTTP/2 connections. The async lock makes requests that arrive while one is
/// being opened wait for it instead of each opening another.
type H2Slot = Arc<tokio::sync::Mutex<Vec<H2Connection>>>;

struct H2Connection {
    sender: http2::SendRequest<BoxBody>,
    last_used: Instant,
    /// Streams open on it: requests sent whose response bodies are not done with.
    streams: Arc<AtomicUsize>,
}

impl H2Connection {
    fn usable(&self, idle_timeout: Duration) -> bool {
        self.sender.is_ready() && self.last_used.elapsed() < idle_timeout
    }
}

/// Requests (or L4 connections) in flight at one endpoint, and a request's stream on the
/// multiplexed connection that carries it, counted while this lives.
pub struct InFlight {
    endpoint: Arc<AtomicUsize>,
    stream: Option<Arc<AtomicUsize>>,
}

/// Counts one more on `count`, until the returned handle is dropped (by [`InFlight`]).
fn count_one(count: &Arc<AtomicUsize>) -> Arc<AtomicUsize> {
    count.fetch_add(1, Ordering::Relaxed);
    count.clone()
}

impl InFlight {
    /// The request now goes on the stream counted by `streams` (a retry on another connection
    /// stops counting on the previous one).
    fn set_stream(&mut self, streams: &Arc<AtomicUsize>) {
        if let Some(previous) = self.stream.replace(count_one(streams)) {
            previous.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.fetch_sub(1, Ordering::Relaxed);
        if let Some(stream) = &self.stream {
            stream.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Endpoint choice, outlier state and idle connections, shared by all requests.
pub struct Upstreams {
    settings: ProxySettings,
    next_pick: AtomicUsize,
    health: Mutex<HashMap<String, Health>>,
    /// Requests in flight per endpoint (workload uid).
    in_flight: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    idle: Arc<Mutex<HashMap<PoolKey, Vec<Idle>>>>,
    /// Multiplexed HTTP/2 connections.
    h2: Mutex<HashMap<PoolKey, H2Slot>>,
}

impl Upstreams {
    pub fn new(settings: ProxySettings) -> Self {
        Upstreams {
            settings,
            next_pick: AtomicUsize::new(0),
            health: Mutex::default(),
            in_flight: Mutex::default(),
            idle: Arc::default(),
            h2: Mutex::default(),
        }
    }

    /// A round-robin starting point for one request's attempts.
    pub fn next_base(&self) -> usize {
        self.next_pick.fetch_add(1, Ordering::Relaxed)
    }

    /// Counts a request (or connection) at `workload` until the returned guard is dropped.
    pub fn start(&self, workload: &Workload) -> InFlight {
        let mut in_flight = self.in_flight.lock().expect("in-flight lock");
        if in_flight.len() > 4096 {
            // Endpoints that went away leave idle counters behind.
            in_flight.retain(|_, count| Arc::strong_count(count) > 1);
        }
        InFlight {
            endpoint: count_one(in_flight.entry(workload.uid.clone()).or_default()),
            stream: None,
        }
    }

    fn in_flight(&self, workload: &Workload) -> usize {
        self.in_flight
            .lock()
            .expect("in-flight lock")
            .get(&workload.uid)
            .map_or(0, |count| count.load(Ordering::Relaxed))
    }

    /// Picks the endpoint for attempt `attempt`, preferring one not in `tried` and one not
    /// ejected, then the less busy of two candidates. `None`: the Service has no healthy
    /// endpoint serving the port.
    pub fn pick(
        &self,
        snapshot: &Snapshot,
        target: &Target,
        base: usize,
        tried: &[Arc<Workload>],
    ) -> Option<Endpoint> {
        let (service, port) = match target {
            Target::Workload { workload, port } => {
                return Some(Endpoint {
                    service: None,
                    workload: workload.clone(),
                    port: *port,
                })
            }
            Target::Service { service, port } => (service, *port),
        };
        let key = service.key();
        let all: Vec<(&Arc<Workload>, u16)> = snapshot
            .endpoints(&key)
            .iter()
            .filter(|w| w.status == HealthStatus::Healthy)
            .filter_map(|w| {
                let target_port = w.target_port(&key, port).or_else(|| {
                    service
                        .ports
                        .get(&port)
                        .map(|&t| if t == 0 { port } else { t })
                })?;
                Some((w, target_port))
            })
            .collect();
        if all.is_empty() {
            return None;
        }
        // Ejected endpoints sit out unless every endpoint is ejected (Envoy's panic mode: better
        // a suspect endpoint than none).
        let now = Instant::now();
        let health = self.health.lock().expect("health lock");
        let usable: Vec<(&Arc<Workload>, u16)> = all
            .iter()
            .copied()
            .filter(|(w, _)| {
                health
                    .get(&w.uid)
                    .and_then(|h| h.ejected_until)
                    .is_none_or(|until| until <= now)
            })
            .collect();
        drop(health);
        let candidates = if usable.is_empty() { &all } else { &usable };
        let mut chosen = None;
        let len = candidates.len();
        for offset in 0..HOST_SELECTION_ATTEMPTS {
            let first = base.wrapping_add(offset) % len;
            let mut choice = candidates[first];
            if len > 1 {
                // Power of two choices: a second candidate at random, never the first again.
                let second =
                    candidates[(first + 1 + super::forward::random() as usize % (len - 1)) % len];
                if self.in_flight(second.0) < self.in_flight(choice.0) {
                    choice = second;
                }
            }
            let (workload, target_port) = choice;
            let fresh = !tried.iter().any(|t| t.uid == workload.uid);
            chosen = Some(Endpoint {
                service: Some(service.clone()),
                workload: workload.clone(),
                port: target_port,
            });
            if fresh {
                break;
            }
        }
        chosen
    }

    /// Records an attempt's outcome for outlier detection: `failed` is a 5xx or a connect
    /// failure; anything else resets the endpoint's count.
    pub fn record(&self, workload: &Workload, failed: bool) {
        let mut health = self.health.lock().expect("health lock");
        let h = health.entry(workload.uid.clone()).or_default();
        if !failed {
            h.consecutive_errors = 0;
            return;
        }
        h.consecutive_errors += 1;
        if h.consecutive_errors >= self.settings.outlier_consecutive_errors {
            h.consecutive_errors = 0;
            h.ejections += 1;
            let ejection = (self.settings.outlier_base_ejection * h.ejections).min(MAX_EJECTION);
            h.ejected_until = Some(Instant::now() + ejection);
            tracing::info!(endpoint = %workload.uid, ?ejection, "endpoint ejected after consecutive failures");
        }
    }

    /// Sends one request to `endpoint` on a pooled connection when one is idle, otherwise on a
    /// new one, and returns as soon as the response headers arrive. The body is taken only once
    /// a connection is there, so a connect failure leaves it for the next attempt. An upgrade
    /// request gets an HTTP/1.1 connection of its own, never pooled: it becomes the upgraded
    /// stream. An HTTP/2 request's stream is counted on its connection by `in_flight`.
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        &self,
        context: &Context,
        tunnel: &TunnelInfo,
        endpoint: &Endpoint,
        head: &RequestHead,
        body: &mut ReplayBody,
        protocol: UpstreamProtocol,
        in_flight: &mut InFlight,
    ) -> Result<Response<Incoming>, Failure> {
        let upgrade = protocol == UpstreamProtocol::Upgrade;
        if protocol == UpstreamProtocol::Http2 {
            return self
                .send_h2(context, tunnel, endpoint, head, body, in_flight)
                .await;
        }
        let key = pool_key(tunnel, endpoint);
        let build = |body: &mut ReplayBody| take_request(head, body, protocol);
        let mut request = None;
        while let Some(mut sender) = (!upgrade).then(|| self.checkout(&key)).flatten() {
            let unsent = match request.take() {
                Some(r) => r,
                None => build(body)?,
            };
            match sender.try_send_request(unsent).await {
                Ok(response) => {
                    self.checkin(key, sender);
                    return Ok(response);
                }
                Err(mut err) => match err.take_message() {
                    // The idle connection was gone before the request left: nothing was sent,
                    // so the request goes on another connection as it is.
                    Some(unsent) => request = Some(unsent),
                    None => return Err(exchange_failure(err.into_error())),
                },
            }
        }
        let io = open(context, tunnel, endpoint).await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| Failure::Reset(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(err) = connection.with_upgrades().await {
                tracing::debug!(error = %err, "upstream HTTP/1.1 connection ended with an error");
            }
        });
        let request = match request {
            Some(r) => r,
            None => build(body)?,
        };
        let response = sender
            .send_request(request)
            .await
            .map_err(exchange_failure)?;
        if !upgrade {
            self.checkin(key, sender);
        }
        Ok(response)
    }

    /// [`send`](Self::send) over HTTP/2: on one of the key's connections while it takes new
    /// streams, else on a new one. A request the connection handed back unsent (it closed first)
    /// goes on the next connection as it is.
    async fn send_h2(
        &self,
        context: &Context,
        tunnel: &TunnelInfo,
        endpoint: &Endpoint,
        head: &RequestHead,
        body: &mut ReplayBody,
        in_flight: &mut InFlight,
    ) -> Result<Response<Incoming>, Failure> {
        let key = pool_key(tunnel, endpoint);
        let mut request = None;
        // A pooled connection may turn out closed; the second round opens a fresh one.
        for _ in 0..2 {
            let mut sender = self
                .h2_sender(context, tunnel, endpoint, &key, in_flight)
                .await?;
            let unsent = match request.take() {
                Some(r) => r,
                None => take_request(head, body, UpstreamProtocol::Http2)?,
            };
            match sender.try_send_request(unsent).await {
                Ok(response) => return Ok(response),
                Err(mut err) => match err.take_message() {
                    Some(unsent) => request = Some(unsent),
                    None => return Err(exchange_failure(err.into_error())),
                },
            }
        }
        Err(Failure::Connect {
            message: "the endpoint's HTTP/2 connection closed before the request was sent".into(),
            retryable: true,
        })
    }

    /// A connection of the key with room for one more stream, counted on it in `in_flight`;
    /// one is opened when none has room (each carries `h2_max_concurrent_streams`) or takes new
    /// streams (it closed, the endpoint sent GOAWAY, or it sat unused past the idle timeout).
    async fn h2_sender(
        &self,
        context: &Context,
        tunnel: &TunnelInfo,
        endpoint: &Endpoint,
        key: &PoolKey,
        in_flight: &mut InFlight,
    ) -> Result<http2::SendRequest<BoxBody>, Failure> {
        let slot = self
            .h2
            .lock()
            .expect("h2 pool lock")
            .entry(key.clone())
            .or_default()
            .clone();
        let mut connections = slot.lock().await;
        let idle_timeout = self.settings.pool_idle_timeout;
        connections.retain(|c| c.usable(idle_timeout));
        let cap = self.settings.h2_max_concurrent_streams.max(1);
        if let Some(c) = connections
            .iter_mut()
            .find(|c| c.streams.load(Ordering::Relaxed) < cap)
        {
            c.last_used = Instant::now();
            in_flight.set_stream(&c.streams);
            return Ok(c.sender.clone());
        }
        self.sweep_h2(key);
        let io = open(context, tunnel, endpoint).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(self.settings.h2_keepalive_interval)
            .keep_alive_timeout(self.settings.h2_keepalive_timeout)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| Failure::Connect {
                message: format!("HTTP/2 handshake: {e}"),
                retryable: true,
            })?;
        let uid = endpoint.workload.uid.clone();
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(endpoint = %uid, error = %err, "upstream HTTP/2 connection ended with an error");
            }
        });
        let streams = Arc::default();
        in_flight.set_stream(&streams);
        connections.push(H2Connection {
            sender: sender.clone(),
            last_used: Instant::now(),
            streams,
        });
        Ok(sender)
    }

    /// Drops the HTTP/2 connections of other keys that closed or sat unused past the idle
    /// timeout (their clients or endpoints went away): run whenever a connection is opened, so
    /// the pool never holds more than what was recently in use.
    fn sweep_h2(&self, keep: &PoolKey) {
        let idle_timeout = self.settings.pool_idle_timeout;
        self.h2.lock().expect("h2 pool lock").retain(|key, slot| {
            key == keep
                // A slot locked is being opened or used right now.
                || slot
                    .try_lock()
                    .map_or(true, |c| c.iter().any(|c| c.usable(idle_timeout)))
        });
    }

    fn checkout(&self, key: &PoolKey) -> Option<SendRequest<BoxBody>> {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.get_mut(key)?;
        while let Some(entry) = list.pop() {
            if entry.sender.is_ready() && entry.since.elapsed() < self.settings.pool_idle_timeout {
                return Some(entry.sender);
            }
        }
        idle.remove(key);
        None
    }

    /// Returns the connection to the pool once it can take another request, i.e. once this
    /// response's body has been read to its end; a connection closed first is dropped.
    fn checkin(&self, key: PoolKey, mut sender: SendRequest<BoxBody>) {
        let idle = Arc::downgrade(&self.idle);
        let max = self.settings.pool_max_idle;
        tokio::spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            let Some(idle) = idle.upgrade() else {
                return;
            };
            let mut idle = idle.lock().expect("pool lock");
            let list = idle.entry(key).or_default();
            list.retain(|e| !e.sender.is_closed());
            if list.len() < max {
                list.push(Idle {
                    sender,
                    since: Instant::now(),
                });
            }
        });
    }
}

/// The request for one attempt, once a connection is there to take it.
fn take_request(
    head: &RequestHead,
    body: &mut ReplayBody,
    protocol: UpstreamProtocol,
) -> Result<http::Request<BoxBody>, Failure> {
    body.take()
        .map(|b| upstream_request(head, b, protocol))
        .ok_or_else(|| Failure::Reset("the request body was already sent".into()))
}

fn pool_key(tunnel: &TunnelInfo, endpoint: &Endpoint) -> PoolKey {
    let target = SocketAddr::new(
        endpoint
            .workload
            .workload_ips
            .first()
            .copied()
            .unwrap_or(IpAddr::from([0, 0, 0, 0])),
        endpoint.port,
    );
    (
        endpoint.workload.uid.clone(),
        target,
        Some(tunnel.client_address().ip()),
        endpoint.service.as_ref().map(|s| s.hostname.clone()),
    )
}

/// Opens the byte stream to an endpoint: HBONE to `podIP:15008` when it is in the mesh, plain
/// TCP otherwise.
pub(super) async fn open(
    context: &Context,
    tunnel: &TunnelInfo,
    endpoint: &Endpoint,
) -> Result<Box<dyn UpstreamIo>, Failure> {
    let connect = |message: String, retryable: bool| Failure::Connect { message, retryable };
    let Some(&ip) = endpoint.workload.workload_ips.first() else {
        return Err(connect(
            format!("workload {} has no address", endpoint.workload.uid),
            true,
        ));
    };
    let target = SocketAddr::new(ip, endpoint.port);
    if endpoint.workload.protocol == Protocol::Tcp {
        return match TcpStream::connect(target).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                Ok(Box::new(stream))
            }
            Err(err) => Err(connect(format!("{target}: {err}"), true)),
        };
    }
    let identity = endpoint
        .workload
        .identity()
        .map_err(|e| connect(e.to_string(), true))?;
    let request = TunnelRequest {
        source: context.identity.clone(),
        destination_identities: vec![identity],
        hbone_address: SocketAddr::new(ip, HBONE_PORT),
        target,
        headers: ConnectHeaders {
            forwarded_for: Some(tunnel.client_address()),
            forwarded_host: endpoint.service.as_ref().map(|s| s.hostname.clone()),
            baggage: None,
            traceparent: tunnel.connect.headers.traceparent.clone(),
        },
    };
    match context.client.connect(&request).await {
        Ok(stream) => Ok(Box::new(stream)),
        Err(err) => {
            let retryable = !matches!(
                err,
                ClientError::Certificate { .. }
                    | ClientError::Config { .. }
                    | ClientError::BadRequest(_)
            );
            Err(connect(err.to_string(), retryable))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_mesh::state::local::LocalConfig;

    fn snapshot(yaml: &str) -> Snapshot {
        let path = std::path::Path::new("t.yaml");
        LocalConfig::parse(yaml, path)
            .unwrap()
            .into_snapshot(path)
            .unwrap()
    }

    #[test]
    fn five_consecutive_failures_eject_an_endpoint_until_all_are_ejected() {
        let yaml = r#"
workloads:
- {uid: a, name: a, namespace: default, serviceAccount: echo, workloadIps: ["10.0.0.1"], services: {default/echo.default.svc.cluster.local: {80: 8080}}}
- {uid: b, name: b, namespace: default, serviceAccount: echo, workloadIps: ["10.0.0.2"], services: {default/echo.default.svc.cluster.local: {80: 8080}}}
services:
- {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: ["/10.96.0.1"], ports: {80: 8080}}
"#;
        let snapshot = snapshot(yaml);
        let service = snapshot.services().next().unwrap().clone();
        let target = Target::Service { service, port: 80 };
        let upstreams = Upstreams::new(ProxySettings::default());
        let picks = |n: usize| -> Vec<String> {
            (0..n)
                .map(|i| {
                    upstreams
                        .pick(&snapshot, &target, i, &[])
                        .unwrap()
                        .workload
                        .uid
                        .clone()
                })
                .collect()
        };
        assert_eq!(picks(2), ["a", "b"]);
        let a = snapshot.workload("a").unwrap().clone();
        // Four failures and a success: the count starts again.
        for _ in 0..4 {
            upstreams.record(&a, true);
        }
        upstreams.record(&a, false);
        upstreams.record(&a, true);
        assert_eq!(picks(2), ["a", "b"]);
        for _ in 0..4 {
            upstreams.record(&a, true);
        }
        assert_eq!(picks(4), ["b", "b", "b", "b"], "a is ejected");
        // Every endpoint ejected: all are used again rather than none.
        let b = snapshot.workload("b").unwrap().clone();
        for _ in 0..5 {
            upstreams.record(&b, true);
        }
        assert_eq!(picks(2), ["a", "b"]);
    }

    #[test]
    fn upstream_protocol_follows_the_declared_protocol_else_the_clients() {
        let yaml = r#"
workloads: []
services:
- {name: s, namespace: default, hostname: s.default.svc.cluster.local, vips: ["/10.96.0.1"], ports: {1: 1, 2: 2, 3: 3, 4: 4}, appProtocols: {1: grpc, 2: http2, 3: http11}}
"#;
        let snapshot = snapshot(yaml);
        let service = snapshot.services().next().unwrap().clone();
        let protocol = |port, version| {
            Target::Service {
                service: service.clone(),
                port,
            }
            .upstream_protocol(version)
        };
        use UpstreamProtocol::{Http1, Http2};
        assert_eq!(protocol(1, Version::HTTP_11), Http2, "grpc");
        assert_eq!(protocol(2, Version::HTTP_11), Http2, "http2");
        assert_eq!(protocol(3, Version::HTTP_2), Http1, "http");
        assert_eq!(
            protocol(4, Version::HTTP_2),
            Http2,
            "undeclared, client on HTTP/2"
        );
        assert_eq!(
            protocol(4, Version::HTTP_11),
            Http1,
            "undeclared, client on HTTP/1.1"
        );
    }

    #[test]
    fn busy_endpoints_lose_to_idle_ones_and_idle_ones_take_turns() {
        let yaml = r#"
workloads:
- {uid: a, name: a, namespace: default, workloadIps: ["10.0.0.1"], services: {default/echo.default.svc.cluster.local: {80: 8080}}}
- {uid: b, name: b, namespace: default, workloadIps: ["10.0.0.2"], services: {default/echo.default.svc.cluster.local: {80: 8080}}}
- {uid: c, name: c, namespace: default, workloadIps: ["10.0.0.3"], services: {default/echo.default.svc.cluster.local: {80: 8080}}}
services:
- {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: ["/10.96.0.1"], ports: {80: 8080}}
"#;
        let snapshot = snapshot(yaml);
        let service = snapshot.services().next().unwrap().clone();
        let target = Target::Service { service, port: 80 };
        let upstreams = Upstreams::new(ProxySettings::default());
        let pick = |i: usize| upstreams.pick(&snapshot, &target, i, &[]).unwrap();
        let uids =
            |n: usize| -> Vec<String> { (0..n).map(|i| pick(i).workload.uid.clone()).collect() };
        assert_eq!(uids(6), ["a", "b", "c", "a", "b", "c"], "idle: round robin");
        let a = snapshot.workload("a").unwrap().clone();
        let busy: Vec<InFlight> = (0..3).map(|_| upstreams.start(&a)).collect();
        assert_eq!(upstreams.in_flight(&a), 3);
        for i in 0..60 {
            assert_ne!(
                pick(i).workload.uid,
                "a",
                "pick {i} went to the busy endpoint"
            );
        }
        drop(busy);
        assert_eq!(upstreams.in_flight(&a), 0);
        assert_eq!(uids(3), ["a", "b", "c"]);
    }
}
