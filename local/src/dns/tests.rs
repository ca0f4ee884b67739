//! The zone against the Kubernetes DNS specification's examples, one record kind at a time.

use std::collections::BTreeMap;
use std::net::IpAddr;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

use super::*;
use crate::control::{ClusterState, RunningPod};
use crate::manifest::parse;

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: pg, port: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: shop}
spec:
  clusterIP: None
  selector: {app: nothing}
  ports: [{name: x, port: 1}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec:
  containers: [{name: c, image: ambit/echo}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}}
spec:
  hostname: primary
  subdomain: db
  containers: [{name: c, image: ambit/echo}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop, labels: {app: db}}
spec:
  containers: [{name: c, image: ambit/echo}]
"#;

fn zone() -> Zone {
    let mut cluster = ClusterState::new();
    cluster.apply(&parse(MANIFESTS).unwrap()).unwrap();
    let pods: Vec<RunningPod> = [
        ("web-1", "10.244.1.2"),
        ("db-0", "10.244.1.3"),
        ("db-1", "10.244.2.2"),
    ]
    .iter()
    .map(|(name, ip)| RunningPod {
        namespace: "shop".into(),
        name: (*name).into(),
        ip: ip.parse().unwrap(),
        node: "node1".into(),
        enrolled: false,
        ready: true,
    })
    .collect();
    let vips = BTreeMap::from([(
        ("shop".to_owned(), "web".to_owned()),
        "10.96.0.11".parse::<IpAddr>().unwrap(),
    )]);
    Zone::build(&ZoneSource {
        cluster: &cluster,
        pods: &pods,
        vips: &vips,
        reverse_ranges: &[(10, 244), (10, 96)],
    })
}

fn ask(zone: &Zone, name: &str, record_type: RecordType) -> Option<Message> {
    let query = Query::query(Name::from_ascii(name).unwrap(), record_type);
    let mut response = Message::response(1, hickory_proto::op::OpCode::Query);
    zone.answer(&query, &mut response).then_some(response)
}

fn answer(zone: &Zone, name: &str, record_type: RecordType) -> (ResponseCode, Vec<String>) {
    let response = ask(zone, name, record_type).expect("the cluster's name");
    assert!(response.metadata.authoritative);
    let mut data: Vec<String> = response
        .answers
        .iter()
        .map(|r| {
            assert_eq!(r.name.to_ascii(), name, "owner name as asked");
            assert_eq!(r.ttl, TTL);
            r.data.to_string()
        })
        .collect();
    data.sort();
    (response.metadata.response_code, data)
}

fn ok(list: &[&str]) -> (ResponseCode, Vec<String>) {
    (
        ResponseCode::NoError,
        list.iter().map(ToString::to_string).collect(),
    )
}

#[test]
fn a_service_with_a_vip_has_a_srv_and_ptr_records() {
    let zone = zone();
    assert_eq!(
        answer(&zone, "web.shop.svc.cluster.local.", RecordType::A),
        ok(&["10.96.0.11"])
    );
    // Case does not matter; the answer keeps the asker's.
    assert_eq!(
        answer(&zone, "WeB.Shop.svc.Cluster.Local.", RecordType::A),
        ok(&["10.96.0.11"])
    );
    assert_eq!(
        answer(
            &zone,
            "_http._tcp.web.shop.svc.cluster.local.",
            RecordType::SRV
        ),
        ok(&["0 100 80 web.shop.svc.cluster.local."])
    );
    assert_eq!(
        answer(
            &zone,
            "_dns._udp.web.shop.svc.cluster.local.",
            RecordType::SRV
        ),
        ok(&["0 100 53 web.shop.svc.cluster.local."])
    );
    let srv = ask(
        &zone,
        "_http._tcp.web.shop.svc.cluster.local.",
        RecordType::SRV,
    )
    .unwrap();
    assert_eq!(srv.additionals.len(), 1, "the target's A record");
    assert_eq!(
        srv.additionals[0].data,
        RData::A(A("10.96.0.11".parse().unwrap()))
    );
    assert_eq!(
        answer(&zone, "11.0.96.10.in-addr.arpa.", RecordType::PTR),
        ok(&["web.shop.svc.cluster.local."])
    );
}

#[test]
fn a_headless_service_answers_with_its_endpoints() {
    let zone = zone();
    assert_eq!(
        answer(&zone, "db.shop.svc.cluster.local.", RecordType::A),
        ok(&["10.244.1.3", "10.244.2.2"])
    );
    // hostname + subdomain names the endpoint; without them, the dashed address does.
    assert_eq!(
        answer(&zone, "primary.db.shop.svc.cluster.local.", RecordType::A),
        ok(&["10.244.1.3"])
    );
    assert_eq!(
        answer(
            &zone,
            "10-244-2-2.db.shop.svc.cluster.local.",
            RecordType::A
        ),
        ok(&["10.244.2.2"])
    );
    assert_eq!(
        answer(
            &zone,
            "_pg._tcp.db.shop.svc.cluster.local.",
            RecordType::SRV
        ),
        ok(&[
            "0 50 5432 10-244-2-2.db.shop.svc.cluster.local.",
            "0 50 5432 primary.db.shop.svc.cluster.local."
        ])
    );
    assert_eq!(
        answer(&zone, "3.1.244.10.in-addr.arpa.", RecordType::PTR),
        ok(&["primary.db.shop.svc.cluster.local."])
    );
    // No ready endpoints: NXDOMAIN, as the specification says.
    let (code, _) = answer(&zone, "empty.shop.svc.cluster.local.", RecordType::A);
    assert_eq!(code, ResponseCode::NXDomain);
}

#[test]
fn pods_have_a_records_and_their_addresses_ptr_records() {
    let zone = zone();
    assert_eq!(
        answer(&zone, "10-244-1-2.shop.pod.cluster.local.", RecordType::A),
        ok(&["10.244.1.2"])
    );
    // Any address, as the specification's (deprecated) record asks, in an existing namespace.
    assert_eq!(
        answer(&zone, "1-2-3-4.default.pod.cluster.local.", RecordType::A),
        ok(&["1.2.3.4"])
    );
    for missing in [
        "1-2-3-4.nowhere.pod.cluster.local.",
        "1-2-3.shop.pod.cluster.local.",
        "1-2-3-400.shop.pod.cluster.local.",
        "a-b-c-d.shop.pod.cluster.local.",
    ] {
        let (code, _) = answer(&zone, missing, RecordType::A);
        assert_eq!(code, ResponseCode::NXDomain, "{missing}");
    }
    assert_eq!(
        answer(&zone, "2.1.244.10.in-addr.arpa.", RecordType::PTR),
        ok(&["10-244-1-2.shop.pod.cluster.local."])
    );
}

#[test]
fn unknown_cluster_names_are_nxdomain_with_the_soa_and_known_ones_nodata() {
    let zone = zone();
    for name in [
        "nope.shop.svc.cluster.local.",
        "web.shop.svc.cluster.local.shop.svc.cluster.local.",
        "example.com.shop.svc.cluster.local.",
        "web.nowhere.svc.cluster.local.",
        "_http._udp.web.shop.svc.cluster.local.",
        "9.9.244.10.in-addr.arpa.",
        "12.0.96.10.in-addr.arpa.",
    ] {
        let response = ask(&zone, name, RecordType::A).unwrap();
        assert_eq!(
            response.metadata.response_code,
            ResponseCode::NXDomain,
            "{name}"
        );
        assert!(response.metadata.authoritative);
        assert_eq!(response.authorities.len(), 1, "{name}: the SOA");
        assert_eq!(response.authorities[0].record_type(), RecordType::SOA);
    }
    // Names that exist with no records of the type asked: NOERROR, nothing, the SOA.
    for (name, record_type) in [
        ("web.shop.svc.cluster.local.", RecordType::AAAA),
        ("web.shop.svc.cluster.local.", RecordType::MX),
        ("shop.svc.cluster.local.", RecordType::A),
        ("svc.cluster.local.", RecordType::A),
        ("cluster.local.", RecordType::A),
        ("244.10.in-addr.arpa.", RecordType::PTR),
    ] {
        let response = ask(&zone, name, record_type).unwrap();
        assert_eq!(
            response.metadata.response_code,
            ResponseCode::NoError,
            "{name}"
        );
        assert!(response.answers.is_empty(), "{name}");
        assert_eq!(response.authorities.len(), 1, "{name}");
    }
}

#[test]
fn the_schema_version_soa_and_any() {
    let zone = zone();
    assert_eq!(
        answer(&zone, "dns-version.cluster.local.", RecordType::TXT),
        ok(&["1.0.1"])
    );
    let (code, soa) = answer(&zone, "cluster.local.", RecordType::SOA);
    assert_eq!(code, ResponseCode::NoError);
    assert_eq!(soa.len(), 1);
    assert!(soa[0].starts_with("ns.dns.cluster.local. hostmaster.cluster.local."));
    assert_eq!(
        answer(&zone, "web.shop.svc.cluster.local.", RecordType::ANY),
        ok(&["10.96.0.11"])
    );
}

#[test]
fn other_names_are_not_the_zones_and_other_classes_are_refused() {
    let zone = zone();
    for name in [
        "example.com.",
        "cluster.local.example.com.",
        "notcluster.local.",
        "1.0.0.127.in-addr.arpa.",
        "1.0.97.10.in-addr.arpa.",
    ] {
        assert!(ask(&zone, name, RecordType::A).is_none(), "{name}");
    }
    let mut query = Query::query(
        Name::from_ascii("web.shop.svc.cluster.local.").unwrap(),
        RecordType::A,
    );
    query.set_query_class(DNSClass::CH);
    let mut response = Message::response(1, hickory_proto::op::OpCode::Query);
    assert!(zone.answer(&query, &mut response));
    assert_eq!(response.metadata.response_code, ResponseCode::Refused);
    assert!(response.answers.is_empty());
}
