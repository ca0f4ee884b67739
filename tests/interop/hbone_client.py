#!/usr/bin/env python3
"""An independent HBONE client: Python's ``ssl`` (OpenSSL) and the ``h2`` package, nothing of Ambit.

It opens one mTLS connection (TLS 1.3 only, ALPN ``h2``, no SNI, the server's chain verified against
``--ca`` but no host name check, as Istio's ztunnel does), sends one HTTP/2 request (``CONNECT`` with
``:authority`` plus ``forwarded``/``baggage``/``traceparent`` by default), and if the answer is 200
sends ``--payload``, half-closes and reads everything back.

It always prints one JSON object on stdout and exits 0, so the driving test can say what happened:

    {"stage": "done" | "tls" | "http2", "error": str | null, "tls_version": str, "alpn": str,
     "peer_san": [str], "status": int | null, "headers": {name: value}, "echoed": str,
     "echoed_bytes": int}

``stage`` is where it stopped: ``tls`` (the handshake or the first read failed, e.g. the server
refused the client certificate), ``http2`` (HTTP/2 failed or the stream was reset), ``done``.

Usage: hbone_client.py --address 127.0.0.1:15008 --ca roots.pem [--cert chain.pem --key key.pem]
       [--method CONNECT] [--authority 10.0.0.1:80] [--payload text] [--header name=value ...]
       [--no-default-headers]
"""

import argparse
import json
import os
import socket
import ssl
import sys

try:
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions
except ImportError:  # pragma: no cover - reported to the driving test
    print("python h2 is missing: pip install h2", file=sys.stderr)
    sys.exit(3)

DEFAULT_HEADERS = [
    ("forwarded", 'for="10.0.0.7:41234"'),
    ("baggage", "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,"
                "k8s.deployment.name=sleep,service.name=sleep,service.version=v1"),
    ("traceparent", "00-" + os.urandom(16).hex() + "-" + os.urandom(8).hex() + "-00"),
]


def san_uris(cert):
    """The URI SANs of a certificate as ``getpeercert()`` returns it."""
    if not cert:
        return []
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]


def text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--method", default="CONNECT")
    parser.add_argument("--authority", default="10.0.0.1:80")
    parser.add_argument("--payload", default="hello from python h2")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--no-default-headers", action="store_true")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()

    result = {"stage": "tls", "error": None, "tls_version": None, "alpn": None,
              "peer_san": [], "status": None, "headers": {}, "echoed": "",
              "echoed_bytes": 0, "sent_headers": {}}

    def finish(stage=None, error=None):
        if stage:
            result["stage"] = stage
        if error is not None:
            result["error"] = error
        print(json.dumps(result))
        sys.exit(0)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SPIFFE identities are URI SANs; no DNS name is checked
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(args.ca)
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key)
    ctx.set_alpn_protocols(["h2"])

    host, port = args.address.rsplit(":", 1)
    try:
        raw = socket.create_connection((host, int(port)), timeout=args.timeout)
        tls = ctx.wrap_socket(raw, server_hostname=None)  # no SNI, like ztunnel
    except (OSError, ssl.SSLError) as err:
        finish("tls", f"handshake: {err}")
    result["tls_version"] = tls.version()
    result["alpn"] = tls.selected_alpn_protocol()
    result["peer_san"] = san_uris(tls.getpeercert())

    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    if args.method == "CONNECT":
        headers = [(":method", "CONNECT"), (":authority", args.authority)]
    else:
        headers = [(":method", args.method), (":scheme", "https"),
                   (":authority", args.authority), (":path", "/")]
    extra = [] if args.no_default_headers else list(DEFAULT_HEADERS)
    for item in args.header:
        name, _, value = item.partition("=")
        extra.append((name.lower(), value))
    headers += extra
    result["sent_headers"] = dict(extra)
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(stream_id, headers, end_stream=False)
    got_first_bytes = False
    try:
        tls.sendall(conn.data_to_send())
        echoed = bytearray()
        payload_sent = False
        while True:
            data = tls.recv(65536)
            if not data:
                finish("tls" if not got_first_bytes else "http2",
                       "the server closed the connection")
            got_first_bytes = True
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    for name, value in event.headers:
                        result["headers"][text(name)] = text(value)
                    result["status"] = int(result["headers"].get(":status", "0"))
                    if result["status"] == 200 and not payload_sent:
                        conn.send_data(stream_id, args.payload.encode(), end_stream=True)
                        payload_sent = True
                elif isinstance(event, h2.events.DataReceived):
                    echoed += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    result["echoed"] = echoed.decode("utf-8", "replace")
                    result["echoed_bytes"] = len(echoed)
                    tls.sendall(conn.data_to_send())
                    finish("done")
                elif isinstance(event, h2.events.StreamReset):
                    finish("http2", f"stream reset, error code {event.error_code}")
                elif isinstance(event, h2.events.ConnectionTerminated):
                    finish("http2", f"GOAWAY, error code {event.error_code}")
            tls.sendall(conn.data_to_send())
    except ssl.SSLError as err:
        finish("tls" if not got_first_bytes else "http2", f"{err}")
    except (OSError, h2.exceptions.ProtocolError) as err:
        finish("tls" if not got_first_bytes else "http2", f"{type(err).__name__}: {err}")


if __name__ == "__main__":
    main()
