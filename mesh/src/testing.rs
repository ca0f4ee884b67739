//! Test helpers (feature `testing`): identities, a throwaway CA and certificate manager, a TCP echo
//! server, and an HBONE server that forwards accepted tunnels to their target over plain TCP.

pub mod bench;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::hbone::server::{
    Accepted, ConnectHandler, ConnectRequest, Rejection, Server, TunnelOutcome,
};
use crate::hbone::Settings;
use crate::identity::{
    BoxFuture, CertificateAuthority, CertificateManager, Identity, ManagerSettings,
    DEFAULT_TRUST_DOMAIN,
};

/// `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
pub fn identity(namespace: &str, service_account: &str) -> Identity {
    Identity::new(DEFAULT_TRUST_DOMAIN, namespace, service_account).expect("valid test identity")
}

/// A fresh self-signed CA for `cluster.local`.
pub fn ca() -> Arc<CertificateAuthority> {
    Arc::new(CertificateAuthority::generate(DEFAULT_TRUST_DOMAIN).expect("generate test CA"))
}

/// A certificate manager signing with `ca`, certificates valid for `ttl`.
pub fn manager(ca: Arc<CertificateAuthority>, ttl: Duration) -> Arc<CertificateManager> {
    Arc::new(CertificateManager::new(
        ca,
        ManagerSettings {
            ttl,
            initial_backoff: Duration::from_millis(50),
            ..Default::default()
        },
    ))
}

/// A TCP echo server on 127.0.0.1: echoes every byte, then half-closes when the client does.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = socket.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    addr
}

/// Forwards accepted tunnels to their `:authority` over TCP; refuses listed identities with 401.
/// Records each request so tests can check what the server saw.
#[derive(Default)]
pub struct TcpForwarder {
    pub deny: Vec<Identity>,
    pub seen: Mutex<Vec<ConnectRequest>>,
    pub finished: Mutex<Vec<(u64, u64)>>,
}

impl ConnectHandler for TcpForwarder {
    fn connect(&self, request: ConnectRequest) -> BoxFuture<'_, Result<Accepted, Rejection>> {
        Box::pin(async move {
            self.seen.lock().unwrap().push(request.clone());
            if self.deny.contains(&request.peer_identity) {
                return Err(Rejection::Unauthorized(format!(
                    "{} is denied",
                    request.peer_identity
                )));
            }
            let upstream = TcpStream::connect(request.target)
                .await
                .map_err(|e| Rejection::Unavailable(format!("{}: {e}", request.target)))?;
            // Small request/response exchanges (gRPC frames) must not wait on Nagle.
            let _ = upstream.set_nodelay(true);
            Ok(Accepted::splice(upstream))
        })
    }

    fn finished(&self, _request: &ConnectRequest, outcome: &TunnelOutcome) {
        self.finished
            .lock()
            .unwrap()
            .push((outcome.received, outcome.sent));
    }
}

/// Starts an HBONE server for `identity` on 127.0.0.1 and returns its address.
pub async fn hbone_server(
    identity: Identity,
    certificates: Arc<CertificateManager>,
    handler: Arc<dyn ConnectHandler>,
    settings: Settings,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind hbone");
    let addr = listener.local_addr().expect("hbone addr");
    let server = Server::new(identity, certificates, handler, settings);
    tokio::spawn(server.serve(listener));
    addr
}

/// Writes `payload`, half-closes, and reads everything back.
pub async fn echo_round_trip<S>(stream: &mut S, payload: &[u8]) -> std::io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut read, mut write) = tokio::io::split(stream);
    let writer = async {
        write.write_all(payload).await?;
        write.shutdown().await
    };
    let mut echoed = Vec::with_capacity(payload.len());
    let reader = read.read_to_end(&mut echoed);
    tokio::try_join!(writer, reader)?;
    Ok(echoed)
}

/// Sends `line` through a line-echoing connection and reads it back within 5 s; an error says
/// what came back instead.
pub async fn echo_line<S>(stream: &mut S, line: &str) -> std::io::Result<()>
where
    S: tokio::io::AsyncBufRead + AsyncWriteExt + Unpin,
{
    use tokio::io::AsyncBufReadExt;
    stream.write_all(format!("{line}\n").as_bytes()).await?;
    let mut back = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_line(&mut back))
        .await
        .map_err(|_| std::io::Error::other("no echo within 5 s"))??;
    if back.trim_end() != line {
        return Err(std::io::Error::other(format!("echoed {back:?}")));
    }
    Ok(())
}
