//! The built-in CA, Istio's `cacerts` layout, CSR checks, and certificate rotation under traffic.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambit_mesh::hbone::client::{Client, TunnelRequest};
use ambit_mesh::hbone::{ConnectHeaders, Settings};
use ambit_mesh::identity::{
    BoxFuture, CaError, CertificateAuthority, CertificateManager, CertificateProvider,
    CertificateRequest, IssuedChain, ManagerError, ManagerSettings,
};
use ambit_mesh::testing::{self, TcpForwarder};
use ambit_mesh::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ambit-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn issued_certificates_carry_the_identity_and_ttl() {
    let ca = testing::ca();
    let id = testing::identity("shop", "cart");
    let cert = ca.issue(&id, Duration::from_secs(600)).unwrap();
    assert_eq!(cert.identity(), &id);
    assert_eq!(tls::spiffe_identities(cert.leaf()).unwrap(), vec![id]);
    let lifetime = cert.not_after().duration_since(cert.not_before()).unwrap();
    assert!(
        (599..=601).contains(&lifetime.as_secs()),
        "lifetime {lifetime:?}"
    );
    let half = cert.refresh_at().duration_since(cert.not_before()).unwrap();
    assert!((299..=301).contains(&half.as_secs()), "refresh at {half:?}");
    assert_eq!(
        cert.chain().len(),
        1,
        "a root-signed leaf needs no intermediates"
    );
}

#[test]
fn the_ca_signs_only_what_the_csr_asks_for_the_caller() {
    let ca = testing::ca();
    let asked = testing::identity("shop", "cart");
    let request = CertificateRequest::new(&asked).unwrap();
    assert!(request
        .csr_pem()
        .starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
    let other = testing::identity("shop", "admin");
    let err = ca
        .sign_csr(request.csr_der(), &other, Duration::from_secs(60))
        .err()
        .unwrap();
    assert!(matches!(err, CaError::CsrIdentityMismatch { .. }), "{err}");
    assert!(err
        .to_string()
        .contains("spiffe://cluster.local/ns/shop/sa/cart"));

    let mut tampered = request.csr_der().to_vec();
    let last = tampered.len() - 1;
    tampered[last] ^= 0xff;
    let err = ca
        .sign_csr(&tampered, &asked, Duration::from_secs(60))
        .err()
        .unwrap();
    assert!(matches!(err, CaError::BadCsr(_)), "{err}");
    assert!(ca
        .sign_csr(b"not a csr", &asked, Duration::from_secs(60))
        .is_err());
}

#[test]
fn a_chain_for_another_key_or_identity_is_refused() {
    let ca = testing::ca();
    let id = testing::identity("shop", "cart");
    let first = CertificateRequest::new(&id).unwrap();
    let second = CertificateRequest::new(&id).unwrap();
    let issued = ca
        .sign_csr(first.csr_der(), &id, Duration::from_secs(60))
        .unwrap();
    let err = second.into_certificate(issued).err().unwrap();
    assert!(
        err.to_string().contains("does not match the workload key"),
        "{err}"
    );

    let other = testing::identity("shop", "admin");
    let request = CertificateRequest::new(&id).unwrap();
    let wrong = ca.issue(&other, Duration::from_secs(60)).unwrap();
    let err = request
        .into_certificate(IssuedChain {
            chain: wrong.chain().to_vec(),
            roots: ca.roots().to_vec(),
        })
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("carries spiffe://cluster.local/ns/shop/sa/admin"),
        "{err}"
    );
}

#[test]
fn cacerts_with_an_intermediate_round_trip_through_files() {
    let root = testing::ca();
    let intermediate = root
        .new_intermediate("cluster.local", "Ambit intermediate")
        .unwrap();
    let dir = temp_dir("cacerts-intermediate");
    intermediate.save(&dir).unwrap();
    for file in [
        "ca-cert.pem",
        "ca-key.pem",
        "root-cert.pem",
        "cert-chain.pem",
    ] {
        assert!(dir.join(file).exists(), "{file} written");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let loaded = CertificateAuthority::load(&dir).unwrap();
    assert_eq!(loaded.roots(), root.roots());
    let cert = loaded
        .issue(&testing::identity("shop", "cart"), Duration::from_secs(60))
        .unwrap();
    assert_eq!(cert.chain().len(), 2, "leaf + intermediate, root left out");
    assert_eq!(cert.roots(), root.roots());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_self_signed_ca_loads_without_root_or_chain_files() {
    let dir = temp_dir("cacerts-selfsigned");
    let ca = testing::ca();
    ca.save(&dir).unwrap();
    std::fs::remove_file(dir.join("root-cert.pem")).unwrap();
    std::fs::remove_file(dir.join("cert-chain.pem")).unwrap();
    let loaded = CertificateAuthority::load(&dir).unwrap();
    assert_eq!(loaded.roots(), ca.roots());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn broken_cacerts_are_refused_naming_the_file() {
    let dir = temp_dir("cacerts-broken");
    let err = CertificateAuthority::load(&dir).err().unwrap();
    assert!(err.to_string().contains("ca-cert.pem"), "{err}");

    // A key that belongs to another CA.
    testing::ca().save(&dir).unwrap();
    let other = temp_dir("cacerts-other");
    testing::ca().save(&other).unwrap();
    std::fs::copy(other.join("ca-key.pem"), dir.join("ca-key.pem")).unwrap();
    let err = CertificateAuthority::load(&dir).err().unwrap();
    assert!(
        err.to_string().contains("ca-key.pem") && err.to_string().contains("does not belong"),
        "{err}"
    );

    // An intermediate without its root.
    let intermediate = testing::ca()
        .new_intermediate("cluster.local", "i")
        .unwrap();
    intermediate.save(&dir).unwrap();
    std::fs::remove_file(dir.join("root-cert.pem")).unwrap();
    let err = CertificateAuthority::load(&dir).err().unwrap();
    assert!(err.to_string().contains("root-cert.pem"), "{err}");

    // Garbage PEM.
    std::fs::write(dir.join("ca-cert.pem"), "-----BEGIN CERTIFICATE-----\n!!\n").unwrap();
    let err = CertificateAuthority::load(&dir).err().unwrap();
    assert!(err.to_string().contains("ca-cert.pem"), "{err}");

    // A workload (non-CA) certificate posing as the CA.
    let workload = testing::ca()
        .issue(&testing::identity("a", "b"), Duration::from_secs(60))
        .unwrap();
    std::fs::write(dir.join("ca-cert.pem"), pem_of(workload.leaf().as_ref())).unwrap();
    assert!(CertificateAuthority::load(&dir).is_err());
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(other).unwrap();
}

fn pem_of(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// Fails while `failing` is set, counting calls; otherwise signs with the CA.
struct FlakyCa {
    ca: Arc<CertificateAuthority>,
    fail_after: usize,
    calls: AtomicUsize,
}

impl CertificateProvider for FlakyCa {
    fn sign<'a>(
        &'a self,
        request: &'a CertificateRequest,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<IssuedChain, ManagerError>> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if call >= self.fail_after {
            return Box::pin(std::future::ready(Err(ManagerError::Provider {
                identity: request.identity().clone(),
                reason: "CA is down".into(),
            })));
        }
        self.ca.sign(request, ttl)
    }
}

#[tokio::test]
async fn a_ca_outage_keeps_the_valid_certificate_and_retries() {
    let provider = Arc::new(FlakyCa {
        ca: testing::ca(),
        fail_after: 1,
        calls: AtomicUsize::new(0),
    });
    let manager = CertificateManager::new(
        provider.clone(),
        ManagerSettings {
            ttl: Duration::from_secs(4),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(400),
        },
    );
    let id = testing::identity("shop", "cart");
    let first = manager.fetch(&id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let calls = provider.calls.load(Ordering::SeqCst);
    assert!(calls >= 3, "the manager kept retrying: {calls} calls");
    let still = manager.fetch(&id).await.unwrap();
    assert_eq!(
        still.leaf(),
        first.leaf(),
        "the valid certificate stays in service"
    );
}

#[tokio::test]
async fn no_certificate_at_all_is_a_clear_error() {
    let provider = Arc::new(FlakyCa {
        ca: testing::ca(),
        fail_after: 0,
        calls: AtomicUsize::new(0),
    });
    let manager = CertificateManager::new(provider, ManagerSettings::default());
    let err = manager
        .fetch(&testing::identity("shop", "cart"))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("CA is down"), "{err}");
}

#[tokio::test]
async fn rotation_keeps_open_tunnels_and_new_connections_use_the_new_cert() {
    let ca = testing::ca();
    // 4 s certificates rotate every 2 s.
    let certificates = testing::manager(ca, Duration::from_secs(4));
    let server_id = testing::identity("default", "echo");
    let hbone = testing::hbone_server(
        server_id.clone(),
        certificates.clone(),
        Arc::new(TcpForwarder::default()),
        Settings::default(),
    )
    .await;
    let request = TunnelRequest {
        source: testing::identity("default", "sleep"),
        destination_identities: vec![server_id.clone()],
        hbone_address: hbone,
        target: testing::echo_server().await,
        headers: ConnectHeaders::default(),
    };
    let client = Client::new(certificates.clone(), Settings::default());
    let mut open = client.connect(&request).await.unwrap();
    let before = open.peer().certificate.clone();
    open.write_all(b"before rotation;").await.unwrap();

    let deadline = SystemTime::now() + Duration::from_secs(6);
    loop {
        let current = certificates.current(&server_id).unwrap();
        if current.leaf() != &before {
            break;
        }
        assert!(
            SystemTime::now() < deadline,
            "the certificate never rotated"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    open.write_all(b"after rotation").await.unwrap();
    open.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    open.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed, b"before rotation;after rotation");

    let fresh_client = Client::new(certificates.clone(), Settings::default());
    let mut fresh = fresh_client.connect(&request).await.unwrap();
    assert_ne!(fresh.peer().certificate, before);
    assert_eq!(
        &fresh.peer().certificate,
        certificates.current(&server_id).unwrap().leaf()
    );
    let echoed = testing::echo_round_trip(&mut fresh, b"new cert")
        .await
        .unwrap();
    assert_eq!(echoed, b"new cert");
}

/// Istio's `tools/certs` Makefiles make plug-in CAs with openssl: an RSA root and an RSA
/// intermediate per cluster, `cert-chain.pem` = intermediate + root. Such a directory must load
/// and issue certificates that verify end to end.
#[tokio::test]
async fn openssl_made_istio_style_cacerts_work() {
    let dir = temp_dir("cacerts-openssl");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("openssl is installed (CI installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("root.conf"),
        "[req]\ndistinguished_name=dn\nprompt=no\nx509_extensions=ext\n[dn]\nO=Istio\nCN=Root CA\n\
         [ext]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("ica.conf"),
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n",
    )
    .unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-sha256",
        "-days",
        "3650",
        "-keyout",
        "root-key.pem",
        "-out",
        "root-cert.pem",
        "-config",
        "root.conf",
    ]);
    run(&["genrsa", "-out", "ca-key.pem", "2048"]);
    run(&[
        "req",
        "-new",
        "-key",
        "ca-key.pem",
        "-subj",
        "/O=Istio/CN=Intermediate CA/L=cluster1",
        "-out",
        "ca.csr",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "ca.csr",
        "-CA",
        "root-cert.pem",
        "-CAkey",
        "root-key.pem",
        "-CAcreateserial",
        "-days",
        "730",
        "-sha256",
        "-extfile",
        "ica.conf",
        "-out",
        "ca-cert.pem",
    ]);
    let chain = std::fs::read_to_string(dir.join("ca-cert.pem")).unwrap()
        + &std::fs::read_to_string(dir.join("root-cert.pem")).unwrap();
    std::fs::write(dir.join("cert-chain.pem"), chain).unwrap();

    let ca = Arc::new(CertificateAuthority::load(&dir).unwrap());
    let certificates = testing::manager(ca, Duration::from_secs(3600));
    let server_id = testing::identity("default", "echo");
    let hbone = testing::hbone_server(
        server_id.clone(),
        certificates.clone(),
        Arc::new(TcpForwarder::default()),
        Settings::default(),
    )
    .await;
    let client = Client::new(certificates.clone(), Settings::default());
    let mut tunnel = client
        .connect(&TunnelRequest {
            source: testing::identity("default", "sleep"),
            destination_identities: vec![server_id.clone()],
            hbone_address: hbone,
            target: testing::echo_server().await,
            headers: ConnectHeaders::default(),
        })
        .await
        .unwrap();
    assert_eq!(certificates.current(&server_id).unwrap().chain().len(), 2);
    let echoed = testing::echo_round_trip(&mut tunnel, b"rsa chain")
        .await
        .unwrap();
    assert_eq!(echoed, b"rsa chain");
    std::fs::remove_dir_all(dir).unwrap();
}
