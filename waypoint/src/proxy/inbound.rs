//! HBONE in: each accepted `CONNECT` becomes an HTTP connection. The handler hands the HBONE
//! server one end of an in-memory pipe to splice the tunnel to, and serves HTTP/1.1 or HTTP/2
//! (told apart by the HTTP/2 preface) on the other end; every request goes through the
//! [`pipeline`](super::pipeline).

use std::sync::Arc;

use ambit_mesh::hbone::server::{ConnectHandler, ConnectRequest, Rejection, Upstream};
use ambit_mesh::identity::BoxFuture;
use ambit_mesh::state::{Destination, Snapshot, Workload};
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::DuplexStream;

use super::{pipeline, Context};

/// Bytes buffered in each direction of the pipe between the tunnel and the HTTP server.
const PIPE_BUFFER: usize = 64 * 1024;

/// One accepted tunnel, as each of its requests sees it.
pub struct TunnelInfo {
    pub connect: ConnectRequest,
    /// The client workload, if the state knows it.
    pub source: Option<Arc<Workload>>,
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
            let (tunnel_end, http_end) = tokio::io::duplex(PIPE_BUFFER);
            tokio::spawn(serve_http(self.context.clone(), tunnel, http_end));
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

/// Serves HTTP on one tunnel until the client closes it. Malformed requests get hyper's 400 (on
/// HTTP/1.1) or a stream reset (on HTTP/2); either ends only this tunnel.
async fn serve_http(context: Arc<Context>, tunnel: Arc<TunnelInfo>, io: DuplexStream) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        pipeline::serve(context.clone(), tunnel.clone(), request)
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client may half-close once its request is sent and still expect the response.
    builder.http1().half_close(true);
    // With upgrades: a WebSocket handshake answered 101 turns the connection into a byte stream.
    if let Err(err) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
    {
        tracing::debug!(error = %err, "HTTP connection inside a tunnel ended with an error");
    }
}
