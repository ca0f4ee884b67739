//! Ambit's mesh library, shared by every Ambit binary: SPIFFE workload identity and certificates
//! (with a built-in CA), the mTLS configuration HBONE uses, and the HBONE tunnel itself (a pooled
//! client and a server), following Istio's wire format so Ambit and Istio components interoperate.

pub mod copy;
pub mod dns;
pub mod file;
pub mod hbone;
pub mod identity;
pub mod lifecycle;
pub mod rbac;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod zds;

#[cfg(feature = "fuzzing")]
pub mod fuzzing;
#[cfg(feature = "testing")]
pub mod testing;
