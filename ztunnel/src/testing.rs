//! Test helpers (feature `testing`): a cluster in network namespaces.
//!
//! One "network" namespace holds a bridge; each node is a namespace on that bridge, routing to the
//! others' pod ranges; each pod is a namespace behind a veth pair on its node, ptp style (pod
//! `10.0.<node>.<n>/32`, gateway `10.0.<node>.1`), as a CNI sets them up. Nothing is created in
//! the host namespace, names are unique per test, and everything is deleted on drop.

use std::fs::File;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A node namespace.
#[derive(Clone, Debug)]
pub struct Node {
    pub netns: String,
    /// The node's address on the inter-node bridge.
    pub address: Ipv4Addr,
    index: u8,
    pods: u8,
}

/// A pod namespace.
#[derive(Clone, Debug)]
pub struct PodNet {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub node: usize,
}

impl PodNet {
    /// The pod's namespace, as ZDS hands it over.
    pub fn open(&self) -> File {
        File::open(format!("/var/run/netns/{}", self.netns)).expect("open pod netns")
    }
}

/// The whole topology; dropping it deletes every namespace it made.
pub struct Topology {
    prefix: String,
    /// The namespace holding the inter-node bridge `br0` (capture there to see the wire).
    pub network: String,
    pub nodes: Vec<Node>,
    pub pods: Vec<PodNet>,
}

/// Runs `ip` with `args`, panicking with its stderr on failure: a broken fixture is a test bug.
pub fn ip(args: &[&str]) {
    run("ip", args);
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e} (is iproute2 installed? run as root)"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command inside a namespace and returns its stdout.
pub fn netns_exec(netns: &str, command: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(command)
        .output()
        .expect("ip netns exec");
    assert!(
        out.status.success(),
        "{command:?} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Topology {
    pub fn new() -> Self {
        let prefix = format!(
            "amb{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let network = format!("{prefix}-net");
        ip(&["netns", "add", &network]);
        let topology = Topology {
            prefix,
            network: network.clone(),
            nodes: Vec::new(),
            pods: Vec::new(),
        };
        ip(&["-n", &network, "link", "set", "lo", "up"]);
        ip(&["-n", &network, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &network, "link", "set", "br0", "up"]);
        topology
    }

    /// Adds a node; returns its index.
    pub fn add_node(&mut self) -> usize {
        let index = self.nodes.len() as u8 + 1;
        let netns = format!("{}-n{index}", self.prefix);
        let address = Ipv4Addr::new(172, 16, 0, index);
        ip(&["netns", "add", &netns]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        let bridge_port = format!("n{index}");
        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &netns,
            "type",
            "veth",
            "peer",
            "name",
            &bridge_port,
            "netns",
            &self.network,
        ]);
        ip(&[
            "-n",
            &self.network,
            "link",
            "set",
            &bridge_port,
            "master",
            "br0",
            "up",
        ]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        netns_exec(&netns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        // Every node routes to every other node's pod range, both ways.
        for other in &self.nodes {
            ip(&[
                "-n",
                &netns,
                "route",
                "add",
                &format!("10.0.{}.0/24", other.index),
                "via",
                &other.address.to_string(),
            ]);
            ip(&[
                "-n",
                &other.netns,
                "route",
                "add",
                &format!("10.0.{index}.0/24"),
                "via",
                &address.to_string(),
            ]);
        }
        self.nodes.push(Node {
            netns,
            address,
            index,
            pods: 0,
        });
        self.nodes.len() - 1
    }

    /// Adds a pod on `node`; returns it.
    pub fn add_pod(&mut self, node: usize, name: &str) -> PodNet {
        let node_info = &mut self.nodes[node];
        node_info.pods += 1;
        let host = node_info.pods + 1;
        let pod_ip = Ipv4Addr::new(10, 0, node_info.index, host);
        let gateway = Ipv4Addr::new(10, 0, node_info.index, 1);
        let node_ns = node_info.netns.clone();
        let netns = format!("{}-{name}", self.prefix);
        let node_port = format!("p{host}");
        ip(&["netns", "add", &netns]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        ip(&[
            "link", "add", "eth0", "netns", &netns, "type", "veth", "peer", "name", &node_port,
            "netns", &node_ns,
        ]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            &gateway.to_string(),
            "dev",
            "eth0",
            "scope",
            "link",
        ]);
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &gateway.to_string(),
        ]);
        ip(&[
            "-n",
            &node_ns,
            "addr",
            "add",
            &format!("{gateway}/32"),
            "dev",
            &node_port,
        ]);
        ip(&["-n", &node_ns, "link", "set", &node_port, "up"]);
        ip(&[
            "-n",
            &node_ns,
            "route",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            &node_port,
        ]);
        let pod = PodNet {
            name: name.to_owned(),
            netns,
            ip: pod_ip,
            node,
        };
        self.pods.push(pod.clone());
        pod
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let names = self
            .pods
            .iter()
            .map(|p| p.netns.clone())
            .chain(self.nodes.iter().map(|n| n.netns.clone()))
            .chain([self.network.clone()]);
        for name in names {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}
