//! What the HBONE server and client refuse, through real sockets and real TLS: peers without a
//! usable certificate (none, foreign trust domain, foreign CA, expired), TLS 1.2, plaintext,
//! non-`CONNECT` methods, bad `:authority`, malformed HTTP/2 frames, oversized headers and stalled
//! handshakes, plus an expired server certificate seen from the client.
//!
//! Every refusal is followed by proof that the same server still serves a well-behaved client: a
//! fresh [`Client`] on a new connection round-trips bytes through an echo server. Where the server's
//! own error matters, a one-shot [`Server::serve_connection`] for the same identity reports it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ambit_mesh::hbone::client::{Client, ClientError, TunnelRequest};
use ambit_mesh::hbone::server::{Server, ServerError};
use ambit_mesh::hbone::{ConnectHeaders, Settings};
use ambit_mesh::identity::{
    CertificateAuthority, CertificateManager, Identity, WorkloadCertificate,
};
use ambit_mesh::testing::{self, TcpForwarder};
use ambit_mesh::tls;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme, SupportedProtocolVersion};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

const TTL: Duration = Duration::from_secs(3600);
/// Upper bound for any single network step: a refusal must come as an answer, never as a hang.
const STEP: Duration = Duration::from_secs(4);
const HOUR: Duration = Duration::from_secs(3600);

/// HTTP/2 frame types and error codes used below (RFC 9113).
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const PROTOCOL_ERROR: u32 = 0x1;
const COMPRESSION_ERROR: u32 = 0x9;
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An HBONE server for `cluster.local/ns/default/sa/echo` (started with `testing::hbone_server`),
/// the CA behind it, and an echo server to tunnel to.
struct Fixture {
    ca: Arc<CertificateAuthority>,
    certificates: Arc<CertificateManager>,
    forwarder: Arc<TcpForwarder>,
    settings: Settings,
    server_id: Identity,
    hbone: SocketAddr,
    echo: SocketAddr,
}

async fn fixture() -> Fixture {
    fixture_with(Settings::default()).await
}

async fn fixture_with(settings: Settings) -> Fixture {
    let ca = testing::ca();
    let certificates = testing::manager(ca.clone(), TTL);
    let server_id = testing::identity("default", "echo");
    let forwarder = Arc::new(TcpForwarder::default());
    let hbone = testing::hbone_server(
        server_id.clone(),
        certificates.clone(),
        forwarder.clone(),
        settings.clone(),
    )
    .await;
    Fixture {
        ca,
        certificates,
        forwarder,
        settings,
        server_id,
        hbone,
        echo: testing::echo_server().await,
    }
}

fn good_source() -> Identity {
    testing::identity("default", "sleep")
}

impl Fixture {
    /// A well-formed tunnel request from `default/sleep` to the echo server through `hbone`.
    fn good_request(&self) -> TunnelRequest {
        TunnelRequest {
            source: good_source(),
            destination_identities: vec![self.server_id.clone()],
            hbone_address: self.hbone,
            target: self.echo,
            headers: ConnectHeaders::default(),
        }
    }

    /// The valid workload certificate of the good client.
    async fn good_cert(&self) -> Arc<WorkloadCertificate> {
        self.certificates.fetch(&good_source()).await.unwrap()
    }

    /// The library's own mTLS client configuration for the good client.
    async fn good_tls(&self) -> Arc<ClientConfig> {
        let cert = self.good_cert().await;
        Arc::new(tls::client_config(&cert, std::slice::from_ref(&self.server_id)).unwrap())
    }

    /// A certificate from the fixture's CA for `identity` that expired an hour ago.
    fn issue_expired(&self, identity: &Identity) -> WorkloadCertificate {
        let now = SystemTime::now();
        self.ca
            .issue_for_period(identity, now - 2 * HOUR, now - HOUR)
            .unwrap()
    }

    /// Proves the server still serves everyone else: a fresh client, on a new connection,
    /// round-trips bytes through the echo server.
    async fn assert_still_serving(&self) {
        let client = Client::new(self.certificates.clone(), Settings::default());
        let mut tunnel = tokio::time::timeout(STEP, client.connect(&self.good_request()))
            .await
            .expect("a good tunnel opens promptly")
            .expect("a good tunnel opens");
        assert!(!tunnel.reused_connection());
        let payload = b"still serving everyone else".repeat(100);
        let echoed = tokio::time::timeout(STEP, testing::echo_round_trip(&mut tunnel, &payload))
            .await
            .expect("the echo finishes promptly")
            .unwrap();
        assert_eq!(echoed, payload);
    }

    /// A second server for the same identity, certificates and settings that serves exactly one
    /// connection through `Server::serve_connection`, so the test can read why it ended.
    async fn one_shot_server(&self) -> (SocketAddr, JoinHandle<Result<(), ServerError>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Server::new(
            self.server_id.clone(),
            self.certificates.clone(),
            self.forwarder.clone(),
            self.settings.clone(),
        );
        let task = tokio::spawn(async move {
            let (socket, peer) = listener.accept().await.unwrap();
            server.serve_connection(socket, peer).await
        });
        (addr, task)
    }

    fn handler_calls(&self) -> usize {
        self.forwarder.seen.lock().unwrap().len()
    }
}

/// The error a one-shot server's connection ended with; panics if it ended well or hung.
async fn server_error(task: JoinHandle<Result<(), ServerError>>) -> ServerError {
    let err = tokio::time::timeout(STEP, task)
        .await
        .expect("the server ends the connection promptly")
        .unwrap()
        .expect_err("the server must refuse this connection");
    eprintln!("server error: {err}");
    err
}

/// Accepts any server certificate (signatures are still checked): for clients whose *own*
/// certificate is under test, so the handshake cannot fail on the client's side first.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Presents `cert`. The workload key is not exported, so the resolver is taken from the library's
/// own client configuration.
fn presenting(cert: &WorkloadCertificate) -> Arc<dyn ResolvesClientCert> {
    tls::client_config(cert, &[])
        .unwrap()
        .client_auth_cert_resolver
}

/// A hand-built client configuration: ring's default suites (TLS 1.2 ones included), the given
/// versions, ALPN h2, any server accepted, and `client_cert` presented (or none).
fn custom_client_config(
    versions: &[&'static SupportedProtocolVersion],
    client_cert: Option<&WorkloadCertificate>,
) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match client_cert {
        Some(cert) => builder.with_client_cert_resolver(presenting(cert)),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    Arc::new(config)
}

/// TCP, then TLS with `config`.
async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio::time::timeout(
        STEP,
        TlsConnector::from(config).connect(tls::server_name_for(addr), tcp),
    )
    .await
    .expect("the TLS handshake ends promptly")
}

/// TLS with `config`, then the first read, writing nothing. An accepted client reads the server's
/// HTTP/2 SETTINGS (which the server sends unprompted); a refused one gets the handshake error or
/// the server's alert. Returns the bytes read.
async fn probe(addr: SocketAddr, config: Arc<ClientConfig>) -> std::io::Result<Vec<u8>> {
    let mut tls = tls_connect(addr, config).await?;
    let mut buf = vec![0; 1024];
    let n = tokio::time::timeout(STEP, tls.read(&mut buf))
        .await
        .expect("the first read ends promptly")?;
    buf.truncate(n);
    Ok(buf)
}

/// TLS with `config`, then HTTP/2 over it; the connection is driven on its own task.
async fn h2_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    let tls = tls_connect(addr, config).await?;
    let (send, connection) = h2::client::handshake(tls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(send)
}

/// Sends `request` (leaving the request stream open, as a tunnel does) and waits for the response
/// head. Panics if no answer comes: a refusal must be an answer.
async fn send(
    sender: &mut h2::client::SendRequest<Bytes>,
    request: Request<()>,
) -> Result<Response<h2::RecvStream>, h2::Error> {
    tokio::time::timeout(STEP, async {
        let mut ready = sender.clone().ready().await?;
        let (response, _body) = ready.send_request(request, false)?;
        response.await
    })
    .await
    .expect("the server answers promptly")
}

fn connect_to(authority: &str) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(())
        .unwrap()
}

/// A full HBONE `CONNECT` to `target` over a hand-built configuration; the answer's status.
async fn raw_tunnel(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    target: SocketAddr,
) -> anyhow::Result<StatusCode> {
    let mut sender = h2_connect(addr, config).await?;
    let response = send(&mut sender, connect_to(&target.to_string())).await?;
    Ok(response.status())
}

/// Asserts that `config`'s client is refused by the HBONE server: the first read fails with one of
/// the server's fatal `alerts` (so it was the server that refused, not our side), no tunnel can be
/// opened, and the handler never saw a request.
async fn assert_refused(fx: &Fixture, config: Arc<ClientConfig>, alerts: &[&str]) {
    let err = probe(fx.hbone, config.clone())
        .await
        .expect_err("the server must not speak HTTP/2 to this client")
        .to_string();
    assert!(
        alerts
            .iter()
            .any(|alert| err == format!("received fatal alert: {alert}")),
        "expected one of the server's alerts {alerts:?}, got: {err}"
    );
    let tunnel = raw_tunnel(fx.hbone, config, fx.echo).await;
    assert!(tunnel.is_err(), "a tunnel opened anyway: {tunnel:?}");
    assert_eq!(fx.handler_calls(), 0, "the handler must never be asked");
}

/// One HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    payload: Vec<u8>,
}

/// The next frame, or `None` once the peer closed (EOF or a TLS/TCP error).
async fn read_frame<R: AsyncRead + Unpin>(read: &mut R) -> Option<Frame> {
    let mut head = [0u8; 9];
    read.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0; len];
    read.read_exact(&mut payload).await.ok()?;
    Some(Frame {
        kind: head[3],
        flags: head[4],
        payload,
    })
}

/// Over a good mTLS connection, writes the client preface, an empty SETTINGS and then `extra` as raw
/// bytes, and reads the server's frames until `stop` says so or the server closes. Returns the
/// frames read and whether the server closed.
async fn raw_h2_exchange(
    fx: &Fixture,
    extra: &[u8],
    stop: impl Fn(&Frame) -> bool,
) -> (Vec<Frame>, bool) {
    let mut tls = tls_connect(fx.hbone, fx.good_tls().await).await.unwrap();
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    bytes.extend(extra);
    tls.write_all(&bytes).await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::timeout(STEP, async {
        let mut frames = Vec::new();
        while let Some(frame) = read_frame(&mut tls).await {
            let done = stop(&frame);
            frames.push(frame);
            if done {
                return (frames, false);
            }
        }
        (frames, true)
    })
    .await
    .expect("the server neither closed nor answered within the deadline")
}

/// Sends a bogus frame after a proper preface and asserts the server answers with GOAWAY and
/// closes the connection; returns the GOAWAY error code.
async fn assert_goaway_and_close(fx: &Fixture, bogus: &[u8]) -> u32 {
    let (frames, closed) = raw_h2_exchange(fx, bogus, |_| false).await;
    assert!(closed, "the server must close the connection");
    let goaway = frames
        .iter()
        .find(|f| f.kind == GOAWAY)
        .unwrap_or_else(|| panic!("no GOAWAY before the close; frames: {frames:?}"));
    u32::from_be_bytes(goaway.payload[4..8].try_into().unwrap())
}

/// A bare TLS server with `config` (no HBONE logic) that answers every HTTP/2 request 200, and
/// reports each TLS handshake failure on the returned channel.
async fn bare_tls_server(
    config: rustls::ServerConfig,
) -> (SocketAddr, mpsc::UnboundedReceiver<std::io::Error>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (failures, failed) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let failures = failures.clone();
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(err) => {
                        let _ = failures.send(err);
                        return;
                    }
                };
                let Ok(mut connection) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((_request, mut respond))) = connection.accept().await {
                    let _ = respond.send_response(Response::new(()), false);
                }
            });
        }
    });
    (addr, failed)
}

// ---------------------------------------------------------------------------------------------
// Control: the hand-built paths below do reach the server when nothing is wrong, so each refusal
// is the server's doing and not a broken test client.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn control_hand_built_clients_with_a_valid_certificate_are_served() {
    let fx = fixture().await;
    let cert = fx.good_cert().await;

    // The same hand-built configuration the refusal tests use, with a valid certificate.
    let custom = custom_client_config(&[&rustls::version::TLS13], Some(&cert));
    let first = probe(fx.hbone, custom.clone()).await.unwrap();
    assert!(
        first.len() >= 9 && first[3] == SETTINGS,
        "an accepted client reads the server's SETTINGS first: {first:?}"
    );
    assert_eq!(
        raw_tunnel(fx.hbone, custom, fx.echo).await.unwrap(),
        StatusCode::OK
    );

    // The library's configuration driven by a bare h2 client.
    assert_eq!(
        raw_tunnel(fx.hbone, fx.good_tls().await, fx.echo)
            .await
            .unwrap(),
        StatusCode::OK
    );

    // Raw frames: a PING is answered with a PING ACK and the connection stays open.
    let ping = frame(PING, 0, 0, b"12345678");
    let (frames, closed) = raw_h2_exchange(&fx, &ping, |f| f.kind == PING).await;
    assert!(!closed, "frames: {frames:?}");
    let ack = frames.last().unwrap();
    assert_eq!((ack.flags, ack.payload.as_slice()), (0x1, &b"12345678"[..]));
    assert!(frames.iter().all(|f| f.kind != GOAWAY), "{frames:?}");
    assert_eq!(fx.handler_calls(), 2);
}

// ---------------------------------------------------------------------------------------------
// Client certificates the server refuses.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn rejects_a_client_without_a_certificate() {
    let fx = fixture().await;
    let config = custom_client_config(&[&rustls::version::TLS13], None);
    assert_refused(&fx, config.clone(), &["CertificateRequired"]).await;

    let (addr, task) = fx.one_shot_server().await;
    let _ = probe(addr, config).await;
    let err = server_error(task).await;
    assert!(
        matches!(err, ServerError::Handshake { .. }) && err.to_string().contains("no certificates"),
        "{err}"
    );
    fx.assert_still_serving().await;
}

#[tokio::test]
async fn rejects_a_client_from_another_trust_domain_signed_by_the_same_ca() {
    let fx = fixture().await;
    let foreign_id = Identity::new("other.example", "default", "x").unwrap();
    let foreign = fx.ca.issue(&foreign_id, TTL).unwrap();
    // The library's own client config: it verifies the server against the same (shared) root.
    let config =
        Arc::new(tls::client_config(&foreign, std::slice::from_ref(&fx.server_id)).unwrap());
    assert_refused(&fx, config.clone(), &["CertificateUnknown"]).await;

    // The library client cannot open a tunnel with it either.
    let foreign_manager = testing::manager(fx.ca.clone(), TTL);
    let client = Client::new(foreign_manager, Settings::default());
    let mut request = fx.good_request();
    request.source = foreign_id;
    let err = client
        .connect(&request)
        .await
        .err()
        .expect("tunnel refused");
    eprintln!("client error: {err}");
    assert!(
        matches!(
            err,
            ClientError::Http2 { .. } | ClientError::Handshake { .. }
        ) && err.to_string().contains("CertificateUnknown"),
        "refused at the connection by the server's alert, before any status: {err}"
    );

    // The server says why: the trust domain, not the chain.
    let (addr, task) = fx.one_shot_server().await;
    let _ = probe(addr, config).await;
    let err = server_error(task).await.to_string();
    assert!(
        err.contains("\"other.example\"") && err.contains("\"cluster.local\""),
        "the server error names both trust domains: {err}"
    );
    assert_eq!(fx.handler_calls(), 0);
    fx.assert_still_serving().await;
}

#[tokio::test]
async fn rejects_a_client_certificate_from_another_ca() {
    let fx = fixture().await;
    let other_ca = testing::ca();
    // Same trust domain and a plausible identity: only the issuer is wrong.
    let impostor = other_ca.issue(&good_source(), TTL).unwrap();
    let config = custom_client_config(&[&rustls::version::TLS13], Some(&impostor));
    // Both test CAs share a subject name, so webpki checks the chain's signature against the
    // trusted root of that name: DecryptError (bad signature) rather than UnknownCA.
    assert_refused(&fx, config.clone(), &["UnknownCA", "DecryptError"]).await;

    let (addr, task) = fx.one_shot_server().await;
    let _ = probe(addr, config).await;
    let err = server_error(task).await;
    let text = err.to_string();
    assert!(
        matches!(err, ServerError::Handshake { .. })
            && (text.contains("BadSignature") || text.contains("UnknownIssuer")),
        "{err}"
    );
    fx.assert_still_serving().await;
}

#[tokio::test]
async fn rejects_an_expired_client_certificate() {
    let fx = fixture().await;
    let expired = fx.issue_expired(&good_source());
    assert!(expired.is_expired(SystemTime::now()));
    let config =
        Arc::new(tls::client_config(&expired, std::slice::from_ref(&fx.server_id)).unwrap());
    assert_refused(&fx, config.clone(), &["CertificateExpired"]).await;

    let (addr, task) = fx.one_shot_server().await;
    let _ = probe(addr, config).await;
    let err = server_error(task).await.to_string();
    assert!(err.contains("expired"), "{err}");
    fx.assert_still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// The client side: an expired server certificate.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn client_refuses_an_expired_server_certificate() {
    let fx = fixture().await;
    let client = Client::new(fx.certificates.clone(), Settings::default());

    // Control: the bare server with a valid certificate for the expected identity is accepted.
    let valid = fx.ca.issue(&fx.server_id, TTL).unwrap();
    let (valid_addr, _) = bare_tls_server(tls::server_config(&valid).unwrap()).await;
    let mut request = fx.good_request();
    request.hbone_address = valid_addr;
    client
        .connect(&request)
        .await
        .expect("the bare server with a valid certificate is accepted");

    // The same server with an expired certificate for the same identity is refused in the handshake.
    let expired = fx.issue_expired(&fx.server_id);
    let (expired_addr, mut failures) = bare_tls_server(tls::server_config(&expired).unwrap()).await;
    request.hbone_address = expired_addr;
    let err = tokio::time::timeout(STEP, client.connect(&request))
        .await
        .expect("the client gives up promptly")
        .err()
        .expect("an expired server certificate must fail the tunnel");
    assert!(matches!(err, ClientError::Handshake { .. }), "{err}");
    assert!(err.to_string().contains("expired"), "{err}");
    assert_eq!(client.pooled_connections(&request), 0);
    // The server learned why from the client's alert.
    let seen = tokio::time::timeout(STEP, failures.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        seen.to_string()
            .contains("received fatal alert: CertificateExpired"),
        "{seen}"
    );

    // The same client still opens tunnels to a healthy server.
    let mut tunnel = client.connect(&fx.good_request()).await.unwrap();
    let echoed = testing::echo_round_trip(&mut tunnel, b"fine")
        .await
        .unwrap();
    assert_eq!(echoed, b"fine");
    fx.assert_still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// Transport: TLS 1.2, plaintext, stalls.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn rejects_a_tls12_only_client() {
    let fx = fixture().await;
    let cert = fx.good_cert().await;
    // Identical to the control's configuration but for the protocol version.
    let config = custom_client_config(&[&rustls::version::TLS12], Some(&cert));
    let err = tls_connect(fx.hbone, config.clone())
        .await
        .expect_err("a TLS 1.2 handshake must fail");
    assert!(
        err.to_string()
            .contains("received fatal alert: ProtocolVersion"),
        "{err}"
    );

    let (addr, task) = fx.one_shot_server().await;
    let _ = tls_connect(addr, config).await;
    let err = server_error(task).await;
    assert!(
        matches!(err, ServerError::Handshake { .. }) && err.to_string().contains("incompatible"),
        "{err}"
    );
    assert_eq!(fx.handler_calls(), 0);
    fx.assert_still_serving().await;
}

#[tokio::test]
async fn rejects_plaintext_http2() {
    let fx = fixture().await;
    let attempt = async {
        let tcp = TcpStream::connect(fx.hbone).await?;
        let (mut sender, connection) = h2::client::handshake(tcp).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        anyhow::Ok(send(&mut sender, connect_to(&fx.echo.to_string())).await?)
    };
    match attempt.await {
        Ok(response) => panic!("plaintext got an answer: {}", response.status()),
        Err(err) => assert!(err.downcast_ref::<h2::Error>().is_some(), "{err:#}"),
    }

    let (addr, task) = fx.one_shot_server().await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(PREFACE).await.unwrap();
    let err = server_error(task).await;
    assert!(
        matches!(err, ServerError::Handshake { .. }) && err.to_string().contains("corrupt"),
        "{err}"
    );
    assert_eq!(fx.handler_calls(), 0);
    fx.assert_still_serving().await;
}

#[tokio::test]
async fn closes_a_peer_that_stalls_before_the_tls_handshake() {
    let fx = fixture_with(Settings {
        handshake_timeout: Duration::from_millis(500),
        ..Default::default()
    })
    .await;
    let started = Instant::now();
    let mut stalled = TcpStream::connect(fx.hbone).await.unwrap();
    let (one_shot, task) = fx.one_shot_server().await;
    let _stalled_too = TcpStream::connect(one_shot).await.unwrap();

    // While the stalled peer holds its connection, everyone else is served.
    fx.assert_still_serving().await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "the good tunnel was checked while the stall was still pending"
    );
    let mut buf = [0u8; 64];
    assert!(
        matches!(stalled.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the stalled peer was still connected during the good tunnel"
    );

    let read = tokio::time::timeout(Duration::from_secs(2), stalled.read(&mut buf))
        .await
        .expect("the server must drop a stalled peer within ~2 s");
    assert!(matches!(read, Ok(0) | Err(_)), "expected a close: {read:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed before the handshake timeout: {:?}",
        started.elapsed()
    );
    let err = server_error(task).await;
    assert!(matches!(err, ServerError::HandshakeTimeout { .. }), "{err}");
    fx.assert_still_serving().await;
}

#[tokio::test]
async fn closes_a_peer_that_stalls_after_tls_before_the_http2_preface() {
    let fx = fixture_with(Settings {
        handshake_timeout: Duration::from_millis(500),
        ..Default::default()
    })
    .await;
    let started = Instant::now();
    // A valid client certificate, so TLS completes; then not a byte of HTTP/2.
    let mut stalled = tls_connect(fx.hbone, fx.good_tls().await).await.unwrap();
    fx.assert_still_serving().await;

    // Whatever comes before the close (the server's SETTINGS) is fine, as is a close without
    // close_notify; the connection must end.
    let mut rest = Vec::new();
    let _closed = tokio::time::timeout(Duration::from_secs(2), stalled.read_to_end(&mut rest))
        .await
        .expect("the server must drop a peer that never sends the preface within ~2 s");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed before the handshake timeout: {:?}",
        started.elapsed()
    );
    fx.assert_still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// Requests the server refuses over a proper mTLS connection.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn rejects_a_non_connect_method_with_400() {
    let fx = fixture().await;
    let mut sender = h2_connect(fx.hbone, fx.good_tls().await).await.unwrap();
    let get = Request::builder()
        .method(Method::GET)
        .uri(format!("http://{}/", fx.echo))
        .body(())
        .unwrap();
    let response = send(&mut sender, get).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(fx.handler_calls(), 0, "refused before the handler");

    // Only that stream was refused: the same connection still carries a CONNECT.
    let ok = send(&mut sender, connect_to(&fx.echo.to_string()))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    fx.assert_still_serving().await;
}

#[tokio::test]
async fn rejects_a_bad_authority_with_400() {
    let fx = fixture().await;
    let mut sender = h2_connect(fx.hbone, fx.good_tls().await).await.unwrap();
    for authority in ["example.com:80", "not-an-address", "127.0.0.1", "[::1]"] {
        let response = send(&mut sender, connect_to(authority)).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{authority}");
    }
    assert_eq!(
        fx.handler_calls(),
        0,
        "no name was resolved, nothing dialed"
    );
    fx.assert_still_serving().await;
}

#[tokio::test]
async fn rejects_oversized_headers() {
    let fx = fixture().await;
    let big = "a".repeat(100 * 1024);
    let mut sender = h2_connect(fx.hbone, fx.good_tls().await).await.unwrap();
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(fx.echo.to_string())
        .header("x-padding", big.as_str())
        .body(())
        .unwrap();
    match send(&mut sender, request).await {
        Ok(response) => assert!(
            response.status().is_client_error(),
            "oversized headers got {}",
            response.status()
        ),
        Err(err) => assert!(err.is_reset(), "{err}"),
    }
    assert_eq!(fx.handler_calls(), 0, "refused before the handler");

    // The connection survives a stream-level refusal.
    let ok = send(&mut sender, connect_to(&fx.echo.to_string()))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);

    // The library client reports it as a refusal with a 4xx status.
    let client = Client::new(fx.certificates.clone(), Settings::default());
    let mut request = fx.good_request();
    request.headers.baggage = Some(big);
    let err = client.connect(&request).await.err().expect("refused");
    eprintln!("client error: {err}");
    assert!(err.status().is_some_and(|s| s.is_client_error()), "{err}");
    fx.assert_still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// Malformed HTTP/2 frames after a proper handshake.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn closes_the_connection_on_data_on_stream_zero() {
    let fx = fixture().await;
    let code = assert_goaway_and_close(&fx, &frame(0x0, 0, 0, b"boom")).await;
    assert_eq!(code, PROTOCOL_ERROR);
    fx.assert_still_serving().await;
}

#[tokio::test]
async fn closes_the_connection_on_garbage_hpack() {
    let fx = fixture().await;
    // HEADERS on stream 1 with END_HEADERS | END_STREAM and an undecodable header block.
    let code = assert_goaway_and_close(&fx, &frame(0x1, 0x5, 1, &[0xff; 16])).await;
    assert!(
        code == PROTOCOL_ERROR || code == COMPRESSION_ERROR,
        "GOAWAY code {code:#x}"
    );
    assert_eq!(fx.handler_calls(), 0);
    fx.assert_still_serving().await;
}
