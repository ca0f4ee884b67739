//! Service VIPs for pods outside the mesh: what kube-proxy does on a cluster node. Enrolled pods
//! never need it (ztunnel captures VIP traffic inside the pod); a pod outside the mesh sends VIP
//! traffic to its node, where these rules pick an endpoint.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::IpAddr;

use ambit_mesh::state::local::LocalConfig;
use ambit_mesh::state::HealthStatus;

/// The chain the rules live in; jumped to from `nat PREROUTING`.
pub const CHAIN: &str = "AMBIT-SERVICES";

/// An `iptables-restore --noflush` input that replaces [`CHAIN`] with one DNAT per service port,
/// spreading connections evenly over the endpoints (kube-proxy's `statistic` cascade). IPv4 only.
pub fn nat_ruleset(config: &LocalConfig) -> String {
    let mut rules = format!("*nat\n:{CHAIN} - [0:0]\n");
    for service in &config.services {
        let key = service.key();
        for vip in &service.vips {
            let IpAddr::V4(vip) = vip.address else {
                continue;
            };
            // service port → endpoints (ip:target) from the workloads that back the service.
            let mut by_port: BTreeMap<u16, Vec<String>> = BTreeMap::new();
            // Only ready pods are endpoints, as kube-proxy keeps only ready EndpointSlice entries.
            for workload in config
                .workloads
                .iter()
                .filter(|w| w.status == HealthStatus::Healthy)
            {
                let Some(IpAddr::V4(ip)) = workload.workload_ips.first().copied() else {
                    continue;
                };
                for &port in service.ports.keys() {
                    if let Some(target) = workload.target_port(&key, port) {
                        by_port
                            .entry(port)
                            .or_default()
                            .push(format!("{ip}:{target}"));
                    }
                }
            }
            for (port, endpoints) in by_port {
                let count = endpoints.len();
                for (i, endpoint) in endpoints.iter().enumerate() {
                    let remaining = count - i;
                    let pick = if remaining > 1 {
                        format!(
                            " -m statistic --mode random --probability {:.5}",
                            1.0 / remaining as f64
                        )
                    } else {
                        String::new()
                    };
                    let _ = writeln!(
                        rules,
                        "-A {CHAIN} -d {vip}/32 -p tcp --dport {port}{pick} -j DNAT --to-destination {endpoint}"
                    );
                }
            }
        }
    }
    rules.push_str("COMMIT\n");
    rules
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn spreads_each_service_port_over_its_endpoints() {
        let config = LocalConfig::parse(
            r#"
workloads:
- {uid: a, name: a, namespace: ns, workloadIps: ["10.244.1.2"], services: {"ns/web.ns.svc.cluster.local": {80: 8080}}}
- {uid: b, name: b, namespace: ns, workloadIps: ["10.244.2.2"], services: {"ns/web.ns.svc.cluster.local": {80: 8080}}}
- {uid: c, name: c, namespace: ns, workloadIps: ["10.244.2.3"], services: {}}
- {uid: d, name: d, namespace: ns, workloadIps: ["10.244.2.4"], services: {"ns/web.ns.svc.cluster.local": {80: 8080}}, status: Unhealthy}
services:
- {name: web, namespace: ns, hostname: web.ns.svc.cluster.local, vips: ["/10.96.0.10"], ports: {80: 8080}}
"#,
            Path::new("t.yaml"),
        )
        .unwrap();
        let rules = nat_ruleset(&config);
        assert_eq!(
            rules,
            "*nat\n:AMBIT-SERVICES - [0:0]\n\
             -A AMBIT-SERVICES -d 10.96.0.10/32 -p tcp --dport 80 -m statistic --mode random --probability 0.50000 -j DNAT --to-destination 10.244.1.2:8080\n\
             -A AMBIT-SERVICES -d 10.96.0.10/32 -p tcp --dport 80 -j DNAT --to-destination 10.244.2.2:8080\n\
             COMMIT\n"
        );
    }
}
