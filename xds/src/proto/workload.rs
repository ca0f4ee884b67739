//! `istio.workload`: what istiod sends ztunnel as `Address` resources (Istio's `workload.proto`).
//!
//! Tag numbers out of order (`Workload.uid = 20`, `services = 22`) are Istio's; tag 15 of
//! `Workload` (the old `virtual_ips`) is reserved upstream.

use std::collections::BTreeMap;

use super::google::{Any, UInt32Value};

/// A workload or a service, named `uid` or `namespace/hostname` in xDS.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Address {
    #[prost(oneof = "address::Type", tags = "1, 2")]
    pub r#type: Option<address::Type>,
}

/// The oneof of [`Address`].
pub mod address {
    // Shaped like the proto; a decoded Address lives only until it is converted.
    #[allow(clippy::large_enum_variant)]
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Type {
        #[prost(message, tag = "1")]
        Workload(super::Workload),
        #[prost(message, tag = "2")]
        Service(super::Service),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Service {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub hostname: String,
    #[prost(message, repeated, tag = "4")]
    pub addresses: Vec<NetworkAddress>,
    #[prost(message, repeated, tag = "5")]
    pub ports: Vec<Port>,
    #[prost(string, repeated, tag = "6")]
    pub subject_alt_names: Vec<String>,
    #[prost(message, optional, tag = "7")]
    pub waypoint: Option<GatewayAddress>,
    #[prost(message, optional, tag = "8")]
    pub load_balancing: Option<LoadBalancing>,
    #[prost(enumeration = "IpFamilies", tag = "9")]
    pub ip_families: i32,
    #[prost(message, repeated, tag = "10")]
    pub extensions: Vec<Extension>,
    #[prost(bool, tag = "11")]
    pub canonical: bool,
    #[prost(bool, tag = "12")]
    pub ingress_use_waypoint: bool,
    #[prost(message, repeated, tag = "13")]
    pub weighted_waypoints: Vec<WeightedWaypoint>,
    #[prost(enumeration = "service::Visibility", tag = "14")]
    pub visibility: i32,
}

/// Nested types of [`Service`].
pub mod service {
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum Visibility {
        Public = 0,
        Namespace = 1,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum IpFamilies {
    Automatic = 0,
    Ipv4Only = 1,
    Ipv6Only = 2,
    Dual = 3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum NetworkMode {
    Standard = 0,
    HostNetwork = 1,
}

#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct LoadBalancing {
    #[prost(enumeration = "load_balancing::Scope", repeated, tag = "1")]
    pub routing_preference: Vec<i32>,
    #[prost(enumeration = "load_balancing::Mode", tag = "2")]
    pub mode: i32,
    #[prost(enumeration = "load_balancing::HealthPolicy", tag = "3")]
    pub health_policy: i32,
}

/// Nested enums of [`LoadBalancing`].
pub mod load_balancing {
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum Scope {
        UnspecifiedScope = 0,
        Region = 1,
        Zone = 2,
        Subzone = 3,
        Node = 4,
        Cluster = 5,
        Network = 6,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum Mode {
        UnspecifiedMode = 0,
        Strict = 1,
        Failover = 2,
        Passthrough = 3,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum HealthPolicy {
        OnlyHealthy = 0,
        AllowAll = 1,
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Workload {
    /// `cluster/group/kind/namespace/name[/section]`; the xDS resource name.
    #[prost(string, tag = "20")]
    pub uid: String,
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// 4- or 16-byte IPs.
    #[prost(bytes = "vec", repeated, tag = "3")]
    pub addresses: Vec<Vec<u8>>,
    #[prost(string, tag = "21")]
    pub hostname: String,
    #[prost(string, tag = "4")]
    pub network: String,
    #[prost(enumeration = "TunnelProtocol", tag = "5")]
    pub tunnel_protocol: i32,
    #[prost(string, tag = "6")]
    pub trust_domain: String,
    #[prost(string, tag = "7")]
    pub service_account: String,
    #[prost(message, optional, tag = "8")]
    pub waypoint: Option<GatewayAddress>,
    #[prost(message, optional, tag = "19")]
    pub network_gateway: Option<GatewayAddress>,
    #[prost(string, tag = "9")]
    pub node: String,
    #[prost(string, tag = "10")]
    pub canonical_name: String,
    #[prost(string, tag = "11")]
    pub canonical_revision: String,
    #[prost(enumeration = "WorkloadType", tag = "12")]
    pub workload_type: i32,
    #[prost(string, tag = "13")]
    pub workload_name: String,
    #[prost(bool, tag = "14")]
    pub native_tunnel: bool,
    #[prost(message, optional, tag = "23")]
    pub application_tunnel: Option<ApplicationTunnel>,
    /// `namespace/hostname` → the ports this workload serves for that service.
    #[prost(btree_map = "string, message", tag = "22")]
    pub services: BTreeMap<String, PortList>,
    /// `namespace/name` of the selector-based policies only.
    #[prost(string, repeated, tag = "16")]
    pub authorization_policies: Vec<String>,
    #[prost(enumeration = "WorkloadStatus", tag = "17")]
    pub status: i32,
    #[prost(string, tag = "18")]
    pub cluster_id: String,
    #[prost(message, optional, tag = "24")]
    pub locality: Option<Locality>,
    #[prost(enumeration = "NetworkMode", tag = "25")]
    pub network_mode: i32,
    #[prost(message, repeated, tag = "26")]
    pub extensions: Vec<Extension>,
    #[prost(message, optional, tag = "27")]
    pub capacity: Option<UInt32Value>,
}

#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Locality {
    #[prost(string, tag = "1")]
    pub region: String,
    #[prost(string, tag = "2")]
    pub zone: String,
    #[prost(string, tag = "3")]
    pub subzone: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum WorkloadStatus {
    Healthy = 0,
    Unhealthy = 1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum WorkloadType {
    Deployment = 0,
    Cronjob = 1,
    Pod = 2,
    Job = 3,
}

#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct PortList {
    #[prost(message, repeated, tag = "1")]
    pub ports: Vec<Port>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
pub struct Port {
    #[prost(uint32, tag = "1")]
    pub service_port: u32,
    /// 0: not known here (a named target port); the workload's own port list decides.
    #[prost(uint32, tag = "2")]
    pub target_port: u32,
    #[prost(enumeration = "AppProtocol", tag = "3")]
    pub app_protocol: i32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum AppProtocol {
    Unknown = 0,
    Http11 = 1,
    Http2 = 2,
    Grpc = 3,
    Tcp = 4,
    Tls = 5,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum TunnelProtocol {
    /// Plain TCP: not in the mesh.
    None = 0,
    Hbone = 1,
    /// Sidecar-style mTLS; ztunnel refuses it.
    LegacyIstioMtls = 2,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
pub struct ApplicationTunnel {
    #[prost(enumeration = "application_tunnel::Protocol", tag = "1")]
    pub protocol: i32,
    #[prost(uint32, tag = "2")]
    pub port: u32,
}

/// Nested types of [`ApplicationTunnel`].
pub mod application_tunnel {
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum Protocol {
        None = 0,
        Proxy = 1,
    }
}

/// Where a waypoint or network gateway is reached. Tag 4 is reserved upstream.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct GatewayAddress {
    #[prost(oneof = "gateway_address::Destination", tags = "1, 2")]
    pub destination: Option<gateway_address::Destination>,
    #[prost(uint32, tag = "3")]
    pub hbone_mtls_port: u32,
}

/// The oneof of [`GatewayAddress`].
pub mod gateway_address {
    #[derive(Clone, PartialEq, Eq, Hash, prost::Oneof)]
    pub enum Destination {
        #[prost(message, tag = "1")]
        Hostname(super::NamespacedHostname),
        #[prost(message, tag = "2")]
        Address(super::NetworkAddress),
    }
}

#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct WeightedWaypoint {
    #[prost(message, optional, tag = "1")]
    pub destination: Option<GatewayAddress>,
    #[prost(uint32, tag = "2")]
    pub weight: u32,
}

#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct NetworkAddress {
    #[prost(string, tag = "1")]
    pub network: String,
    #[prost(bytes = "vec", tag = "2")]
    pub address: Vec<u8>,
    /// A prefix length when the address is a range (ServiceEntry CIDRs).
    #[prost(uint32, optional, tag = "3")]
    pub length: Option<u32>,
}

#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct NamespacedHostname {
    #[prost(string, tag = "1")]
    pub namespace: String,
    #[prost(string, tag = "2")]
    pub hostname: String,
}

#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Extension {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub config: Option<Any>,
}
