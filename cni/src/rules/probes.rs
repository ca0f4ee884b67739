//! Host-side SNAT of the kubelet's probes, installed in the *node's* network namespace.
//!
//! The kubelet probes a pod from the node itself. Left alone, an enrolled pod's in-pod rules send
//! such a probe to ztunnel's inbound capture port, where it is plaintext from an unknown peer and
//! fails under `STRICT` PeerAuthentication. istio-cni therefore SNATs TCP that a process on the
//! node sends to an enrolled pod to [`PROBE_ADDRESS`] (169.254.7.127, and [`PROBE_ADDRESS_V6`]),
//! which the in-pod rules ACCEPT without capture:
//!
//! ```text
//! *nat
//! -A POSTROUTING -j ISTIO_POSTRT
//! -A ISTIO_POSTRT -m owner --socket-exists -p tcp -m set --match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127
//! ```
//!
//! `--socket-exists` only matches packets with a local socket behind them: host processes, never
//! pod-to-pod traffic the node merely forwards. Istio keeps the enrolled pods' IPs in an ipset;
//! `ipset` is not installed on a stock Debian (nor in our image) and needs its own userspace tool,
//! so instead chain `AMBIT-PROBES` holds one rule per enrolled pod address:
//!
//! ```text
//! *nat
//! -A POSTROUTING -j AMBIT-PROBES
//! -A AMBIT-PROBES -d 10.0.1.2/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127
//! ```
//!
//! Same behaviour, only `iptables` needed (the tool the in-pod rules already use), and the state
//! is plain to see in `iptables-save`. A node's pods number in the hundreds at most, so the linear
//! chain costs nothing that matters, and only on the first packet of a connection (nat).
//!
//! Every change goes through [`apply`]: read `iptables-save`, compute the wanted set of pod
//! addresses, and when it differs from what is there rewrite the whole chain and its single jump
//! in one `iptables-restore --noflush` transaction (IPv6 addresses go to `ip6tables`). So
//! [`install`] and [`add`] are idempotent, a stray duplicate jump is cleaned up, and [`remove`]
//! leaves nothing (and succeeds on a clean node). Nothing else in the node's tables is touched.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd};

use super::{netns, RuleOptions, RulesError, Ruleset};

/// Our chain in the node's `nat` table.
pub const CHAIN: &str = "AMBIT-PROBES";
/// The built-in chain that jumps to [`CHAIN`] (Istio's jump to `ISTIO_POSTRT` sits there too).
const HOOK: &str = "POSTROUTING";
const RESTORE_ARGS: &[&str] = &["--noflush", "--wait"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

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

    fn prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    fn probe_address(self, options: &RuleOptions) -> String {
        match self {
            Family::V4 => options.probe_address.to_string(),
            Family::V6 => options.probe_address_v6.to_string(),
        }
    }
}

/// What `iptables-save` shows of ours in the `nat` table.
#[derive(Debug, Default, PartialEq, Eq)]
struct Saved {
    chain: bool,
    /// Rules elsewhere jumping to [`CHAIN`], minus `-A `: what `-D` needs.
    jumps: Vec<String>,
    /// The rules in [`CHAIN`], minus `-A `.
    rules: Vec<String>,
    /// The pod addresses those rules name.
    pods: BTreeSet<IpAddr>,
}

fn parse_save(text: &str) -> Saved {
    let mut saved = Saved::default();
    let mut in_nat = false;
    for line in text.lines().map(str::trim) {
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table.trim() == "nat";
        } else if !in_nat {
            continue;
        } else if let Some(declared) = line.strip_prefix(':') {
            saved.chain |= declared.split_whitespace().next() == Some(CHAIN);
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let tokens: Vec<&str> = rule.split_whitespace().collect();
            if tokens.first() == Some(&CHAIN) {
                saved.rules.push(rule.to_owned());
                let pod: Option<IpAddr> = tokens
                    .windows(2)
                    .find(|w| w[0] == "-d")
                    .and_then(|w| w[1].split('/').next())
                    .and_then(|ip| ip.parse().ok());
                saved.pods.extend(pod);
            } else if tokens
                .windows(2)
                .any(|w| (w[0] == "-j" || w[0] == "-g") && w[1] == CHAIN)
            {
                saved.jumps.push(rule.to_owned());
            }
        }
    }
    saved
}

/// The rule for one pod address, as `iptables-save` prints it back (minus `-A `).
fn pod_rule(family: Family, pod: &IpAddr, options: &RuleOptions) -> String {
    format!(
        "{CHAIN} -d {pod}/{prefix} -p tcp -m owner --socket-exists -j SNAT --to-source {probe}",
        prefix = family.prefix(),
        probe = family.probe_address(options),
    )
}

/// The restore input taking one family from `saved` to exactly `pods` (`None`: to nothing of
/// ours). Empty text when it is there already.
fn ruleset(
    family: Family,
    saved: &Saved,
    pods: Option<&BTreeSet<IpAddr>>,
    options: &RuleOptions,
) -> Ruleset {
    let mut lines: Vec<String> = Vec::new();
    match pods {
        Some(pods) => {
            let rules: Vec<String> = pods.iter().map(|p| pod_rule(family, p, options)).collect();
            let jump = format!("{HOOK} -j {CHAIN}");
            let settled = saved.chain && saved.jumps == [jump.clone()] && saved.rules == rules;
            if !settled {
                lines.extend(saved.jumps.iter().map(|j| format!("-D {j}")));
                // Declaring creates the chain, or empties it.
                lines.push(format!(":{CHAIN} - [0:0]"));
                lines.extend(rules.iter().map(|r| format!("-A {r}")));
                lines.push(format!("-A {jump}"));
            }
        }
        None => {
            lines.extend(saved.jumps.iter().map(|j| format!("-D {j}")));
            if saved.chain {
                // -X only deletes an empty chain.
                lines.push(format!(":{CHAIN} - [0:0]"));
                lines.push(format!("-X {CHAIN}"));
            }
        }
    }
    let mut text = String::new();
    if !lines.is_empty() {
        text.push_str("*nat\n");
        for line in lines {
            text.push_str(&line);
            text.push('\n');
        }
        text.push_str("COMMIT\n");
    }
    Ruleset {
        program: family.restore(),
        args: RESTORE_ARGS,
        text,
    }
}

/// How [`apply`] changes the set of pod addresses.
enum Change<'a> {
    /// Exactly these.
    Set(&'a [IpAddr]),
    /// Add these, then take those out.
    Update {
        add: &'a [IpAddr],
        remove: &'a [IpAddr],
    },
    /// Nothing of ours at all.
    Clear,
}

fn apply(
    netns: BorrowedFd<'_>,
    options: &RuleOptions,
    change: Change<'_>,
) -> Result<(), RulesError> {
    for family in Family::ALL {
        let of_family = |ips: &[IpAddr]| -> Vec<IpAddr> {
            ips.iter()
                .copied()
                .filter(|ip| Family::of(ip) == family)
                .collect()
        };
        // The chain and jump are kept in IPv4 always, in IPv6 when it is captured or a pod has
        // an IPv6 address; anything else only needs cleaning up, if ip6tables works at all.
        let needed = match &change {
            Change::Clear => false,
            Change::Set(pods) => {
                family == Family::V4 || options.ipv6 || !of_family(pods).is_empty()
            }
            Change::Update { add, .. } => {
                family == Family::V4 || options.ipv6 || !of_family(add).is_empty()
            }
        };
        let saved = match netns::run(netns, family.save(), &["-t", "nat"], None) {
            Ok(text) => parse_save(&text),
            Err(error) if family == Family::V6 && !needed => {
                tracing::debug!(%error, "skipping IPv6 probe SNAT cleanup");
                continue;
            }
            Err(error) => return Err(error),
        };
        let wanted: Option<BTreeSet<IpAddr>> = match change {
            Change::Clear => None,
            Change::Set(pods) => Some(of_family(pods).into_iter().collect()),
            Change::Update { add, remove } => {
                let mut pods = saved.pods.clone();
                pods.extend(of_family(add));
                for ip in remove {
                    pods.remove(ip);
                }
                Some(pods)
            }
        };
        // An IPv6 chain nobody needs is not created; one that exists is kept up to date.
        let wanted = wanted.filter(|pods| needed || saved.chain || !pods.is_empty());
        let ruleset = ruleset(family, &saved, wanted.as_ref(), options);
        if !ruleset.text.is_empty() {
            netns::run_ruleset(netns, &ruleset)?;
        }
    }
    Ok(())
}

/// Installs the chain and its jump in the node's namespace `netns`, SNATing probes to exactly
/// `pods` (the enrolled pods' addresses; may be empty). Replaces whatever of ours is there, so
/// an agent starting up converges the node to the pods it knows.
pub fn install(netns: impl AsFd, options: &RuleOptions, pods: &[IpAddr]) -> Result<(), RulesError> {
    tracing::info!(pods = pods.len(), "installing the host-side probe SNAT");
    apply(netns.as_fd(), options, Change::Set(pods))
}

/// Adds `add` and takes out `remove` (pod addresses), installing the chain and jump if missing.
/// Adding an address that is there and removing one that is not are no-ops.
pub fn update(
    netns: impl AsFd,
    options: &RuleOptions,
    add: &[IpAddr],
    remove: &[IpAddr],
) -> Result<(), RulesError> {
    tracing::debug!(?add, ?remove, "updating the host-side probe SNAT");
    apply(netns.as_fd(), options, Change::Update { add, remove })
}

/// Removes the chain, its jump and every pod's rule, both families. Succeeds on a clean node.
pub fn remove(netns: impl AsFd) -> Result<(), RulesError> {
    tracing::info!("removing the host-side probe SNAT");
    apply(netns.as_fd(), &RuleOptions::default(), Change::Clear)
}

/// The pod addresses probes are SNATed for now, both families (IPv6 only where ip6tables works).
pub fn pods(netns: impl AsFd) -> Result<Vec<IpAddr>, RulesError> {
    let netns = netns.as_fd();
    let mut out = Vec::new();
    for family in Family::ALL {
        match netns::run(netns, family.save(), &["-t", "nat"], None) {
            Ok(text) => out.extend(parse_save(&text).pods),
            Err(error) if family == Family::V6 => {
                tracing::debug!(%error, "no IPv6 probe SNAT to read")
            }
            Err(error) => return Err(error),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    const SAVED: &str = "\
*filter
:AMBIT-PROBES - [0:0]
-A FORWARD -j AMBIT-PROBES
COMMIT
*nat
:POSTROUTING ACCEPT [0:0]
:AMBIT-PROBES - [0:0]
-A POSTROUTING -j KUBE-POSTROUTING
-A POSTROUTING -j AMBIT-PROBES
-A POSTROUTING -j AMBIT-PROBES
-A AMBIT-PROBES -d 10.0.1.2/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127
COMMIT
";

    #[test]
    fn parse_reads_only_the_nat_table() {
        let saved = parse_save(SAVED);
        assert!(saved.chain);
        assert_eq!(saved.jumps, ["POSTROUTING -j AMBIT-PROBES"; 2]);
        assert_eq!(saved.pods, ips(&["10.0.1.2"]));
    }

    #[test]
    fn rewrite_drops_duplicate_jumps_and_keeps_one() {
        let text = ruleset(
            Family::V4,
            &parse_save(SAVED),
            Some(&ips(&["10.0.1.2", "10.0.1.3"])),
            &RuleOptions::default(),
        )
        .text;
        assert_eq!(
            text,
            "*nat\n\
             -D POSTROUTING -j AMBIT-PROBES\n\
             -D POSTROUTING -j AMBIT-PROBES\n\
             :AMBIT-PROBES - [0:0]\n\
             -A AMBIT-PROBES -d 10.0.1.2/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127\n\
             -A AMBIT-PROBES -d 10.0.1.3/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127\n\
             -A POSTROUTING -j AMBIT-PROBES\n\
             COMMIT\n"
        );
    }

    #[test]
    fn settled_state_needs_no_change() {
        let saved = "*nat\n:AMBIT-PROBES - [0:0]\n-A POSTROUTING -j AMBIT-PROBES\n\
            -A AMBIT-PROBES -d 10.0.1.2/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127\nCOMMIT\n";
        let ruleset = ruleset(
            Family::V4,
            &parse_save(saved),
            Some(&ips(&["10.0.1.2"])),
            &RuleOptions::default(),
        );
        assert!(ruleset.text.is_empty(), "{}", ruleset.text);
    }

    #[test]
    fn ipv6_rules_use_the_v6_probe_address() {
        let text = ruleset(
            Family::V6,
            &Saved::default(),
            Some(&ips(&["fd00::5"])),
            &RuleOptions::default(),
        )
        .text;
        assert!(text.contains(
            "-A AMBIT-PROBES -d fd00::5/128 -p tcp -m owner --socket-exists -j SNAT \
             --to-source fd16:9254:7127:1337:ffff:ffff:ffff:ffff\n"
        ));
    }

    #[test]
    fn removal_deletes_jumps_then_the_chain_and_is_a_noop_when_clean() {
        let text = ruleset(
            Family::V4,
            &parse_save(SAVED),
            None,
            &RuleOptions::default(),
        )
        .text;
        assert_eq!(
            text,
            "*nat\n-D POSTROUTING -j AMBIT-PROBES\n-D POSTROUTING -j AMBIT-PROBES\n\
             :AMBIT-PROBES - [0:0]\n-X AMBIT-PROBES\nCOMMIT\n"
        );
        assert!(
            ruleset(Family::V4, &Saved::default(), None, &RuleOptions::default())
                .text
                .is_empty()
        );
    }
}
