//! The node's kubelet-probe SNAT (`ambit_cni::rules::probes`) on real network namespaces: a
//! "node" and its "pods" joined by veths (the local mesh's topology), the in-pod rules in the
//! pod, the SNAT in the node, and real connections from a process on the node, as the kubelet's
//! probes are. Needs root, iproute2 and iptables.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use ambit_cni::rules::{self, probes, Backend, RuleOptions, PROBE_ADDRESS};
use ambit_ztunnel::testing::{netns_exec, PodNet, Topology};
use nix::sched::{setns, CloneFlags};

const APP_PORT: u16 = 8080;

fn options() -> RuleOptions {
    RuleOptions {
        dns_capture: false,
        ipv6: false,
        ..RuleOptions::default()
    }
}

fn open(netns: &str) -> File {
    File::open(format!("/var/run/netns/{netns}")).expect("open netns")
}

/// Runs `f` on a thread inside `netns`; sockets it makes belong to that namespace.
fn enter<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = open(netns);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("thread in netns panicked")
    })
}

fn listen(netns: &str, port: u16) -> TcpListener {
    enter(netns, || {
        let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
        listener.set_nonblocking(true).unwrap();
        listener
    })
}

fn connect(netns: &str, to: Ipv4Addr) -> TcpStream {
    enter(netns, || {
        TcpStream::connect_timeout(&SocketAddr::from((to, APP_PORT)), Duration::from_secs(5))
            .expect("connect")
    })
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

/// The pod: its app on 8080, and a stand-in for ztunnel's inbound capture port 15006.
struct Pod {
    net: PodNet,
    app: TcpListener,
    ztunnel: TcpListener,
}

/// Where a connection to the pod's app landed, and the source address it was seen from.
#[derive(Debug, PartialEq, Eq)]
enum Landed {
    App(Ipv4Addr),
    Ztunnel(Ipv4Addr),
}

impl Pod {
    fn new(net: PodNet) -> Pod {
        let app = listen(&net.netns, APP_PORT);
        let ztunnel = listen(&net.netns, rules::INBOUND_PLAINTEXT_PORT);
        Pod { net, app, ztunnel }
    }

    /// Connects from `from` to the app and reports where it landed, after a round trip.
    fn probe_from(&self, from: &str) -> Landed {
        let mut client = connect(from, self.net.ip);
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mut accepted, landed) = loop {
            if let Some(s) = accept_within(&self.app, Duration::ZERO) {
                let source = peer(&s);
                break (s, Landed::App(source));
            }
            if let Some(s) = accept_within(&self.ztunnel, Duration::ZERO) {
                let source = peer(&s);
                break (s, Landed::Ztunnel(source));
            }
            assert!(
                Instant::now() < deadline,
                "connection from {from} to {}:{APP_PORT} landed nowhere",
                self.net.ip
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        for s in [&client, &accepted] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        accepted.read_exact(&mut buf).unwrap();
        accepted.write_all(b"pong").unwrap();
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
        landed
    }
}

fn peer(stream: &TcpStream) -> Ipv4Addr {
    match stream.peer_addr().unwrap().ip() {
        IpAddr::V4(ip) => ip,
        other => panic!("unexpected peer {other}"),
    }
}

/// The address the node sends from to `to` (what the kubelet's probes carry without SNAT).
fn node_source(node: &str, to: Ipv4Addr) -> Ipv4Addr {
    let route = netns_exec(node, &["ip", "-4", "route", "get", &to.to_string()]);
    let mut words = route.split_whitespace();
    words
        .find(|w| *w == "src")
        .and_then(|_| words.next())
        .and_then(|ip| ip.parse().ok())
        .unwrap_or_else(|| panic!("no source in {route:?}"))
}

/// `iptables-save -t nat` lines naming our chain, counters and comments aside.
fn ours(node: &str, program: &str) -> Vec<String> {
    netns_exec(node, &[program, "-t", "nat"])
        .lines()
        .filter(|l| l.contains(probes::CHAIN))
        .map(|l| match l.strip_prefix(':') {
            Some(decl) => format!(":{}", decl.split_whitespace().next().unwrap()),
            None => l.to_owned(),
        })
        .collect()
}

#[test]
fn node_probes_reach_the_app_from_the_probe_address_only_while_enrolled() {
    let mut topology = Topology::new();
    let n = topology.add_node();
    let node = topology.nodes[n].netns.clone();
    let app = Pod::new(topology.add_pod(n, "app"));
    let other = topology.add_pod(n, "other");
    let node_ip = node_source(&node, app.net.ip);
    assert_ne!(node_ip, PROBE_ADDRESS);

    // Enrolled without the node's SNAT: the probe is captured, as on a node without istio-cni's
    // host rule, and ztunnel sees the node's address.
    rules::install(app.net.open(), Backend::Iptables, &options()).unwrap();
    assert_eq!(app.probe_from(&node), Landed::Ztunnel(node_ip));

    // The agent starts (chain and jump, no pods yet), then enrolls the pod.
    let node_ns = open(&node);
    probes::install(&node_ns, &options(), &[]).unwrap();
    assert_eq!(app.probe_from(&node), Landed::Ztunnel(node_ip));
    probes::update(&node_ns, &options(), &[IpAddr::V4(app.net.ip)], &[]).unwrap();
    assert_eq!(app.probe_from(&node), Landed::App(PROBE_ADDRESS));

    // Only connections from the node's own sockets: another pod's traffic, which the node
    // merely forwards, keeps its source and is captured.
    assert_eq!(app.probe_from(&other.netns), Landed::Ztunnel(other.ip));

    // Unenrolled (the agent removes the in-pod rules, then the pod's SNAT): the app sees the
    // node again.
    rules::remove(app.net.open(), Backend::Iptables).unwrap();
    probes::update(&node_ns, &options(), &[], &[IpAddr::V4(app.net.ip)]).unwrap();
    assert_eq!(app.probe_from(&node), Landed::App(node_ip));
    assert!(probes::pods(&node_ns).unwrap().is_empty());

    probes::remove(&node_ns).unwrap();
}

#[test]
fn install_is_idempotent_and_remove_leaves_nothing() {
    let mut topology = Topology::new();
    let n = topology.add_node();
    let node = topology.nodes[n].netns.clone();
    let node_ns = open(&node);
    let pod: IpAddr = "10.0.1.50".parse().unwrap();
    let pod2: IpAddr = "10.0.1.51".parse().unwrap();
    let expected_one = [
        ":AMBIT-PROBES".to_owned(),
        "-A POSTROUTING -j AMBIT-PROBES".to_owned(),
        format!(
            "-A AMBIT-PROBES -d {pod}/32 -p tcp -m owner --socket-exists -j SNAT --to-source \
             169.254.7.127"
        ),
    ];

    for _ in 0..2 {
        probes::install(&node_ns, &options(), &[pod]).unwrap();
        probes::update(&node_ns, &options(), &[pod], &[]).unwrap();
        assert_eq!(ours(&node, "iptables-save"), expected_one);
    }
    // A second pod, then the first one out: one rule each, one jump.
    probes::update(&node_ns, &options(), &[pod2], &[]).unwrap();
    probes::update(&node_ns, &options(), &[], &[pod]).unwrap();
    assert_eq!(probes::pods(&node_ns).unwrap(), [pod2]);
    assert_eq!(ours(&node, "iptables-save").len(), 3);
    // A restarting agent converges to the pods it knows, dropping the others.
    probes::install(&node_ns, &options(), &[pod]).unwrap();
    assert_eq!(ours(&node, "iptables-save"), expected_one);
    // Someone else's duplicate jump is folded back into one.
    netns_exec(
        &node,
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-j",
            probes::CHAIN,
        ],
    );
    probes::install(&node_ns, &options(), &[pod]).unwrap();
    assert_eq!(ours(&node, "iptables-save"), expected_one);

    // IPv6 on: the v6 chain and jump too, with the v6 probe address for v6 pods.
    let v6: IpAddr = "fd00:10::50".parse().unwrap();
    let with_v6 = RuleOptions {
        ipv6: true,
        ..options()
    };
    probes::install(&node_ns, &with_v6, &[pod, v6]).unwrap();
    assert_eq!(
        ours(&node, "ip6tables-save"),
        [
            ":AMBIT-PROBES".to_owned(),
            "-A POSTROUTING -j AMBIT-PROBES".to_owned(),
            format!(
                "-A AMBIT-PROBES -d {v6}/128 -p tcp -m owner --socket-exists -j SNAT \
                 --to-source fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
            ),
        ]
    );
    assert_eq!(ours(&node, "iptables-save"), expected_one);

    for _ in 0..2 {
        probes::remove(&node_ns).unwrap();
        assert!(ours(&node, "iptables-save").is_empty());
        assert!(ours(&node, "ip6tables-save").is_empty());
        assert!(!netns_exec(&node, &["iptables-save"]).contains("AMBIT-PROBES"));
    }
}
