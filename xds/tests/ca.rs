//! The Istio CA client against the stand-in istiod's CA service, over real gRPC, alone and
//! behind ambit-mesh's certificate manager.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambit_mesh::identity::{
    CertificateAuthority, CertificateManager, CertificateRequest, Identity, ManagerError,
    ManagerSettings,
};
use ambit_xds::ca::CaClientError;
use ambit_xds::testing::{CaMode, FakeIstiod, ServingCert};
use ambit_xds::{CaClient, CaClientSettings, ControlPlane, ControlPlaneConfig};

fn identity(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa).unwrap()
}

struct Setup {
    istiod: FakeIstiod,
    client: Arc<CaClient>,
    dir: std::path::PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn setup(tls: bool) -> Setup {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("ambit-xds-ca-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("istio-token");
    std::fs::write(&token, "node-token").unwrap();
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let (istiod, root_cert) = if tls {
        let serving = ServingCert::generate();
        let root = dir.join("root-cert.pem");
        std::fs::write(&root, &serving.root_pem).unwrap();
        (
            FakeIstiod::start_tls(ca, serving.server_config).await,
            Some(root),
        )
    } else {
        (FakeIstiod::start(ca).await, None)
    };
    let plane = ControlPlane::new(ControlPlaneConfig {
        address: istiod.url(),
        root_cert,
        token_path: Some(token),
        cluster_id: "cluster-7".into(),
    })
    .unwrap();
    let client = Arc::new(CaClient::new(plane, CaClientSettings::default()));
    Setup {
        istiod,
        client,
        dir,
    }
}

#[tokio::test]
async fn issues_a_certificate_for_the_impersonated_identity_over_tls() {
    let setup = setup(true).await;
    let manager = CertificateManager::new(setup.client.clone(), ManagerSettings::default());
    let echo = identity("demo", "echo");
    let cert = manager.fetch(&echo).await.unwrap();
    assert_eq!(cert.identity(), &echo);
    assert_eq!(
        ambit_mesh::tls::spiffe_identities(cert.leaf()).unwrap(),
        vec![echo.clone()]
    );
    assert_eq!(cert.roots(), setup.istiod.ca().roots());
    let call = setup.istiod.next_ca_call().await;
    assert_eq!(
        call.impersonated_identity.as_deref(),
        Some("spiffe://cluster.local/ns/demo/sa/echo")
    );
    assert_eq!(call.authorization.as_deref(), Some("Bearer node-token"));
    assert_eq!(call.cluster_id.as_deref(), Some("cluster-7"));
    assert_eq!(call.validity_duration, 86400);
    assert!(
        call.csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
        "{}",
        call.csr
    );
    let lifetime = cert.not_after().duration_since(cert.not_before()).unwrap();
    assert_eq!(lifetime, Duration::from_secs(86400));
}

#[tokio::test]
async fn concurrent_requests_share_one_connection_and_all_succeed() {
    let setup = setup(false).await;
    let manager = Arc::new(CertificateManager::new(
        setup.client.clone(),
        ManagerSettings::default(),
    ));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let manager = manager.clone();
        tasks.push(tokio::spawn(async move {
            let id = identity("demo", &format!("sa-{i}"));
            manager.fetch(&id).await.map(|c| c.identity() == &id)
        }));
    }
    for task in tasks {
        assert!(task.await.unwrap().unwrap());
    }
}

#[tokio::test]
async fn a_ca_outage_keeps_the_unexpired_certificate_and_retries() {
    let setup = setup(false).await;
    let manager = CertificateManager::new(
        setup.client.clone(),
        ManagerSettings {
            ttl: Duration::from_secs(4),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(400),
        },
    );
    let sleep = identity("demo", "sleep");
    let first = manager.fetch(&sleep).await.unwrap();
    setup.istiod.next_ca_call().await;
    setup.istiod.set_ca_mode(CaMode::Fail(
        tonic::Code::Unavailable,
        "istiod is restarting".into(),
    ));
    // Past the refresh point (half of 4 s): refreshes fail, the valid certificate stays.
    tokio::time::sleep(Duration::from_millis(2800)).await;
    let during = manager.fetch(&sleep).await.unwrap();
    assert_eq!(
        during.not_after(),
        first.not_after(),
        "the unexpired certificate keeps serving"
    );
    assert!(SystemTime::now() < first.not_after());
    let mut retries = 0;
    while let Ok(call) =
        tokio::time::timeout(Duration::from_millis(50), setup.istiod.next_ca_call()).await
    {
        assert_eq!(
            call.impersonated_identity.as_deref(),
            Some("spiffe://cluster.local/ns/demo/sa/sleep")
        );
        retries += 1;
    }
    assert!(
        retries >= 2,
        "the manager retries with backoff ({retries} calls)"
    );

    setup.istiod.set_ca_mode(CaMode::Sign);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = manager.fetch(&sleep).await.unwrap();
        if now.not_after() != first.not_after() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new certificate after the CA came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn garbage_answers_are_refused_with_a_clear_error() {
    let setup = setup(false).await;
    let echo = identity("demo", "echo");
    let ask = || async {
        let request = CertificateRequest::new(&echo).unwrap();
        setup
            .client
            .create_certificate(&request, Duration::from_secs(3600))
            .await
    };

    setup
        .istiod
        .set_ca_mode(CaMode::Garbage(vec!["hello".into()]));
    let err = ask().await.unwrap_err();
    assert!(
        matches!(err, CaClientError::Garbage { index: 0, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("cert_chain[0]"), "{err}");

    let not_x509 = pem::encode(&pem::Pem::new("CERTIFICATE", b"not DER".to_vec()));
    setup.istiod.set_ca_mode(CaMode::Garbage(vec![not_x509]));
    let err = ask().await.unwrap_err();
    assert!(
        err.to_string().contains("not an X.509 certificate"),
        "{err}"
    );

    setup.istiod.set_ca_mode(CaMode::Garbage(vec![]));
    let err = ask().await.unwrap_err();
    assert!(matches!(err, CaClientError::EmptyChain(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "the Istio CA returned an empty certificate chain for spiffe://cluster.local/ns/demo/sa/echo"
    );

    setup
        .istiod
        .set_ca_mode(CaMode::WrongIdentity(identity("demo", "admin")));
    let err = ask().await.unwrap_err();
    assert!(
        matches!(err, CaClientError::WrongIdentity { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("spiffe://cluster.local/ns/demo/sa/admin"),
        "{err}"
    );

    setup.istiod.set_ca_mode(CaMode::Fail(
        tonic::Code::PermissionDenied,
        "not a trusted node account".into(),
    ));
    let err = ask().await.unwrap_err();
    assert!(
        err.to_string().contains("PermissionDenied")
            && err.to_string().contains("not a trusted node account"),
        "{err}"
    );

    // Behind the manager, the reason reaches whoever asks for a certificate.
    setup
        .istiod
        .set_ca_mode(CaMode::Garbage(vec!["hello".into()]));
    let manager = CertificateManager::new(setup.client.clone(), ManagerSettings::default());
    match manager.fetch(&echo).await {
        Err(ManagerError::Unavailable { reason, .. }) => {
            assert!(reason.contains("cert_chain[0]"), "{reason}")
        }
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test]
async fn an_unreachable_ca_or_a_wrong_root_is_a_clear_error() {
    let setup = setup(true).await;
    // A root that did not sign the serving certificate.
    let other = ServingCert::generate();
    let root = setup.dir.join("other-root.pem");
    std::fs::write(&root, other.root_pem).unwrap();
    let plane = ControlPlane::new(ControlPlaneConfig {
        address: setup.istiod.url(),
        root_cert: Some(root),
        token_path: None,
        cluster_id: "Kubernetes".into(),
    })
    .unwrap();
    let client = CaClient::new(plane, CaClientSettings::default());
    let request = CertificateRequest::new(&identity("demo", "echo")).unwrap();
    let err = client
        .create_certificate(&request, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("TLS with https://localhost"),
        "{err}"
    );

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let plane = ControlPlane::new(ControlPlaneConfig {
        address: format!("http://127.0.0.1:{port}"),
        root_cert: None,
        token_path: None,
        cluster_id: "Kubernetes".into(),
    })
    .unwrap();
    let err = CaClient::new(plane, CaClientSettings::default())
        .create_certificate(&request, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("cannot connect to http://127.0.0.1:{port}")),
        "{err}"
    );

    let err = ControlPlane::new(ControlPlaneConfig {
        address: "istiod:15012".into(),
        root_cert: None,
        token_path: None,
        cluster_id: String::new(),
    })
    .unwrap_err();
    assert!(err.to_string().contains("https"), "{err}");
}
