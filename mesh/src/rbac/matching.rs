//! Whether one policy's rules match a connection, with ztunnel's exact semantics (rules ORed,
//! clauses ANDed, matches ORed; within a match, fields ANDed and values ORed).

use std::net::IpAddr;

use tracing::trace;

use super::{Authorization, ConnectionInfo, Match, ServiceAccountMatch, StringMatch};
use crate::identity::Identity;

/// The connection facts rules compare against, derived once per connection rather than once per
/// policy.
pub(super) struct Peer<'a> {
    identity: Option<&'a Identity>,
    /// `<td>/ns/<ns>/sa/<sa>`: Istio writes principals without `spiffe://` (even prefixes, so
    /// `!Prefix "cluster.local/"` means `spiffe://cluster.local/…`). Empty without an identity.
    principal: String,
    source_ip: IpAddr,
    destination_ip: IpAddr,
    destination_port: u16,
}

impl<'a> Peer<'a> {
    pub(super) fn new(conn: &'a ConnectionInfo) -> Self {
        let identity = conn.source_identity.as_ref();
        Peer {
            identity,
            principal: identity
                .map(|id| {
                    format!(
                        "{}/ns/{}/sa/{}",
                        id.trust_domain(),
                        id.namespace(),
                        id.service_account()
                    )
                })
                .unwrap_or_default(),
            // Dual-stack listeners report IPv4 peers as IPv4-mapped IPv6 addresses; policies
            // written with IPv4 CIDRs must still see them (or a DENY on 10.0.0.0/8 is bypassed).
            source_ip: conn.source_ip.to_canonical(),
            destination_ip: conn.destination_ip.to_canonical(),
            destination_port: conn.destination_port,
        }
    }

    /// The peer's namespace, or "" for plaintext peers: ztunnel compares namespace conditions
    /// against that empty string, so `!Presence` fails while `!Prefix ""` would match.
    fn namespace(&self) -> &str {
        self.identity.map(Identity::namespace).unwrap_or_default()
    }

    fn principal_matches(&self, m: &StringMatch) -> bool {
        // A peer without an identity has no principal: it matches no principal condition, so it
        // fails every positive one and passes every `not_principals`.
        self.identity.is_some() && m.matches(&self.principal)
    }
}

impl ServiceAccountMatch {
    /// Compares namespace and service account; the trust domain is not part of the match.
    pub fn matches(&self, identity: Option<&Identity>) -> bool {
        identity.is_some_and(|id| {
            id.namespace() == self.namespace && id.service_account() == self.service_account
        })
    }
}

impl Authorization {
    /// Whether the policy's rules match the connection (its action is applied by the caller).
    pub fn matches(&self, conn: &ConnectionInfo) -> bool {
        self.matches_peer(&Peer::new(conn))
    }

    pub(super) fn matches_peer(&self, peer: &Peer<'_>) -> bool {
        // `any` over no rules is false: a policy without rules matches nothing, so an ALLOW
        // policy with no rules denies everything it applies to.
        let matched = self.rules.iter().any(|rule| {
            rule.clauses.iter().all(|clause| {
                // `any` over an empty clause would be false, but Istio treats it as true.
                clause.matches.is_empty()
                    || clause
                        .matches
                        .iter()
                        .filter(|m| !m.is_empty())
                        .any(|m| m.matches_peer(peer))
            })
        });
        trace!(policy = %self.key(), matched, "policy rules evaluated");
        matched
    }
}

impl Match {
    fn matches_peer(&self, peer: &Peer<'_>) -> bool {
        field(&self.destination_ips, &self.not_destination_ips, |n| {
            n.contains(&peer.destination_ip)
        }) && field(&self.source_ips, &self.not_source_ips, |n| {
            n.contains(&peer.source_ip)
        }) && field(&self.destination_ports, &self.not_destination_ports, |p| {
            *p == peer.destination_port
        }) && field(&self.service_accounts, &self.not_service_accounts, |s| {
            s.matches(peer.identity)
        }) && field(&self.principals, &self.not_principals, |p| {
            peer.principal_matches(p)
        }) && field(&self.namespaces, &self.not_namespaces, |n| {
            n.matches(peer.namespace())
        })
    }
}

/// One field type and its `not_` twin: some positive value must match (if any are given) and no
/// negative value may.
fn field<T>(positive: &[T], negative: &[T], matches: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&matches)) && !negative.iter().any(&matches)
}

#[cfg(test)]
mod tests {
    use super::super::{Action, Clause, Rule, Scope};
    use super::*;

    fn id(s: &str) -> Option<Identity> {
        Some(s.parse().unwrap())
    }

    /// mTLS from demo/sleep at 10.0.0.1 to 10.0.1.1:8080.
    fn sleep() -> ConnectionInfo {
        ConnectionInfo {
            source_identity: id("spiffe://cluster.local/ns/demo/sa/sleep"),
            source_ip: "10.0.0.1".parse().unwrap(),
            destination_ip: "10.0.1.1".parse().unwrap(),
            destination_port: 8080,
        }
    }

    fn plaintext() -> ConnectionInfo {
        ConnectionInfo {
            source_identity: None,
            ..sleep()
        }
    }

    fn policy(rules: Vec<Vec<Vec<Match>>>) -> Authorization {
        Authorization {
            name: "p".into(),
            namespace: "demo".into(),
            scope: Scope::Namespace,
            action: Action::Allow,
            rules: rules
                .into_iter()
                .map(|clauses| Rule {
                    clauses: clauses
                        .into_iter()
                        .map(|matches| Clause { matches })
                        .collect(),
                })
                .collect(),
            dry_run: false,
        }
    }

    /// A policy with one rule of one clause holding `m`.
    fn single(m: Match) -> Authorization {
        policy(vec![vec![vec![m]]])
    }

    fn exact(s: &str) -> StringMatch {
        StringMatch::Exact(s.into())
    }

    fn sa(ns: &str, name: &str) -> ServiceAccountMatch {
        ServiceAccountMatch {
            namespace: ns.into(),
            service_account: name.into(),
        }
    }

    fn nets(v: &[&str]) -> Vec<ipnet::IpNet> {
        v.iter()
            .map(|s| super::super::parse_cidr(s).unwrap())
            .collect()
    }

    fn port(p: u16) -> Match {
        Match {
            destination_ports: vec![p],
            ..Match::default()
        }
    }

    fn matches(m: Match, conn: &ConnectionInfo) -> bool {
        single(m).matches(conn)
    }

    #[test]
    fn namespaces_and_not_namespaces() {
        let pos = |v: Vec<StringMatch>| Match {
            namespaces: v,
            ..Match::default()
        };
        let neg = |v: Vec<StringMatch>| Match {
            not_namespaces: v,
            ..Match::default()
        };
        assert!(matches(pos(vec![exact("demo")]), &sleep()));
        assert!(matches(pos(vec![exact("x"), exact("demo")]), &sleep()));
        assert!(!matches(pos(vec![exact("other")]), &sleep()));
        assert!(!matches(neg(vec![exact("demo")]), &sleep()));
        assert!(!matches(neg(vec![exact("x"), exact("demo")]), &sleep()));
        assert!(matches(neg(vec![exact("other")]), &sleep()));
    }

    #[test]
    fn service_accounts_and_not_service_accounts() {
        let pos = |v| Match {
            service_accounts: v,
            ..Match::default()
        };
        let neg = |v| Match {
            not_service_accounts: v,
            ..Match::default()
        };
        assert!(matches(pos(vec![sa("demo", "sleep")]), &sleep()));
        assert!(matches(
            pos(vec![sa("demo", "curl"), sa("demo", "sleep")]),
            &sleep()
        ));
        // Both parts must agree; a service account of the same name elsewhere is someone else.
        assert!(!matches(pos(vec![sa("other", "sleep")]), &sleep()));
        assert!(!matches(pos(vec![sa("demo", "curl")]), &sleep()));
        assert!(!matches(neg(vec![sa("demo", "sleep")]), &sleep()));
        assert!(matches(neg(vec![sa("demo", "curl")]), &sleep()));
        // The trust domain is not compared.
        let foreign = ConnectionInfo {
            source_identity: id("spiffe://other.domain/ns/demo/sa/sleep"),
            ..sleep()
        };
        assert!(matches(pos(vec![sa("demo", "sleep")]), &foreign));
    }

    #[test]
    fn principals_and_not_principals() {
        let pos = |v| Match {
            principals: v,
            ..Match::default()
        };
        let neg = |v| Match {
            not_principals: v,
            ..Match::default()
        };
        assert!(matches(
            pos(vec![exact("cluster.local/ns/demo/sa/sleep")]),
            &sleep()
        ));
        // Principals are written without the scheme; the full SPIFFE URI is not a principal.
        assert!(!matches(
            pos(vec![exact("spiffe://cluster.local/ns/demo/sa/sleep")]),
            &sleep()
        ));
        assert!(!matches(
            pos(vec![exact("cluster.local/ns/demo/sa/curl")]),
            &sleep()
        ));
        assert!(!matches(
            neg(vec![exact("cluster.local/ns/demo/sa/sleep")]),
            &sleep()
        ));
        assert!(matches(
            neg(vec![exact("cluster.local/ns/demo/sa/curl")]),
            &sleep()
        ));
    }

    #[test]
    fn string_match_kinds() {
        let p = |m| Match {
            principals: vec![m],
            ..Match::default()
        };
        let cases = [
            (StringMatch::Prefix("cluster.local/ns/demo/".into()), true),
            (StringMatch::Prefix("cluster.local/ns/other/".into()), false),
            (StringMatch::Suffix("/sa/sleep".into()), true),
            (StringMatch::Suffix("/sa/curl".into()), false),
            (StringMatch::Presence, true),
        ];
        for (m, want) in cases {
            assert_eq!(matches(p(m.clone()), &sleep()), want, "{m:?}");
        }
        assert!(StringMatch::Prefix("foo".into()).matches("foobar"));
        assert!(!StringMatch::Prefix("foo".into()).matches(""));
        assert!(StringMatch::Suffix("bar".into()).matches("foobar"));
        assert!(!StringMatch::Suffix("foo".into()).matches("foobar"));
        assert!(StringMatch::Exact("".into()).matches(""));
        assert!(StringMatch::Presence.matches("x"));
        assert!(!StringMatch::Presence.matches(""));
    }

    #[test]
    fn source_ips_and_not_source_ips() {
        let pos = |v: &[&str]| Match {
            source_ips: nets(v),
            ..Match::default()
        };
        let neg = |v: &[&str]| Match {
            not_source_ips: nets(v),
            ..Match::default()
        };
        assert!(matches(pos(&["10.0.0.0/8"]), &sleep()));
        assert!(matches(pos(&["192.168.0.0/16", "10.0.0.1"]), &sleep()));
        assert!(!matches(pos(&["10.0.0.2"]), &sleep()));
        assert!(!matches(pos(&["::/0"]), &sleep()));
        assert!(!matches(neg(&["10.0.0.0/24"]), &sleep()));
        assert!(matches(neg(&["10.0.1.0/24"]), &sleep()));
        // The destination address is not the source.
        assert!(!matches(pos(&["10.0.1.1"]), &sleep()));
    }

    #[test]
    fn ipv4_mapped_peers_match_ipv4_cidrs() {
        let mapped = ConnectionInfo {
            source_ip: "::ffff:10.0.0.1".parse().unwrap(),
            destination_ip: "::ffff:10.0.1.1".parse().unwrap(),
            ..sleep()
        };
        let deny_src = Match {
            source_ips: nets(&["10.0.0.0/8"]),
            ..Match::default()
        };
        assert!(matches(deny_src, &mapped));
        let dst = Match {
            destination_ips: nets(&["10.0.1.1"]),
            ..Match::default()
        };
        assert!(matches(dst, &mapped));
    }

    #[test]
    fn ipv6_addresses() {
        let v6 = ConnectionInfo {
            source_ip: "fd00::1".parse().unwrap(),
            destination_ip: "fd00::2".parse().unwrap(),
            ..sleep()
        };
        let m = |v: &[&str]| Match {
            source_ips: nets(v),
            ..Match::default()
        };
        assert!(matches(m(&["fd00::/8"]), &v6));
        assert!(!matches(m(&["10.0.0.0/8"]), &v6));
        assert!(!matches(m(&["fd00::2"]), &v6));
    }

    #[test]
    fn destination_ips_and_not_destination_ips() {
        let pos = |v: &[&str]| Match {
            destination_ips: nets(v),
            ..Match::default()
        };
        let neg = |v: &[&str]| Match {
            not_destination_ips: nets(v),
            ..Match::default()
        };
        assert!(matches(pos(&["10.0.1.1"]), &sleep()));
        assert!(matches(pos(&["10.0.1.0/24"]), &sleep()));
        assert!(!matches(pos(&["10.0.0.1"]), &sleep()));
        assert!(!matches(neg(&["10.0.1.1"]), &sleep()));
        assert!(matches(neg(&["10.0.2.0/24"]), &sleep()));
    }

    #[test]
    fn destination_ports_and_not_destination_ports() {
        assert!(matches(port(8080), &sleep()));
        assert!(!matches(port(80), &sleep()));
        let multi = Match {
            destination_ports: vec![80, 8080],
            ..Match::default()
        };
        assert!(matches(multi, &sleep()));
        let not = |v: Vec<u16>| Match {
            not_destination_ports: v,
            ..Match::default()
        };
        assert!(!matches(not(vec![8080]), &sleep()));
        assert!(!matches(not(vec![1, 8080]), &sleep()));
        assert!(matches(not(vec![9999]), &sleep()));
    }

    #[test]
    fn positive_and_negative_of_one_field_are_anded() {
        let m = Match {
            source_ips: nets(&["10.0.0.0/8"]),
            not_source_ips: nets(&["10.0.0.1"]),
            ..Match::default()
        };
        assert!(!matches(m.clone(), &sleep()));
        let other = ConnectionInfo {
            source_ip: "10.0.0.2".parse().unwrap(),
            ..sleep()
        };
        assert!(matches(m, &other));
    }

    #[test]
    fn field_types_within_a_match_are_anded() {
        let m = Match {
            namespaces: vec![exact("demo")],
            destination_ports: vec![8080],
            source_ips: nets(&["10.0.0.0/8"]),
            ..Match::default()
        };
        assert!(matches(m.clone(), &sleep()));
        for broken in [
            Match {
                namespaces: vec![exact("other")],
                ..m.clone()
            },
            Match {
                destination_ports: vec![80],
                ..m.clone()
            },
            Match {
                source_ips: nets(&["192.168.0.0/16"]),
                ..m.clone()
            },
        ] {
            assert!(!matches(broken.clone(), &sleep()), "{broken:?}");
        }
    }

    #[test]
    fn matches_in_a_clause_are_ored() {
        assert!(policy(vec![vec![vec![port(80), port(8080)]]]).matches(&sleep()));
        assert!(!policy(vec![vec![vec![port(80), port(443)]]]).matches(&sleep()));
    }

    #[test]
    fn clauses_in_a_rule_are_anded() {
        let ns = Match {
            namespaces: vec![exact("demo")],
            ..Match::default()
        };
        assert!(policy(vec![vec![vec![ns.clone()], vec![port(8080)]]]).matches(&sleep()));
        assert!(!policy(vec![vec![vec![ns.clone()], vec![port(80)]]]).matches(&sleep()));
        assert!(!policy(vec![vec![vec![port(80)], vec![ns]]]).matches(&sleep()));
    }

    #[test]
    fn rules_are_ored() {
        assert!(policy(vec![vec![vec![port(80)]], vec![vec![port(8080)]]]).matches(&sleep()));
        assert!(!policy(vec![vec![vec![port(80)]], vec![vec![port(443)]]]).matches(&sleep()));
    }

    #[test]
    fn empty_rules_never_match() {
        assert!(!policy(vec![]).matches(&sleep()));
        assert!(!policy(vec![]).matches(&plaintext()));
    }

    #[test]
    fn an_empty_rule_matches_everything() {
        // A rule with no clauses is an empty AND: this is how "allow all" (`rules: [{}]`) arrives.
        assert!(policy(vec![vec![]]).matches(&sleep()));
        assert!(policy(vec![vec![]]).matches(&plaintext()));
    }

    #[test]
    fn an_empty_clause_is_true() {
        assert!(policy(vec![vec![vec![]]]).matches(&sleep()));
        assert!(policy(vec![vec![vec![], vec![port(8080)]]]).matches(&sleep()));
        assert!(!policy(vec![vec![vec![], vec![port(80)]]]).matches(&sleep()));
    }

    #[test]
    fn an_empty_match_is_skipped_not_match_all() {
        // A clause holding only an empty match has nothing left to match.
        assert!(!single(Match::default()).matches(&sleep()));
        assert!(!policy(vec![vec![vec![Match::default(), port(80)]]]).matches(&sleep()));
        assert!(policy(vec![vec![vec![Match::default(), port(8080)]]]).matches(&sleep()));
    }

    #[test]
    fn plaintext_peers_fail_positive_identity_matches() {
        let conn = plaintext();
        for m in [
            Match {
                principals: vec![StringMatch::Presence],
                ..Match::default()
            },
            Match {
                principals: vec![StringMatch::Prefix("".into())],
                ..Match::default()
            },
            Match {
                principals: vec![StringMatch::Exact("".into())],
                ..Match::default()
            },
            Match {
                namespaces: vec![StringMatch::Presence],
                ..Match::default()
            },
            Match {
                namespaces: vec![exact("demo")],
                ..Match::default()
            },
            Match {
                service_accounts: vec![sa("demo", "sleep")],
                ..Match::default()
            },
            Match {
                service_accounts: vec![sa("", "")],
                ..Match::default()
            },
        ] {
            assert!(!matches(m.clone(), &conn), "{m:?}");
        }
    }

    #[test]
    fn plaintext_peers_pass_negative_identity_matches() {
        let conn = plaintext();
        for m in [
            Match {
                not_principals: vec![StringMatch::Presence],
                ..Match::default()
            },
            Match {
                not_principals: vec![StringMatch::Prefix("".into())],
                ..Match::default()
            },
            Match {
                not_namespaces: vec![StringMatch::Presence],
                ..Match::default()
            },
            Match {
                not_namespaces: vec![exact("demo")],
                ..Match::default()
            },
            Match {
                not_service_accounts: vec![sa("demo", "sleep")],
                ..Match::default()
            },
        ] {
            assert!(matches(m.clone(), &conn), "{m:?}");
        }
    }

    #[test]
    fn plaintext_namespace_is_the_empty_string() {
        // ztunnel compares namespace conditions with "" for plaintext peers, so only a condition
        // the empty string satisfies matches; its `not_` twin then excludes them.
        let conn = plaintext();
        let pos = |m| Match {
            namespaces: vec![m],
            ..Match::default()
        };
        let neg = |m| Match {
            not_namespaces: vec![m],
            ..Match::default()
        };
        assert!(matches(pos(StringMatch::Prefix("".into())), &conn));
        assert!(matches(pos(exact("")), &conn));
        assert!(!matches(neg(StringMatch::Prefix("".into())), &conn));
    }

    #[test]
    fn deny_plaintext_idiom() {
        // Istio's "require mTLS": DENY when notPrincipals: ["*"] (translated to presence).
        let deny_plaintext = Match {
            not_principals: vec![StringMatch::Presence],
            ..Match::default()
        };
        assert!(matches(deny_plaintext.clone(), &plaintext()));
        assert!(!matches(deny_plaintext, &sleep()));
    }
}
