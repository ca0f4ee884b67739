//! The HBONE server: accepts mTLS connections, reads HTTP/2 `CONNECT` streams, asks a
//! [`ConnectHandler`] for each, and splices the accepted ones to what the handler connected.
//!
//! Each connection goes through the same phases: TLS handshake (client certificate verified, same
//! trust domain), HTTP/2 handshake, then streams. Each stream: method and authority checked (400),
//! the handler's decision (401/503, or an upstream, or to serve the stream itself), 200, bytes
//! spliced until both sides close (or the stream handed to the handler).
//! A failure in one connection or stream is logged and ends only that connection or stream.
//!
//! Draining ([`Server::with_drain`]): once the [`Drain`] starts, the listener is closed, every
//! connection sends GOAWAY (h2's graceful shutdown: streams already open carry on, new ones go to
//! another connection) and each open tunnel counts as an open connection until it ends.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::{keepalive, ConnectHeaders, H2Stream, Settings};
use crate::copy::{self, Buffered};
use crate::identity::{BoxFuture, CertificateManager, Identity, ManagerError};
use crate::lifecycle::{self, Drain};
use crate::tls::{self, TlsError};

/// Why a connection was dropped before or while serving streams.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("no certificate to serve as {identity}: {source}")]
    Certificate {
        identity: Identity,
        source: ManagerError,
    },
    #[error("TLS configuration for {identity} is unusable: {source}")]
    Config {
        identity: Identity,
        source: TlsError,
    },
    #[error(
        "TLS handshake with {peer} failed: {}",
        tls::explain_handshake_error(source)
    )]
    Handshake {
        peer: SocketAddr,
        source: std::io::Error,
    },
    #[error("{peer} did not finish the TLS and HTTP/2 handshakes within {timeout:?}")]
    HandshakeTimeout {
        peer: SocketAddr,
        timeout: std::time::Duration,
    },
    #[error("{peer} presented no usable identity: {source}")]
    PeerIdentity { peer: SocketAddr, source: TlsError },
    #[error("HTTP/2 with {peer} failed: {source}")]
    Http2 { peer: SocketAddr, source: h2::Error },
    #[error("keepalive with {peer}: {source}")]
    Keepalive {
        peer: SocketAddr,
        source: keepalive::KeepaliveError,
    },
}

/// One accepted `CONNECT`, as the handler sees it.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// `:authority`: where the client wants to go.
    pub target: SocketAddr,
    /// The client's verified SPIFFE identity.
    pub peer_identity: Identity,
    /// The TCP address the HBONE connection came from.
    pub peer_addr: SocketAddr,
    /// The address the HBONE connection was accepted on.
    pub local_addr: SocketAddr,
    pub headers: ConnectHeaders,
}

/// A handler's refusal; the status is what the client receives.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// 401: policy denies this peer.
    #[error("denied by policy: {0}")]
    Unauthorized(String),
    /// 503: no such workload, or the upstream could not be reached.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// 400: the request makes no sense for this server.
    #[error("bad request: {0}")]
    BadRequest(String),
}

impl Rejection {
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Rejection::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Rejection::BadRequest(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// A byte stream the server splices an accepted tunnel to.
pub trait Upstream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Upstream for T {}

/// What a handler does with a tunnel it accepts.
pub enum Accepted {
    /// The server splices the tunnel to this stream and reports [`ConnectHandler::finished`].
    Splice(Box<dyn Upstream>),
    /// Once the 200 is out, the stream is handed to this function, which owns it from then on and
    /// runs on the stream's own task (a waypoint serving HTTP inside the tunnel needs no pipe and
    /// no second task).
    Serve(Box<dyn FnOnce(H2Stream) -> BoxFuture<'static, ()> + Send>),
}

impl Accepted {
    pub fn splice(upstream: impl Upstream + 'static) -> Self {
        Accepted::Splice(Box::new(upstream))
    }

    pub fn serve<F>(serve: impl FnOnce(H2Stream) -> F + Send + 'static) -> Self
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        Accepted::Serve(Box::new(move |stream| Box::pin(serve(stream))))
    }
}

/// Decides each `CONNECT`: reject it, or accept it with what to do with its stream.
pub trait ConnectHandler: Send + Sync + 'static {
    fn connect(&self, request: ConnectRequest) -> BoxFuture<'_, Result<Accepted, Rejection>>;

    /// Told when a spliced tunnel ends, with bytes moved each way (for telemetry).
    fn finished(&self, _request: &ConnectRequest, _outcome: &TunnelOutcome) {}

    /// Who to answer a new connection as, when that can change while the server runs (a pod's
    /// identity comes from its workload, trust domain included); `None`: the server's own.
    fn local_identity(&self) -> BoxFuture<'_, Option<Identity>> {
        Box::pin(std::future::ready(None))
    }
}

/// How a spliced tunnel ended.
#[derive(Debug)]
pub struct TunnelOutcome {
    /// Bytes from the client into the upstream.
    pub received: u64,
    /// Bytes from the upstream back to the client.
    pub sent: u64,
    pub error: Option<std::io::Error>,
}

/// An HBONE server for one identity (one pod's 15008, or a waypoint's).
pub struct Server {
    identity: Identity,
    certificates: Arc<CertificateManager>,
    handler: Arc<dyn ConnectHandler>,
    settings: Settings,
    drain: Drain,
}

impl Server {
    /// A server that is never drained (it stops when its `serve` future is dropped).
    pub fn new(
        identity: Identity,
        certificates: Arc<CertificateManager>,
        handler: Arc<dyn ConnectHandler>,
        settings: Settings,
    ) -> Arc<Self> {
        Self::with_drain(identity, certificates, handler, settings, Drain::default())
    }

    /// A server that takes part in `drain` (module docs).
    pub fn with_drain(
        identity: Identity,
        certificates: Arc<CertificateManager>,
        handler: Arc<dyn ConnectHandler>,
        settings: Settings,
        drain: Drain,
    ) -> Arc<Self> {
        Arc::new(Server {
            identity,
            certificates,
            handler,
            settings,
            drain,
        })
    }

    /// Accepts connections until the listener fails or the drain starts, then serves the accepted
    /// ones to their end; each is served on its own task. The tasks belong to this future:
    /// dropping it (a pod leaving) closes every connection it accepted.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                _ = self.drain.started() => break,
            };
            let (socket, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) if lifecycle::accept_failed(&err, "HBONE").await => continue,
                Err(err) => return Err(err),
            };
            let server = self.clone();
            connections.spawn(async move {
                if let Err(err) = server.serve_connection(socket, peer).await {
                    tracing::info!(error = %err, "HBONE connection closed with an error");
                }
            });
        }
        drop(listener);
        while connections.join_next().await.is_some() {}
        Ok(())
    }

    /// Serves one accepted TCP connection to the end.
    pub async fn serve_connection(
        self: Arc<Self>,
        socket: TcpStream,
        peer: SocketAddr,
    ) -> Result<(), ServerError> {
        let local_addr = socket.local_addr().unwrap_or(peer);
        let _ = socket.set_nodelay(true);
        let identity = match self.handler.local_identity().await {
            Some(identity) => identity,
            None => self.identity.clone(),
        };
        let cert = self.certificates.fetch(&identity).await.map_err(|source| {
            ServerError::Certificate {
                identity: identity.clone(),
                source,
            }
        })?;
        let config = cert.server_config().map_err(|source| ServerError::Config {
            identity: identity.clone(),
            source,
        })?;
        let timeout = self.settings.handshake_timeout;
        let handshakes = async {
            let tls = TlsAcceptor::from(config)
                .accept(socket)
                .await
                .map_err(|source| ServerError::Handshake { peer, source })?;
            let leaf = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .ok_or(ServerError::PeerIdentity {
                    peer,
                    source: TlsError::NoSpiffeIdentity,
                })?;
            let peer_identity = tls::peer_identity(leaf)
                .map_err(|source| ServerError::PeerIdentity { peer, source })?;
            let connection = self
                .http2_builder()
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|source| ServerError::Http2 { peer, source })?;
            Ok::<_, ServerError>((connection, peer_identity))
        };
        let (mut connection, peer_identity) = tokio::time::timeout(timeout, handshakes)
            .await
            .map_err(|_| ServerError::HandshakeTimeout { peer, timeout })??;
        tracing::debug!(%peer, peer_identity = %peer_identity, local = %identity, "HBONE connection established");

        let ping = connection.ping_pong().expect("ping_pong is taken once");
        let keepalive = keepalive::run(
            ping,
            self.settings.ping_interval,
            self.settings.ping_timeout,
        );
        tokio::pin!(keepalive);
        // Streams live no longer than their connection.
        let mut streams = tokio::task::JoinSet::new();
        let mut goaway_sent = false;
        loop {
            tokio::select! {
                Some(_) = streams.join_next(), if !streams.is_empty() => {}
                _ = self.drain.started(), if !goaway_sent => {
                    tracing::debug!(%peer, "draining: GOAWAY sent");
                    connection.graceful_shutdown();
                    goaway_sent = true;
                }
                next = connection.accept() => match next {
                    Some(Ok((request, respond))) => {
                        let server = self.clone();
                        let peer_identity = peer_identity.clone();
                        let open = self.drain.track();
                        streams.spawn(async move {
                            server.serve_stream(request, respond, peer_identity, peer, local_addr).await;
                            drop(open);
                        });
                    }
                    Some(Err(source)) => return Err(ServerError::Http2 { peer, source }),
                    None => return Ok(()),
                },
                source = &mut keepalive => return Err(ServerError::Keepalive { peer, source }),
            }
        }
    }

    async fn serve_stream(
        &self,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer_identity: Identity,
        peer_addr: SocketAddr,
        local_addr: SocketAddr,
    ) {
        let connect = match connect_target(request.method(), request.uri()) {
            Ok(target) => ConnectRequest {
                target,
                peer_identity,
                peer_addr,
                local_addr,
                headers: ConnectHeaders::from_headers(request.headers()),
            },
            Err(rejection) => {
                tracing::info!(%peer_addr, method = %request.method(), uri = %request.uri(), reason = %rejection, "HBONE request refused");
                reply(&mut respond, rejection.status(), true);
                return;
            }
        };
        let accepted = match self.handler.connect(connect.clone()).await {
            Ok(accepted) => accepted,
            Err(rejection) => {
                tracing::info!(peer = %connect.peer_identity, target = %connect.target, reason = %rejection, "HBONE tunnel refused");
                reply(&mut respond, rejection.status(), true);
                return;
            }
        };
        let Some(send) = reply(&mut respond, StatusCode::OK, false) else {
            return;
        };
        let mut tunnel = H2Stream::new(send, request.into_body());
        let mut upstream = match accepted {
            Accepted::Splice(upstream) => upstream,
            Accepted::Serve(serve) => return serve(tunnel).await,
        };
        let transfer = copy::splice(&mut tunnel, &mut Buffered::new(&mut upstream), &()).await;
        let outcome = TunnelOutcome {
            received: transfer.forward,
            sent: transfer.backward,
            error: transfer.error,
        };
        tracing::debug!(peer = %connect.peer_identity, target = %connect.target, ?outcome, "HBONE tunnel closed");
        self.handler.finished(&connect, &outcome);
    }

    fn http2_builder(&self) -> h2::server::Builder {
        let s = &self.settings;
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .max_frame_size(s.max_frame_size)
            .max_concurrent_streams(s.server_max_streams)
            .max_header_list_size(s.server_max_header_list)
            .max_send_buffer_size(s.stream_window as usize);
        builder
    }
}

/// Checks method and authority (as h2 hands them over: the URI of a CONNECT is its
/// `:authority`); returns the target address.
pub(crate) fn connect_target(method: &Method, uri: &Uri) -> Result<SocketAddr, Rejection> {
    if method != Method::CONNECT {
        return Err(Rejection::BadRequest(format!(
            "HBONE accepts only CONNECT, not {method}"
        )));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| Rejection::BadRequest("CONNECT without :authority".into()))?;
    authority.as_str().parse().map_err(|_| {
        Rejection::BadRequest(format!(
            ":authority {:?} is not an ip:port",
            authority.as_str()
        ))
    })
}

fn reply(
    respond: &mut SendResponse<Bytes>,
    status: StatusCode,
    end_of_stream: bool,
) -> Option<h2::SendStream<Bytes>> {
    let response = Response::builder()
        .status(status)
        .body(())
        .expect("static response parts are valid");
    match respond.send_response(response, end_of_stream) {
        Ok(send) => Some(send),
        Err(err) => {
            tracing::debug!(error = %err, "client went away before the HBONE response");
            None
        }
    }
}
