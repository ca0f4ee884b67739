//! Keeps one valid certificate per workload identity, refreshed in the background at half life.
//!
//! The data path only ever reads the current certificate (a lock-free load); fetching, signing and
//! retrying happen on a task per identity. A refresh that fails keeps the still-valid certificate
//! in service and retries with backoff, as Istio's ztunnel does.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::ca::{CaError, CertificateAuthority};
use super::certificate::{CertificateError, CertificateRequest, IssuedChain};
use super::{Identity, WorkloadCertificate};

/// A boxed future, for the object-safe provider trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where certificates come from: the built-in CA here, the Istio CA on a cluster.
pub trait CertificateProvider: Send + Sync + 'static {
    /// Signs the CSR of `request` for its identity, asking for a certificate valid for `ttl`.
    fn sign<'a>(
        &'a self,
        request: &'a CertificateRequest,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<IssuedChain, ManagerError>>;
}

/// Why no certificate could be had for an identity.
#[derive(Debug, thiserror::Error, Clone)]
pub enum ManagerError {
    #[error("the certificate authority refused or failed for {identity}: {reason}")]
    Provider { identity: Identity, reason: String },
    #[error("no certificate for {identity} yet, and the last attempt failed: {reason}")]
    Unavailable { identity: Identity, reason: String },
}

/// How the manager paces its work.
#[derive(Clone, Debug)]
pub struct ManagerSettings {
    /// Lifetime asked of the CA for each certificate.
    pub ttl: Duration,
    /// First retry delay after a failed fetch; doubled up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for ManagerSettings {
    fn default() -> Self {
        ManagerSettings {
            ttl: super::DEFAULT_CERT_TTL,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(150),
        }
    }
}

#[derive(Clone)]
enum Status {
    Pending,
    Ready,
    Failed(String),
}

struct Entry {
    current: Arc<ArcSwapOption<WorkloadCertificate>>,
    status: watch::Receiver<Status>,
    refresher: JoinHandle<()>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

/// One certificate per identity, fetched on first use and rotated at half life.
pub struct CertificateManager {
    provider: Arc<dyn CertificateProvider>,
    settings: ManagerSettings,
    entries: Mutex<HashMap<Identity, Entry>>,
}

impl CertificateManager {
    pub fn new(provider: Arc<dyn CertificateProvider>, settings: ManagerSettings) -> Self {
        CertificateManager {
            provider,
            settings,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// A manager signing with the built-in CA loaded from an Istio `cacerts` directory, asking
    /// for certificates valid for `ttl` (what ztunnel and the waypoint run with locally).
    pub fn with_local_ca(ca_dir: &std::path::Path, ttl: Duration) -> Result<Self, CaError> {
        let ca = CertificateAuthority::load(ca_dir)?;
        Ok(Self::new(
            Arc::new(ca),
            ManagerSettings {
                ttl,
                ..Default::default()
            },
        ))
    }

    /// The current certificate for `identity`, waiting for the first one if needed.
    ///
    /// Must be called within a Tokio runtime: the first call for an identity starts its refresher.
    pub async fn fetch(
        &self,
        identity: &Identity,
    ) -> Result<Arc<WorkloadCertificate>, ManagerError> {
        let (current, mut status) = {
            let mut entries = self.entries.lock().expect("manager lock poisoned");
            let entry = entries
                .entry(identity.clone())
                .or_insert_with(|| self.start(identity.clone()));
            (entry.current.clone(), entry.status.clone())
        };
        loop {
            if let Some(cert) = current.load_full() {
                if !cert.is_expired(SystemTime::now()) {
                    return Ok(cert);
                }
            }
            if let Status::Failed(reason) = &*status.borrow_and_update() {
                return Err(ManagerError::Unavailable {
                    identity: identity.clone(),
                    reason: reason.clone(),
                });
            }
            if status.changed().await.is_err() {
                return Err(ManagerError::Unavailable {
                    identity: identity.clone(),
                    reason: "the certificate refresher stopped".into(),
                });
            }
        }
    }

    /// The current certificate without waiting: what a handshake in progress uses.
    pub fn current(&self, identity: &Identity) -> Option<Arc<WorkloadCertificate>> {
        let entries = self.entries.lock().expect("manager lock poisoned");
        entries.get(identity)?.current.load_full()
    }

    /// Stops refreshing `identity` (its last workload left); held certificates stay usable.
    pub fn forget(&self, identity: &Identity) {
        self.entries
            .lock()
            .expect("manager lock poisoned")
            .remove(identity);
    }

    /// Identities with a certificate or a fetch under way.
    pub fn identities(&self) -> Vec<Identity> {
        let entries = self.entries.lock().expect("manager lock poisoned");
        entries.keys().cloned().collect()
    }

    fn start(&self, identity: Identity) -> Entry {
        let current = Arc::new(ArcSwapOption::empty());
        let (tx, rx) = watch::channel(Status::Pending);
        let refresher = tokio::spawn(refresh_loop(
            identity,
            self.provider.clone(),
            self.settings.clone(),
            current.clone(),
            tx,
        ));
        Entry {
            current,
            status: rx,
            refresher,
        }
    }
}

impl Drop for CertificateManager {
    fn drop(&mut self) {
        if let Ok(entries) = self.entries.get_mut() {
            entries.clear();
        }
    }
}

async fn refresh_loop(
    identity: Identity,
    provider: Arc<dyn CertificateProvider>,
    settings: ManagerSettings,
    current: Arc<ArcSwapOption<WorkloadCertificate>>,
    status: watch::Sender<Status>,
) {
    let mut backoff = settings.initial_backoff;
    loop {
        match issue(&identity, provider.as_ref(), settings.ttl).await {
            Ok(cert) => {
                tracing::info!(
                    identity = %identity,
                    expires = ?cert.not_after(),
                    "workload certificate issued"
                );
                let refresh_at = cert.refresh_at();
                current.store(Some(Arc::new(cert)));
                status.send_replace(Status::Ready);
                backoff = settings.initial_backoff;
                let wait = refresh_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tokio::time::sleep(wait).await;
            }
            Err(err) => {
                let still_valid = current
                    .load()
                    .as_ref()
                    .is_some_and(|cert| !cert.is_expired(SystemTime::now()));
                tracing::warn!(
                    identity = %identity,
                    error = %err,
                    retry_in = ?backoff,
                    still_valid,
                    "workload certificate fetch failed"
                );
                if !still_valid {
                    status.send_replace(Status::Failed(err.to_string()));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(settings.max_backoff);
            }
        }
    }
}

async fn issue(
    identity: &Identity,
    provider: &dyn CertificateProvider,
    ttl: Duration,
) -> Result<WorkloadCertificate, ManagerError> {
    let failed = |reason: String| ManagerError::Provider {
        identity: identity.clone(),
        reason,
    };
    let request = CertificateRequest::new(identity).map_err(|e| failed(e.to_string()))?;
    let issued = provider.sign(&request, ttl).await?;
    request
        .into_certificate(issued)
        .map_err(|e: CertificateError| failed(e.to_string()))
}

impl CertificateProvider for CertificateAuthority {
    fn sign<'a>(
        &'a self,
        request: &'a CertificateRequest,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<IssuedChain, ManagerError>> {
        let signed = self
            .sign_csr(request.csr_der(), request.identity(), ttl)
            .map_err(|e: CaError| ManagerError::Provider {
                identity: request.identity().clone(),
                reason: e.to_string(),
            });
        Box::pin(std::future::ready(signed))
    }
}
