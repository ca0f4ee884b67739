//! Policy routing for ztunnel's connections: `ip rule add fwmark 0x111/0xfff pref 32764 lookup
//! 100` and `ip route add local 0.0.0.0/0 dev lo table 100` (and `::/0` for IPv6), as istio-cni
//! sets them. Packets carrying the connmark-restored mark are delivered locally, to ztunnel's
//! sockets, whatever their destination address.
//!
//! Existence is checked by listing, never by reading `ip`'s error messages, so that "already
//! there" and "already gone" are not confused with real failures.

use std::io;
use std::os::fd::BorrowedFd;

use super::{netns, RulesError, CONNMARK, MARK_MASK, ROUTE_TABLE, RULE_PRIORITY};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn default_route(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
}

struct Args {
    fwmark: String,
    pref: String,
    table: String,
}

impl Args {
    fn new() -> Self {
        Args {
            fwmark: format!("{CONNMARK:#x}/{MARK_MASK:#x}"),
            pref: RULE_PRIORITY.to_string(),
            table: ROUTE_TABLE.to_string(),
        }
    }

    fn rule<'a>(&'a self, family: Family, verb: &'a str) -> [&'a str; 9] {
        let (fwmark, pref, table) = (&self.fwmark, &self.pref, &self.table);
        [
            family.flag(),
            "rule",
            verb,
            "fwmark",
            fwmark,
            "pref",
            pref,
            "table",
            table,
        ]
    }

    fn route<'a>(&'a self, family: Family, verb: &'a str) -> [&'a str; 9] {
        [
            family.flag(),
            "route",
            verb,
            "local",
            family.default_route(),
            "dev",
            "lo",
            "table",
            &self.table,
        ]
    }
}

/// Adds the IPv4 rule and route, and the IPv6 ones when `ipv6` (else removes stale IPv6 ones).
pub(super) fn install(netns: BorrowedFd<'_>, ipv6: bool) -> Result<(), RulesError> {
    install_family(netns, Family::V4)?;
    if ipv6 {
        install_family(netns, Family::V6)
    } else {
        remove_family(netns, Family::V6)
    }
}

/// Removes the rule and route of both families; tries both even if one fails.
pub(super) fn remove(netns: BorrowedFd<'_>) -> Result<(), RulesError> {
    let v4 = remove_family(netns, Family::V4);
    let v6 = remove_family(netns, Family::V6);
    v4.and(v6)
}

fn install_family(netns: BorrowedFd<'_>, family: Family) -> Result<(), RulesError> {
    let args = Args::new();
    // istio-cni skips the IPv6 route when lo has IPv6 disabled: the kernel would refuse it, and
    // there is no IPv6 traffic to deliver anyway.
    if family == Family::V6 && lo_ipv6_disabled(netns)? {
        tracing::debug!("IPv6 is disabled on lo; no IPv6 local route");
    } else {
        // `replace` is idempotent by itself.
        netns::run(netns, "ip", &args.route(family, "replace"), None)?;
    }
    if count_rules(netns, family)? == 0 {
        netns::run(netns, "ip", &args.rule(family, "add"), None)?;
    }
    Ok(())
}

fn remove_family(netns: BorrowedFd<'_>, family: Family) -> Result<(), RulesError> {
    let args = Args::new();
    let counts =
        count_rules(netns, family).and_then(|rules| Ok((rules, count_routes(netns, family)?)));
    let (rules, routes) = match counts {
        Ok(counts) => counts,
        // Listing IPv6 fails only where IPv6 is off altogether: then there is nothing to remove.
        Err(error) if family == Family::V6 => {
            tracing::debug!(%error, "skipping IPv6 policy routing cleanup");
            return Ok(());
        }
        Err(error) => return Err(error),
    };
    for _ in 0..rules {
        netns::run(netns, "ip", &args.rule(family, "del"), None)?;
    }
    for _ in 0..routes {
        netns::run(netns, "ip", &args.route(family, "del"), None)?;
    }
    Ok(())
}

fn count_rules(netns: BorrowedFd<'_>, family: Family) -> Result<usize, RulesError> {
    let listed = netns::run(netns, "ip", &Args::new().rule(family, "list"), None)?;
    Ok(listed.lines().filter(|l| !l.trim().is_empty()).count())
}

fn count_routes(netns: BorrowedFd<'_>, family: Family) -> Result<usize, RulesError> {
    // `table all`: listing table 100 alone fails when the table does not exist.
    let listed = netns::run(
        netns,
        "ip",
        &[
            family.flag(),
            "route",
            "list",
            "table",
            "all",
            "type",
            "local",
            "exact",
            family.default_route(),
        ],
        None,
    )?;
    let table = ROUTE_TABLE.to_string();
    Ok(listed
        .lines()
        .filter(|line| {
            let tokens: Vec<&str> = line.split_whitespace().collect();
            tokens.windows(2).any(|w| w == ["dev", "lo"])
                && tokens.windows(2).any(|w| w[0] == "table" && w[1] == table)
        })
        .count())
}

fn lo_ipv6_disabled(netns: BorrowedFd<'_>) -> Result<bool, RulesError> {
    let read = netns::with_netns(netns, || {
        std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6")
    });
    match read {
        Ok(value) => Ok(value.trim() == "1"),
        // No such sysctl: the kernel has no IPv6 at all.
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(error) => Err(RulesError::Netns(error)),
    }
}
