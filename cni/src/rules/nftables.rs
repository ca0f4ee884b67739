//! The nftables backend: Istio's `inet istio-ambient-{nat,mangle,raw}` tables, applied with
//! `nft -f -`.
//!
//! The tables are ours alone, so convergence needs no look at the current state: each table is
//! added (a no-op when it exists), deleted, and, when wanted, built again, all in one `nft`
//! transaction. Adding before deleting is what makes deleting an absent table succeed (nft 1.0.6
//! in Debian 12 has no `destroy`).

use std::fmt::Write;

use super::{
    RuleOptions, Ruleset, CONNMARK, DNS_PORT, HBONE_PORT, INBOUND_PLAINTEXT_PORT, MARK_MASK,
    OUTBOUND_PORT, PACKET_MARK,
};

pub(super) const NAT: &str = "istio-ambient-nat";
pub(super) const MANGLE: &str = "istio-ambient-mangle";
pub(super) const RAW: &str = "istio-ambient-raw";

/// The `nft` script taking the namespace to `options`' rules, or to none of ours for `None`.
pub(super) fn ruleset(options: Option<&RuleOptions>) -> Ruleset {
    let mut text = String::new();
    // Istio's table order.
    for table in [NAT, MANGLE, RAW] {
        let _ = writeln!(text, "add table inet {table}");
        let _ = writeln!(text, "delete table inet {table}");
        if let Some(body) = options.and_then(|o| table_body(table, o)) {
            let _ = writeln!(text, "add table inet {table}");
            for line in body {
                let _ = writeln!(text, "{line}");
            }
        }
    }
    Ruleset {
        program: "nft",
        args: &["-f", "-"],
        text,
    }
}

/// The chains and rules of one table, as `nft` commands; `None` when the table is not wanted.
fn table_body(table: &str, options: &RuleOptions) -> Option<Vec<String>> {
    let mark = format!("meta mark & {MARK_MASK:#x}");
    let not_ours = format!("{mark} != {PACKET_MARK:#x}");
    let v4_probe = options.probe_address;
    let v6_probe = options.probe_address_v6;
    // Rules that name an address exist once per family; the v6 twin follows the v4 one.
    let per_family = |v4: String, v6: String| -> Vec<String> {
        if options.ipv6 {
            vec![v4, v6]
        } else {
            vec![v4]
        }
    };

    let (hooks, rules): (Vec<String>, Vec<String>) = match table {
        NAT => {
            let mut rules = vec![
                "output jump istio-output".to_owned(),
                "prerouting jump istio-prerouting".to_owned(),
            ];
            // The node SNATs the kubelet's probes to this address; they must reach the app as is.
            rules.extend(per_family(
                format!("istio-prerouting meta l4proto tcp ip saddr {v4_probe} counter accept"),
                format!("istio-prerouting meta l4proto tcp ip6 saddr {v6_probe} counter accept"),
            ));
            rules.extend(per_family(
                format!("istio-output meta l4proto tcp ip daddr {v4_probe} counter accept"),
                format!("istio-output meta l4proto tcp ip6 daddr {v6_probe} counter accept"),
            ));
            let inbound = format!(
                "tcp dport != {HBONE_PORT} {not_ours} counter redirect to :{INBOUND_PLAINTEXT_PORT}"
            );
            rules.extend(per_family(
                format!("istio-prerouting ip daddr != 127.0.0.1/32 {inbound}"),
                format!("istio-prerouting ip6 daddr != ::1/128 {inbound}"),
            ));
            if options.dns_capture {
                rules.push(format!(
                    "istio-output oifname != \"lo\" {not_ours} udp dport 53 counter redirect to :{DNS_PORT}"
                ));
                let dns_tcp = format!("tcp dport 53 {not_ours} counter redirect to :{DNS_PORT}");
                rules.extend(per_family(
                    format!("istio-output ip daddr != 127.0.0.1/32 {dns_tcp}"),
                    format!("istio-output ip6 daddr != ::1/128 {dns_tcp}"),
                ));
            }
            rules.push(format!(
                "istio-output meta l4proto tcp {mark} == {CONNMARK:#x} counter accept"
            ));
            // App to its own pod IP goes out through lo: it never left the pod, nothing to proxy.
            rules.extend(per_family(
                "istio-output oifname \"lo\" ip daddr != 127.0.0.1/32 counter accept".to_owned(),
                "istio-output oifname \"lo\" ip6 daddr != ::1/128 counter accept".to_owned(),
            ));
            let outbound = format!("{not_ours} counter redirect to :{OUTBOUND_PORT}");
            rules.extend(per_family(
                format!("istio-output meta l4proto tcp ip daddr != 127.0.0.1/32 {outbound}"),
                format!("istio-output meta l4proto tcp ip6 daddr != ::1/128 {outbound}"),
            ));
            (
                vec![
                    "prerouting { type nat hook prerouting priority -100 ; }".to_owned(),
                    "output { type nat hook output priority -100 ; }".to_owned(),
                ],
                rules,
            )
        }
        MANGLE => (
            vec![
                "prerouting { type filter hook prerouting priority -150 ; }".to_owned(),
                // A route chain, as iptables' mangle OUTPUT: a changed mark re-routes the packet.
                "output { type route hook output priority -150 ; }".to_owned(),
            ],
            vec![
                "prerouting jump istio-prerouting".to_owned(),
                "output jump istio-output".to_owned(),
                format!(
                    "istio-prerouting {mark} == {PACKET_MARK:#x} counter \
                     ct mark set ct mark & {:#x} | {CONNMARK:#x}",
                    !MARK_MASK
                ),
                format!("istio-output ct mark & {MARK_MASK:#x} == {CONNMARK:#x} counter meta mark set ct mark"),
            ],
        ),
        RAW if options.dns_capture => (
            vec![
                "prerouting { type filter hook prerouting priority -300 ; }".to_owned(),
                "output { type filter hook output priority -300 ; }".to_owned(),
            ],
            // The DNS proxy's upstream queries and the app's redirected ones can share a
            // 5-tuple after NAT; separate conntrack zones keep them apart (istio/istio#33469).
            vec![
                "prerouting jump istio-prerouting".to_owned(),
                "output jump istio-output".to_owned(),
                format!("istio-output udp dport 53 {mark} == {PACKET_MARK:#x} counter ct zone set 1"),
                format!("istio-prerouting udp sport 53 {not_ours} counter ct zone set 1"),
            ],
        ),
        _ => return None,
    };

    let mut body: Vec<String> = hooks
        .into_iter()
        .chain(["istio-prerouting".to_owned(), "istio-output".to_owned()])
        .map(|chain| format!("add chain inet {table} {chain}"))
        .collect();
    body.extend(
        rules
            .into_iter()
            .map(|rule| format!("add rule inet {table} {rule}")),
    );
    Some(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_script_deletes_all_three_tables_and_adds_nothing() {
        let text = ruleset(None).text;
        for table in [NAT, MANGLE, RAW] {
            assert!(text.contains(&format!(
                "add table inet {table}\ndelete table inet {table}\n"
            )));
        }
        assert!(!text.contains("add rule") && !text.contains("add chain"));
    }

    #[test]
    fn without_dns_capture_the_raw_table_is_removed() {
        let options = RuleOptions {
            dns_capture: false,
            ipv6: false,
            ..RuleOptions::default()
        };
        let text = ruleset(Some(&options)).text;
        assert!(text
            .ends_with("add table inet istio-ambient-raw\ndelete table inet istio-ambient-raw\n"));
        assert!(!text.contains("dport 53") && !text.contains("ip6"));
    }

    #[test]
    fn ipv6_rules_follow_their_ipv4_twins() {
        let text = ruleset(Some(&RuleOptions::default())).text;
        assert!(text.contains(
            "add rule inet istio-ambient-nat istio-output meta l4proto tcp ip daddr != 127.0.0.1/32 meta mark & 0xfff != 0x539 counter redirect to :15001\n\
             add rule inet istio-ambient-nat istio-output meta l4proto tcp ip6 daddr != ::1/128 meta mark & 0xfff != 0x539 counter redirect to :15001\n"
        ));
    }
}
