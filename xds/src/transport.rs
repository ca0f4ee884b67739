//! Connections to istiod: TCP, TLS (rustls with ring, roots from a file) or plaintext (tests),
//! HTTP/2, and the call metadata Istio expects (`authorization: Bearer <token>`, `clusterid`).
//!
//! One [`Connection`] is one HTTP/2 connection; gRPC calls are multiplexed on it. There is no
//! connection pool or balancer: the ADS client holds one per stream, the CA client one shared.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tonic::body::Body;
use tonic::metadata::MetadataValue;

/// How long a TCP connect plus TLS handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 keepalive, as Istio's ztunnel sets on its control-plane channels.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why istiod could not be reached or called.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("control plane address {address:?}: {reason} (expected https://host:port, or http://host:port without TLS)")]
    BadAddress { address: String, reason: String },
    #[error("cannot read the control plane root certificate {path}: {reason}")]
    Root { path: PathBuf, reason: String },
    #[error("cannot read the token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("TLS with {address} failed: {source}")]
    Tls {
        address: String,
        source: std::io::Error,
    },
    #[error("HTTP/2 with {address} failed: {source}")]
    Http2 {
        address: String,
        source: hyper::Error,
    },
}

/// Where istiod is and how to talk to it.
#[derive(Clone, Debug)]
pub struct ControlPlaneConfig {
    /// `https://istiod.istio-system.svc:15012`, or `http://…` for a plaintext control plane.
    pub address: String,
    /// PEM roots that sign istiod's serving certificate (Istio's `root-cert.pem`); required for
    /// `https`.
    pub root_cert: Option<PathBuf>,
    /// A file holding the bearer token (Istio's projected `istio-token`), re-read on every call
    /// because the kubelet rotates it. `None`: no `authorization` header.
    pub token_path: Option<PathBuf>,
    /// Sent as the `clusterid` header.
    pub cluster_id: String,
}

/// A validated [`ControlPlaneConfig`], ready to open connections.
#[derive(Clone)]
pub struct ControlPlane {
    config: ControlPlaneConfig,
    origin: Uri,
    host: String,
    port: u16,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("address", &self.config.address)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl ControlPlane {
    pub fn new(config: ControlPlaneConfig) -> Result<Self, TransportError> {
        let bad = |reason: &str| TransportError::BadAddress {
            address: config.address.clone(),
            reason: reason.to_owned(),
        };
        let origin: Uri = config.address.parse().map_err(|_| bad("not a URI"))?;
        let secure = match origin.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("the scheme must be https or http")),
        };
        let host = origin
            .host()
            .ok_or_else(|| bad("no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = origin.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let tls = if secure {
            let path = config
                .root_cert
                .clone()
                .ok_or_else(|| TransportError::Root {
                    path: PathBuf::new(),
                    reason: "no root certificate file configured for an https control plane".into(),
                })?;
            let root_err = |reason: String| TransportError::Root {
                path: path.clone(),
                reason,
            };
            let pem = std::fs::read(&path).map_err(|e| root_err(e.to_string()))?;
            let roots = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| root_err(format!("not PEM certificates: {e}")))?;
            if roots.is_empty() {
                return Err(root_err("no certificate in the file".into()));
            }
            let store = ambit_mesh::tls::root_store(&roots).map_err(|e| root_err(e.to_string()))?;
            let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| root_err(e.to_string()))?
            .with_root_certificates(store)
            .with_no_client_auth();
            client.alpn_protocols = vec![ambit_mesh::tls::ALPN_H2.to_vec()];
            let name = ServerName::try_from(host.clone())
                .map_err(|_| bad("host is not a valid TLS server name"))?;
            Some((Arc::new(client), name))
        } else {
            None
        };
        Ok(ControlPlane {
            origin,
            host,
            port,
            tls,
            config,
        })
    }

    pub fn address(&self) -> &str {
        &self.config.address
    }

    /// Opens a new HTTP/2 connection.
    pub async fn connect(&self) -> Result<Connection, TransportError> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.connect_inner())
            .await
            .unwrap_or_else(|_| {
                Err(TransportError::Connect {
                    address: self.config.address.clone(),
                    reason: format!("timed out after {CONNECT_TIMEOUT:?}"),
                })
            })
    }

    async fn connect_inner(&self) -> Result<Connection, TransportError> {
        let address = self.config.address.clone();
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| TransportError::Connect {
                address: address.clone(),
                reason: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some((config, name)) => {
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|source| TransportError::Tls {
                        address: address.clone(),
                        source,
                    })?;
                self.handshake(tls).await
            }
            None => self.handshake(tcp).await,
        }
    }

    async fn handshake<IO>(&self, io: IO) -> Result<Connection, TransportError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let address = self.config.address.clone();
        let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| TransportError::Http2 {
                address: address.clone(),
                source,
            })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%address, error = %e, "control plane connection closed");
            }
        });
        Ok(Connection { send })
    }

    /// A gRPC client over `connection`, addressing requests to this control plane.
    pub fn grpc(&self, connection: Connection) -> tonic::client::Grpc<Connection> {
        tonic::client::Grpc::with_origin(connection, self.origin.clone())
    }

    /// Adds the `authorization` and `clusterid` headers Istio's control plane expects.
    pub fn authorize<T>(&self, request: &mut tonic::Request<T>) -> Result<(), TransportError> {
        if let Some(path) = &self.config.token_path {
            let token = std::fs::read_to_string(path).map_err(|source| TransportError::Token {
                path: path.clone(),
                source,
            })?;
            let value = format!("Bearer {}", token.trim());
            let value = MetadataValue::try_from(value).map_err(|_| TransportError::Token {
                path: path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the token is not a valid header value",
                ),
            })?;
            request.metadata_mut().insert("authorization", value);
        }
        if let Ok(value) = MetadataValue::try_from(self.config.cluster_id.as_str()) {
            request.metadata_mut().insert("clusterid", value);
        }
        Ok(())
    }
}

/// One HTTP/2 connection to istiod, as the tower service tonic's client drives.
#[derive(Clone)]
pub struct Connection {
    send: SendRequest<Body>,
}

impl Connection {
    /// Whether the connection is gone and a new one is needed.
    pub fn is_closed(&self) -> bool {
        self.send.is_closed()
    }
}

impl tower_service::Service<http::Request<Body>> for Connection {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(self.send.send_request(request))
    }
}
