//! The iptables backend: Istio's in-pod chains, applied with `iptables-restore --noflush`.
//!
//! `--noflush` leaves everyone else's rules alone. Declaring our chains (`:ISTIO_PRERT - [0:0]`)
//! creates them or, when they exist, empties them, so re-installing replaces their contents. The
//! jumps into them sit in the built-in chains, which we must not flush; a second append would
//! duplicate them, so each install first reads `iptables-save` and deletes the jumps it finds, in
//! the same restore transaction that adds them back. Removal is the same transaction without
//! the additions, plus `-X` of our chains.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::BorrowedFd;

use super::{
    netns, RuleOptions, RulesError, Ruleset, CONNMARK, DNS_PORT, HBONE_PORT,
    INBOUND_PLAINTEXT_PORT, MARK_MASK, OUTBOUND_PORT, PACKET_MARK,
};

const PRERT: &str = "ISTIO_PRERT";
const OUTPUT: &str = "ISTIO_OUTPUT";
const OUR_CHAINS: [&str; 2] = [PRERT, OUTPUT];
/// In the order Istio writes them.
const TABLES: [&str; 3] = ["mangle", "nat", "raw"];
/// `--wait`: legacy iptables takes a host-wide lock even for other namespaces.
const RESTORE_ARGS: &[&str] = &["--noflush", "--wait"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Family {
    V4,
    V6,
}

impl Family {
    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn localhost(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }
}

/// What `iptables-save` shows of ours.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Saved {
    tables: BTreeMap<String, SavedTable>,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct SavedTable {
    /// Our chains that exist.
    chains: BTreeSet<String>,
    /// Rules elsewhere that jump to our chains, as `iptables-save` prints them minus `-A `:
    /// exactly what `-D` needs to delete them.
    references: Vec<String>,
}

pub(super) fn parse_save(text: &str) -> Saved {
    let mut saved = Saved::default();
    let mut table = None;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            table = Some(saved.tables.entry(name.trim().to_owned()).or_default());
        } else if let (Some(declared), Some(table)) = (line.strip_prefix(':'), table.as_mut()) {
            let chain = declared.split_whitespace().next().unwrap_or_default();
            if OUR_CHAINS.contains(&chain) {
                table.chains.insert(chain.to_owned());
            }
        } else if let (Some(rule), Some(table)) = (line.strip_prefix("-A "), table.as_mut()) {
            let tokens: Vec<&str> = rule.split_whitespace().collect();
            let in_ours = tokens
                .first()
                .is_some_and(|chain| OUR_CHAINS.contains(chain));
            let to_ours = tokens
                .windows(2)
                .any(|w| (w[0] == "-j" || w[0] == "-g") && OUR_CHAINS.contains(&w[1]));
            if to_ours && !in_ours {
                table.references.push(rule.to_owned());
            }
        }
    }
    saved
}

/// Istio's in-pod rules for one family, per table, each rule as `CHAIN args` (appended in order).
fn wanted(family: Family, options: &RuleOptions) -> Vec<(&'static str, Vec<String>)> {
    let mark = format!("{PACKET_MARK:#x}/{MARK_MASK:#x}");
    let connmark = format!("{CONNMARK:#x}/{MARK_MASK:#x}");
    let lo = family.localhost();
    let probe = match family {
        Family::V4 => options.probe_address.to_string(),
        Family::V6 => options.probe_address_v6.to_string(),
    };

    let mangle = vec![
        format!("PREROUTING -j {PRERT}"),
        format!("OUTPUT -j {OUTPUT}"),
        format!("{PRERT} -m mark --mark {mark} -j CONNMARK --set-xmark {connmark}"),
        format!(
            "{OUTPUT} -m connmark --mark {connmark} -j CONNMARK --restore-mark \
             --nfmask 0xffffffff --ctmask 0xffffffff"
        ),
    ];

    let mut nat = vec![
        format!("OUTPUT -j {OUTPUT}"),
        format!("PREROUTING -j {PRERT}"),
        // The node SNATs the kubelet's probes to this address; they must reach the app as is.
        format!("{PRERT} -s {probe} -p tcp -m tcp -j ACCEPT"),
        format!("{OUTPUT} -d {probe} -p tcp -m tcp -j ACCEPT"),
        format!(
            "{PRERT} ! -d {lo} -p tcp ! --dport {HBONE_PORT} -m mark ! --mark {mark} \
             -j REDIRECT --to-ports {INBOUND_PLAINTEXT_PORT}"
        ),
    ];
    if options.dns_capture {
        nat.push(format!(
            "{OUTPUT} ! -o lo -p udp -m mark ! --mark {mark} -m udp --dport 53 \
             -j REDIRECT --to-port {DNS_PORT}"
        ));
        nat.push(format!(
            "{OUTPUT} ! -d {lo} -p tcp --dport 53 -m mark ! --mark {mark} \
             -j REDIRECT --to-ports {DNS_PORT}"
        ));
    }
    nat.extend([
        format!("{OUTPUT} -p tcp -m mark --mark {connmark} -j ACCEPT"),
        // App to its own pod IP goes out through lo: it never left the pod, nothing to proxy.
        format!("{OUTPUT} ! -d {lo} -o lo -j ACCEPT"),
        format!(
            "{OUTPUT} ! -d {lo} -p tcp -m mark ! --mark {mark} \
             -j REDIRECT --to-ports {OUTBOUND_PORT}"
        ),
    ]);

    let mut tables = vec![("mangle", mangle), ("nat", nat)];
    if options.dns_capture {
        // The DNS proxy's upstream queries and the app's redirected ones can share a 5-tuple
        // after NAT; separate conntrack zones keep them apart (istio/istio#33469).
        tables.push((
            "raw",
            vec![
                format!("PREROUTING -j {PRERT}"),
                format!("OUTPUT -j {OUTPUT}"),
                format!("{OUTPUT} -p udp -m mark --mark {mark} -m udp --dport 53 -j CT --zone 1"),
                format!("{PRERT} -p udp -m mark ! --mark {mark} -m udp --sport 53 -j CT --zone 1"),
            ],
        ));
    }
    tables
}

/// The restore input taking one family from `saved` to `options`' rules, or to none of ours
/// when `options` is `None`. Empty text means there is nothing to do.
pub(super) fn ruleset(family: Family, saved: &Saved, options: Option<&RuleOptions>) -> Ruleset {
    let wanted = options.map(|o| wanted(family, o)).unwrap_or_default();
    let empty = SavedTable::default();
    let mut text = String::new();
    for table in TABLES {
        let have = saved.tables.get(table).unwrap_or(&empty);
        let want = wanted.iter().find(|(name, _)| *name == table);
        let mut lines: Vec<String> = have.references.iter().map(|r| format!("-D {r}")).collect();
        match want {
            Some((_, rules)) => {
                lines.extend(OUR_CHAINS.iter().map(|c| format!(":{c} - [0:0]")));
                lines.extend(rules.iter().map(|r| format!("-A {r}")));
            }
            None => {
                let present: Vec<&str> = OUR_CHAINS
                    .into_iter()
                    .filter(|c| have.chains.contains(*c))
                    .collect();
                // Declaring empties them: -X only deletes empty chains.
                lines.extend(present.iter().map(|c| format!(":{c} - [0:0]")));
                lines.extend(present.iter().map(|c| format!("-X {c}")));
            }
        }
        if !lines.is_empty() {
            text.push_str(&format!("*{table}\n"));
            for line in lines {
                text.push_str(&line);
                text.push('\n');
            }
            text.push_str("COMMIT\n");
        }
    }
    Ruleset {
        program: family.restore(),
        args: RESTORE_ARGS,
        text,
    }
}

/// Brings both families in `netns` to `options`' rules (`None`: to none of ours).
pub(super) fn apply(
    netns: BorrowedFd<'_>,
    options: Option<&RuleOptions>,
) -> Result<(), RulesError> {
    for family in [Family::V4, Family::V6] {
        let wanted = options.filter(|o| family == Family::V4 || o.ipv6);
        let saved = match netns::run(netns, family.save(), &[], None) {
            Ok(text) => parse_save(&text),
            // Leftover IPv6 rules can only exist where ip6tables works; a node without it (no
            // binary, IPv6 off in the kernel) has nothing to clean up.
            Err(error) if family == Family::V6 && wanted.is_none() => {
                tracing::debug!(%error, "skipping IPv6 cleanup");
                continue;
            }
            Err(error) => return Err(error),
        };
        let ruleset = ruleset(family, &saved, wanted);
        if !ruleset.text.is_empty() {
            netns::run_ruleset(netns, &ruleset)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables)
*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_PRERT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -p tcp -m comment --comment \"someone else\" -j ISTIO_OUTPUT
-A OUTPUT -j KUBE-SOMETHING
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:ISTIO_PRERT - [0:0]
-A PREROUTING -j ISTIO_PRERT
COMMIT
*filter
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
COMMIT
";

    #[test]
    fn parse_finds_our_chains_and_every_jump_into_them() {
        let saved = parse_save(SAVED);
        let mangle = &saved.tables["mangle"];
        assert_eq!(
            mangle.chains,
            BTreeSet::from([PRERT.to_owned(), OUTPUT.to_owned()])
        );
        assert_eq!(
            mangle.references,
            [
                "PREROUTING -j ISTIO_PRERT",
                "PREROUTING -j ISTIO_PRERT",
                "OUTPUT -p tcp -m comment --comment \"someone else\" -j ISTIO_OUTPUT",
            ]
        );
        assert!(!saved.tables.contains_key("nat"));
    }

    #[test]
    fn reinstall_deletes_old_jumps_in_the_same_transaction() {
        let options = RuleOptions {
            dns_capture: false,
            ..RuleOptions::default()
        };
        let text = ruleset(Family::V4, &parse_save(SAVED), Some(&options)).text;
        let mangle = text.split("COMMIT\n").next().unwrap();
        assert!(mangle.starts_with(
            "*mangle\n-D PREROUTING -j ISTIO_PRERT\n-D PREROUTING -j ISTIO_PRERT\n\
             -D OUTPUT -p tcp -m comment --comment \"someone else\" -j ISTIO_OUTPUT\n\
             :ISTIO_PRERT - [0:0]\n"
        ));
        // DNS capture is off now: the old raw chain goes; filter is not ours to touch.
        assert!(text.contains(
            "*raw\n-D PREROUTING -j ISTIO_PRERT\n:ISTIO_PRERT - [0:0]\n-X ISTIO_PRERT\nCOMMIT\n"
        ));
        assert!(!text.contains("*filter"));
    }

    #[test]
    fn removing_from_a_clean_namespace_does_nothing() {
        assert!(ruleset(Family::V4, &Saved::default(), None).text.is_empty());
        assert!(ruleset(
            Family::V6,
            &parse_save("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"),
            None
        )
        .text
        .is_empty());
    }

    #[test]
    fn ipv6_uses_v6_loopback_and_probe_address() {
        let text = ruleset(Family::V6, &Saved::default(), Some(&RuleOptions::default())).text;
        assert!(text.contains("-A ISTIO_PRERT -s fd16:9254:7127:1337:ffff:ffff:ffff:ffff -p tcp"));
        assert!(text.contains("-A ISTIO_OUTPUT ! -d ::1/128 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001"));
        assert!(!text.contains("127.0.0.1"));
    }
}
