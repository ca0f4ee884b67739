//! The local mesh's network: nodes and pods as network namespaces, wired the way a CNI would.
//!
//! One "network" namespace holds the bridge between nodes; each node is a namespace on it that
//! routes to every other node's pod range; each pod is a namespace behind a veth pair on its
//! node, ptp style (pod `<pod-cidr>.<node>.<n>/32`, gateway `.1` on the node side). Nothing is
//! created in the host namespace except the namespace files; every name starts with the
//! topology's prefix so leftovers of a crashed run can be found and removed.

use std::net::Ipv4Addr;
use std::process::Command;

/// Why the network could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot run `ip {args}`: {source} (is iproute2 installed, and are we root?)")]
    Spawn {
        args: String,
        source: std::io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    Command { args: String, stderr: String },
    #[error("node {node} has no room for another pod (at most 250 per node)")]
    NodeFull { node: String },
}

/// A node namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub netns: String,
    /// The node's address on the inter-node bridge.
    pub address: Ipv4Addr,
    index: u8,
}

/// A pod namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNet {
    pub netns: String,
    pub ip: Ipv4Addr,
    pub node: String,
    host: u8,
}

impl PodNet {
    /// Where the namespace can be opened (to hand it to ztunnel, or to enter it).
    pub fn netns_path(&self) -> String {
        format!("/var/run/netns/{}", self.netns)
    }
}

/// The nodes and pods of one local mesh.
pub struct Topology {
    prefix: String,
    /// First two octets of the pod range: pods get `<a>.<b>.<node>.<n>`.
    pod_range: (u8, u8),
    pub network: String,
    pub nodes: Vec<Node>,
    /// Host numbers in use per node (index = node index - 1).
    used_hosts: Vec<Vec<u8>>,
}

fn ip(args: &[&str]) -> Result<(), TopologyError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| TopologyError::Spawn {
            args: args.join(" "),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TopologyError::Command {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Namespaces whose name starts with `prefix-` (left by an earlier run).
pub fn leftover_namespaces(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return Vec::new();
    };
    let start = format!("{prefix}-");
    entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(&start))
        .collect()
}

/// Deletes every namespace named `prefix-*`; deleting a namespace deletes its veths too.
pub fn remove_leftovers(prefix: &str) -> Vec<String> {
    let names = leftover_namespaces(prefix);
    for name in &names {
        let _ = ip(&["netns", "del", name]);
    }
    names
}

impl Topology {
    /// Creates the inter-node network. `pod_range` is the first two octets of the pod CIDR.
    pub fn create(prefix: &str, pod_range: (u8, u8)) -> Result<Self, TopologyError> {
        let network = format!("{prefix}-net");
        ip(&["netns", "add", &network])?;
        let topology = Topology {
            prefix: prefix.to_owned(),
            pod_range,
            network: network.clone(),
            nodes: Vec::new(),
            used_hosts: Vec::new(),
        };
        ip(&["-n", &network, "link", "set", "lo", "up"])?;
        ip(&["-n", &network, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &network, "link", "set", "br0", "up"])?;
        Ok(topology)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Adds a node named `name`.
    pub fn add_node(&mut self, name: &str) -> Result<Node, TopologyError> {
        let index = self.nodes.len() as u8 + 1;
        let netns = format!("{}-{name}", self.prefix);
        let address = Ipv4Addr::new(172, 16, 0, index);
        ip(&["netns", "add", &netns])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
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
        ])?;
        ip(&[
            "-n",
            &self.network,
            "link",
            "set",
            &bridge_port,
            "master",
            "br0",
            "up",
        ])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&[
            "netns",
            "exec",
            &netns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        let (a, b) = self.pod_range;
        for other in &self.nodes {
            ip(&[
                "-n",
                &netns,
                "route",
                "add",
                &format!("{a}.{b}.{}.0/24", other.index),
                "via",
                &other.address.to_string(),
            ])?;
            ip(&[
                "-n",
                &other.netns,
                "route",
                "add",
                &format!("{a}.{b}.{index}.0/24"),
                "via",
                &address.to_string(),
            ])?;
        }
        let node = Node {
            name: name.to_owned(),
            netns,
            address,
            index,
        };
        self.nodes.push(node.clone());
        self.used_hosts.push(Vec::new());
        Ok(node)
    }

    /// Gives `node` the local address `address` (on its loopback), so that what its pods send
    /// there is delivered to the node itself (the cluster DNS's address, as NodeLocal DNSCache
    /// holds kube-dns' VIP on every node).
    pub fn add_node_address(&self, node: &Node, address: Ipv4Addr) -> Result<(), TopologyError> {
        ip(&[
            "-n",
            &node.netns,
            "addr",
            "add",
            &format!("{address}/32"),
            "dev",
            "lo",
        ])
    }

    /// Adds a pod namespace `netns_suffix` on node `node` (its index in `nodes`).
    pub fn add_pod(&mut self, node: usize, netns_suffix: &str) -> Result<PodNet, TopologyError> {
        let node_info = self.nodes[node].clone();
        let used = &mut self.used_hosts[node];
        let host =
            (2..=251u8)
                .find(|h| !used.contains(h))
                .ok_or_else(|| TopologyError::NodeFull {
                    node: node_info.name.clone(),
                })?;
        used.push(host);
        let (a, b) = self.pod_range;
        let pod_ip = Ipv4Addr::new(a, b, node_info.index, host);
        let gateway = Ipv4Addr::new(a, b, node_info.index, 1);
        let netns = format!("{}-{netns_suffix}", self.prefix);
        let node_port = format!("p{host}");
        let result = (|| {
            ip(&["netns", "add", &netns])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
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
                &node_port,
                "netns",
                &node_info.netns,
            ])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{pod_ip}/32"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
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
            ])?;
            ip(&[
                "-n",
                &netns,
                "route",
                "add",
                "default",
                "via",
                &gateway.to_string(),
            ])?;
            ip(&[
                "-n",
                &node_info.netns,
                "addr",
                "add",
                &format!("{gateway}/32"),
                "dev",
                &node_port,
            ])?;
            ip(&["-n", &node_info.netns, "link", "set", &node_port, "up"])?;
            ip(&[
                "-n",
                &node_info.netns,
                "route",
                "add",
                &format!("{pod_ip}/32"),
                "dev",
                &node_port,
            ])
        })();
        if let Err(err) = result {
            let _ = ip(&["netns", "del", &netns]);
            self.used_hosts[node].retain(|h| *h != host);
            return Err(err);
        }
        Ok(PodNet {
            netns,
            ip: pod_ip,
            node: node_info.name,
            host,
        })
    }

    /// Removes a pod namespace (its veth goes with it).
    pub fn remove_pod(&mut self, pod: &PodNet) -> Result<(), TopologyError> {
        if let Some(index) = self.nodes.iter().position(|n| n.name == pod.node) {
            self.used_hosts[index].retain(|h| *h != pod.host);
        }
        ip(&["netns", "del", &pod.netns])
    }

    /// Removes every namespace of this topology.
    pub fn destroy(self) -> Vec<String> {
        remove_leftovers(&self.prefix)
    }
}
