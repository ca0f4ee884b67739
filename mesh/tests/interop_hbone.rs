//! HBONE interop against peers Ambit did not write: `tests/interop/hbone_client.py` and
//! `tests/interop/hbone_server.py`, built on Python's `ssl` (OpenSSL) and the `h2` package.
//!
//! Python client → Ambit's HBONE [`Server`](ambit_mesh::hbone::server::Server): a good `CONNECT`
//! gets 200 and bytes flow; no client certificate, or one from a foreign trust domain, fails the
//! handshake; `GET` and a bad `:authority` get 400; a denying handler gets 401.
//!
//! Ambit's HBONE [`Client`] → Python server: the request carries `CONNECT`, `:authority` =
//! target, `forwarded`, `baggage` and a W3C `traceparent`, over TLS 1.3 with ALPN `h2`, and the
//! client certificate's SAN is the source SPIFFE id; a server proving the wrong SAN is refused.
//!
//! Needs `python3` with `h2` (`pip install h2`); without it every test fails saying so.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ambit_mesh::hbone::client::{Client, TunnelRequest};
use ambit_mesh::hbone::{ConnectHeaders, Settings};
use ambit_mesh::identity::{CertificateAuthority, CertificateManager, Identity};
use ambit_mesh::testing::{self, TcpForwarder};
use rustls_pki_types::CertificateDer;
use serde_yaml::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const TTL: Duration = Duration::from_secs(3600);
/// Upper bound for one Python peer's whole run.
const PEER_TIMEOUT: Duration = Duration::from_secs(20);

// --- The Python peers ---

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/interop")
        .join(name)
}

/// Fails (never skips) when `python3` or its `h2` package is missing.
fn require_python_h2() {
    let out = std::process::Command::new("python3")
        .args(["-c", "import h2, ssl; assert ssl.HAS_TLSv1_3"])
        .output()
        .unwrap_or_else(|e| {
            panic!("interop tests need python3 with the h2 package (pip install h2): {e}")
        });
    assert!(
        out.status.success(),
        "interop tests need the python h2 package and TLS 1.3: pip install h2\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A JSON line as a generic value (JSON is YAML; `serde_yaml` is already a dependency).
fn parse_json(peer: &str, line: &str) -> Value {
    serde_yaml::from_str(line).unwrap_or_else(|e| panic!("{peer}: bad JSON output {line:?}: {e}"))
}

fn str_of<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or("")
}

/// Scratch directory with PEM files, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "ambit-interop-hbone-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn to_pem(certs: &[CertificateDer<'_>]) -> String {
    certs
        .iter()
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())))
        .collect()
}

/// PEM files for a Python peer: a workload key and chain for `identity` signed by `ca`.
struct PemFiles {
    chain: PathBuf,
    key: PathBuf,
}

/// Issues a workload certificate for `identity` the way a workload gets one (its own key, a CSR
/// carrying only the SPIFFE id), and writes chain and key as PEM under `dir`.
fn issue_pem(ca: &CertificateAuthority, identity: &Identity, dir: &Path, name: &str) -> PemFiles {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        identity.to_string().try_into().unwrap(),
    )];
    let csr = params.serialize_request(&key).unwrap();
    let issued = ca.sign_csr(csr.der(), identity, TTL).unwrap();
    let files = PemFiles {
        chain: dir.join(format!("{name}-chain.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    std::fs::write(&files.chain, to_pem(&issued.chain)).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

fn write_roots(ca: &CertificateAuthority, dir: &Path) -> PathBuf {
    let path = dir.join("roots.pem");
    std::fs::write(&path, to_pem(ca.roots())).unwrap();
    path
}

// --- Python client → Ambit server ---

/// Ambit's HBONE server for `default/echo` with a [`TcpForwarder`] in front of an echo server,
/// and PEM files for Python clients from the same CA.
struct ServerFixture {
    ca: Arc<CertificateAuthority>,
    forwarder: Arc<TcpForwarder>,
    hbone: SocketAddr,
    echo: SocketAddr,
    roots: PathBuf,
    dir: TempDir,
}

async fn server_fixture(deny: Vec<Identity>) -> ServerFixture {
    require_python_h2();
    let ca = testing::ca();
    let certificates = testing::manager(ca.clone(), TTL);
    let forwarder = Arc::new(TcpForwarder {
        deny,
        ..Default::default()
    });
    let hbone = testing::hbone_server(
        testing::identity("default", "echo"),
        certificates,
        forwarder.clone(),
        Settings::default(),
    )
    .await;
    let dir = TempDir::new();
    ServerFixture {
        roots: write_roots(&ca, &dir.0),
        ca,
        forwarder,
        hbone,
        echo: testing::echo_server().await,
        dir,
    }
}

impl ServerFixture {
    /// PEM files for `default/sleep` from the server's CA.
    fn sleep_cert(&self) -> PemFiles {
        issue_pem(
            &self.ca,
            &testing::identity("default", "sleep"),
            &self.dir.0,
            "sleep",
        )
    }

    /// Runs `hbone_client.py` against the server with `args` and returns its JSON result.
    async fn python_client(&self, cert: Option<&PemFiles>, args: &[&str]) -> Value {
        let mut command = Command::new("python3");
        command
            .arg(script("hbone_client.py"))
            .arg("--address")
            .arg(self.hbone.to_string())
            .arg("--ca")
            .arg(&self.roots)
            .args(args)
            .kill_on_drop(true);
        if let Some(cert) = cert {
            command
                .arg("--cert")
                .arg(&cert.chain)
                .arg("--key")
                .arg(&cert.key);
        }
        let out = tokio::time::timeout(PEER_TIMEOUT, command.output())
            .await
            .expect("python h2 HBONE client: finished within 20 s")
            .expect("python h2 HBONE client: python3 runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "python h2 HBONE client exited with {}: {stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let result = parse_json("python h2 HBONE client", stdout.trim());
        eprintln!("python h2 HBONE client: {stdout}");
        result
    }
}

#[tokio::test]
async fn python_client_connect_gets_200_and_bytes_flow() {
    let fx = server_fixture(vec![]).await;
    let cert = fx.sleep_cert();
    let authority = fx.echo.to_string();
    let payload = "interop bytes from python h2 ".repeat(500);
    let result = fx
        .python_client(
            Some(&cert),
            &["--authority", &authority, "--payload", &payload],
        )
        .await;
    let step = format!("python h2 HBONE client → Ambit server: CONNECT {authority}");
    assert_eq!(
        result["status"].as_u64(),
        Some(200),
        "{step} expected 200, got {:?} (error: {})",
        result["status"],
        str_of(&result, "error")
    );
    assert_eq!(
        str_of(&result, "stage"),
        "done",
        "{step}: the stream did not finish: {}",
        str_of(&result, "error")
    );
    assert_eq!(
        str_of(&result, "echoed"),
        payload,
        "{step}: bytes echoed back through the tunnel differ ({} of {} bytes)",
        result["echoed_bytes"].as_u64().unwrap_or(0),
        payload.len()
    );
    assert_eq!(
        str_of(&result, "tls_version"),
        "TLSv1.3",
        "{step}: negotiated TLS version"
    );
    assert_eq!(str_of(&result, "alpn"), "h2", "{step}: negotiated ALPN");
    let sans: Vec<&str> = result["peer_san"]
        .as_sequence()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert_eq!(
        sans,
        ["spiffe://cluster.local/ns/default/sa/echo"],
        "{step}: the server certificate's SAN as OpenSSL reads it"
    );

    // What Ambit's server parsed from the Python client's request.
    let seen = fx.forwarder.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{step}: the handler saw one request");
    let request = &seen[0];
    assert_eq!(request.target, fx.echo, "{step}: :authority as parsed");
    assert_eq!(
        request.peer_identity,
        testing::identity("default", "sleep"),
        "{step}: client identity from the OpenSSL-presented certificate"
    );
    assert_eq!(
        request.headers.forwarded_for,
        Some("10.0.0.7:41234".parse().unwrap()),
        "{step}: forwarded for= as parsed"
    );
    assert_eq!(
        request.headers.baggage.as_deref(),
        result["sent_headers"]["baggage"].as_str(),
        "{step}: baggage as parsed"
    );
    assert_eq!(
        request.headers.traceparent.as_deref(),
        result["sent_headers"]["traceparent"].as_str(),
        "{step}: traceparent as parsed"
    );
    // The tunnel's byte counts reach the handler once the splice ends.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let finished = fx.forwarder.finished.lock().unwrap().clone();
        if let Some(&(received, sent)) = finished.first() {
            assert_eq!(
                (received, sent),
                (payload.len() as u64, payload.len() as u64),
                "{step}: bytes counted each way"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{step}: the tunnel never finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts the Python client got no HTTP answer because TLS failed.
fn assert_tls_refused(result: &Value, step: &str) {
    assert_eq!(
        str_of(result, "stage"),
        "tls",
        "{step}: expected the TLS handshake to fail, but it got to {:?} (status {:?}, error {})",
        str_of(result, "stage"),
        result["status"],
        str_of(result, "error")
    );
    assert!(
        result["status"].is_null(),
        "{step}: expected no HTTP status, got {:?}",
        result["status"]
    );
}

#[tokio::test]
async fn python_client_without_a_certificate_fails_the_handshake() {
    let fx = server_fixture(vec![]).await;
    let authority = fx.echo.to_string();
    let result = fx.python_client(None, &["--authority", &authority]).await;
    let step = "python h2 HBONE client (no client certificate) → Ambit server: TLS handshake";
    assert_tls_refused(&result, step);
    let error = str_of(&result, "error").to_ascii_lowercase();
    assert!(
        error.contains("certificate required") || error.contains("certificate_required"),
        "{step}: expected OpenSSL to report the server's certificate_required alert, got {error}"
    );
    assert_eq!(
        fx.forwarder.seen.lock().unwrap().len(),
        0,
        "{step}: no request reached the handler"
    );
}

#[tokio::test]
async fn python_client_from_a_foreign_trust_domain_fails_the_handshake() {
    let fx = server_fixture(vec![]).await;
    // Same CA, so the chain verifies: only the trust domain is wrong.
    let foreign = Identity::new("evil.example", "default", "sleep").unwrap();
    let cert = issue_pem(&fx.ca, &foreign, &fx.dir.0, "foreign");
    let authority = fx.echo.to_string();
    let result = fx
        .python_client(Some(&cert), &["--authority", &authority])
        .await;
    let step =
        "python h2 HBONE client (spiffe://evil.example/ns/default/sa/sleep) → Ambit server: TLS handshake";
    assert_tls_refused(&result, step);
    assert!(
        str_of(&result, "error").contains("alert"),
        "{step}: expected a TLS alert from the server, got {}",
        str_of(&result, "error")
    );
    assert_eq!(
        fx.forwarder.seen.lock().unwrap().len(),
        0,
        "{step}: no request reached the handler"
    );
}

/// Asserts an HTTP status answered to the Python client, and that the handler never ran unless
/// `handler_ran`.
fn assert_status(fx: &ServerFixture, result: &Value, step: &str, expected: u64, handler_ran: bool) {
    assert_eq!(
        result["status"].as_u64(),
        Some(expected),
        "{step} expected {expected}, got {:?} (stage {}, error: {})",
        result["status"],
        str_of(result, "stage"),
        str_of(result, "error")
    );
    assert_eq!(
        str_of(result, "echoed"),
        "",
        "{step}: no bytes may flow after a refusal"
    );
    assert_eq!(
        fx.forwarder.seen.lock().unwrap().len(),
        usize::from(handler_ran),
        "{step}: handler calls"
    );
}

#[tokio::test]
async fn python_client_get_instead_of_connect_gets_400() {
    let fx = server_fixture(vec![]).await;
    let cert = fx.sleep_cert();
    let authority = fx.echo.to_string();
    let result = fx
        .python_client(Some(&cert), &["--method", "GET", "--authority", &authority])
        .await;
    let step = format!("python h2 HBONE client → Ambit server: GET {authority}");
    assert_status(&fx, &result, &step, 400, false);
}

#[tokio::test]
async fn python_client_bad_authority_gets_400() {
    let fx = server_fixture(vec![]).await;
    let cert = fx.sleep_cert();
    for authority in ["echo.default.svc.cluster.local:80", "10.0.0.1"] {
        let result = fx
            .python_client(Some(&cert), &["--authority", authority])
            .await;
        let step = format!("python h2 HBONE client → Ambit server: CONNECT {authority}");
        assert_status(&fx, &result, &step, 400, false);
    }
}

#[tokio::test]
async fn python_client_denied_by_the_handler_gets_401() {
    let fx = server_fixture(vec![testing::identity("default", "sleep")]).await;
    let cert = fx.sleep_cert();
    let authority = fx.echo.to_string();
    let result = fx
        .python_client(Some(&cert), &["--authority", &authority])
        .await;
    let step = format!(
        "python h2 HBONE client (default/sleep, denied) → Ambit server: CONNECT {authority}"
    );
    assert_status(&fx, &result, &step, 401, true);
}

// --- Ambit client → Python server ---

/// `hbone_server.py` proving `server_identity`, trusting `ca`; returns the address it listens on
/// and the process (its stdout positioned at the record line).
struct PythonServer {
    address: SocketAddr,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    child: tokio::process::Child,
    _dir: TempDir,
}

async fn python_server(ca: &CertificateAuthority, server_identity: &Identity) -> PythonServer {
    require_python_h2();
    let dir = TempDir::new();
    let cert = issue_pem(ca, server_identity, &dir.0, "server");
    let roots = write_roots(ca, &dir.0);
    let mut child = Command::new("python3")
        .arg(script("hbone_server.py"))
        .arg("--cert")
        .arg(&cert.chain)
        .arg("--key")
        .arg(&cert.key)
        .arg("--ca")
        .arg(&roots)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python h2 HBONE server: python3 runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(PEER_TIMEOUT, lines.next_line())
        .await
        .expect("python h2 HBONE server: listening within 20 s")
        .unwrap()
        .expect("python h2 HBONE server: prints where it listens");
    let address = str_of(&parse_json("python h2 HBONE server", &first), "listening")
        .parse()
        .expect("python h2 HBONE server: listening on ip:port");
    PythonServer {
        address,
        lines,
        child,
        _dir: dir,
    }
}

impl PythonServer {
    /// The record the server prints after its one connection.
    async fn record(mut self) -> Value {
        let line = tokio::time::timeout(PEER_TIMEOUT, self.lines.next_line())
            .await
            .expect("python h2 HBONE server: record within 20 s")
            .unwrap()
            .expect("python h2 HBONE server: prints its record");
        eprintln!("python h2 HBONE server: {line}");
        let _ = self.child.wait().await;
        parse_json("python h2 HBONE server", &line)
    }
}

#[tokio::test]
async fn ambit_client_request_as_a_python_server_sees_it() {
    let ca = testing::ca();
    let certificates: Arc<CertificateManager> = testing::manager(ca.clone(), TTL);
    let echo_id = testing::identity("default", "echo");
    let server = python_server(&ca, &echo_id).await;
    let target: SocketAddr = "10.0.0.1:80".parse().unwrap();
    let baggage = "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=sleep,service.name=sleep,service.version=v1";
    let request = TunnelRequest {
        source: testing::identity("default", "sleep"),
        destination_identities: vec![echo_id.clone()],
        hbone_address: server.address,
        target,
        headers: ConnectHeaders {
            forwarded_for: Some("10.0.0.7:41234".parse().unwrap()),
            baggage: Some(baggage.into()),
            ..Default::default()
        },
    };
    let client = Client::new(certificates, Settings::default());
    let step = format!("Ambit client → python h2 HBONE server: CONNECT {target}");
    let Ok(connected) = tokio::time::timeout(PEER_TIMEOUT, client.connect(&request)).await else {
        panic!("{step}: no answer within 20 s");
    };
    let mut tunnel = connected.unwrap_or_else(|e| panic!("{step} expected 200, got: {e}"));
    assert_eq!(
        tunnel.peer().identity,
        echo_id,
        "{step}: the identity the python server proved"
    );
    let payload = b"interop bytes from Ambit".repeat(1000);
    let echoed = tokio::time::timeout(
        PEER_TIMEOUT,
        testing::echo_round_trip(&mut tunnel, &payload),
    )
    .await
    .unwrap_or_else(|_| panic!("{step}: echo did not finish within 20 s"))
    .unwrap_or_else(|e| panic!("{step}: echo failed: {e}"));
    assert_eq!(echoed, payload, "{step}: bytes echoed by the python server");
    drop(tunnel);
    drop(client);

    let record = server.record().await;
    assert!(
        record["error"].is_null(),
        "{step}: the python server reported an error: {}",
        str_of(&record, "error")
    );
    assert_eq!(str_of(&record, "method"), "CONNECT", "{step}: :method");
    assert_eq!(
        str_of(&record, "authority"),
        target.to_string(),
        "{step}: :authority"
    );
    let headers = &record["headers"];
    assert_eq!(
        str_of(headers, "forwarded"),
        r#"for="10.0.0.7:41234""#,
        "{step}: forwarded header"
    );
    assert_eq!(
        str_of(headers, "baggage"),
        baggage,
        "{step}: baggage header"
    );
    let traceparent = str_of(headers, "traceparent");
    let parts: Vec<&str> = traceparent.split('-').collect();
    let hex = |s: &str, len: usize| s.len() == len && s.chars().all(|c| c.is_ascii_hexdigit());
    assert!(
        parts.len() == 4
            && parts[0] == "00"
            && hex(parts[1], 32)
            && hex(parts[2], 16)
            && hex(parts[3], 2)
            && parts[1] != "0".repeat(32)
            && parts[2] != "0".repeat(16),
        "{step}: traceparent {traceparent:?} is not W3C 00-<32 hex>-<16 hex>-<2 hex>"
    );
    assert_eq!(str_of(&record, "alpn"), "h2", "{step}: negotiated ALPN");
    assert_eq!(
        str_of(&record, "tls_version"),
        "TLSv1.3",
        "{step}: negotiated TLS version"
    );
    let sans: Vec<&str> = record["client_san"]
        .as_sequence()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert_eq!(
        sans,
        ["spiffe://cluster.local/ns/default/sa/sleep"],
        "{step}: Ambit's client certificate SAN as OpenSSL reads it"
    );
    assert_eq!(
        record["received"].as_str().map(str::len),
        Some(payload.len()),
        "{step}: bytes the python server received"
    );
}

#[tokio::test]
async fn ambit_client_refuses_a_python_server_with_the_wrong_san() {
    let ca = testing::ca();
    let certificates = testing::manager(ca.clone(), TTL);
    // A valid certificate from the same CA, for someone other than the expected destination.
    let server = python_server(&ca, &testing::identity("default", "impostor")).await;
    let target: SocketAddr = "10.0.0.1:80".parse().unwrap();
    let request = TunnelRequest {
        source: testing::identity("default", "sleep"),
        destination_identities: vec![testing::identity("default", "echo")],
        hbone_address: server.address,
        target,
        headers: ConnectHeaders::default(),
    };
    let client = Client::new(certificates, Settings::default());
    let step = format!(
        "Ambit client (expecting default/echo) → python h2 HBONE server (default/impostor): CONNECT {target}"
    );
    let Ok(connected) = tokio::time::timeout(PEER_TIMEOUT, client.connect(&request)).await else {
        panic!("{step}: no answer within 20 s");
    };
    let Err(err) = connected else {
        panic!("{step}: expected the handshake to be refused, got a tunnel");
    };
    let message = err.to_string();
    assert!(
        message.contains("mTLS handshake") && message.contains("default/sa/impostor"),
        "{step}: expected an mTLS handshake error naming the impostor identity, got: {message}"
    );
    drop(client);
    let record = server.record().await;
    assert!(
        str_of(&record, "error").contains("handshake"),
        "{step}: the python server should see the handshake fail, got record {record:?}"
    );
    assert!(
        record["method"].is_null(),
        "{step}: no request may reach the python server"
    );
}
