//! What kubelet gives every pod besides its network: a hostname in a UTS namespace of its own,
//! `/etc/hosts` and `/etc/resolv.conf` as kubelet writes them (bind-mounted over `/etc` by
//! `ip netns exec`, from `/etc/netns/<netns>/`), and the environment kubelet sets (`HOSTNAME`,
//! the Docker-link-style variables of the Services in the pod's namespace).
//!
//! Every process of a pod gets a fresh UTS namespace with the pod's hostname (containers and
//! `mesh exec` alike); a process that changes its hostname changes only its own.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::CommandExt;

use ambit_local::control::DOMAIN_SUFFIX;
use ambit_local::manifest::{Pod, Protocol, Service};

/// kubelet's cap on the search list (`MaxDNSSearchPaths`).
const MAX_SEARCH_PATHS: usize = 32;

/// The pod's hostname as kubelet derives it: `spec.hostname`, else its name cut to one DNS label.
pub fn hostname(pod: Option<&Pod>, name: &str) -> String {
    if let Some(hostname) = pod.and_then(|p| p.spec.hostname.clone()) {
        return hostname;
    }
    let mut cut: String = name.chars().take(63).collect();
    while cut.ends_with(['-', '.']) {
        cut.pop();
    }
    cut
}

/// `<subdomain>.<ns>.svc.<zone>` when the pod names a `subdomain`.
pub fn domain(pod: Option<&Pod>, namespace: &str) -> Option<String> {
    let subdomain = pod?.spec.subdomain.as_ref()?;
    Some(format!("{subdomain}.{namespace}.svc.{DOMAIN_SUFFIX}"))
}

/// kubelet's managed `/etc/hosts`: localhost, the IPv6 names, and the pod's own address with its
/// hostname (fully qualified first when it has a domain).
pub fn hosts_file(ip: Ipv4Addr, hostname: &str, domain: Option<&str>) -> String {
    let mut text = String::from(
        "# Kubernetes-managed hosts file.\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\n\
         fe00::0\tip6-mcastprefix\n\
         fe00::1\tip6-allnodes\n\
         fe00::2\tip6-allrouters\n",
    );
    match domain {
        Some(domain) => text.push_str(&format!("{ip}\t{hostname}.{domain}\t{hostname}\n")),
        None => text.push_str(&format!("{ip}\t{hostname}\n")),
    }
    text
}

/// kubelet's `/etc/resolv.conf` for `dnsPolicy: ClusterFirst`: the cluster's search domains,
/// then the host's, the cluster DNS, `ndots:5`.
pub fn resolv_conf(namespace: &str, nameserver: Ipv4Addr, host_search: &[String]) -> String {
    let mut search = vec![
        format!("{namespace}.svc.{DOMAIN_SUFFIX}"),
        format!("svc.{DOMAIN_SUFFIX}"),
        DOMAIN_SUFFIX.to_owned(),
    ];
    for domain in host_search {
        let domain = domain.trim_end_matches('.');
        if !domain.is_empty() && !search.iter().any(|s| s == domain) {
            search.push(domain.to_owned());
        }
    }
    search.truncate(MAX_SEARCH_PATHS);
    format!(
        "search {}\nnameserver {nameserver}\noptions ndots:5\n",
        search.join(" ")
    )
}

/// The search domains of this host's `/etc/resolv.conf` (`search`, or the older `domain`).
pub fn host_search_domains() -> Vec<String> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut domains = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            // The last `search` or `domain` line wins, as in resolv.conf(5).
            Some("search") | Some("domain") => {
                domains = words.map(str::to_owned).collect();
            }
            _ => {}
        }
    }
    domains
}

/// kubelet's environment for a pod's containers, before the container's own `env` (which wins):
/// `HOSTNAME`, then for each Service of the pod's namespace that has a VIP, `<SVC>_SERVICE_HOST`,
/// `<SVC>_SERVICE_PORT[_<PORT NAME>]` and the Docker link variables (`<SVC>_PORT...`).
pub fn environment<'a>(
    hostname: &str,
    services: impl IntoIterator<Item = (&'a Service, IpAddr)>,
) -> Vec<(String, String)> {
    let mut env = BTreeMap::new();
    for (service, vip) in services {
        let Some(first) = service.spec.ports.first() else {
            continue;
        };
        let prefix = service.metadata.name.to_uppercase().replace('-', "_");
        env.insert(format!("{prefix}_SERVICE_HOST"), vip.to_string());
        env.insert(format!("{prefix}_SERVICE_PORT"), first.port.to_string());
        for (i, port) in service.spec.ports.iter().enumerate() {
            if let Some(name) = &port.name {
                let name = name.to_uppercase().replace('-', "_");
                env.insert(
                    format!("{prefix}_SERVICE_PORT_{name}"),
                    port.port.to_string(),
                );
            }
            let protocol = match port.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
                Protocol::Sctp => "sctp",
            };
            let url = format!("{protocol}://{}", std::net::SocketAddr::new(vip, port.port));
            if i == 0 {
                env.insert(format!("{prefix}_PORT"), url.clone());
            }
            let port_prefix = format!(
                "{prefix}_PORT_{}_{}",
                port.port,
                protocol.to_ascii_uppercase()
            );
            env.insert(format!("{port_prefix}_PROTO"), protocol.to_owned());
            env.insert(format!("{port_prefix}_PORT"), port.port.to_string());
            env.insert(format!("{port_prefix}_ADDR"), vip.to_string());
            env.insert(port_prefix, url);
        }
    }
    let mut out = vec![("HOSTNAME".to_owned(), hostname.to_owned())];
    out.extend(env);
    out
}

/// Starts `command`'s process in a UTS namespace of its own named `hostname`.
pub fn with_hostname(command: &mut std::process::Command, hostname: &str) {
    // Allocated here: between fork and exec, only async-signal-safe calls.
    let hostname = hostname.to_owned();
    // SAFETY: the closure makes two system calls and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUTS)?;
            nix::unistd::sethostname(&hostname)?;
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(text: &str) -> Pod {
        match ambit_local::manifest::parse(text).unwrap().remove(0) {
            ambit_local::manifest::Object::Pod(pod) => pod,
            other => panic!("not a pod: {other:?}"),
        }
    }

    #[test]
    fn hosts_files_are_kubelets() {
        let plain = pod("{apiVersion: v1, kind: Pod, metadata: {name: web-0, namespace: shop}, spec: {containers: [{name: c, image: i}]}}");
        let named = pod("{apiVersion: v1, kind: Pod, metadata: {name: web-0, namespace: shop}, spec: {hostname: primary, subdomain: db, containers: [{name: c, image: i}]}}");
        assert_eq!(hostname(Some(&plain), "web-0"), "web-0");
        assert_eq!(domain(Some(&plain), "shop"), None);
        assert_eq!(hostname(Some(&named), "web-0"), "primary");
        let domain = domain(Some(&named), "shop");
        assert_eq!(domain.as_deref(), Some("db.shop.svc.cluster.local"));
        let ip = Ipv4Addr::new(10, 244, 1, 2);
        let text = hosts_file(ip, "primary", domain.as_deref());
        assert!(text.starts_with("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"));
        assert!(text.ends_with(
            "fe00::2\tip6-allrouters\n10.244.1.2\tprimary.db.shop.svc.cluster.local\tprimary\n"
        ));
        assert!(hosts_file(ip, "web-0", None).ends_with("\n10.244.1.2\tweb-0\n"));
        // A long name is cut to a label, without a trailing dash.
        let long = format!("{}-{}", "a".repeat(62), "b");
        assert_eq!(hostname(None, &long), "a".repeat(62));
    }

    #[test]
    fn resolv_conf_is_kubelets_cluster_first() {
        assert_eq!(
            resolv_conf(
                "shop",
                Ipv4Addr::new(10, 96, 0, 10),
                &["corp.example".into(), "cluster.local".into()]
            ),
            "search shop.svc.cluster.local svc.cluster.local cluster.local corp.example\n\
             nameserver 10.96.0.10\noptions ndots:5\n"
        );
    }

    #[test]
    fn service_links_are_kubelets() {
        let service = match ambit_local::manifest::parse(
            "{apiVersion: v1, kind: Service, metadata: {name: my-web, namespace: shop}, spec: {selector: {a: b}, ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, protocol: UDP}]}}",
        )
        .unwrap()
        .remove(0)
        {
            ambit_local::manifest::Object::Service(service) => service,
            other => panic!("not a service: {other:?}"),
        };
        let env: BTreeMap<String, String> =
            environment("web-0", [(&service, "10.96.0.11".parse().unwrap())])
                .into_iter()
                .collect();
        let expected = [
            ("HOSTNAME", "web-0"),
            ("MY_WEB_SERVICE_HOST", "10.96.0.11"),
            ("MY_WEB_SERVICE_PORT", "80"),
            ("MY_WEB_SERVICE_PORT_HTTP", "80"),
            ("MY_WEB_SERVICE_PORT_DNS", "53"),
            ("MY_WEB_PORT", "tcp://10.96.0.11:80"),
            ("MY_WEB_PORT_80_TCP", "tcp://10.96.0.11:80"),
            ("MY_WEB_PORT_80_TCP_PROTO", "tcp"),
            ("MY_WEB_PORT_80_TCP_PORT", "80"),
            ("MY_WEB_PORT_80_TCP_ADDR", "10.96.0.11"),
            ("MY_WEB_PORT_53_UDP", "udp://10.96.0.11:53"),
            ("MY_WEB_PORT_53_UDP_PROTO", "udp"),
            ("MY_WEB_PORT_53_UDP_PORT", "53"),
            ("MY_WEB_PORT_53_UDP_ADDR", "10.96.0.11"),
        ];
        assert_eq!(
            env,
            expected
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        );
    }
}
