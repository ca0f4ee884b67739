//! Workloads and services as Istio's WDS describes them (`istio.workload.Address`), in the shape of
//! Istio ztunnel's local configuration file (camelCase, unknown fields refused).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::identity::{Identity, IdentityError, DEFAULT_TRUST_DOMAIN};

/// How a workload receives mesh traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    /// Plain TCP: the workload is not in the mesh (Istio's `NONE`).
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// HBONE on port 15008: the workload is enrolled.
    #[serde(rename = "HBONE")]
    Hbone,
}

/// What a service port carries, as declared by the Service (`appProtocol`, or the port name's
/// `<protocol>-` prefix), following `istio.workload.AppProtocol`. A waypoint serves HTTP ports
/// at L7 and proxies TCP ports at L4; a port with no declared protocol is sniffed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    Http11,
    Http2,
    Grpc,
    Tcp,
    Tls,
}

impl AppProtocol {
    /// HTTP/1.1, HTTP/2 or gRPC: requests a waypoint can route and authorize one by one.
    pub fn is_http(self) -> bool {
        matches!(
            self,
            AppProtocol::Http11 | AppProtocol::Http2 | AppProtocol::Grpc
        )
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

/// An address qualified by its network, written `"<network>/<ip>"` (an empty network is the
/// default one: `"/10.0.0.1"`), as in Istio's local configuration.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkAddress {
    pub network: String,
    pub address: IpAddr,
}

impl FromStr for NetworkAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (network, ip) = s.rsplit_once('/').unwrap_or(("", s));
        let address = ip
            .parse()
            .map_err(|_| format!("{s:?} is not a \"<network>/<ip>\" address"))?;
        Ok(NetworkAddress {
            network: network.to_owned(),
            address,
        })
    }
}

impl fmt::Display for NetworkAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.address)
    }
}

impl Serialize for NetworkAddress {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NetworkAddress {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// `namespace` + `hostname`, the way WDS names a service from elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespacedHostname {
    pub namespace: String,
    pub hostname: String,
}

/// Where a waypoint (or gateway) is reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    #[serde(default = "default_hbone_port")]
    pub hbone_mtls_port: u16,
}

fn default_hbone_port() -> u16 {
    crate::hbone::HBONE_PORT
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GatewayDestination {
    /// `"<network>/<ip>"`.
    Address(NetworkAddress),
    /// A service, resolved through the state.
    Hostname(NamespacedHostname),
}

/// Ports a workload serves for one service: service port → target port.
pub type PortMap = BTreeMap<u16, u16>;

/// A workload (pod), following `istio.workload.Workload`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    /// Unique id, e.g. `cluster1//v1/Pod/default/sleep-1`.
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default)]
    pub workload_ips: Vec<IpAddr>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddress>,
    /// `"<namespace>/<hostname>"` of each service this workload backs, with its ports.
    #[serde(default)]
    pub services: BTreeMap<String, PortMap>,
    /// `"<namespace>/<name>"` of the WorkloadSelector policies that select this workload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorization_policies: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub canonical_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub canonical_revision: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workload_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster_id: String,
    #[serde(default)]
    pub status: HealthStatus,
}

fn default_service_account() -> String {
    "default".into()
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.into()
}

impl Workload {
    /// The workload's SPIFFE identity.
    pub fn identity(&self) -> Result<Identity, IdentityError> {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// The target port this workload serves `service_port` of `service_key` on, if it does.
    pub fn target_port(&self, service_key: &str, service_port: u16) -> Option<u16> {
        self.services
            .get(service_key)?
            .get(&service_port)
            .map(|&target| if target == 0 { service_port } else { target })
    }
}

/// A service, following `istio.workload.Service`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `<name>.<namespace>.svc.cluster.local` for Kubernetes services.
    pub hostname: String,
    #[serde(default)]
    pub vips: Vec<NetworkAddress>,
    /// Service port → target port (0: same as the service port).
    #[serde(default)]
    pub ports: PortMap,
    /// Declared protocols of service ports; a port missing here declared none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub app_protocols: BTreeMap<u16, AppProtocol>,
    /// Identities a client accepts from this service's endpoints besides their own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddress>,
}

impl Service {
    /// The `"<namespace>/<hostname>"` key workloads use to name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}
