//! Workload identity: SPIFFE ids, keys and certificates, the built-in CA, and the per-identity
//! certificate manager that keeps a fresh certificate for each identity without blocking traffic.

mod ca;
mod certificate;
mod manager;

pub use ca::{CaError, CertificateAuthority, DEFAULT_CERT_TTL};
pub use certificate::{CertificateError, CertificateRequest, IssuedChain, WorkloadCertificate};
pub use manager::{
    BoxFuture, CertificateManager, CertificateProvider, ManagerError, ManagerSettings,
};

use std::fmt;
use std::str::FromStr;

/// The trust domain Istio uses when a workload names none.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not a workload SPIFFE id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("SPIFFE id {0:?} must start with spiffe://")]
    MissingScheme(String),
    #[error("SPIFFE id {0:?} must have the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    BadPath(String),
    #[error("SPIFFE id {id:?} has an invalid {part}: {value:?} (allowed: lowercase letters, digits, '-', '.', '_')")]
    BadSegment {
        id: String,
        part: &'static str,
        value: String,
    },
}

impl Identity {
    /// Builds an identity from its parts, checking each the way [`FromStr`] does.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        let id = Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        id.validate()?;
        Ok(id)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    fn validate(&self) -> Result<(), IdentityError> {
        // Trust domains are DNS-like; namespaces and service accounts are Kubernetes names
        // (DNS subdomains). Anything else would let a crafted SAN alias another identity.
        let checks = [
            ("trust domain", &self.trust_domain),
            ("namespace", &self.namespace),
            ("service account", &self.service_account),
        ];
        for (part, value) in checks {
            let ok = !value.is_empty()
                && value.len() <= 253
                && value.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
                });
            if !ok {
                return Err(IdentityError::BadSegment {
                    id: self.to_string(),
                    part,
                    value: value.clone(),
                });
            }
        }
        Ok(())
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::MissingScheme(s.to_owned()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => {
                let id = Identity {
                    trust_domain: (*td).to_owned(),
                    namespace: (*ns).to_owned(),
                    service_account: (*sa).to_owned(),
                };
                id.validate()?;
                Ok(id)
            }
            _ => Err(IdentityError::BadPath(s.to_owned())),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo-productpage");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
        );
    }

    #[test]
    fn rejects_malformed_ids_with_the_reason() {
        assert!(matches!(
            "http://cluster.local/ns/a/sa/b".parse::<Identity>(),
            Err(IdentityError::MissingScheme(_))
        ));
        for bad in [
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local",
        ] {
            assert!(
                matches!(bad.parse::<Identity>(), Err(IdentityError::BadPath(_))),
                "{bad}"
            );
        }
        let err = "spiffe://cluster.local/ns/A/sa/b"
            .parse::<Identity>()
            .unwrap_err();
        assert!(err.to_string().contains("invalid namespace"), "{err}");
        assert!("spiffe:///ns/a/sa/b".parse::<Identity>().is_err());
        assert!("spiffe://td/ns//sa/b".parse::<Identity>().is_err());
        assert!("spiffe://td/ns/a%2f/sa/b".parse::<Identity>().is_err());
    }
}
