//! HBONE in: the handler takes each accepted `CONNECT`'s stream and serves it, on the stream's
//! own task, by what the addressed port carries: HTTP
//! (HTTP/1.1 or HTTP/2, told apart by the HTTP/2 preface; every request goes through the
//! [`pipeline`](super::pipeline)) or TCP ([`tcp`](super::tcp), proxied at L4). A Service port's
//! declared protocol decides; a port that declares none, and pod-addressed traffic, are
//! [sniffed](super::sniff).
//!
//! The client's address (`source.ip`, `ipBlocks`, the address the destination sees) is the
//! tunnel's peer unless its `forwarded: for` claim can be checked. In ambient the peer of a
//! waypoint is the source ztunnel, which tunnels from inside the client pod with that pod's
//! certificate: the claim then names an address of a workload with the identity the peer proved.
//! A waypoint identity may speak for any client it forwards. Any other claim is ignored, since a
//! peer holding just some mesh certificate could otherwise pick the address a policy allows.

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_mesh::hbone::server::{Accepted, ConnectHandler, ConnectRequest, Rejection};
use ambit_mesh::identity::BoxFuture;
use ambit_mesh::state::{Destination, Snapshot, Workload};
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};

use super::sniff::{self, Detected, Rewind};
use super::{pipeline, tcp, Context};

/// The largest request head (request line and headers) accepted: Envoy's default
/// `max_request_headers_kb` (60 KiB). Larger ones are answered 431 on HTTP/1.1 and reset on
/// HTTP/2.
const MAX_REQUEST_HEAD: usize = 60 * 1024;

/// One accepted tunnel, as each of its requests sees it.
pub struct TunnelInfo {
    pub connect: ConnectRequest,
    /// The client workload, if the state knows it.
    pub source: Option<Arc<Workload>>,
    /// The client's address as far as it can be trusted (module docs).
    client: SocketAddr,
}

impl TunnelInfo {
    /// A tunnel whose client is `connect`'s peer or, when the peer may make it, its
    /// `forwarded: for` claim (module docs).
    pub fn new(snapshot: &Snapshot, network: &str, connect: ConnectRequest) -> Self {
        let source = source_workload(snapshot, network, &connect);
        let client = match connect.headers.forwarded_for {
            Some(claimed)
                if source.is_some() || snapshot.is_waypoint_identity(&connect.peer_identity) =>
            {
                claimed
            }
            Some(claimed) => {
                tracing::info!(peer = %connect.peer_addr, identity = %connect.peer_identity, %claimed, "forwarded: for claim ignored: no workload with the peer's identity has that address; using the peer's address");
                connect.peer_addr
            }
            None => connect.peer_addr,
        };
        TunnelInfo {
            connect,
            source,
            client,
        }
    }

    /// The client's address: the `forwarded: for` claim when the peer may make it, else the
    /// peer's own.
    pub fn client_address(&self) -> SocketAddr {
        self.client
    }
}

/// The waypoint's [`ConnectHandler`]: accepts tunnels to services and workloads it knows.
pub struct Inbound {
    context: Arc<Context>,
}

impl Inbound {
    pub fn new(context: Arc<Context>) -> Self {
        Inbound { context }
    }
}

impl ConnectHandler for Inbound {
    fn connect(&self, request: ConnectRequest) -> BoxFuture<'_, Result<Accepted, Rejection>> {
        Box::pin(async move {
            let snapshot = self.context.state.load();
            if let Destination::Passthrough =
                snapshot.resolve(&self.context.network, request.target, 0)
            {
                return Err(Rejection::Unavailable(format!(
                    "{} is neither a service nor a workload this waypoint knows",
                    request.target
                )));
            }
            let tunnel = Arc::new(TunnelInfo::new(&snapshot, &self.context.network, request));
            let declared =
                declared_protocol(&snapshot, &self.context.network, tunnel.connect.target);
            let context = self.context.clone();
            Ok(Accepted::serve(move |stream| {
                serve_tunnel(context, tunnel, stream, declared)
            }))
        })
    }
}

/// The workload behind the tunnel: the one at the `forwarded: for` address, provided its identity
/// is the one the peer proved.
fn source_workload(
    snapshot: &Snapshot,
    network: &str,
    request: &ConnectRequest,
) -> Option<Arc<Workload>> {
    let address = request.headers.forwarded_for?;
    let workload = snapshot.workload_by_ip(network, address.ip())?;
    (workload.identity().ok()? == request.peer_identity).then(|| workload.clone())
}

/// What the addressed Service port declares it carries; `None` (sniff) for undeclared ports and
/// for pod-addressed traffic.
fn declared_protocol(snapshot: &Snapshot, network: &str, target: SocketAddr) -> Option<Detected> {
    let service = snapshot.service_by_vip(network, target.ip())?;
    let protocol = service.app_protocols.get(&target.port())?;
    Some(if protocol.is_http() {
        Detected::Http
    } else {
        Detected::Tcp
    })
}

/// Serves one tunnel at L7 or L4, detecting which when the port does not say.
async fn serve_tunnel<S>(
    context: Arc<Context>,
    tunnel: Arc<TunnelInfo>,
    mut io: S,
    declared: Option<Detected>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (protocol, read) = match declared {
        Some(protocol) => (protocol, Bytes::new()),
        None => sniff::detect(&mut io, context.settings.protocol_detection_timeout).await,
    };
    let io = Rewind::new(read, io);
    match protocol {
        Detected::Http => serve_http(context, tunnel, io).await,
        Detected::Tcp => tcp::serve(context, tunnel, io).await,
    }
}

/// Serves HTTP on one tunnel until the client closes it. Malformed requests get hyper's 400 (on
/// HTTP/1.1) or a stream reset (on HTTP/2); either ends only this tunnel.
async fn serve_http<S>(context: Arc<Context>, tunnel: Arc<TunnelInfo>, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let drain = context.drain.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        pipeline::serve(context.clone(), tunnel.clone(), request)
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client may half-close once its request is sent and still expect the response.
    builder
        .http1()
        .half_close(true)
        .max_buf_size(MAX_REQUEST_HEAD);
    builder
        .http2()
        .max_header_list_size(MAX_REQUEST_HEAD as u32);
    // With upgrades: a WebSocket handshake answered 101 turns the connection into a byte stream.
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    // Draining: the request in flight completes, then `connection: close` (HTTP/1.1) or GOAWAY
    // (HTTP/2) tells the client to go elsewhere, so keep-alive clients do not hold the drain to
    // its deadline.
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = drain.started() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(error = %err, "HTTP connection inside a tunnel ended with an error");
    }
}
