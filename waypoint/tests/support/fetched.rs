//! What the tests of fetched modules share: a test CA and a server certificate for 127.0.0.1
//! signed by it, for the HTTPS servers modules are fetched from (the CA named in
//! `AMBIT_WASM_CA_FILE` once per test binary), and a WasmPlugin whose configuration shows when
//! it is in force.

#![allow(dead_code)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ambit_waypoint::wasm::remote::CA_FILE_ENV;
use hyper::StatusCode;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

use super::l7mesh::L7Mesh;

/// A CA and a certificate for 127.0.0.1 signed by it.
pub struct TestPki {
    pub ca_pem: String,
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

pub fn pki() -> TestPki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    TestPki {
        ca_pem: ca_cert.pem(),
        cert_der: cert.der().to_vec(),
        key_der: key.serialize_der(),
    }
}

/// The trusted CA, written once and named in the waypoint's environment for this test binary.
pub fn trusted() -> &'static TestPki {
    static PKI: OnceLock<TestPki> = OnceLock::new();
    PKI.get_or_init(|| {
        let pki = pki();
        let path = std::env::temp_dir().join(format!(
            "ambit-wasm-ca-{}-{}.pem",
            std::process::id(),
            env!("CARGO_CRATE_NAME")
        ));
        std::fs::write(&path, &pki.ca_pem).unwrap();
        // Set once, before any fetch, to the same value for every test of this binary.
        std::env::set_var(CA_FILE_ENV, &path);
        pki
    })
}

impl TestPki {
    /// A TLS acceptor presenting this certificate.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let certs = vec![rustls::pki_types::CertificateDer::from(
            self.cert_der.clone(),
        )];
        let key = rustls::pki_types::PrivateKeyDer::try_from(self.key_der.clone()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

/// A fail-closed WasmPlugin on the waypoint setting `x-test: <tag>` on requests.
pub fn plugin(url: &str, extra: &str, tag: &str) -> String {
    format!(
        r#"apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: remote, namespace: default}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
  url: {url}
{extra}  pluginConfig: {{request: {{set: {{x-test: {tag}}}}}}}
"#
    )
}

/// Polls until the echo app reports `x-test: want` (the plugin is in force), or 10 s pass.
pub async fn wait_for_tag(mesh: &L7Mesh, want: &str) -> (StatusCode, String) {
    let mut last = (StatusCode::OK, String::new());
    for _ in 0..100 {
        let (status, headers, body) = mesh.get("/", &[]).await;
        let seen = headers
            .get("x-seen-test")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        if status == StatusCode::OK && seen == want {
            return (status, seen);
        }
        last = (status, format!("{seen} / {body}"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}
