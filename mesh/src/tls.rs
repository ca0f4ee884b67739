//! mTLS for HBONE: rustls configurations and the peer verifiers that turn a certificate chain into a
//! SPIFFE identity check.
//!
//! Both sides speak TLS 1.3 only with ALPN `h2`. The server requires a client certificate that chains
//! to the trust roots and whose trust domain equals its own; finer authorization is left to policy.
//! The client verifies the server's chain and requires one of its SPIFFE URI SANs to be among the
//! identities it expected; DNS names and SNI play no part.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::{Identity, WorkloadCertificate};

/// The only ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a TLS configuration could not be built, or why a peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("building the TLS configuration failed: {0}")]
    Config(#[from] rustls::Error),
    #[error("the trust roots are unusable: {0}")]
    Roots(String),
    #[error("peer certificate has no SPIFFE identity (URI SAN spiffe://<td>/ns/<ns>/sa/<sa>)")]
    NoSpiffeIdentity,
    #[error("peer identity {actual} is not among the expected identities [{expected}]")]
    UnexpectedIdentity { actual: String, expected: String },
    #[error("peer identity {peer} is from trust domain {peer_td:?}, but this workload only accepts {local_td:?}")]
    ForeignTrustDomain {
        peer: String,
        peer_td: String,
        local_td: String,
    },
    #[error("peer certificate could not be parsed: {0}")]
    BadCertificate(String),
}

/// The crypto provider every HBONE configuration uses: ring, with the TLS 1.3 suites Istio's
/// ztunnel offers (AES-GCM only).
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    cipher_suite::TLS13_AES_256_GCM_SHA384,
                    cipher_suite::TLS13_AES_128_GCM_SHA256,
                ],
                ..default_provider()
            })
        })
        .clone()
}

/// Builds a root store from DER certificates, refusing an empty or unusable set so that a
/// misconfigured workload fails closed instead of trusting nothing useful.
pub fn root_store(roots: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    let (added, ignored) = store.add_parsable_certificates(roots.iter().cloned());
    if added == 0 {
        return Err(TlsError::Roots(format!(
            "none of the {} root certificate(s) could be used ({ignored} ignored)",
            roots.len()
        )));
    }
    Ok(Arc::new(store))
}

/// The server side of HBONE for one workload certificate: TLS 1.3, ALPN h2, client certificate
/// required from the same trust domain.
pub fn server_config(cert: &WorkloadCertificate) -> Result<rustls::ServerConfig, TlsError> {
    let inner = WebPkiClientVerifier::builder_with_provider(cert.root_store(), provider())
        .build()
        .map_err(|e| TlsError::Roots(e.to_string()))?;
    let verifier = Arc::new(TrustDomainVerifier {
        inner,
        trust_domain: cert.identity().trust_domain().to_owned(),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(FixedCertificate(cert.certified_key())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Tickets and the session cache would let a resumed session skip the client-certificate check
    // against the current roots.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(config)
}

/// The client side of HBONE: presents `cert` and accepts the server only if one of its SPIFFE SANs
/// is in `expected`.
pub fn client_config(
    cert: &WorkloadCertificate,
    expected: &[Identity],
) -> Result<rustls::ClientConfig, TlsError> {
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: cert.root_store(),
        expected: expected.to_vec(),
        provider: provider(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(FixedCertificate(cert.certified_key())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // The server picks its certificate by the address it was reached on, not by name.
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The server name handed to rustls: unused for verification (SNI is off), but rustls wants one.
pub fn server_name_for(addr: std::net::SocketAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.ip().into())
}

/// Every SPIFFE workload identity among the URI SANs of a DER certificate.
pub fn spiffe_identities(cert: &CertificateDer<'_>) -> Result<Vec<Identity>, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::URI(uri) => uri.parse().ok(),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The single SPIFFE identity of a verified peer leaf certificate.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    spiffe_identities(cert)?
        .into_iter()
        .next()
        .ok_or(TlsError::NoSpiffeIdentity)
}

/// An operator-readable account of a failed TLS handshake: rustls prints certificate errors of its
/// own kinds well, but ours (wrong identity, foreign trust domain) only as a debug dump.
pub fn explain_handshake_error(err: &std::io::Error) -> String {
    let ours = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|tls| match tls {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
                Some(format!("invalid peer certificate: {}", other.0))
            }
            _ => None,
        });
    ours.unwrap_or_else(|| err.to_string())
}

fn refuse(err: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(err),
    )))
}

/// Presents one certificate whatever the handshake asks; rotation builds a new configuration.
#[derive(Debug)]
struct FixedCertificate(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for FixedCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// WebPKI chain verification, then: the client's SPIFFE trust domain must be ours.
#[derive(Debug)]
struct TrustDomainVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let peer = peer_identity(end_entity).map_err(refuse)?;
        if peer.trust_domain() != self.trust_domain {
            return Err(refuse(TlsError::ForeignTrustDomain {
                peer_td: peer.trust_domain().to_owned(),
                peer: peer.to_string(),
                local_td: self.trust_domain.clone(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// WebPKI chain verification against the roots, then a SPIFFE SAN check instead of a DNS name check.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let presented = spiffe_identities(end_entity).map_err(refuse)?;
        if presented.is_empty() {
            return Err(refuse(TlsError::NoSpiffeIdentity));
        }
        if presented.iter().any(|id| self.expected.contains(id)) {
            return Ok(ServerCertVerified::assertion());
        }
        Err(refuse(TlsError::UnexpectedIdentity {
            actual: presented
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            expected: self
                .expected
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        }))
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
