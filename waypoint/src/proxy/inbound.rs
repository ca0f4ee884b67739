//! HBONE in: the handler hands the HBONE server one end of an in-memory pipe to splice each
//! accepted `CONNECT` to, and serves the other end by what the addressed port carries: HTTP
//! (HTTP/1.1 or HTTP/2, told apart by the HTTP/2 preface; every request goes through the
//! [`pipeline`](super::pipeline)) or TCP ([`tcp`](super::tcp), proxied at L4). A Service port's
//! declared protocol decides; a port that declares none, and pod-addressed traffic, are
//! [sniffed](super::sniff).

use std::sync::Arc;

use ambit_mesh::hbone::server::{ConnectHandler, ConnectRequest, Rejection, Upstream};
use ambit_mesh::identity::BoxFuture;
use ambit_mesh::state::{Destination, Snapshot, Workload};
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream};

use super::sniff::{self, Detected, Rewind};
use super::{pipeline, tcp, Context};

/// Bytes buffered in each direction of the pipe between the tunnel and the HTTP server.
const PIPE_BUFFER: usize = 64 * 1024;
/// The largest request head (request line and headers) accepted: Envoy's default
/// `max_request_headers_kb` (60 KiB). Larger ones are answered 431 on HTTP/1.1 and reset on
/// HTTP/2.
const MAX_REQUEST_HEAD: usize = 60 * 1024;

/// One accepted tunnel, as each of its requests sees it.
pub struct TunnelInfo {
    pub connect: ConnectRequest,
    /// The client workload, if the state knows it.
    pub source: Option<Arc<Workload>>,
}

impl TunnelInfo {
    /// The client's address: what the source ztunnel said (`forwarded: for`), else the peer.
    pub fn client_address(&self) -> std::net::SocketAddr {
        self.connect
            .headers
            .forwarded_for
            .unwrap_or(self.connect.peer_addr)
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
    fn connect(
        &self,
        request: ConnectRequest,
    ) -> BoxFuture<'_, Result<Box<dyn Upstream>, Rejection>> {
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
            let source = source_workload(&snapshot, &self.context.network, &request);
            let tunnel = Arc::new(TunnelInfo {
                connect: request,
                source,
            });
            let declared =
                declared_protocol(&snapshot, &self.context.network, tunnel.connect.target);
            let (tunnel_end, proxy_end) = tokio::io::duplex(PIPE_BUFFER);
            tokio::spawn(serve_tunnel(
                self.context.clone(),
                tunnel,
                proxy_end,
                declared,
            ));
            Ok(Box::new(tunnel_end) as Box<dyn Upstream>)
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
fn declared_protocol(
    snapshot: &Snapshot,
    network: &str,
    target: std::net::SocketAddr,
) -> Option<Detected> {
    let service = snapshot.service_by_vip(network, target.ip())?;
    let protocol = service.app_protocols.get(&target.port())?;
    Some(if protocol.is_http() {
        Detected::Http
    } else {
        Detected::Tcp
    })
}

/// Serves one tunnel at L7 or L4, detecting which when the port does not say.
async fn serve_tunnel(
    context: Arc<Context>,
    tunnel: Arc<TunnelInfo>,
    mut io: DuplexStream,
    declared: Option<Detected>,
) {
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
