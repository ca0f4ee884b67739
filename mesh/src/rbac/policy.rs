//! The authorization policy model, mirroring Istio's `istio.security.Authorization` proto, and its
//! serde form, which is exactly the `policies` list of ztunnel's local-config YAML
//! (`LOCAL_XDS_PATH`): camelCase keys, unknown keys refused, absent keys defaulted, rules nested
//! as list(rule) → list(clause) → list(match), and string matches as YAML tags (`!Exact "…"`).

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::ser::{SerializeTupleVariant, Serializer};
use serde::{Deserialize, Serialize};

use super::RbacError;

/// One authorization policy as istiod sends it: translated from an `AuthorizationPolicy` into
/// L4-only terms.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    /// ORed; a policy without rules matches nothing.
    pub rules: Vec<Rule>,
    /// Evaluated and logged, never enforced.
    pub dry_run: bool,
}

/// Which workloads a policy applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// Every workload in the mesh (a policy in the root namespace). The default because it is
    /// the proto's zero value, which is what an omitted field means on the wire.
    #[default]
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// Only workloads that list the policy in their `authorization_policies`.
    WorkloadSelector,
}

/// What a matching policy does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    /// The proto's zero value, and Istio's documented default.
    #[default]
    Allow,
    Deny,
}

/// A rule matches when all its clauses match. Written in YAML as the bare list of clauses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Rule {
    pub clauses: Vec<Clause>,
}

/// A clause matches when any of its matches does (an empty clause always matches). Written in
/// YAML as the bare list of matches.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Clause {
    pub matches: Vec<Match>,
}

/// Conditions on a connection: every non-empty field must hold (values within a field are ORed;
/// a `not_*` field holds when none of its values match). A match with no field set is ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Match {
    /// Compared with the namespace of the peer's SPIFFE id.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// Compared with the peer's SPIFFE id without `spiffe://`: `<td>/ns/<ns>/sa/<sa>`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty", with = "cidr_list")]
    pub source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty", with = "cidr_list")]
    pub not_source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty", with = "cidr_list")]
    pub destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty", with = "cidr_list")]
    pub not_destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

impl Match {
    /// Whether no field is set; such a match is skipped rather than treated as "match all".
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
    }
}

/// A peer's namespace and service account, regardless of trust domain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// A string condition. In YAML a tagged value: `!Exact "cluster.local/ns/demo/sa/sleep"`,
/// `!Prefix "…"`, `!Suffix "…"`, `!Presence` (also `!Presence []`, ztunnel's own output). In a
/// flow list the YAML scanner needs a space after a bare tag: `[!Presence ]` or
/// `[!Presence '']`, not `[!Presence]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

impl Serialize for StringMatch {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            StringMatch::Exact(s) => {
                serializer.serialize_newtype_variant("StringMatch", 0, "Exact", s)
            }
            StringMatch::Prefix(s) => {
                serializer.serialize_newtype_variant("StringMatch", 1, "Prefix", s)
            }
            StringMatch::Suffix(s) => {
                serializer.serialize_newtype_variant("StringMatch", 2, "Suffix", s)
            }
            // ztunnel models presence as an empty tuple variant, so this is the spelling it reads
            // back (`!Presence []`); a unit variant would print an untagged `Presence` it refuses.
            StringMatch::Presence => serializer
                .serialize_tuple_variant("StringMatch", 3, "Presence", 0)?
                .end(),
        }
    }
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Derived on a mirror so the externally tagged shape (YAML tags) comes from serde, while
        // `!Presence` may carry nothing, `~`, `''` or `[]`.
        #[derive(Deserialize)]
        #[serde(rename = "StringMatch")]
        enum Tagged {
            Exact(String),
            Prefix(String),
            Suffix(String),
            Presence(NoValue),
        }
        Ok(match Tagged::deserialize(deserializer)? {
            Tagged::Exact(s) => StringMatch::Exact(s),
            Tagged::Prefix(s) => StringMatch::Prefix(s),
            Tagged::Suffix(s) => StringMatch::Suffix(s),
            Tagged::Presence(NoValue) => StringMatch::Presence,
        })
    }
}

/// The payload of `!Presence`, which must be absent or empty.
struct NoValue;

impl<'de> Deserialize<'de> for NoValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NoValueVisitor;
        impl<'de> Visitor<'de> for NoValueVisitor {
            type Value = NoValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("no value (`!Presence` takes none)")
            }
            fn visit_unit<E: de::Error>(self) -> Result<NoValue, E> {
                Ok(NoValue)
            }
            fn visit_none<E: de::Error>(self) -> Result<NoValue, E> {
                Ok(NoValue)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<NoValue, E> {
                if v.is_empty() {
                    Ok(NoValue)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(v), &self))
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NoValue, A::Error> {
                if seq.next_element::<IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(1, &self));
                }
                Ok(NoValue)
            }
        }
        deserializer.deserialize_any(NoValueVisitor)
    }
}

/// Parses a policy's IP condition: a network (`10.0.0.0/8`, `fd00::/8`) or a bare address,
/// which means that single host (/32 or /128).
pub fn parse_cidr(value: &str) -> Result<IpNet, RbacError> {
    let invalid = |reason: String| RbacError::InvalidCidr {
        value: value.to_owned(),
        reason,
    };
    if value.contains('/') {
        value.parse::<IpNet>().map_err(|e| invalid(e.to_string()))
    } else {
        value
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|e| invalid(e.to_string()))
    }
}

/// Serde for the IP lists: strings, so a bare address can stand for a host network, and so a bad
/// value is reported with the value itself.
mod cidr_list {
    use super::*;

    pub fn serialize<S: Serializer>(nets: &[IpNet], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(nets.iter().map(|n| n.to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
        Vec::<String>::deserialize(deserializer)?
            .iter()
            .map(|s| parse_cidr(s).map_err(de::Error::custom))
            .collect()
    }
}

impl Authorization {
    /// The policy's resource name, `namespace/name`, as xDS and workloads refer to it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Checks what the YAML shape cannot express: a name to refer to the policy by, and a
    /// namespace for a namespace-scoped policy (without one it would apply to no real namespace).
    pub fn validate(&self) -> Result<(), RbacError> {
        if self.name.is_empty() {
            return Err(RbacError::MissingName {
                namespace: self.namespace.clone(),
            });
        }
        if self.scope == Scope::Namespace && self.namespace.is_empty() {
            return Err(RbacError::MissingNamespace {
                name: self.name.clone(),
            });
        }
        Ok(())
    }
}

/// Parses and validates a YAML list of policies in ztunnel's local-config format (the value of
/// its `policies` key).
pub fn parse_policies(yaml: &str) -> Result<Vec<Authorization>, RbacError> {
    let policies: Vec<Authorization> = serde_yaml::from_str(yaml)?;
    for policy in &policies {
        policy.validate()?;
    }
    Ok(policies)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(s: &str) -> StringMatch {
        StringMatch::Exact(s.to_owned())
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn parses_the_reference_example() {
        let policies = parse_policies(
            "[{name: deny-9999, namespace: default, scope: Namespace, action: Allow, \
             rules: [[[{notDestinationPorts: [9999]}]]]}]",
        )
        .unwrap();
        assert_eq!(
            policies,
            vec![Authorization {
                name: "deny-9999".into(),
                namespace: "default".into(),
                scope: Scope::Namespace,
                action: Action::Allow,
                rules: vec![Rule {
                    clauses: vec![Clause {
                        matches: vec![Match {
                            not_destination_ports: vec![9999],
                            ..Match::default()
                        }],
                    }],
                }],
                dry_run: false,
            }]
        );
        assert_eq!(policies[0].key(), "default/deny-9999");
    }

    #[test]
    fn parses_a_realistic_local_config_policy_list() {
        // The shape of a ztunnel LOCAL_XDS_PATH file; only `policies` is this module's concern.
        #[derive(Deserialize)]
        struct LocalConfig {
            policies: Vec<Authorization>,
        }
        let yaml = r#"
workloads: []
services: []
policies:
- name: allow-sleep
  namespace: demo
  scope: WorkloadSelector
  action: Allow
  dryRun: false
  rules:
  - - - principals: [!Exact "cluster.local/ns/demo/sa/sleep"]
      - principals:
        - !Prefix "cluster.local/ns/tools/"
        - !Suffix "/sa/admin"
    - - destinationPorts: [80, 8080]
        destinationIps: ["10.0.0.0/8", "fd00::/8", "192.168.1.7"]
  - - - namespaces:
        - !Presence
        notNamespaces: [!Exact kube-system, !Presence []]
        serviceAccounts: [{namespace: demo, serviceAccount: sleep}]
        notServiceAccounts:
        - namespace: demo
          serviceAccount: curl
        sourceIps: ["10.1.0.0/16"]
        notSourceIps: ["10.1.2.3"]
        notDestinationIps: ["::1"]
- name: deny-all-dry
  namespace: istio-system
  scope: Global
  action: Deny
  dryRun: true
  rules:
  - []
"#;
        let cfg: LocalConfig = serde_yaml::from_str(yaml).unwrap();
        let [allow, deny] = cfg.policies.as_slice() else {
            panic!("want two policies: {:?}", cfg.policies);
        };
        assert_eq!(allow.key(), "demo/allow-sleep");
        assert_eq!(allow.scope, Scope::WorkloadSelector);
        assert_eq!(allow.rules.len(), 2);
        let first = &allow.rules[0].clauses;
        assert_eq!(first.len(), 2);
        assert_eq!(
            first[0].matches[0].principals,
            vec![exact("cluster.local/ns/demo/sa/sleep")]
        );
        assert_eq!(
            first[0].matches[1].principals,
            vec![
                StringMatch::Prefix("cluster.local/ns/tools/".into()),
                StringMatch::Suffix("/sa/admin".into()),
            ]
        );
        assert_eq!(first[1].matches[0].destination_ports, vec![80, 8080]);
        assert_eq!(
            first[1].matches[0].destination_ips,
            vec![net("10.0.0.0/8"), net("fd00::/8"), net("192.168.1.7/32")]
        );
        let m = &allow.rules[1].clauses[0].matches[0];
        assert_eq!(m.namespaces, vec![StringMatch::Presence]);
        assert_eq!(
            m.not_namespaces,
            vec![exact("kube-system"), StringMatch::Presence]
        );
        assert_eq!(
            m.service_accounts,
            vec![ServiceAccountMatch {
                namespace: "demo".into(),
                service_account: "sleep".into(),
            }]
        );
        assert_eq!(m.not_service_accounts[0].service_account, "curl");
        assert_eq!(m.source_ips, vec![net("10.1.0.0/16")]);
        assert_eq!(m.not_source_ips, vec![net("10.1.2.3/32")]);
        assert_eq!(m.not_destination_ips, vec![net("::1/128")]);

        assert_eq!(deny.scope, Scope::Global);
        assert_eq!(deny.action, Action::Deny);
        assert!(deny.dry_run);
        assert_eq!(deny.rules, vec![Rule::default()]);
    }

    #[test]
    fn absent_fields_take_the_proto_defaults() {
        let policies = parse_policies("- name: p\n").unwrap();
        assert_eq!(
            policies[0],
            Authorization {
                name: "p".into(),
                ..Authorization::default()
            }
        );
        assert_eq!(policies[0].scope, Scope::Global);
        assert_eq!(policies[0].action, Action::Allow);
        assert!(!policies[0].dry_run);
        assert!(policies[0].rules.is_empty());
    }

    #[test]
    fn string_match_tags() {
        let parsed: Vec<StringMatch> = serde_yaml::from_str(
            "- !Exact a\n- !Prefix b\n- !Suffix c\n- !Presence\n- !Presence []\n- !Presence ~\n",
        )
        .unwrap();
        assert_eq!(
            parsed,
            vec![
                exact("a"),
                StringMatch::Prefix("b".into()),
                StringMatch::Suffix("c".into()),
                StringMatch::Presence,
                StringMatch::Presence,
                StringMatch::Presence,
            ]
        );
        // ztunnel refuses the mapping spelling; so do we, and a value on !Presence is a mistake.
        assert!(serde_yaml::from_str::<StringMatch>("{Exact: a}").is_err());
        assert!(serde_yaml::from_str::<StringMatch>("!Presence [x]").is_err());
        assert!(serde_yaml::from_str::<StringMatch>("!Presence x").is_err());
        assert!(serde_yaml::from_str::<StringMatch>("!Regex x").is_err());
        // The YAML scanner rule the type's docs warn about.
        assert!(serde_yaml::from_str::<Vec<StringMatch>>("[!Presence]").is_err());
        for flow in ["[!Presence ]", "[!Presence '']", "[!Presence [], !Exact a]"] {
            let parsed: Vec<StringMatch> = serde_yaml::from_str(flow).unwrap();
            assert_eq!(parsed[0], StringMatch::Presence, "{flow}");
        }
    }

    #[test]
    fn serializes_back_to_the_same_shape() {
        let yaml = r#"
- name: p
  namespace: demo
  scope: Namespace
  action: Deny
  rules:
  - - - principals: [!Exact "cluster.local/ns/demo/sa/sleep", !Presence '']
        notNamespaces: [!Prefix "kube-"]
        serviceAccounts: [{namespace: demo, serviceAccount: sleep}]
        sourceIps: ["10.0.0.0/8", "10.9.9.9"]
        notDestinationPorts: [9999]
    - []
  dryRun: true
"#;
        let policies = parse_policies(yaml).unwrap();
        let out = serde_yaml::to_string(&policies).unwrap();
        assert!(
            out.contains("!Exact cluster.local/ns/demo/sa/sleep"),
            "{out}"
        );
        assert!(out.contains("!Presence []"), "{out}");
        assert!(out.contains("dryRun: true"), "{out}");
        assert!(out.contains("serviceAccount: sleep"), "{out}");
        assert!(out.contains("10.9.9.9/32"), "{out}");
        // Unset match fields are left out, as ztunnel does.
        assert!(!out.contains("notPrincipals"), "{out}");
        assert_eq!(parse_policies(&out).unwrap(), policies);
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        for (yaml, field) in [
            ("- name: p\n  selector: {}\n", "selector"),
            (
                "- name: p\n  rules: [[[{notDestinationPort: [1]}]]]\n",
                "notDestinationPort",
            ),
            (
                "- name: p\n  rules: [[[{serviceAccounts: [{namespace: a, sa: b}]}]]]\n",
                "sa",
            ),
            // snake_case is not the local-config spelling.
            ("- name: p\n  dry_run: true\n", "dry_run"),
        ] {
            let err = parse_policies(yaml).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(&format!("unknown field `{field}`")), "{msg}");
        }
    }

    #[test]
    fn bad_enum_values_are_refused() {
        assert!(parse_policies("- {name: p, scope: Cluster}").is_err());
        assert!(parse_policies("- {name: p, action: Audit}").is_err());
        assert!(parse_policies("- {name: p, scope: namespace}").is_err());
        let err = parse_policies("- {name: p, rules: [[[{destinationPorts: [70000]}]]]}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("70000"), "{err}");
    }

    #[test]
    fn cidrs_accept_networks_and_bare_addresses() {
        assert_eq!(parse_cidr("10.0.0.0/8").unwrap(), net("10.0.0.0/8"));
        assert_eq!(parse_cidr("10.1.2.3").unwrap(), net("10.1.2.3/32"));
        assert_eq!(parse_cidr("fd00::1").unwrap(), net("fd00::1/128"));
        assert_eq!(parse_cidr("fd00::/8").unwrap(), net("fd00::/8"));
        for bad in [
            "10.0.0.0/33",
            "10.0.0",
            "example.com",
            "",
            "10.0.0.0/",
            "/8",
        ] {
            let err = parse_cidr(bad).unwrap_err();
            assert!(
                matches!(&err, RbacError::InvalidCidr { value, .. } if value == bad),
                "{bad}: {err:?}"
            );
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn a_bad_cidr_in_yaml_names_the_value() {
        let err = parse_policies("- {name: p, rules: [[[{sourceIps: [\"10.0.0.0/40\"]}]]]}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"10.0.0.0/40\""), "{err}");
        assert!(err.contains("invalid IP address or CIDR"), "{err}");
    }

    #[test]
    fn validation_names_the_policy() {
        let err = parse_policies("- {namespace: demo, scope: Namespace}").unwrap_err();
        assert!(matches!(err, RbacError::MissingName { ref namespace } if namespace == "demo"));
        let err = parse_policies("- {name: p, scope: Namespace}").unwrap_err();
        assert!(matches!(err, RbacError::MissingNamespace { ref name } if name == "p"));
        assert!(err.to_string().contains("\"p\""), "{err}");
        // Global and selector policies may leave the namespace out.
        parse_policies("- {name: p, scope: Global}\n- {name: q, scope: WorkloadSelector}").unwrap();
    }

    #[test]
    fn empty_match_detection() {
        assert!(Match::default().is_empty());
        assert!(!Match {
            not_destination_ports: vec![1],
            ..Match::default()
        }
        .is_empty());
    }
}
