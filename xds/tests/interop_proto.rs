//! Istio's WDS protobufs from an encoder Ambit did not write, through Ambit's converter.
//!
//! `tests/interop/istio_xds_encoder.py` builds `istio.workload.Address` and
//! `istio.security.Authorization` messages with Google's Python `protobuf` package, from
//! descriptors it assembles out of the field numbers in Istio ztunnel's `workload.proto` and
//! `authorization.proto` (not from Ambit's prost structs), filled the way istiod's ambient
//! controller fills them. Each message goes through [`address_from_any`] /
//! [`authorization_from_any`], and the result must equal the state written out by hand here:
//! workloads and services in Istio ztunnel's local-config YAML (`LOCAL_XDS_PATH` format, parsed by
//! `LocalConfig`), policies as `ambit_mesh::rbac` values. Then the whole set must build a
//! snapshot that resolves what ztunnel asks of it. A second run adds fields a newer istiod might
//! send (unknown field numbers), which must be skipped.
//!
//! Needs `python3` with the `protobuf` package (`pip install protobuf`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ambit_mesh::rbac::{
    Action, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch, StringMatch,
};
use ambit_mesh::state::local::LocalConfig;
use ambit_mesh::state::{Service, Snapshot, Workload};
use ambit_xds::convert::{address_from_any, authorization_from_any, AddressResource};
use ambit_xds::proto::google::Any;
use ambit_xds::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use serde_json::Value;

const PEER: &str = "python protobuf encoder (istio_xds_encoder.py)";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop/istio_xds_encoder.py")
}

/// Runs the encoder; returns case name → `Any`.
fn encode(future_fields: bool) -> BTreeMap<String, Any> {
    let mut command = std::process::Command::new("python3");
    command.arg(script());
    if future_fields {
        command.arg("--future-fields");
    }
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{PEER}: python3 runs: {e}"));
    assert!(
        out.status.success(),
        "{PEER}: encoding failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{PEER}: output is not JSON ({e}): {:?}", out.stdout));
    if let Some(error) = json.get("error") {
        panic!("{PEER}: {error}");
    }
    json.as_object()
        .unwrap()
        .iter()
        .map(|(name, case)| {
            let hex = case["hex"].as_str().unwrap();
            let value = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            let any = Any {
                type_url: case["type_url"].as_str().unwrap().to_owned(),
                value,
            };
            (name.clone(), any)
        })
        .collect()
}

/// The same workloads and services in Istio ztunnel's local-config YAML.
const EXPECTED_ADDRESSES: &str = r#"
workloads:
- uid: Kubernetes//Pod/bookinfo/reviews-v2-5b667bcbf8-x7t2q
  name: reviews-v2-5b667bcbf8-x7t2q
  namespace: bookinfo
  serviceAccount: bookinfo-reviews
  trustDomain: cluster.local
  workloadIps: ["10.244.1.17"]
  protocol: HBONE
  node: ambient-worker
  network: ""
  canonicalName: reviews
  canonicalRevision: v2
  workloadName: reviews-v2
  clusterId: Kubernetes
  status: Healthy
  services:
    "bookinfo/reviews.bookinfo.svc.cluster.local": {9080: 9080}
    "bookinfo/reviews-v2.bookinfo.svc.cluster.local": {80: 9080}
  authorizationPolicies: ["bookinfo/productpage-viewer", "istio-system/global-deny"]
- uid: Kubernetes//Pod/bookinfo/ratings-v1-7d9b5f6c4-abcde
  name: ratings-v1-7d9b5f6c4-abcde
  namespace: bookinfo
  serviceAccount: default
  trustDomain: cluster.local
  workloadIps: ["10.244.2.9", "fd00:10:244:2::9"]
  protocol: HBONE
  node: ambient-worker2
  canonicalName: ratings
  canonicalRevision: v1
  workloadName: ratings-v1
  clusterId: Kubernetes
  status: Unhealthy
  waypoint:
    destination: {namespace: bookinfo, hostname: waypoint.bookinfo.svc.cluster.local}
    hboneMtlsPort: 15008
  services: {}
- uid: Kubernetes//Pod/legacy/mysql-0
  name: mysql-0
  namespace: legacy
  serviceAccount: mysql
  workloadIps: ["10.244.3.4"]
  protocol: TCP
  node: ambient-worker
  clusterId: Kubernetes
  services: {}
services:
- name: reviews
  namespace: bookinfo
  hostname: reviews.bookinfo.svc.cluster.local
  vips: ["/10.96.120.7"]
  ports: {9080: 9080}
  appProtocols: {9080: http11}
  subjectAltNames: ["spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"]
  waypoint:
    destination: "/10.96.200.1"
    hboneMtlsPort: 15008
- name: external-db
  namespace: legacy
  hostname: db.example.com
  vips: ["/240.240.0.5", "/2001:2::5"]
  ports: {5432: 0}
"#;

fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

fn expected_policies() -> BTreeMap<&'static str, Authorization> {
    let productpage_viewer = Authorization {
        name: "productpage-viewer".into(),
        namespace: "bookinfo".into(),
        scope: Scope::WorkloadSelector,
        action: Action::Allow,
        rules: vec![Rule {
            clauses: vec![
                Clause {
                    matches: vec![Match {
                        principals: vec![
                            StringMatch::Exact("cluster.local/ns/default/sa/sleep".into()),
                            StringMatch::Prefix("cluster.local/ns/bookinfo/".into()),
                        ],
                        service_accounts: vec![ServiceAccountMatch {
                            namespace: "bookinfo".into(),
                            service_account: "bookinfo-gateway-istio".into(),
                        }],
                        ..Default::default()
                    }],
                },
                Clause {
                    matches: vec![Match {
                        destination_ports: vec![9080],
                        ..Default::default()
                    }],
                },
            ],
        }],
        dry_run: false,
    };
    let deny_outsiders = Authorization {
        name: "deny-outsiders".into(),
        namespace: "legacy".into(),
        scope: Scope::Namespace,
        action: Action::Deny,
        rules: vec![Rule {
            clauses: vec![
                Clause {
                    matches: vec![Match {
                        not_namespaces: vec![
                            StringMatch::Exact("legacy".into()),
                            StringMatch::Suffix("-trusted".into()),
                        ],
                        not_source_ips: vec![net("10.244.0.0/16"), net("fd00::/8")],
                        not_principals: vec![StringMatch::Presence],
                        ..Default::default()
                    }],
                },
                Clause {
                    matches: vec![Match {
                        destination_ips: vec![net("10.244.3.4/32")],
                        not_destination_ports: vec![3306, 33060],
                        not_service_accounts: vec![ServiceAccountMatch {
                            namespace: "legacy".into(),
                            service_account: "backup".into(),
                        }],
                        ..Default::default()
                    }],
                },
            ],
        }],
        dry_run: true,
    };
    let global_deny = Authorization {
        name: "global-deny".into(),
        namespace: "istio-system".into(),
        scope: Scope::Global,
        action: Action::Deny,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    destination_ports: vec![9999],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    };
    BTreeMap::from([
        ("policy_allow", productpage_viewer),
        ("policy_deny_dry_run", deny_outsiders),
        ("policy_global", global_deny),
    ])
}

struct Converted {
    workloads: BTreeMap<String, Workload>,
    services: BTreeMap<String, Service>,
    policies: BTreeMap<String, Authorization>,
}

fn convert_all(cases: &BTreeMap<String, Any>, run: &str) -> Converted {
    let mut converted = Converted {
        workloads: BTreeMap::new(),
        services: BTreeMap::new(),
        policies: BTreeMap::new(),
    };
    for (name, any) in cases {
        let step = format!("{PEER} ({run}) → ambit-xds convert: {name}");
        match any.type_url.as_str() {
            ADDRESS_TYPE_URL => match address_from_any(name, Some(any)) {
                Ok(AddressResource::Workload(w)) => {
                    converted.workloads.insert(w.uid.clone(), w);
                }
                Ok(AddressResource::Service(s)) => {
                    converted.services.insert(s.key(), s);
                }
                Err(e) => panic!("{step}: refused: {e}"),
            },
            AUTHORIZATION_TYPE_URL => {
                let policy = authorization_from_any(name, Some(any))
                    .unwrap_or_else(|e| panic!("{step}: refused: {e}"));
                converted.policies.insert(name.clone(), policy);
            }
            other => panic!("{step}: unexpected type url {other}"),
        }
    }
    converted
}

fn check(run: &str, future_fields: bool) {
    let cases = encode(future_fields);
    assert_eq!(
        cases.len(),
        8,
        "{PEER} ({run}): cases encoded: {:?}",
        cases.keys()
    );
    let converted = convert_all(&cases, run);

    let expected = LocalConfig::parse(EXPECTED_ADDRESSES, Path::new("expected.yaml"))
        .expect("the expected state parses");
    assert_eq!(
        converted.workloads.len(),
        expected.workloads.len(),
        "{PEER} ({run}): workloads converted: {:?}",
        converted.workloads.keys()
    );
    for want in &expected.workloads {
        let got = converted.workloads.get(&want.uid).unwrap_or_else(|| {
            panic!(
                "{PEER} ({run}) → ambit-xds convert: workload {} missing",
                want.uid
            )
        });
        assert_eq!(
            got, want,
            "{PEER} ({run}) → ambit-xds convert: workload {}",
            want.uid
        );
    }
    assert_eq!(
        converted.services.len(),
        expected.services.len(),
        "{PEER} ({run}): services converted: {:?}",
        converted.services.keys()
    );
    for want in &expected.services {
        let got = converted.services.get(&want.key()).unwrap_or_else(|| {
            panic!(
                "{PEER} ({run}) → ambit-xds convert: service {} missing",
                want.key()
            )
        });
        assert_eq!(
            got,
            want,
            "{PEER} ({run}) → ambit-xds convert: service {} (the /16 range in Istio's \
             addresses is dropped: only single VIPs are modelled)",
            want.key()
        );
    }
    for (name, want) in expected_policies() {
        let got = converted
            .policies
            .get(name)
            .unwrap_or_else(|| panic!("{PEER} ({run}) → ambit-xds convert: policy {name} missing"));
        assert_eq!(
            got, &want,
            "{PEER} ({run}) → ambit-xds convert: authorization {name}"
        );
    }

    // The converted resources form a snapshot that answers ztunnel's questions.
    let snapshot = Snapshot::build(
        converted.workloads.into_values().collect(),
        converted.services.into_values().collect(),
        converted.policies.into_values().collect(),
    )
    .unwrap_or_else(|e| panic!("{PEER} ({run}) → snapshot from the converted resources: {e}"));
    let step = format!("{PEER} ({run}) → snapshot lookups");
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let reviews = snapshot
        .workload_by_ip("", ip("10.244.1.17"))
        .unwrap_or_else(|| panic!("{step}: workload by IP 10.244.1.17"));
    assert_eq!(
        reviews.identity().unwrap().to_string(),
        "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews",
        "{step}: reviews identity"
    );
    let ratings = snapshot
        .workload_by_ip("", ip("fd00:10:244:2::9"))
        .unwrap_or_else(|| panic!("{step}: workload by IPv6 fd00:10:244:2::9"));
    assert_eq!(
        ratings.identity().unwrap().to_string(),
        "spiffe://cluster.local/ns/bookinfo/sa/default",
        "{step}: ratings identity (Istio's defaults for an empty trust domain / service account)"
    );
    let service = snapshot
        .service_by_vip("", ip("10.96.120.7"))
        .unwrap_or_else(|| panic!("{step}: service by VIP 10.96.120.7"));
    assert_eq!(
        service.hostname, "reviews.bookinfo.svc.cluster.local",
        "{step}"
    );
    assert!(
        snapshot.service_by_vip("", ip("2001:2::5")).is_some(),
        "{step}: service by IPv6 VIP 2001:2::5"
    );
}

#[test]
fn istio_wds_messages_from_python_protobuf_convert_to_the_expected_state() {
    check("istio's fields", false);
}

#[test]
fn fields_from_a_newer_istiod_are_skipped() {
    check("with unknown future fields", true);
}

/// Fields the model drops still line up on the wire (prost reads the Python bytes at Istio's tag
/// numbers), and the converter refuses, by field name, a tunnel protocol it cannot serve.
#[test]
fn python_encoded_bytes_decode_with_the_expected_tags() {
    use ambit_xds::proto::workload;
    use prost::Message;
    let cases = encode(false);
    let any = &cases["workload_pod"];
    let decoded = workload::Address::decode(any.value.as_slice())
        .unwrap_or_else(|e| panic!("{PEER}: workload_pod decodes with prost: {e}"));
    let Some(workload::address::Type::Workload(w)) = decoded.r#type else {
        panic!("{PEER}: workload_pod is not Address.workload (field 1)");
    };
    // Fields the model drops but the wire carries: proves the tags line up beyond the model.
    assert_eq!(
        w.workload_type,
        workload::WorkloadType::Pod as i32,
        "{PEER}: workload_type (12)"
    );
    assert_eq!(
        w.locality
            .as_ref()
            .map(|l| (l.region.as_str(), l.zone.as_str())),
        Some(("us-east1", "us-east1-b")),
        "{PEER}: locality (24)"
    );
    assert_eq!(
        w.capacity.map(|c| c.value),
        Some(1),
        "{PEER}: capacity (27)"
    );
    assert_eq!(
        w.services["bookinfo/reviews.bookinfo.svc.cluster.local"].ports[0].app_protocol,
        workload::AppProtocol::Http11 as i32,
        "{PEER}: services map (22) → PortList → Port.app_protocol"
    );

    let mut legacy = w.clone();
    legacy.tunnel_protocol = workload::TunnelProtocol::LegacyIstioMtls as i32;
    let any = ambit_xds::proto::to_any(
        ADDRESS_TYPE_URL,
        &workload::Address {
            r#type: Some(workload::address::Type::Workload(legacy)),
        },
    );
    let error = address_from_any("legacy", Some(&any)).unwrap_err();
    assert!(
        error.to_string().contains("tunnel_protocol"),
        "ambit-xds convert: LEGACY_ISTIO_MTLS refused naming the field: {error}"
    );
}
