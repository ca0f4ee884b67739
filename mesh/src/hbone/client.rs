//! The HBONE client: opens tunnels (HTTP/2 `CONNECT` streams) to HBONE servers over pooled mTLS
//! connections, presenting the source workload's certificate and accepting the server only if it
//! proves one of the expected SPIFFE identities.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use crate::copy::ChunkStream;

use super::pool::{Connection, Pool, PoolKey, StreamSlot};
use super::{keepalive, random_traceparent, ConnectHeaders, H2Stream, Settings};
use crate::identity::{BoxFuture, CertificateManager, Identity, ManagerError};
use crate::tls::{self, TlsError};

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no certificate for source identity {identity}: {source}")]
    Certificate {
        identity: Identity,
        source: ManagerError,
    },
    #[error("TLS configuration for {identity} is unusable: {source}")]
    Config {
        identity: Identity,
        source: TlsError,
    },
    #[error("cannot reach HBONE server {address}: {source}")]
    Connect {
        address: SocketAddr,
        source: io::Error,
    },
    #[error(
        "mTLS handshake with {address} failed (expected identity one of [{expected}]): {}",
        tls::explain_handshake_error(source)
    )]
    Handshake {
        address: SocketAddr,
        expected: String,
        source: io::Error,
    },
    #[error("HBONE server {address} did not complete the handshakes within {timeout:?}")]
    HandshakeTimeout {
        address: SocketAddr,
        timeout: std::time::Duration,
    },
    #[error("the CONNECT request cannot be encoded (bad target or header value): {0}")]
    BadRequest(String),
    #[error("HBONE server {address} negotiated no h2 ALPN")]
    NoAlpn { address: SocketAddr },
    #[error("HTTP/2 with {address} failed: {source}")]
    Http2 {
        address: SocketAddr,
        source: h2::Error,
    },
    #[error("HBONE server {address} refused CONNECT {target}: {status}")]
    Status {
        address: SocketAddr,
        target: SocketAddr,
        status: StatusCode,
    },
    #[error("HBONE server {address} did not answer CONNECT {target} within {timeout:?}")]
    ResponseTimeout {
        address: SocketAddr,
        target: SocketAddr,
        timeout: std::time::Duration,
    },
}

impl ClientError {
    /// The HTTP status the server answered, if it answered one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// What to tunnel where.
#[derive(Clone, Debug)]
pub struct TunnelRequest {
    /// Whose certificate the client presents.
    pub source: Identity,
    /// Identities the server may prove (the destination workload's, the service's SANs, or a
    /// waypoint's); any other identity fails the tunnel.
    pub destination_identities: Vec<Identity>,
    /// The HBONE server to connect to (a pod's or waypoint's `ip:15008`).
    pub hbone_address: SocketAddr,
    /// `:authority`: the final destination behind the server.
    pub target: SocketAddr,
    pub headers: ConnectHeaders,
}

/// The server a connection was established with.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The expected identity the server proved.
    pub identity: Identity,
    /// The server's leaf certificate (DER).
    pub certificate: CertificateDer<'static>,
}

/// An open tunnel: a byte stream to `target`. Shut down the write side to half-close; drop it to
/// reset the stream.
pub struct Tunnel {
    stream: H2Stream,
    slot: StreamSlot,
    reused_connection: bool,
}

impl Tunnel {
    /// The server this tunnel's connection was established with.
    pub fn peer(&self) -> &PeerInfo {
        &self.slot.connection().peer
    }

    /// Whether the tunnel rode an already open connection from the pool.
    pub fn reused_connection(&self) -> bool {
        self.reused_connection
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl ChunkStream for Tunnel {
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        self.stream.poll_read_chunk(cx)
    }

    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        self.stream.poll_write_chunk(cx, data)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ChunkStream::poll_flush(&mut self.stream, cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ChunkStream::poll_shutdown(&mut self.stream, cx)
    }
}

/// Opens the TCP connection an HBONE connection rides on. The default connects from wherever the
/// process is; ztunnel connects from inside the source pod's network namespace, with its mark.
pub trait Connector: Send + Sync + 'static {
    fn connect(&self, address: SocketAddr) -> BoxFuture<'_, io::Result<TcpStream>>;
}

/// Connects from the calling process's own network namespace.
pub struct DirectConnector;

impl Connector for DirectConnector {
    fn connect(&self, address: SocketAddr) -> BoxFuture<'_, io::Result<TcpStream>> {
        Box::pin(TcpStream::connect(address))
    }
}

/// Opens HBONE tunnels over a shared connection pool.
pub struct Client {
    certificates: Arc<CertificateManager>,
    connector: Arc<dyn Connector>,
    settings: Settings,
    pool: Arc<Pool>,
    sweeper: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.sweeper.abort();
    }
}

impl Client {
    /// Must be called within a Tokio runtime: it starts the pool's idle sweeper.
    pub fn new(certificates: Arc<CertificateManager>, settings: Settings) -> Self {
        Self::with_connector(certificates, settings, Arc::new(DirectConnector))
    }

    /// A client whose connections are opened by `connector`.
    pub fn with_connector(
        certificates: Arc<CertificateManager>,
        settings: Settings,
        connector: Arc<dyn Connector>,
    ) -> Self {
        let pool = Arc::new(Pool::default());
        let sweeper = tokio::spawn(sweep(Arc::downgrade(&pool), settings.pool_idle_timeout));
        Client {
            certificates,
            connector,
            settings,
            pool,
            sweeper,
        }
    }

    /// Opens a tunnel: a pooled (or new) connection, then a `CONNECT` answered 200.
    pub async fn connect(&self, request: &TunnelRequest) -> Result<Tunnel, ClientError> {
        let key = PoolKey::new(
            request.source.clone(),
            request.destination_identities.clone(),
            request.hbone_address,
        );
        // A pooled connection may have died since it was last used; such a failure gets one more
        // try on a fresh connection. A refusal by the server is final.
        let mut attempts_left = 2;
        loop {
            attempts_left -= 1;
            let (slot, reused) = self.pool.checkout(&key, || self.dial(request)).await?;
            match self.open_stream(&slot, request).await {
                Ok(stream) => {
                    return Ok(Tunnel {
                        stream,
                        slot,
                        reused_connection: reused,
                    })
                }
                Err(err @ ClientError::Http2 { .. }) if reused && attempts_left > 0 => {
                    tracing::debug!(error = %err, "pooled HBONE connection failed; redialing");
                    slot.connection().mark_broken();
                }
                Err(err) => {
                    if matches!(err, ClientError::Http2 { .. }) {
                        slot.connection().mark_broken();
                    }
                    return Err(err);
                }
            }
        }
    }

    /// Open pooled connections to `request`'s server for its source and identities.
    pub fn pooled_connections(&self, request: &TunnelRequest) -> usize {
        self.pool.connection_count(&PoolKey::new(
            request.source.clone(),
            request.destination_identities.clone(),
            request.hbone_address,
        ))
    }

    async fn open_stream(
        &self,
        slot: &StreamSlot,
        request: &TunnelRequest,
    ) -> Result<H2Stream, ClientError> {
        let address = request.hbone_address;
        let http2 = |source| ClientError::Http2 { address, source };
        let mut send = slot
            .connection()
            .send
            .clone()
            .ready()
            .await
            .map_err(http2)?;
        let mut connect = Request::builder()
            .method(Method::CONNECT)
            .uri(request.target.to_string());
        let headers = &request.headers;
        if let Some(forwarded) = headers.forwarded_value() {
            connect = connect.header("forwarded", forwarded);
        }
        if let Some(baggage) = &headers.baggage {
            connect = connect.header("baggage", baggage);
        }
        let traceparent = headers
            .traceparent
            .clone()
            .unwrap_or_else(random_traceparent);
        connect = connect.header("traceparent", traceparent);
        let connect = connect
            .body(())
            .map_err(|e| ClientError::BadRequest(e.to_string()))?;
        let (response, send_stream) = send.send_request(connect, false).map_err(http2)?;
        let timeout = self.settings.response_timeout;
        let response = tokio::time::timeout(timeout, response)
            .await
            .map_err(|_| ClientError::ResponseTimeout {
                address,
                target: request.target,
                timeout,
            })?
            .map_err(|source| {
                if source.is_reset() && source.is_remote() {
                    // A stream-level refusal (e.g. headers too large): the connection is fine.
                    ClientError::Status {
                        address,
                        target: request.target,
                        status: StatusCode::BAD_REQUEST,
                    }
                } else {
                    http2(source)
                }
            })?;
        if response.status() != StatusCode::OK {
            return Err(ClientError::Status {
                address,
                target: request.target,
                status: response.status(),
            });
        }
        Ok(H2Stream::new(send_stream, response.into_body()))
    }

    async fn dial(&self, request: &TunnelRequest) -> Result<Connection, ClientError> {
        let address = request.hbone_address;
        let cert = self
            .certificates
            .fetch(&request.source)
            .await
            .map_err(|source| ClientError::Certificate {
                identity: request.source.clone(),
                source,
            })?;
        let config =
            tls::client_config(&cert, &request.destination_identities).map_err(|source| {
                ClientError::Config {
                    identity: request.source.clone(),
                    source,
                }
            })?;
        let timeout = self.settings.handshake_timeout;
        let handshakes = async {
            let tcp = self
                .connector
                .connect(address)
                .await
                .map_err(|source| ClientError::Connect { address, source })?;
            let _ = tcp.set_nodelay(true);
            let tls = TlsConnector::from(Arc::new(config))
                .connect(tls::server_name_for(address), tcp)
                .await
                .map_err(|source| ClientError::Handshake {
                    address,
                    expected: request
                        .destination_identities
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    source,
                })?;
            let session = tls.get_ref().1;
            if session.alpn_protocol() != Some(tls::ALPN_H2) {
                return Err(ClientError::NoAlpn { address });
            }
            let certificate = session
                .peer_certificates()
                .and_then(|c| c.first())
                .cloned()
                .expect("a verified TLS 1.3 server always presents a certificate");
            let presented = tls::spiffe_identities(&certificate).unwrap_or_default();
            let identity = presented
                .into_iter()
                .find(|id| request.destination_identities.contains(id))
                .expect("the verifier accepted one of the expected identities");
            let (send, connection) = self
                .http2_builder()
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|source| ClientError::Http2 { address, source })?;
            Ok((
                send,
                connection,
                PeerInfo {
                    identity,
                    certificate,
                },
            ))
        };
        let (send, mut connection, peer) = tokio::time::timeout(timeout, handshakes)
            .await
            .map_err(|_| ClientError::HandshakeTimeout { address, timeout })??;

        let closed = Arc::new(AtomicBool::new(false));
        let ping = connection.ping_pong().expect("ping_pong is taken once");
        let keepalive = keepalive::run(
            ping,
            self.settings.ping_interval,
            self.settings.ping_timeout,
        );
        let driver_closed = closed.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = connection => {
                    if let Err(err) = result {
                        tracing::debug!(%address, error = %err, "HBONE client connection ended");
                    }
                }
                err = keepalive => tracing::info!(%address, error = %err, "HBONE client connection dropped"),
            }
            driver_closed.store(true, Ordering::Release);
        });
        tracing::debug!(%address, peer = %peer.identity, source = %request.source, "HBONE connection established");
        Ok(Connection::new(
            send,
            peer,
            self.settings.client_max_streams,
            closed,
        ))
    }

    fn http2_builder(&self) -> h2::client::Builder {
        let s = &self.settings;
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .max_frame_size(s.max_frame_size)
            .max_header_list_size(s.client_max_header_list)
            .max_send_buffer_size(s.stream_window as usize)
            .enable_push(false);
        builder
    }
}

async fn sweep(pool: Weak<Pool>, idle_timeout: std::time::Duration) {
    let period = (idle_timeout / 4).clamp(
        std::time::Duration::from_millis(50),
        std::time::Duration::from_secs(30),
    );
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else { return };
        pool.sweep(idle_timeout);
    }
}
