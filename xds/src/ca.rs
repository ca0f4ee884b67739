//! The Istio CA client: `istio.v1.auth.IstioCertificateService/CreateCertificate`, as Istio's
//! ztunnel calls it, behind Ambit's [`CertificateProvider`] so the [`CertificateManager`]
//! (rotation at half life, backoff, keeping a valid certificate through outages) drives it.
//!
//! ztunnel asks for its pods' identities, not its own: each request carries the workload's
//! SPIFFE id as `ImpersonatedIdentity` metadata, which istiod honours for trusted node agents.
//!
//! [`CertificateManager`]: ambit_mesh::identity::CertificateManager

use std::path::Path;
use std::time::Duration;

use ambit_mesh::identity::{
    BoxFuture, CertificateProvider, CertificateRequest, Identity, IssuedChain, ManagerError,
};
use http::uri::PathAndQuery;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::sync::{Mutex, Semaphore};
use tonic_prost::ProstCodec;

use crate::proto::ca::{
    IstioCertificateRequest, IstioCertificateResponse, CREATE_CERTIFICATE_PATH,
    IMPERSONATED_IDENTITY,
};
use crate::proto::google::Struct;
use crate::transport::{Connection, ControlPlane, TransportError};

/// Concurrent CSRs in flight, Istio ztunnel's limit: a node full of new pods must not flood
/// istiod.
pub const DEFAULT_CONCURRENCY: usize = 8;

/// How long one `CreateCertificate` call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the Istio CA gave no usable certificate.
#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the Istio CA at {address} is not accepting calls: {source}")]
    NotReady {
        address: String,
        source: hyper::Error,
    },
    #[error("the Istio CA at {address} refused the CSR for {identity}: {code:?}: {message}")]
    Refused {
        address: String,
        identity: Identity,
        code: tonic::Code,
        message: String,
    },
    #[error("the Istio CA at {address} did not answer for {identity} within {CALL_TIMEOUT:?}")]
    Timeout { address: String, identity: Identity },
    #[error("the Istio CA returned an empty certificate chain for {0}")]
    EmptyChain(Identity),
    #[error("the Istio CA's answer for {identity} is not usable: cert_chain[{index}] {reason}")]
    Garbage {
        identity: Identity,
        index: usize,
        reason: String,
    },
    #[error(
        "the Istio CA issued a certificate for {actual} when {requested} was asked for; refused"
    )]
    WrongIdentity { requested: Identity, actual: String },
    #[error("the Istio CA's answer for {0} names no root, and no root certificate is configured")]
    NoRoots(Identity),
}

/// How the client asks.
#[derive(Clone, Debug)]
pub struct CaClientSettings {
    /// Send `ImpersonatedIdentity` (node-level issuing for pod identities, as ztunnel does).
    pub impersonate: bool,
    /// Bound on concurrent `CreateCertificate` calls.
    pub concurrency: usize,
}

impl Default for CaClientSettings {
    fn default() -> Self {
        CaClientSettings {
            impersonate: true,
            concurrency: DEFAULT_CONCURRENCY,
        }
    }
}

/// The Istio CA, as a [`CertificateProvider`].
pub struct CaClient {
    plane: ControlPlane,
    settings: CaClientSettings,
    /// The trust roots used when the CA's chain ends without one (also istiod's own root).
    fallback_roots: Vec<CertificateDer<'static>>,
    /// One HTTP/2 connection shared by all calls, replaced once it breaks.
    connection: Mutex<Option<Connection>>,
    permits: Semaphore,
}

impl CaClient {
    pub fn new(plane: ControlPlane, settings: CaClientSettings) -> Self {
        CaClient {
            plane,
            permits: Semaphore::new(settings.concurrency.max(1)),
            settings,
            fallback_roots: Vec::new(),
            connection: Mutex::new(None),
        }
    }

    /// Roots (PEM file) to trust peers with when the CA's answer carries none.
    pub fn with_fallback_roots(mut self, pem_file: &Path) -> Result<Self, TransportError> {
        let pem = std::fs::read(pem_file).map_err(|e| TransportError::Root {
            path: pem_file.to_owned(),
            reason: e.to_string(),
        })?;
        self.fallback_roots = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TransportError::Root {
                path: pem_file.to_owned(),
                reason: format!("not PEM certificates: {e}"),
            })?;
        Ok(self)
    }

    /// Asks the CA to sign `request`'s CSR for `ttl`, and checks the answer.
    pub async fn create_certificate(
        &self,
        request: &CertificateRequest,
        ttl: Duration,
    ) -> Result<IssuedChain, CaClientError> {
        let identity = request.identity();
        let _permit = self.permits.acquire().await.expect("never closed");
        let message = IstioCertificateRequest {
            csr: request.csr_pem().to_owned(),
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: self
                .settings
                .impersonate
                .then(|| Struct::from_strings([(IMPERSONATED_IDENTITY, identity.to_string())])),
        };
        let mut call = tonic::Request::new(message);
        self.plane.authorize(&mut call)?;
        let connection = self.connection().await?;
        let mut grpc = self.plane.grpc(connection);
        let address = self.plane.address().to_owned();
        let answer = tokio::time::timeout(CALL_TIMEOUT, async {
            grpc.ready()
                .await
                .map_err(|source| CaClientError::NotReady {
                    address: address.clone(),
                    source,
                })?;
            let codec = ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default();
            grpc.unary(
                call,
                PathAndQuery::from_static(CREATE_CERTIFICATE_PATH),
                codec,
            )
            .await
            .map_err(|status| CaClientError::Refused {
                address: address.clone(),
                identity: identity.clone(),
                code: status.code(),
                message: status.message().to_owned(),
            })
        })
        .await
        .unwrap_or_else(|_| {
            Err(CaClientError::Timeout {
                address: address.clone(),
                identity: identity.clone(),
            })
        });
        let response = match answer {
            Ok(response) => response.into_inner(),
            Err(e) => {
                // A failed call may have been a broken connection: start the next one afresh.
                if !matches!(e, CaClientError::Refused { .. }) {
                    *self.connection.lock().await = None;
                }
                return Err(e);
            }
        };
        self.parse_chain(identity, response)
    }

    async fn connection(&self) -> Result<Connection, TransportError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(connection.clone());
        }
        let connection = self.plane.connect().await?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Istio's answer: one PEM per element, leaf first; the last element holds the root(s)
    /// (possibly several concatenated) when there is more than one element.
    fn parse_chain(
        &self,
        identity: &Identity,
        response: IstioCertificateResponse,
    ) -> Result<IssuedChain, CaClientError> {
        if response.cert_chain.iter().all(|pem| pem.trim().is_empty()) {
            return Err(CaClientError::EmptyChain(identity.clone()));
        }
        let mut elements = Vec::with_capacity(response.cert_chain.len());
        for (index, pem) in response.cert_chain.iter().enumerate() {
            let garbage = |reason: String| CaClientError::Garbage {
                identity: identity.clone(),
                index,
                reason,
            };
            let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| garbage(format!("is not PEM: {e}")))?;
            if certs.is_empty() {
                return Err(garbage("holds no PEM certificate".into()));
            }
            for cert in &certs {
                x509_check(cert)
                    .map_err(|e| garbage(format!("is not an X.509 certificate: {e}")))?;
            }
            elements.push(certs);
        }
        let leaf = &elements[0][0];
        let presented =
            ambit_mesh::tls::spiffe_identities(leaf).map_err(|e| CaClientError::Garbage {
                identity: identity.clone(),
                index: 0,
                reason: e.to_string(),
            })?;
        if !presented.contains(identity) {
            return Err(CaClientError::WrongIdentity {
                requested: identity.clone(),
                actual: if presented.is_empty() {
                    "no SPIFFE identity".into()
                } else {
                    presented
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            });
        }
        let roots = if elements.len() > 1 {
            elements.pop().expect("more than one")
        } else if !self.fallback_roots.is_empty() {
            self.fallback_roots.clone()
        } else {
            return Err(CaClientError::NoRoots(identity.clone()));
        };
        Ok(IssuedChain {
            chain: elements.into_iter().flatten().collect(),
            roots,
        })
    }
}

fn x509_check(cert: &CertificateDer<'_>) -> Result<(), String> {
    use x509_parser::prelude::FromDer;
    x509_parser::certificate::X509Certificate::from_der(cert)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

impl CertificateProvider for CaClient {
    fn sign<'a>(
        &'a self,
        request: &'a CertificateRequest,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<IssuedChain, ManagerError>> {
        Box::pin(async move {
            self.create_certificate(request, ttl)
                .await
                .map_err(|e| ManagerError::Provider {
                    identity: request.identity().clone(),
                    reason: e.to_string(),
                })
        })
    }
}
