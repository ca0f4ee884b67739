//! The in-pod rules on real network namespaces: installed state as `iptables-save` / `nft` /
//! `ip` show it, idempotence, clean removal, and real connections being redirected (or not).
//!
//! Needs root and iproute2, iptables and nftables (`apt-get install iproute2 iptables nftables`).
//! Every test makes its own uniquely named namespaces, so tests run in parallel, and deletes them
//! when it ends, failed or not.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ambit_cni::rules::{self, Backend, RuleOptions};
use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
use nix::sys::time::TimeVal;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A named network namespace, deleted on drop.
struct Netns {
    file: File,
    name: Name,
}

/// Deletes the namespace on drop, so that it goes even when setting it up fails half way.
struct Name(String);

impl Drop for Name {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

impl Netns {
    fn new() -> Netns {
        let name = format!(
            "ambit-rules-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let name = Name(name);
        let file = File::open(format!("/var/run/netns/{}", name.0)).expect("open netns");
        let ns = Netns { file, name };
        // Pods always have lo up, and the IPv6 local route needs it.
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn name(&self) -> &str {
        &self.name.0
    }

    /// `ip -n <name> args`.
    fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a program inside the namespace.
    fn exec(&self, command: &[&str]) -> String {
        let mut full = vec!["netns", "exec", self.name()];
        full.extend_from_slice(command);
        run("ip", &full)
    }

    /// Runs `f` on a thread inside the namespace; sockets it makes stay in the namespace.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
                    f()
                })
                .join()
                .expect("thread in netns panicked")
        })
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{program} {args:?}: {e} (needs root, iproute2, iptables, nftables)")
        });
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Our lines in `iptables-save` / `ip6tables-save`, without comments (they carry a timestamp).
fn saved(ns: &Netns, program: &str) -> String {
    ns.exec(&[program])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

fn our_iptables_lines(ns: &Netns, program: &str) -> Vec<String> {
    let mut table = String::new();
    let mut lines = Vec::new();
    for line in saved(ns, program).lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = name.to_owned();
        } else if line.contains("ISTIO_") {
            lines.push(format!("{table} {line}"));
        }
    }
    lines
}

/// Policy routing of ours: rules at pref 32764 and routes in table 100, both families.
fn policy_routing(ns: &Netns) -> Vec<String> {
    let mut out = Vec::new();
    for family in ["-4", "-6"] {
        out.extend(
            ns.ip(&[family, "rule", "list"])
                .lines()
                .filter(|l| l.starts_with("32764:"))
                .map(|l| format!("{family} {}", l.trim())),
        );
        out.extend(
            ns.ip(&[family, "route", "list", "table", "all"])
                .lines()
                .filter(|l| l.contains("table 100"))
                .map(|l| format!("{family} {}", l.trim())),
        );
    }
    out
}

const EXPECTED_POLICY_ROUTING: [&str; 4] = [
    "-4 32764:\tfrom all fwmark 0x111/0xfff lookup 100",
    "-4 local default dev lo table 100 scope host",
    "-6 32764:\tfrom all fwmark 0x111/0xfff lookup 100",
    "-6 local default dev lo table 100 metric 1024 pref medium",
];

/// `nft list ruleset` without counter values, which traffic changes.
fn nft_ruleset(ns: &Netns) -> String {
    ns.exec(&["nft", "list", "ruleset"])
        .lines()
        .map(|l| match l.find(" counter packets ") {
            Some(at) => {
                let rest = &l[at + " counter packets ".len()..];
                let after = rest.splitn(4, ' ').nth(3).unwrap_or("");
                format!("{} counter {after}", &l[..at])
            }
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Istio's rules as the kernel reports them back through `iptables-save` (v4), per table.
const EXPECTED_IPTABLES_V4: &[&str] = &[
    "mangle :ISTIO_OUTPUT - [0:0]",
    "mangle :ISTIO_PRERT - [0:0]",
    "mangle -A PREROUTING -j ISTIO_PRERT",
    "mangle -A OUTPUT -j ISTIO_OUTPUT",
    "mangle -A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
    "mangle -A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
    "raw :ISTIO_OUTPUT - [0:0]",
    "raw :ISTIO_PRERT - [0:0]",
    "raw -A PREROUTING -j ISTIO_PRERT",
    "raw -A OUTPUT -j ISTIO_OUTPUT",
    "raw -A ISTIO_OUTPUT -p udp -m mark --mark 0x539/0xfff -m udp --dport 53 -j CT --zone 1",
    "raw -A ISTIO_PRERT -p udp -m mark ! --mark 0x539/0xfff -m udp --sport 53 -j CT --zone 1",
    "nat :ISTIO_OUTPUT - [0:0]",
    "nat :ISTIO_PRERT - [0:0]",
    "nat -A PREROUTING -j ISTIO_PRERT",
    "nat -A OUTPUT -j ISTIO_OUTPUT",
    "nat -A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
    "nat -A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053",
    "nat -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053",
    "nat -A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT",
    "nat -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT",
    "nat -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
    "nat -A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
    "nat -A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006",
];

fn sorted(mut lines: Vec<String>) -> Vec<String> {
    lines.sort();
    lines
}

fn sorted_expected(lines: &[&str]) -> Vec<String> {
    sorted(lines.iter().map(|l| l.to_string()).collect())
}

#[test]
fn iptables_install_is_idempotent_and_remove_leaves_nothing() {
    let ns = Netns::new();
    // Removing from a clean namespace is fine.
    rules::remove(&ns.file, Backend::Iptables).expect("remove on a clean netns");

    let options = RuleOptions::default();
    rules::install(&ns.file, Backend::Iptables, &options).expect("install");
    assert_eq!(
        sorted(our_iptables_lines(&ns, "iptables-save")),
        sorted_expected(EXPECTED_IPTABLES_V4)
    );
    let v6 = our_iptables_lines(&ns, "ip6tables-save");
    assert!(v6.contains(&"nat -A ISTIO_OUTPUT ! -d ::1/128 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001".to_owned()), "{v6:#?}");
    assert!(v6.contains(&"nat -A ISTIO_PRERT -s fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128 -p tcp -m tcp -j ACCEPT".to_owned()), "{v6:#?}");
    assert_eq!(v6.len(), EXPECTED_IPTABLES_V4.len(), "{v6:#?}");
    assert_eq!(policy_routing(&ns), EXPECTED_POLICY_ROUTING);

    let first = (
        saved(&ns, "iptables-save"),
        saved(&ns, "ip6tables-save"),
        policy_routing(&ns),
    );
    rules::install(&ns.file, Backend::Iptables, &options).expect("second install");
    let second = (
        saved(&ns, "iptables-save"),
        saved(&ns, "ip6tables-save"),
        policy_routing(&ns),
    );
    assert_eq!(first, second, "a second install changed the rules");

    // New options replace the old rules: without DNS capture and IPv6, the raw chains, the DNS
    // redirects and every IPv6 rule go.
    let narrow = RuleOptions {
        dns_capture: false,
        ipv6: false,
        ..RuleOptions::default()
    };
    rules::install(&ns.file, Backend::Iptables, &narrow).expect("install without DNS");
    let v4 = our_iptables_lines(&ns, "iptables-save");
    assert!(
        !v4.iter()
            .any(|l| l.starts_with("raw ") || l.contains("15053")),
        "{v4:#?}"
    );
    assert_eq!(v4.len(), EXPECTED_IPTABLES_V4.len() - 6 - 2, "{v4:#?}");
    assert!(our_iptables_lines(&ns, "ip6tables-save").is_empty());
    assert_eq!(policy_routing(&ns), EXPECTED_POLICY_ROUTING[..2]);

    rules::install(&ns.file, Backend::Iptables, &options).expect("install again");
    rules::remove(&ns.file, Backend::Iptables).expect("remove");
    assert!(!saved(&ns, "iptables-save").contains("ISTIO"));
    assert!(!saved(&ns, "ip6tables-save").contains("ISTIO"));
    assert!(policy_routing(&ns).is_empty(), "{:?}", policy_routing(&ns));
    rules::remove(&ns.file, Backend::Iptables).expect("second remove");
}

#[test]
fn nftables_install_is_idempotent_and_remove_leaves_nothing() {
    let ns = Netns::new();
    rules::remove(&ns.file, Backend::Nftables).expect("remove on a clean netns");

    let options = RuleOptions::default();
    rules::install(&ns.file, Backend::Nftables, &options).expect("install");
    let ruleset = nft_ruleset(&ns);
    for expected in [
        "table inet istio-ambient-nat {",
        "table inet istio-ambient-mangle {",
        "table inet istio-ambient-raw {",
        "\t\ttype nat hook output priority -100; policy accept;",
        "\t\tip daddr != 127.0.0.1 tcp dport != 15008 meta mark & 0x00000fff != 0x00000539 counter redirect to :15006",
        "\t\tip6 daddr != ::1 tcp dport != 15008 meta mark & 0x00000fff != 0x00000539 counter redirect to :15006",
        "\t\toifname != \"lo\" meta mark & 0x00000fff != 0x00000539 udp dport 53 counter redirect to :15053",
        "\t\tmeta l4proto tcp meta mark & 0x00000fff == 0x00000111 counter accept",
        "\t\toifname \"lo\" ip daddr != 127.0.0.1 counter accept",
        "\t\tmeta l4proto tcp ip daddr != 127.0.0.1 meta mark & 0x00000fff != 0x00000539 counter redirect to :15001",
        "\t\tmeta l4proto tcp ip6 daddr != ::1 meta mark & 0x00000fff != 0x00000539 counter redirect to :15001",
        "\t\tmeta l4proto tcp ip saddr 169.254.7.127 counter accept",
        "\t\ttype route hook output priority mangle; policy accept;",
        // nft folds `& 0xfffff000 | 0x111` into this equivalent mask.
        "\t\tmeta mark & 0x00000fff == 0x00000539 counter ct mark set ct mark & 0xfffff111 | 0x00000111",
        "\t\tct mark & 0x00000fff == 0x00000111 counter meta mark set ct mark",
        "\t\tudp dport 53 meta mark & 0x00000fff == 0x00000539 counter ct zone set 1",
        "\t\tudp sport 53 meta mark & 0x00000fff != 0x00000539 counter ct zone set 1",
    ] {
        assert!(
            ruleset.lines().any(|l| l == expected),
            "missing {expected:?} in\n{ruleset}"
        );
    }
    assert_eq!(ruleset.matches("redirect to").count(), 7, "{ruleset}");
    assert_eq!(policy_routing(&ns), EXPECTED_POLICY_ROUTING);

    rules::install(&ns.file, Backend::Nftables, &options).expect("second install");
    assert_eq!(
        ruleset,
        nft_ruleset(&ns),
        "a second install changed the rules"
    );
    assert_eq!(policy_routing(&ns), EXPECTED_POLICY_ROUTING);

    let narrow = RuleOptions {
        dns_capture: false,
        ipv6: false,
        ..RuleOptions::default()
    };
    rules::install(&ns.file, Backend::Nftables, &narrow).expect("install without DNS");
    let ruleset = nft_ruleset(&ns);
    assert!(!ruleset.contains("istio-ambient-raw") && !ruleset.contains("15053"));
    assert!(!ruleset.contains("ip6 "), "{ruleset}");
    assert_eq!(policy_routing(&ns), EXPECTED_POLICY_ROUTING[..2]);

    rules::remove(&ns.file, Backend::Nftables).expect("remove");
    assert!(!nft_ruleset(&ns).contains("istio"), "{}", nft_ruleset(&ns));
    assert!(policy_routing(&ns).is_empty());
    rules::remove(&ns.file, Backend::Nftables).expect("second remove");
}

#[test]
fn iptables_redirects_real_connections() {
    redirects_real_connections(Backend::Iptables);
}

#[test]
fn nftables_redirects_real_connections() {
    redirects_real_connections(Backend::Nftables);
}

const POD: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const GRACE: Duration = Duration::from_millis(300);

/// A pod namespace with the rules, and a "remote" namespace on the other end of a veth pair:
/// pod 10.99.0.2/24, remote 10.99.0.1/24 (plus the probe source 169.254.7.127).
fn redirects_real_connections(backend: Backend) {
    let pod = Netns::new();
    let remote = Netns::new();
    pod.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        remote.name(),
    ]);
    pod.ip(&["addr", "add", "10.99.0.2/24", "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    remote.ip(&["addr", "add", "10.99.0.1/24", "dev", "eth0"]);
    remote.ip(&["addr", "add", "169.254.7.127/32", "dev", "eth0"]);
    remote.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["route", "add", "169.254.7.127/32", "dev", "eth0"]);

    rules::install(&pod.file, backend, &RuleOptions::default()).expect("install");

    // What ztunnel would listen on in the pod, plus the app itself on 8080.
    let listen = |ns: &Netns, port: u16| {
        let l = ns
            .enter(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
            .expect("bind");
        l.set_nonblocking(true).unwrap();
        l
    };
    let outbound = listen(&pod, 15001);
    let inbound = listen(&pod, 15006);
    let hbone = listen(&pod, 15008);
    let dns_tcp = listen(&pod, 15053);
    let app = listen(&pod, 8080);
    let upstream = listen(&remote, 80);
    let upstream_dns_tcp = listen(&remote, 53);
    let all = [
        ("pod:15001", &outbound),
        ("pod:15006", &inbound),
        ("pod:15008", &hbone),
        ("pod:15053", &dns_tcp),
        ("pod:8080", &app),
        ("remote:80", &upstream),
        ("remote:53", &upstream_dns_tcp),
    ];
    // Asserts that `name`, and no other listener, accepted `client`'s connection.
    let only = |name: &str, client: TcpStream| -> TcpStream {
        let listener = all.iter().find(|(n, _)| *n == name).unwrap().1;
        let accepted = accept_within(listener, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{name} accepted nothing"));
        // A misdirected connection would have been accepted by now too.
        std::thread::sleep(GRACE);
        for (other, l) in &all {
            if *other != name {
                assert!(
                    accept_within(l, Duration::ZERO).is_none(),
                    "{other} accepted a connection meant for {name}"
                );
            }
        }
        echo(client, &accepted);
        accepted
    };

    // App traffic leaving the pod goes to ztunnel's outbound port, which can read where it was
    // going.
    let client = connect(&pod, None, None, SocketAddrV4::new(REMOTE, 80)).expect("app connect");
    let accepted = only("pod:15001", client);
    assert_eq!(original_dst(&accepted), SocketAddrV4::new(REMOTE, 80));

    // ztunnel's own sockets carry mark 0x539 and go where they are addressed.
    let client = connect(
        &pod,
        None,
        Some(rules::PACKET_MARK),
        SocketAddrV4::new(REMOTE, 80),
    )
    .expect("marked connect");
    only("remote:80", client);

    // Traffic into the pod goes to the plaintext inbound port, except HBONE on 15008.
    let client = connect(&remote, None, None, SocketAddrV4::new(POD, 8080)).expect("inbound");
    let accepted = only("pod:15006", client);
    assert_eq!(original_dst(&accepted), SocketAddrV4::new(POD, 8080));
    let client = connect(&remote, None, None, SocketAddrV4::new(POD, 15008)).expect("hbone");
    only("pod:15008", client);

    // The kubelet's probes, SNATed to 169.254.7.127, reach the app directly.
    let client = connect(
        &remote,
        Some(rules::PROBE_ADDRESS),
        None,
        SocketAddrV4::new(POD, 8080),
    )
    .expect("probe");
    only("pod:8080", client);

    // App to its own pod IP stays inside the pod.
    let client = connect(&pod, None, None, SocketAddrV4::new(POD, 8080)).expect("self");
    only("pod:8080", client);

    // DNS over TCP goes to the DNS proxy, unless it is the proxy's own upstream query.
    let client = connect(&pod, None, None, SocketAddrV4::new(REMOTE, 53)).expect("dns tcp");
    let accepted = only("pod:15053", client);
    assert_eq!(original_dst(&accepted), SocketAddrV4::new(REMOTE, 53));
    let client = connect(
        &pod,
        None,
        Some(rules::PACKET_MARK),
        SocketAddrV4::new(REMOTE, 53),
    )
    .expect("marked dns tcp");
    only("remote:53", client);

    // DNS over UDP likewise.
    let proxy = pod
        .enter(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 15053)))
        .unwrap();
    let resolver = remote
        .enter(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 53)))
        .unwrap();
    proxy.set_read_timeout(Some(GRACE)).unwrap();
    resolver.set_read_timeout(Some(GRACE)).unwrap();
    let app_udp = pod
        .enter(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
        .unwrap();
    app_udp.send_to(b"query", (REMOTE, 53)).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        proxy
            .recv_from(&mut buf)
            .expect("DNS proxy got the query")
            .0,
        5
    );
    assert!(
        resolver.recv_from(&mut buf).is_err(),
        "the app's query escaped the pod"
    );
    let proxy_upstream = pod
        .enter(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
        .unwrap();
    socket::setsockopt(&proxy_upstream, sockopt::Mark, &rules::PACKET_MARK).unwrap();
    proxy_upstream.send_to(b"upstream", (REMOTE, 53)).unwrap();
    resolver
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(
        resolver
            .recv_from(&mut buf)
            .expect("resolver got the proxy's query")
            .0,
        8
    );
    assert!(
        proxy.recv_from(&mut buf).is_err(),
        "the proxy's own query was redirected"
    );

    // ztunnel connects to the app with the client's address as source (IP_TRANSPARENT) and
    // mark 0x539. The app's replies are addressed off-pod; only the connmark, restored as the
    // mark, and `ip rule fwmark 0x111 lookup 100` bring them back to ztunnel. Without them the
    // remote would get the SYN-ACK and reset it.
    let client = connect_transparent(&pod, REMOTE, SocketAddrV4::new(POD, 8080))
        .expect("spoofed connect from ztunnel to the app");
    let accepted = only("pod:8080", client);
    assert_eq!(
        accepted.peer_addr().unwrap().ip(),
        std::net::IpAddr::V4(REMOTE)
    );

    // Removing the rules stops the redirect: app traffic reaches the remote directly.
    rules::remove(&pod.file, backend).expect("remove");
    let client = connect(&pod, None, None, SocketAddrV4::new(REMOTE, 80)).expect("after remove");
    only("remote:80", client);
}

fn accept_within(listener: &TcpListener, wait: Duration) -> Option<TcpStream> {
    let deadline = Instant::now() + wait;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                return Some(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Proves the accepted socket is the client's peer: bytes go both ways.
fn echo(mut client: TcpStream, accepted: &TcpStream) {
    let mut accepted = accepted.try_clone().unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    accepted
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    accepted.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    accepted.write_all(b"pong").unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
}

fn original_dst(stream: &TcpStream) -> SocketAddrV4 {
    let raw = socket::getsockopt(stream, sockopt::OriginalDst).expect("SO_ORIGINAL_DST");
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr)),
        u16::from_be(raw.sin_port),
    )
}

/// Connects from inside `ns`, optionally from `source` and with `SO_MARK` `mark`.
fn connect(
    ns: &Netns,
    source: Option<Ipv4Addr>,
    mark: Option<u32>,
    to: SocketAddrV4,
) -> nix::Result<TcpStream> {
    ns.enter(|| {
        let fd = socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        // Bounds connect(): a dropped SYN must fail the test, not hang it.
        socket::setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(5, 0))?;
        if let Some(mark) = mark {
            socket::setsockopt(&fd, sockopt::Mark, &mark)?;
        }
        if let Some(source) = source {
            socket::bind(
                fd.as_raw_fd(),
                &SockaddrIn::from(SocketAddrV4::new(source, 0)),
            )?;
        }
        socket::connect(fd.as_raw_fd(), &SockaddrIn::from(to))?;
        Ok(TcpStream::from(fd))
    })
}

/// Connects the way ztunnel's inbound does: marked, from a foreign source address.
fn connect_transparent(ns: &Netns, source: Ipv4Addr, to: SocketAddrV4) -> nix::Result<TcpStream> {
    ns.enter(|| {
        let fd = socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        socket::setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(5, 0))?;
        socket::setsockopt(&fd, sockopt::Mark, &rules::PACKET_MARK)?;
        socket::setsockopt(&fd, sockopt::IpTransparent, &true)?;
        socket::bind(
            fd.as_raw_fd(),
            &SockaddrIn::from(SocketAddrV4::new(source, 0)),
        )?;
        socket::connect(fd.as_raw_fd(), &SockaddrIn::from(to))?;
        Ok(TcpStream::from(fd))
    })
}

/// What `render(Iptables, default)` feeds `iptables-restore`.
///
/// Compared with Istio's `cni/pkg/iptables/testdata/default.golden` (istio/istio 86c9f01f):
/// - every rule line is the same, in the same order, in the same tables (mangle, nat, raw);
/// - Istio creates the chains with `-N ISTIO_PRERT`; we declare them with `:ISTIO_PRERT - [0:0]`,
///   which under `--noflush` creates the chain or empties an existing one, so a re-install
///   replaces the contents instead of failing on `-N`. (Istio instead checks the state first and
///   runs separate `iptables -D/-F/-X` cleanup commands before restoring.)
/// - Istio's raw block declares ISTIO_OUTPUT before ISTIO_PRERT; we always declare ISTIO_PRERT
///   first. Declaration order has no effect.
/// - Istio's builder writes table headers as `* mangle`; we write `*mangle`, as iptables-save
///   does.
/// - the golden's first two lines, `iptables-save` and `ip6tables-save`, are the state checks
///   Istio's test stub recorded, not restore input. We read iptables-save too, and on a
///   re-install put `-D` lines for the jumps already present at the top of each table block
///   (none on a fresh namespace, so none here).
/// - Istio runs `iptables-restore --noflush -v`; we run `--noflush --wait`.
/// - Istio's "default" test case has IPv6 off; our default has it on (Istio's chart default,
///   `ambient.ipv6: true`), so `render` also returns an ip6tables ruleset: it matches the second
///   half of Istio's `default_ipv6.golden` with the same differences, except that the golden
///   uses a test probe address (e9ac:1e77:90ca:399f:4d6d:ece2:2f9b:3164) where we use Istio's
///   runtime default, fd16:9254:7127:1337:ffff:ffff:ffff:ffff (`HOST_PROBE_SNAT_IPV6`).
const RENDERED_IPTABLES_V4: &str = "\
*mangle
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*nat
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A PREROUTING -j ISTIO_PRERT
-A ISTIO_PRERT -s 169.254.7.127 -p tcp -m tcp -j ACCEPT
-A ISTIO_OUTPUT -d 169.254.7.127 -p tcp -m tcp -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-port 15053
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
COMMIT
*raw
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -p udp -m mark --mark 0x539/0xfff -m udp --dport 53 -j CT --zone 1
-A ISTIO_PRERT -p udp -m mark ! --mark 0x539/0xfff -m udp --sport 53 -j CT --zone 1
COMMIT
";

/// What `render(Nftables, default without IPv6)` feeds `nft -f -`.
///
/// Compared with Istio's `cni/pkg/nftables/testdata/default.golden` (istio/istio 86c9f01f),
/// which also has IPv6 off:
/// - the same tables, chains (types, hooks, priorities), rules and order;
/// - Istio starts each table with `add table` + `flush table`, which keeps existing chains; we
///   use `add table` + `delete table` + `add table`, replacing the whole table in the same
///   transaction (Istio's removal uses the same add-then-delete).
/// - Istio spells the mark match three ways (`mark and 0xfff != 0x539`, with a double space in
///   the nat prerouting rule, and `meta mark & 0xfff == 0x539`); we always write
///   `meta mark & 0xfff`. `mark` is nft's short form of `meta mark` and `and` of `&`.
/// - we quote `"lo"` in `oifname`; Istio writes it bare. Same match.
/// - with DNS capture off, Istio omits the raw table; we still emit its add+delete, so that a
///   raw table left by an earlier install with DNS capture goes.
const RENDERED_NFTABLES_V4: &str = "\
add table inet istio-ambient-nat
delete table inet istio-ambient-nat
add table inet istio-ambient-nat
add chain inet istio-ambient-nat prerouting { type nat hook prerouting priority -100 ; }
add chain inet istio-ambient-nat output { type nat hook output priority -100 ; }
add chain inet istio-ambient-nat istio-prerouting
add chain inet istio-ambient-nat istio-output
add rule inet istio-ambient-nat output jump istio-output
add rule inet istio-ambient-nat prerouting jump istio-prerouting
add rule inet istio-ambient-nat istio-prerouting meta l4proto tcp ip saddr 169.254.7.127 counter accept
add rule inet istio-ambient-nat istio-output meta l4proto tcp ip daddr 169.254.7.127 counter accept
add rule inet istio-ambient-nat istio-prerouting ip daddr != 127.0.0.1/32 tcp dport != 15008 meta mark & 0xfff != 0x539 counter redirect to :15006
add rule inet istio-ambient-nat istio-output oifname != \"lo\" meta mark & 0xfff != 0x539 udp dport 53 counter redirect to :15053
add rule inet istio-ambient-nat istio-output ip daddr != 127.0.0.1/32 tcp dport 53 meta mark & 0xfff != 0x539 counter redirect to :15053
add rule inet istio-ambient-nat istio-output meta l4proto tcp meta mark & 0xfff == 0x111 counter accept
add rule inet istio-ambient-nat istio-output oifname \"lo\" ip daddr != 127.0.0.1/32 counter accept
add rule inet istio-ambient-nat istio-output meta l4proto tcp ip daddr != 127.0.0.1/32 meta mark & 0xfff != 0x539 counter redirect to :15001
add table inet istio-ambient-mangle
delete table inet istio-ambient-mangle
add table inet istio-ambient-mangle
add chain inet istio-ambient-mangle prerouting { type filter hook prerouting priority -150 ; }
add chain inet istio-ambient-mangle output { type route hook output priority -150 ; }
add chain inet istio-ambient-mangle istio-prerouting
add chain inet istio-ambient-mangle istio-output
add rule inet istio-ambient-mangle prerouting jump istio-prerouting
add rule inet istio-ambient-mangle output jump istio-output
add rule inet istio-ambient-mangle istio-prerouting meta mark & 0xfff == 0x539 counter ct mark set ct mark & 0xfffff000 | 0x111
add rule inet istio-ambient-mangle istio-output ct mark & 0xfff == 0x111 counter meta mark set ct mark
add table inet istio-ambient-raw
delete table inet istio-ambient-raw
add table inet istio-ambient-raw
add chain inet istio-ambient-raw prerouting { type filter hook prerouting priority -300 ; }
add chain inet istio-ambient-raw output { type filter hook output priority -300 ; }
add chain inet istio-ambient-raw istio-prerouting
add chain inet istio-ambient-raw istio-output
add rule inet istio-ambient-raw prerouting jump istio-prerouting
add rule inet istio-ambient-raw output jump istio-output
add rule inet istio-ambient-raw istio-output udp dport 53 meta mark & 0xfff == 0x539 counter ct zone set 1
add rule inet istio-ambient-raw istio-prerouting udp sport 53 meta mark & 0xfff != 0x539 counter ct zone set 1
";

#[test]
fn iptables_render_matches_istio_default_golden() {
    let rendered = rules::render(Backend::Iptables, &RuleOptions::default());
    assert_eq!(rendered.len(), 2, "IPv4 and IPv6 rulesets");
    assert_eq!(rendered[0].command(), "iptables-restore --noflush --wait");
    assert_eq!(rendered[0].text, RENDERED_IPTABLES_V4);
    // The IPv6 ruleset is the IPv4 one with the family's loopback and probe addresses.
    assert_eq!(rendered[1].command(), "ip6tables-restore --noflush --wait");
    assert_eq!(
        rendered[1].text,
        RENDERED_IPTABLES_V4
            .replace("127.0.0.1/32", "::1/128")
            .replace("169.254.7.127", "fd16:9254:7127:1337:ffff:ffff:ffff:ffff")
    );
}

#[test]
fn nftables_render_matches_istio_default_golden() {
    let options = RuleOptions {
        ipv6: false,
        ..RuleOptions::default()
    };
    let rendered = rules::render(Backend::Nftables, &options);
    assert_eq!(rendered.len(), 1);
    assert_eq!(rendered[0].command(), "nft -f -");
    assert_eq!(rendered[0].text, RENDERED_NFTABLES_V4);
}
