//! `istio.v1.auth`: the Istio CA's `IstioCertificateService` (Istio's `citadel.proto`).

use super::google::Struct;

/// gRPC path of `CreateCertificate`.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// Metadata key asking istiod to issue for another identity than the caller's (node-level
/// issuing by ztunnel; istiod checks `CA_TRUSTED_NODE_ACCOUNTS`).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// A CSR to sign. Tag 2 is unused upstream.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded PKCS#10.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested lifetime in seconds.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<Struct>,
}

/// The signed chain: one PEM per element, leaf first, root(s) last.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}
