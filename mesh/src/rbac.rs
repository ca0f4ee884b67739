//! L4 authorization with Istio ztunnel's semantics: the `istio.security.Authorization` policy
//! model (also readable from ztunnel's local-config YAML), how one policy matches a connection,
//! and the policy set that picks the policies for a destination and decides allow or deny.

mod matching;
mod policy;
mod policy_set;

pub use policy::{
    parse_cidr, parse_policies, Action, Authorization, Clause, Match, Rule, Scope,
    ServiceAccountMatch, StringMatch,
};
pub use policy_set::{evaluate, Decision, DecisionReason, PolicySet};

use std::fmt;
use std::net::IpAddr;

use crate::identity::Identity;

/// What authorization knows about an inbound connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionInfo {
    /// The peer's verified SPIFFE identity; `None` for plaintext (non-HBONE) connections.
    pub source_identity: Option<Identity>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

impl fmt::Display for ConnectionInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source_ip)?;
        match &self.source_identity {
            Some(id) => write!(f, "({id})")?,
            None => f.write_str("(plaintext)")?,
        }
        let dst = std::net::SocketAddr::new(self.destination_ip, self.destination_port);
        write!(f, "->{dst}")
    }
}

/// Why authorization input was refused.
#[derive(Debug, thiserror::Error)]
pub enum RbacError {
    #[error(
        "invalid IP address or CIDR {value:?} in an authorization policy: {reason} \
         (write an address such as 10.0.0.1 or a network such as 10.0.0.0/8)"
    )]
    InvalidCidr { value: String, reason: String },
    #[error("invalid authorization policy YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("authorization policy in namespace {namespace:?} has no name")]
    MissingName { namespace: String },
    #[error(
        "authorization policy {name:?} has scope Namespace but no namespace; \
         set `namespace`, or use scope Global for a mesh-wide policy"
    )]
    MissingNamespace { name: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_info_display_names_peer_and_destination() {
        let mut conn = ConnectionInfo {
            source_identity: Some("spiffe://cluster.local/ns/demo/sa/sleep".parse().unwrap()),
            source_ip: "10.0.0.1".parse().unwrap(),
            destination_ip: "fd00::2".parse().unwrap(),
            destination_port: 8080,
        };
        assert_eq!(
            conn.to_string(),
            "10.0.0.1(spiffe://cluster.local/ns/demo/sa/sleep)->[fd00::2]:8080"
        );
        conn.source_identity = None;
        assert_eq!(conn.to_string(), "10.0.0.1(plaintext)->[fd00::2]:8080");
    }
}
