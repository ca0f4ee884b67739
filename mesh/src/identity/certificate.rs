//! A workload's key, its certificate signing request, and the issued certificate ready for TLS.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::Identity;
use crate::tls;

/// Why a key, request or certificate could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("generating the workload key or CSR failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the CA returned no certificate for {0}")]
    EmptyChain(Identity),
    #[error("the certificate issued for {requested} carries {actual} instead")]
    WrongIdentity { requested: Identity, actual: String },
    #[error("the issued certificate could not be parsed: {0}")]
    Parse(String),
    #[error("the issued certificate does not match the workload key: {0}")]
    KeyMismatch(rustls::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// What a CA answers to a CSR: the chain leaf first (a trailing root is allowed, as Istio's CA
/// sends one) and the roots to trust peers with.
#[derive(Clone, Debug)]
pub struct IssuedChain {
    pub chain: Vec<CertificateDer<'static>>,
    pub roots: Vec<CertificateDer<'static>>,
}

/// A fresh ECDSA P-256 key and a CSR for it carrying the identity as its only URI SAN (no CN), as
/// Istio's ztunnel sends to the Istio CA.
pub struct CertificateRequest {
    identity: Identity,
    key: KeyPair,
    csr_der: Vec<u8>,
    csr_pem: String,
}

impl CertificateRequest {
    pub fn new(identity: &Identity) -> Result<Self, CertificateError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        let csr = params.serialize_request(&key)?;
        Ok(CertificateRequest {
            identity: identity.clone(),
            csr_der: csr.der().to_vec(),
            csr_pem: csr.pem()?,
            key,
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The CSR in DER, as the built-in CA takes it.
    pub fn csr_der(&self) -> &[u8] {
        &self.csr_der
    }

    /// The CSR in PEM, as Istio's `CreateCertificate` takes it.
    pub fn csr_pem(&self) -> &str {
        &self.csr_pem
    }

    /// Joins the request's key with the chain the CA issued for it.
    ///
    /// `chain` is leaf first; a trailing self-signed root is allowed (Istio's CA returns one) and
    /// is not sent to peers. The leaf must carry the requested identity and match the key.
    pub fn into_certificate(
        self,
        issued: IssuedChain,
    ) -> Result<WorkloadCertificate, CertificateError> {
        let IssuedChain { chain, roots } = issued;
        let leaf = chain
            .first()
            .ok_or_else(|| CertificateError::EmptyChain(self.identity.clone()))?;
        let presented = tls::spiffe_identities(leaf)?;
        if !presented.contains(&self.identity) {
            return Err(CertificateError::WrongIdentity {
                requested: self.identity,
                actual: presented
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let (not_before, not_after) = validity(leaf)?;
        let chain: Vec<_> = chain
            .into_iter()
            .filter(|cert| !roots.contains(cert))
            .collect();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()));
        let signing_key = tls::provider()
            .key_provider
            .load_private_key(key_der)
            .map_err(CertificateError::KeyMismatch)?;
        let certified = CertifiedKey::new(chain.clone(), signing_key);
        certified
            .keys_match()
            .map_err(CertificateError::KeyMismatch)?;
        let root_store = tls::root_store(&roots)?;
        Ok(WorkloadCertificate {
            identity: self.identity,
            chain,
            roots,
            root_store,
            certified: Arc::new(certified),
            not_before,
            not_after,
            server_config: OnceLock::new(),
        })
    }
}

/// An issued workload certificate with its key, chain and trust roots, ready to serve TLS.
///
/// Immutable: rotation replaces the whole value, so connections keep the certificate they were
/// established with.
pub struct WorkloadCertificate {
    identity: Identity,
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    root_store: Arc<RootCertStore>,
    certified: Arc<CertifiedKey>,
    not_before: SystemTime,
    not_after: SystemTime,
    server_config: OnceLock<Arc<rustls::ServerConfig>>,
}

impl WorkloadCertificate {
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Leaf first, then intermediates; never the root.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When to ask for the next certificate: half way through this one's life, as Istio does.
    pub fn refresh_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + lifetime / 2
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    pub(crate) fn root_store(&self) -> Arc<RootCertStore> {
        self.root_store.clone()
    }

    pub(crate) fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }

    /// The HBONE server configuration for this certificate, built on first use and then shared by
    /// every handshake until the certificate rotates.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, tls::TlsError> {
        if let Some(config) = self.server_config.get() {
            return Ok(config.clone());
        }
        let config = Arc::new(tls::server_config(self)?);
        Ok(self.server_config.get_or_init(|| config).clone())
    }
}

impl std::fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// The validity window of a DER certificate.
pub(crate) fn validity(
    cert: &CertificateDer<'_>,
) -> Result<(SystemTime, SystemTime), CertificateError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| CertificateError::Parse(e.to_string()))?;
    let to_system = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            UNIX_EPOCH
        }
    };
    let v = parsed.validity();
    Ok((to_system(v.not_before), to_system(v.not_after)))
}
