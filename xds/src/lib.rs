//! Ambit's clients of Istio's control plane: delta ADS from istiod into the mesh state
//! ([`ads`]), and the Istio CA behind the certificate manager ([`ca`]), over hand-written prost
//! messages with Istio's field numbers ([`proto`]) converted into Ambit's model ([`convert`]).

pub mod ads;
pub mod ca;
pub mod convert;
pub mod proto;
pub mod transport;

#[cfg(feature = "testing")]
pub mod testing;

pub use ads::{AdsClient, AdsSettings, NodeInfo};
pub use ca::{CaClient, CaClientSettings};
pub use transport::{ControlPlane, ControlPlaneConfig};
