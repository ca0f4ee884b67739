#!/usr/bin/env python3
"""Encodes Istio's WDS protobufs (``istio.workload.Address``, ``istio.security.Authorization``)
with Google's ``protobuf`` package (pip ``protobuf``), independently of Ambit's prost structs.

The message descriptors are built here, at run time, from the field names, numbers, types and
enum values of Istio ztunnel's ``proto/workload.proto`` and ``proto/authorization.proto``
(istio/ztunnel@62d8265); no generated code and nothing of Ambit's is used. The resources are
filled the way istiod's ambient controller fills them (uids ``<cluster>//Pod/<ns>/<name>``,
4/16-byte addresses, ``<ns>/<hostname>`` service keys, SPIFFE principals without the scheme).

A newer istiod may send fields this reader does not know: ``--future-fields`` adds one unknown
field number to Workload, Service and Match (ztunnel, like every protobuf reader, skips them).

Prints one JSON object: {"<case>": {"type_url": str, "hex": str}, ...}.

Usage: istio_xds_encoder.py [--future-fields]
"""

import argparse
import ipaddress
import json
import sys

try:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from google.protobuf import empty_pb2, wrappers_pb2, any_pb2
except ImportError as err:  # the Rust test names the missing package
    print(json.dumps({"error": f"python protobuf package missing: {err} (pip install protobuf)"}))
    sys.exit(0)

F = descriptor_pb2.FieldDescriptorProto
STRING, BYTES, BOOL, UINT32, ENUM, MESSAGE = (F.TYPE_STRING, F.TYPE_BYTES, F.TYPE_BOOL,
                                              F.TYPE_UINT32, F.TYPE_ENUM, F.TYPE_MESSAGE)
ONE, MANY = F.LABEL_OPTIONAL, F.LABEL_REPEATED


def message(file, name, fields, oneofs=(), nested=()):
    """fields: (name, number, type, label, type_name or None, oneof name or None, proto3 optional)"""
    m = file.message_type.add() if file is not None else descriptor_pb2.DescriptorProto()
    m.name = name
    oneof_index = {}
    for oneof in oneofs:
        oneof_index[oneof] = len(m.oneof_decl)
        m.oneof_decl.add().name = oneof
    for spec in fields:
        fname, number, ftype, label = spec[:4]
        type_name = spec[4] if len(spec) > 4 else None
        oneof = spec[5] if len(spec) > 5 else None
        optional = spec[6] if len(spec) > 6 else False
        f = m.field.add(name=fname, number=number, type=ftype, label=label)
        if type_name:
            f.type_name = type_name
        if optional:
            oneof_index[f"_{fname}"] = len(m.oneof_decl)
            m.oneof_decl.add().name = f"_{fname}"
            f.proto3_optional = True
            f.oneof_index = oneof_index[f"_{fname}"]
        elif oneof:
            f.oneof_index = oneof_index[oneof]
    for n in nested:
        m.nested_type.add().CopyFrom(n)
    return m


def enum(container, name, values):
    e = container.enum_type.add()
    e.name = name
    for value_name, number in values:
        e.value.add(name=value_name, number=number)


def build_pool(future_fields):
    pool = descriptor_pool.DescriptorPool()
    for wkt in (empty_pb2, wrappers_pb2, any_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        wkt.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)

    w = descriptor_pb2.FileDescriptorProto(name="workload.proto", package="istio.workload",
                                           syntax="proto3")
    w.dependency.extend(["google/protobuf/wrappers.proto", "google/protobuf/any.proto"])
    P = ".istio.workload."
    message(w, "Address", [("workload", 1, MESSAGE, ONE, P + "Workload", "type"),
                           ("service", 2, MESSAGE, ONE, P + "Service", "type")], ["type"])
    service = message(w, "Service", [
        ("name", 1, STRING, ONE), ("namespace", 2, STRING, ONE), ("hostname", 3, STRING, ONE),
        ("addresses", 4, MESSAGE, MANY, P + "NetworkAddress"),
        ("ports", 5, MESSAGE, MANY, P + "Port"),
        ("subject_alt_names", 6, STRING, MANY),
        ("waypoint", 7, MESSAGE, ONE, P + "GatewayAddress"),
        ("load_balancing", 8, MESSAGE, ONE, P + "LoadBalancing"),
        ("ip_families", 9, ENUM, ONE, P + "IPFamilies"),
        ("extensions", 10, MESSAGE, MANY, P + "Extension"),
        ("canonical", 11, BOOL, ONE), ("ingress_use_waypoint", 12, BOOL, ONE),
        ("weighted_waypoints", 13, MESSAGE, MANY, P + "WeightedWaypoint"),
        ("visibility", 14, ENUM, ONE, P + "Service.Visibility"),
    ] + ([("future_service_field", 99, STRING, ONE)] if future_fields else []))
    enum(service, "Visibility", [("PUBLIC", 0), ("NAMESPACE", 1)])
    enum(w, "IPFamilies", [("AUTOMATIC", 0), ("IPV4_ONLY", 1), ("IPV6_ONLY", 2), ("DUAL", 3)])
    enum(w, "NetworkMode", [("STANDARD", 0), ("HOST_NETWORK", 1)])
    lb = message(w, "LoadBalancing", [
        ("routing_preference", 1, ENUM, MANY, P + "LoadBalancing.Scope"),
        ("mode", 2, ENUM, ONE, P + "LoadBalancing.Mode"),
        ("health_policy", 3, ENUM, ONE, P + "LoadBalancing.HealthPolicy"),
    ])
    enum(lb, "Scope", [("UNSPECIFIED_SCOPE", 0), ("REGION", 1), ("ZONE", 2), ("SUBZONE", 3),
                       ("NODE", 4), ("CLUSTER", 5), ("NETWORK", 6)])
    enum(lb, "Mode", [("UNSPECIFIED_MODE", 0), ("STRICT", 1), ("FAILOVER", 2), ("PASSTHROUGH", 3)])
    enum(lb, "HealthPolicy", [("ONLY_HEALTHY", 0), ("ALLOW_ALL", 1)])
    services_entry = message(None, "ServicesEntry", [("key", 1, STRING, ONE),
                                                     ("value", 2, MESSAGE, ONE, P + "PortList")])
    services_entry.options.map_entry = True
    message(w, "Workload", [
        ("uid", 20, STRING, ONE), ("name", 1, STRING, ONE), ("namespace", 2, STRING, ONE),
        ("addresses", 3, BYTES, MANY), ("hostname", 21, STRING, ONE),
        ("network", 4, STRING, ONE),
        ("tunnel_protocol", 5, ENUM, ONE, P + "TunnelProtocol"),
        ("trust_domain", 6, STRING, ONE), ("service_account", 7, STRING, ONE),
        ("waypoint", 8, MESSAGE, ONE, P + "GatewayAddress"),
        ("network_gateway", 19, MESSAGE, ONE, P + "GatewayAddress"),
        ("node", 9, STRING, ONE), ("canonical_name", 10, STRING, ONE),
        ("canonical_revision", 11, STRING, ONE),
        ("workload_type", 12, ENUM, ONE, P + "WorkloadType"),
        ("workload_name", 13, STRING, ONE), ("native_tunnel", 14, BOOL, ONE),
        ("application_tunnel", 23, MESSAGE, ONE, P + "ApplicationTunnel"),
        ("services", 22, MESSAGE, MANY, P + "Workload.ServicesEntry"),
        ("authorization_policies", 16, STRING, MANY),
        ("status", 17, ENUM, ONE, P + "WorkloadStatus"),
        ("cluster_id", 18, STRING, ONE),
        ("locality", 24, MESSAGE, ONE, P + "Locality"),
        ("network_mode", 25, ENUM, ONE, P + "NetworkMode"),
        ("extensions", 26, MESSAGE, MANY, P + "Extension"),
        ("capacity", 27, MESSAGE, ONE, ".google.protobuf.UInt32Value"),
    ] + ([("future_workload_field", 99, STRING, ONE)] if future_fields else []),
        nested=[services_entry])
    message(w, "Locality", [("region", 1, STRING, ONE), ("zone", 2, STRING, ONE),
                            ("subzone", 3, STRING, ONE)])
    enum(w, "WorkloadStatus", [("HEALTHY", 0), ("UNHEALTHY", 1)])
    enum(w, "WorkloadType", [("DEPLOYMENT", 0), ("CRONJOB", 1), ("POD", 2), ("JOB", 3)])
    message(w, "PortList", [("ports", 1, MESSAGE, MANY, P + "Port")])
    message(w, "Port", [("service_port", 1, UINT32, ONE), ("target_port", 2, UINT32, ONE),
                        ("app_protocol", 3, ENUM, ONE, P + "AppProtocol")])
    enum(w, "AppProtocol", [("UNKNOWN", 0), ("HTTP11", 1), ("HTTP2", 2), ("GRPC", 3), ("TCP", 4),
                            ("TLS", 5)])
    enum(w, "TunnelProtocol", [("NONE", 0), ("HBONE", 1), ("LEGACY_ISTIO_MTLS", 2)])
    tunnel = message(w, "ApplicationTunnel", [
        ("protocol", 1, ENUM, ONE, P + "ApplicationTunnel.Protocol"), ("port", 2, UINT32, ONE)])
    enum(tunnel, "Protocol", [("NONE", 0), ("PROXY", 1)])
    message(w, "GatewayAddress", [
        ("hostname", 1, MESSAGE, ONE, P + "NamespacedHostname", "destination"),
        ("address", 2, MESSAGE, ONE, P + "NetworkAddress", "destination"),
        ("hbone_mtls_port", 3, UINT32, ONE)], ["destination"])
    message(w, "WeightedWaypoint", [("destination", 1, MESSAGE, ONE, P + "GatewayAddress"),
                                    ("weight", 2, UINT32, ONE)])
    message(w, "NetworkAddress", [("network", 1, STRING, ONE), ("address", 2, BYTES, ONE),
                                  ("length", 3, UINT32, ONE, None, None, True)])
    message(w, "NamespacedHostname", [("namespace", 1, STRING, ONE),
                                      ("hostname", 2, STRING, ONE)])
    message(w, "Extension", [("name", 1, STRING, ONE),
                             ("config", 2, MESSAGE, ONE, ".google.protobuf.Any")])
    pool.Add(w)

    a = descriptor_pb2.FileDescriptorProto(name="authorization.proto", package="istio.security",
                                           syntax="proto3")
    a.dependency.extend(["google/protobuf/empty.proto", "workload.proto"])
    S = ".istio.security."
    message(a, "Authorization", [
        ("name", 1, STRING, ONE), ("namespace", 2, STRING, ONE),
        ("scope", 3, ENUM, ONE, S + "Scope"), ("action", 4, ENUM, ONE, S + "Action"),
        ("rules", 5, MESSAGE, MANY, S + "Rule"), ("dry_run", 6, BOOL, ONE),
        ("extensions", 7, MESSAGE, MANY, P + "Extension")])
    message(a, "Rule", [("clauses", 1, MESSAGE, MANY, S + "Clause")])
    message(a, "Clause", [("matches", 2, MESSAGE, MANY, S + "Match")])
    message(a, "Match", [
        ("namespaces", 1, MESSAGE, MANY, S + "StringMatch"),
        ("not_namespaces", 2, MESSAGE, MANY, S + "StringMatch"),
        ("service_accounts", 11, MESSAGE, MANY, S + "ServiceAccountMatch"),
        ("not_service_accounts", 12, MESSAGE, MANY, S + "ServiceAccountMatch"),
        ("principals", 3, MESSAGE, MANY, S + "StringMatch"),
        ("not_principals", 4, MESSAGE, MANY, S + "StringMatch"),
        ("source_ips", 5, MESSAGE, MANY, S + "Address"),
        ("not_source_ips", 6, MESSAGE, MANY, S + "Address"),
        ("destination_ips", 7, MESSAGE, MANY, S + "Address"),
        ("not_destination_ips", 8, MESSAGE, MANY, S + "Address"),
        ("destination_ports", 9, UINT32, MANY), ("not_destination_ports", 10, UINT32, MANY),
        ("extensions", 13, MESSAGE, MANY, P + "Extension"),
    ] + ([("future_match_field", 99, STRING, ONE)] if future_fields else []))
    message(a, "Address", [("address", 1, BYTES, ONE), ("length", 2, UINT32, ONE)])
    message(a, "ServiceAccountMatch", [("namespace", 1, STRING, ONE),
                                       ("serviceAccount", 2, STRING, ONE)])
    message(a, "StringMatch", [
        ("exact", 1, STRING, ONE, None, "match_type"),
        ("prefix", 2, STRING, ONE, None, "match_type"),
        ("suffix", 3, STRING, ONE, None, "match_type"),
        ("presence", 4, MESSAGE, ONE, ".google.protobuf.Empty", "match_type")], ["match_type"])
    enum(a, "Scope", [("GLOBAL", 0), ("NAMESPACE", 1), ("WORKLOAD_SELECTOR", 2)])
    enum(a, "Action", [("ALLOW", 0), ("DENY", 1)])
    pool.Add(a)
    return pool


def ip(text):
    return ipaddress.ip_address(text).packed


def cases(pool, future_fields):
    cls = lambda name: message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
    Address = cls("istio.workload.Address")
    Authorization = cls("istio.security.Authorization")
    out = {}

    # A bookinfo pod enrolled in ambient, as istiod's ambient index builds it (workloadapi).
    addr = Address()
    w = addr.workload
    w.uid = "Kubernetes//Pod/bookinfo/reviews-v2-5b667bcbf8-x7t2q"
    w.name = "reviews-v2-5b667bcbf8-x7t2q"
    w.namespace = "bookinfo"
    w.addresses.append(ip("10.244.1.17"))
    w.network = ""
    w.tunnel_protocol = 1  # HBONE: the pod is captured by ztunnel
    w.trust_domain = "cluster.local"
    w.service_account = "bookinfo-reviews"
    w.node = "ambient-worker"
    w.canonical_name = "reviews"
    w.canonical_revision = "v2"
    w.workload_type = 2  # POD
    w.workload_name = "reviews-v2"
    w.services["bookinfo/reviews.bookinfo.svc.cluster.local"].ports.add(
        service_port=9080, target_port=9080, app_protocol=1)
    w.services["bookinfo/reviews-v2.bookinfo.svc.cluster.local"].ports.add(
        service_port=80, target_port=9080)
    w.authorization_policies.extend(["bookinfo/productpage-viewer", "istio-system/global-deny"])
    w.status = 0
    w.cluster_id = "Kubernetes"
    w.locality.region = "us-east1"
    w.locality.zone = "us-east1-b"
    w.capacity.value = 1
    w.network_mode = 0
    if future_fields:
        w.future_workload_field = "from a newer istiod"
    out["workload_pod"] = addr

    # A dual-stack, not-yet-ready pod behind a waypoint, with Istio's defaults left unset
    # (empty trust domain, service account and cluster id).
    addr = Address()
    w = addr.workload
    w.uid = "Kubernetes//Pod/bookinfo/ratings-v1-7d9b5f6c4-abcde"
    w.name = "ratings-v1-7d9b5f6c4-abcde"
    w.namespace = "bookinfo"
    w.addresses.extend([ip("10.244.2.9"), ip("fd00:10:244:2::9")])
    w.tunnel_protocol = 1
    w.node = "ambient-worker2"
    w.canonical_name = "ratings"
    w.canonical_revision = "v1"
    w.workload_name = "ratings-v1"
    w.waypoint.hostname.namespace = "bookinfo"
    w.waypoint.hostname.hostname = "waypoint.bookinfo.svc.cluster.local"
    w.waypoint.hbone_mtls_port = 15008
    w.status = 1  # UNHEALTHY
    out["workload_unready_behind_waypoint"] = addr

    # A pod outside the mesh (no capture): plain TCP.
    addr = Address()
    w = addr.workload
    w.uid = "Kubernetes//Pod/legacy/mysql-0"
    w.name = "mysql-0"
    w.namespace = "legacy"
    w.addresses.append(ip("10.244.3.4"))
    w.service_account = "mysql"
    w.tunnel_protocol = 0
    w.node = "ambient-worker"
    out["workload_plain_tcp"] = addr

    # The reviews Service, with its waypoint given by address (as for a waypoint's VIP).
    addr = Address()
    s = addr.service
    s.name = "reviews"
    s.namespace = "bookinfo"
    s.hostname = "reviews.bookinfo.svc.cluster.local"
    s.addresses.add(network="", address=ip("10.96.120.7"))
    s.ports.add(service_port=9080, target_port=9080, app_protocol=1)
    s.subject_alt_names.append("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews")
    s.waypoint.address.network = ""
    s.waypoint.address.address = ip("10.96.200.1")
    s.waypoint.hbone_mtls_port = 15008
    s.ip_families = 1  # IPV4_ONLY
    s.load_balancing.routing_preference.extend([6, 2])  # NETWORK, ZONE
    s.load_balancing.mode = 2  # FAILOVER
    if future_fields:
        s.future_service_field = "from a newer istiod"
    out["service_reviews"] = addr

    # A ServiceEntry-like service: a dual-stack VIP pair and a CIDR range (length set).
    addr = Address()
    s = addr.service
    s.name = "external-db"
    s.namespace = "legacy"
    s.hostname = "db.example.com"
    s.addresses.add(network="", address=ip("240.240.0.5"), length=32)
    s.addresses.add(network="", address=ip("2001:2::5"))
    s.addresses.add(network="", address=ip("192.168.0.0"), length=16)
    s.ports.add(service_port=5432)  # target_port 0: the same port
    out["service_entry"] = addr

    # `kubectl apply` of Istio's L4 policy docs example (allow the sleep SA to productpage on
    # 9080), as istiod sends it: WORKLOAD_SELECTOR scope, principals without "spiffe://".
    policy = Authorization()
    policy.name = "productpage-viewer"
    policy.namespace = "bookinfo"
    policy.scope = 2
    policy.action = 0
    clause = policy.rules.add().clauses.add()
    m = clause.matches.add()
    m.principals.add(exact="cluster.local/ns/default/sa/sleep")
    m.principals.add(prefix="cluster.local/ns/bookinfo/")
    m.service_accounts.add(namespace="bookinfo", serviceAccount="bookinfo-gateway-istio")
    ports = policy.rules[0].clauses.add().matches.add()
    ports.destination_ports.extend([9080])
    if future_fields:
        m.future_match_field = "from a newer istiod"
    out["policy_allow"] = policy

    # A namespace-wide DENY with negative matches, CIDRs, presence, suffix; dry run.
    policy = Authorization()
    policy.name = "deny-outsiders"
    policy.namespace = "legacy"
    policy.scope = 1
    policy.action = 1
    policy.dry_run = True
    rule = policy.rules.add()
    m = rule.clauses.add().matches.add()
    m.not_namespaces.add(exact="legacy")
    m.not_namespaces.add(suffix="-trusted")
    m.not_source_ips.add(address=ip("10.244.0.0"), length=16)
    m.not_source_ips.add(address=ip("fd00::"), length=8)
    m.not_principals.add().presence.SetInParent()
    m2 = rule.clauses.add().matches.add()
    m2.destination_ips.add(address=ip("10.244.3.4"), length=32)
    m2.not_destination_ports.extend([3306, 33060])
    m2.not_service_accounts.add(namespace="legacy", serviceAccount="backup")
    out["policy_deny_dry_run"] = policy

    # The mesh-wide policy in the root namespace.
    policy = Authorization()
    policy.name = "global-deny"
    policy.namespace = "istio-system"
    policy.scope = 0
    policy.action = 1
    policy.rules.add().clauses.add().matches.add().destination_ports.append(9999)
    out["policy_global"] = policy

    type_urls = {"Address": "type.googleapis.com/istio.workload.Address",
                 "Authorization": "type.googleapis.com/istio.security.Authorization"}
    return {name: {"type_url": type_urls[msg.DESCRIPTOR.name],
                   "hex": msg.SerializeToString(deterministic=True).hex()}
            for name, msg in out.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--future-fields", action="store_true")
    args = parser.parse_args()
    pool = build_pool(args.future_fields)
    print(json.dumps(cases(pool, args.future_fields)))


if __name__ == "__main__":
    main()
