//! `istio.security`: L4 authorization policies as istiod sends them to ztunnel (Istio's
//! `authorization.proto`). Tag numbers out of order (`Clause.matches = 2`,
//! `Match.service_accounts = 11`) are Istio's.

use super::google::Empty;
use super::workload::Extension;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Authorization {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(enumeration = "Scope", tag = "3")]
    pub scope: i32,
    #[prost(enumeration = "Action", tag = "4")]
    pub action: i32,
    #[prost(message, repeated, tag = "5")]
    pub rules: Vec<Rule>,
    #[prost(bool, tag = "6")]
    pub dry_run: bool,
    #[prost(message, repeated, tag = "7")]
    pub extensions: Vec<Extension>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Rule {
    #[prost(message, repeated, tag = "1")]
    pub clauses: Vec<Clause>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Clause {
    #[prost(message, repeated, tag = "2")]
    pub matches: Vec<Match>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Match {
    #[prost(message, repeated, tag = "1")]
    pub namespaces: Vec<StringMatch>,
    #[prost(message, repeated, tag = "2")]
    pub not_namespaces: Vec<StringMatch>,
    #[prost(message, repeated, tag = "11")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    #[prost(message, repeated, tag = "12")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    #[prost(message, repeated, tag = "3")]
    pub principals: Vec<StringMatch>,
    #[prost(message, repeated, tag = "4")]
    pub not_principals: Vec<StringMatch>,
    #[prost(message, repeated, tag = "5")]
    pub source_ips: Vec<Address>,
    #[prost(message, repeated, tag = "6")]
    pub not_source_ips: Vec<Address>,
    #[prost(message, repeated, tag = "7")]
    pub destination_ips: Vec<Address>,
    #[prost(message, repeated, tag = "8")]
    pub not_destination_ips: Vec<Address>,
    #[prost(uint32, repeated, tag = "9")]
    pub destination_ports: Vec<u32>,
    #[prost(uint32, repeated, tag = "10")]
    pub not_destination_ports: Vec<u32>,
    #[prost(message, repeated, tag = "13")]
    pub extensions: Vec<Extension>,
}

/// An IP range: 4- or 16-byte address and prefix length.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Address {
    #[prost(bytes = "vec", tag = "1")]
    pub address: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub length: u32,
}

/// Istio spells the second field `serviceAccount` in the proto (JSON name and field name alike).
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct ServiceAccountMatch {
    #[prost(string, tag = "1")]
    pub namespace: String,
    #[prost(string, tag = "2")]
    pub service_account: String,
}

#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct StringMatch {
    #[prost(oneof = "string_match::MatchType", tags = "1, 2, 3, 4")]
    pub match_type: Option<string_match::MatchType>,
}

/// The oneof of [`StringMatch`].
pub mod string_match {
    #[derive(Clone, PartialEq, Eq, Hash, prost::Oneof)]
    pub enum MatchType {
        #[prost(string, tag = "1")]
        Exact(String),
        #[prost(string, tag = "2")]
        Prefix(String),
        #[prost(string, tag = "3")]
        Suffix(String),
        #[prost(message, tag = "4")]
        Presence(super::Empty),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Scope {
    Global = 0,
    Namespace = 1,
    WorkloadSelector = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Action {
    Allow = 0,
    Deny = 1,
}
