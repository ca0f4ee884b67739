//! The entry point for the manifest fuzz target in `fuzz/` and the test that replays its corpus
//! (feature `fuzzing`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use crate::control::{self, ClusterState, RunningPod};
use crate::manifest;

/// Manifests as `ambit mesh apply` takes them: parsed, applied to an empty cluster, and, when
/// accepted, translated into ztunnel's state with every pod running and enrolled. Whatever the
/// control plane accepts must give a state ztunnel takes (the local mesh would otherwise fail
/// every later change), and every object must name itself in errors.
pub fn manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let objects = match manifest::parse_in(text, "fuzz") {
        Ok(objects) => objects,
        Err(err) => {
            assert!(!err.to_string().is_empty());
            return;
        }
    };
    for object in &objects {
        assert!(!object.object_ref().to_string().is_empty());
    }
    let mut cluster = ClusterState::new();
    if cluster.apply(&objects).is_err() {
        return;
    }
    let running: Vec<RunningPod> = cluster
        .pods()
        .enumerate()
        .map(|(i, pod)| RunningPod {
            namespace: pod.metadata.namespace.clone(),
            name: pod.metadata.name.clone(),
            ip: IpAddr::V4(Ipv4Addr::from(0x0af4_0000 + i as u32)),
            node: "node1".into(),
            enrolled: true,
            ready: true,
        })
        .collect();
    let vips: BTreeMap<(String, String), IpAddr> = cluster
        .services()
        .enumerate()
        .map(|(i, service)| {
            let key = (
                service.metadata.namespace.clone(),
                service.metadata.name.clone(),
            );
            (key, IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i as u32)))
        })
        .collect();
    let config = control::ztunnel_config(&cluster, &running, &vips, "cluster.local");
    if let Err(err) = config.into_snapshot(Path::new("fuzz.yaml")) {
        panic!("the control plane accepted manifests ztunnel refuses: {err}");
    }
    for gateway in cluster.gateways() {
        let meta = &gateway.metadata;
        for object in cluster.waypoint_l7_objects(&meta.namespace, &meta.name) {
            assert!(
                cluster.get(&object).is_some(),
                "{object} is not in the cluster"
            );
        }
    }
}
