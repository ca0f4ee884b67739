//! Istio's in-pod redirect rules, installed inside a pod's network namespace.
//!
//! The rules are Istio's own (istio-cni's in-pod rules): the same chains (`ISTIO_PRERT`,
//! `ISTIO_OUTPUT` in the mangle, nat and raw tables), the same nftables tables
//! (`inet istio-ambient-{nat,mangle,raw}`), the same marks and ports, so that tooling, runbooks and
//! a ztunnel written for Istio all work on a pod Ambit enrolled, and the other way round:
//!
//! - app TCP leaving the pod, not to 127.0.0.1 and without ztunnel's packet mark `0x539`, is
//!   REDIRECTed to ztunnel's outbound port 15001;
//! - TCP entering the pod, except to 15008 (HBONE, which ztunnel listens on directly), is
//!   REDIRECTed to the plaintext inbound port 15006;
//! - with DNS capture, DNS (UDP and TCP port 53) goes to ztunnel's DNS proxy on 15053, and the
//!   proxy's upstream queries get their own conntrack zone so they cannot collide with the app's;
//! - a packet with mark `0x539` gives its connection the connmark `0x111`; later packets of that
//!   connection get `0x111` back as their mark, and `ip rule fwmark 0x111/0xfff lookup 100`
//!   with a `local` default route on `lo` in table 100 delivers them to ztunnel's sockets;
//! - the kubelet's probes (SNATed on the node to 169.254.7.127) are left alone.
//!
//! Two backends: [`Backend::Iptables`] feeds `iptables-restore`/`ip6tables-restore --noflush`,
//! [`Backend::Nftables`] feeds `nft -f`. [`render`] shows the exact input for a namespace without
//! our rules; [`install`] and [`remove`] apply it inside a namespace given as an open fd (the
//! form ZDS hands to ztunnel). Both converge: installing twice leaves one copy of every rule,
//! installing with other options replaces the old rules, removing leaves nothing of ours, and
//! removing from a clean namespace succeeds.

mod iptables;
pub(crate) mod netns;
mod nftables;
pub mod probes;
mod routing;

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::process::ExitStatus;

/// ztunnel marks every socket it opens with this (Istio's `InpodMark`, 1337).
pub const PACKET_MARK: u32 = 0x539;
/// The connmark given to connections ztunnel's marked packets belong to (`InpodTProxyMark`).
pub const CONNMARK: u32 = 0x111;
/// Only these bits of the packet mark and connmark are ours; others may use the rest.
pub const MARK_MASK: u32 = 0xfff;
/// Routing table holding the `local` default route on `lo`.
pub const ROUTE_TABLE: u32 = 100;
/// Priority of the `ip rule` sending connmarked traffic to [`ROUTE_TABLE`].
pub const RULE_PRIORITY: u32 = 32764;
/// ztunnel's outbound capture port.
pub const OUTBOUND_PORT: u16 = 15001;
/// ztunnel's plaintext inbound capture port.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// ztunnel's HBONE port: reached directly, never redirected.
pub const HBONE_PORT: u16 = 15008;
/// ztunnel's DNS proxy port.
pub const DNS_PORT: u16 = 15053;
/// Istio's default source address for kubelet probes, SNATed on the node.
pub const PROBE_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// Istio's default IPv6 source address for kubelet probes.
pub const PROBE_ADDRESS_V6: Ipv6Addr = Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);

/// How the rules are applied. Both backends install the same behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `iptables-restore` / `ip6tables-restore` (whichever variant, legacy or nft, is on PATH).
    Iptables,
    /// Native nftables through `nft -f`.
    Nftables,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Iptables => "iptables",
            Backend::Nftables => "nftables",
        })
    }
}

/// What to capture. The defaults are those of Istio's chart (`ambient.dnsCapture: true`,
/// `ambient.ipv6: true`) and its probe addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleOptions {
    /// Redirect DNS (UDP and TCP port 53) to ztunnel's DNS proxy on [`DNS_PORT`].
    pub dns_capture: bool,
    /// Also capture IPv6 (ip6tables rules, `ip6` nftables matches, the IPv6 rule and route).
    pub ipv6: bool,
    /// Source address of the kubelet's probes after the node's SNAT; exempt from capture.
    pub probe_address: Ipv4Addr,
    /// The IPv6 twin of `probe_address`.
    pub probe_address_v6: Ipv6Addr,
}

impl Default for RuleOptions {
    fn default() -> Self {
        RuleOptions {
            dns_capture: true,
            ipv6: true,
            probe_address: PROBE_ADDRESS,
            probe_address_v6: PROBE_ADDRESS_V6,
        }
    }
}

/// One input for one program, as [`install`] runs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    /// `iptables-restore`, `ip6tables-restore` or `nft`, looked up on PATH.
    pub program: &'static str,
    pub args: &'static [&'static str],
    /// Fed on stdin.
    pub text: String,
}

impl Ruleset {
    /// The command line, for logs and messages.
    pub fn command(&self) -> String {
        command_line(self.program, self.args)
    }
}

/// Why installing or removing failed. Messages are for operators: they name the command and
/// carry what it printed on stderr.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The program could not be started inside the namespace (not installed, or entering the
    /// namespace was refused).
    #[error("cannot run `{command}` in the pod network namespace: {source} (is it installed and on PATH, and do we have CAP_SYS_ADMIN and CAP_NET_ADMIN?)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// The program ran and failed.
    #[error("`{command}` failed in the pod network namespace ({status}): {stderr}")]
    Command {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    /// Reading the namespace's own state failed.
    #[error("cannot inspect the pod network namespace: {0}")]
    Netns(#[source] std::io::Error),
}

/// What [`install`] feeds to the rule programs on a namespace that holds none of our rules yet.
///
/// For iptables, one ruleset per IP family (`iptables-restore`, then `ip6tables-restore` when
/// `ipv6`); for nftables a single `nft` script covering both families (`inet` tables). On a
/// namespace that already has our chains, [`install`] prefixes each table's block with the
/// deletions of its old jumps so the whole replacement is one transaction per family.
pub fn render(backend: Backend, options: &RuleOptions) -> Vec<Ruleset> {
    match backend {
        Backend::Iptables => {
            let mut out = vec![iptables::ruleset(
                iptables::Family::V4,
                &iptables::Saved::default(),
                Some(options),
            )];
            if options.ipv6 {
                out.push(iptables::ruleset(
                    iptables::Family::V6,
                    &iptables::Saved::default(),
                    Some(options),
                ));
            }
            out
        }
        Backend::Nftables => vec![nftables::ruleset(Some(options))],
    }
}

/// Installs the rules and the policy routing inside the namespace `netns` (an open
/// `/proc/<pid>/ns/net` or `/var/run/netns/<name>`). Replaces whatever of ours is there.
///
/// The calling thread stays where it is: every command is started in the namespace. With
/// `ipv6`, `lo` must be up (it is in any running pod): the kernel refuses an IPv6 route on a down
/// device. Rules of the other backend are not touched.
pub fn install(
    netns: impl AsFd,
    backend: Backend,
    options: &RuleOptions,
) -> Result<(), RulesError> {
    let netns = netns.as_fd();
    tracing::info!(%backend, ?options, "installing in-pod redirect rules");
    // Routing first, as istio-cni does: once the rules connmark ztunnel's connections, table
    // 100 must already deliver their packets to ztunnel's sockets.
    routing::install(netns, options.ipv6)?;
    match backend {
        Backend::Iptables => iptables::apply(netns, Some(options)),
        Backend::Nftables => netns::run_ruleset(netns, &nftables::ruleset(Some(options))),
    }
}

/// Removes everything [`install`] put in `netns` for `backend`, for both IP families whatever
/// the options were. Succeeds when nothing is installed; on failure it still tries every step
/// and reports the first error. Rules of the other backend are not touched.
pub fn remove(netns: impl AsFd, backend: Backend) -> Result<(), RulesError> {
    let netns = netns.as_fd();
    tracing::info!(%backend, "removing in-pod redirect rules");
    let rules = match backend {
        Backend::Iptables => iptables::apply(netns, None),
        Backend::Nftables => netns::run_ruleset(netns, &nftables::ruleset(None)),
    };
    let routes = routing::remove(netns);
    rules.and(routes)
}

fn command_line(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}
