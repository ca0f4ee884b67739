#!/usr/bin/env python3
"""An independent HBONE server: Python's ``ssl`` (OpenSSL) and the ``h2`` package, nothing of Ambit.

It listens on ``--listen`` (port 0 picks one), prints ``{"listening": "<ip:port>"}`` on stdout,
and serves exactly one connection: TLS 1.3 only, ALPN ``h2``, a client certificate required and
verified against ``--ca``. It answers the first request with 200 and echoes the stream's bytes
back, half-closing when the client does. Then it prints the record of what it saw as one JSON line
and exits:

    {"error": str | null, "tls_version": str, "alpn": str, "client_san": [str],
     "method": str, "authority": str, "headers": {name: value}, "received": str}

``headers`` holds the regular (non-pseudo) request headers; ``error`` is set when the handshake or
HTTP/2 failed (then the rest may be empty).

Usage: hbone_server.py --cert chain.pem --key key.pem --ca roots.pem [--listen 127.0.0.1:0]
"""

import argparse
import json
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


def text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(args.ca)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.set_alpn_protocols(["h2"])

    host, port = args.listen.rsplit(":", 1)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(1)
    listener.settimeout(args.timeout)
    bound = listener.getsockname()
    print(json.dumps({"listening": f"{bound[0]}:{bound[1]}"}), flush=True)

    record = {"error": None, "tls_version": None, "alpn": None, "client_san": [],
              "method": None, "authority": None, "headers": {}, "received": ""}

    def finish(error=None):
        if error is not None and record["error"] is None:
            record["error"] = error
        print(json.dumps(record), flush=True)
        sys.exit(0)

    try:
        raw, _peer = listener.accept()
    except OSError as err:
        finish(f"accept: {err}")
    raw.settimeout(args.timeout)
    try:
        tls = ctx.wrap_socket(raw, server_side=True)
    except (OSError, ssl.SSLError) as err:
        finish(f"handshake: {err}")
    record["tls_version"] = tls.version()
    record["alpn"] = tls.selected_alpn_protocol()
    cert = tls.getpeercert() or {}
    record["client_san"] = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]

    conn = h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=False, validate_inbound_headers=True))
    conn.initiate_connection()
    received = bytearray()
    stream_id = None
    try:
        tls.sendall(conn.data_to_send())
        while True:
            data = tls.recv(65536)
            if not data:
                finish("the client closed the connection before the stream ended")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived) and stream_id is None:
                    stream_id = event.stream_id
                    for name, value in event.headers:
                        name, value = text(name), text(value)
                        if name == ":method":
                            record["method"] = value
                        elif name == ":authority":
                            record["authority"] = value
                        elif not name.startswith(":"):
                            record["headers"][name] = value
                    conn.send_headers(stream_id, [(":status", "200")], end_stream=False)
                elif isinstance(event, h2.events.DataReceived):
                    received += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    if event.stream_id == stream_id and event.data:
                        conn.send_data(stream_id, event.data, end_stream=False)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                    conn.end_stream(stream_id)
                    tls.sendall(conn.data_to_send())
                    record["received"] = received.decode("utf-8", "replace")
                    finish()
                elif isinstance(event, h2.events.StreamReset):
                    finish(f"stream reset, error code {event.error_code}")
                elif isinstance(event, h2.events.ConnectionTerminated):
                    finish(f"GOAWAY, error code {event.error_code}")
            tls.sendall(conn.data_to_send())
    except (OSError, ssl.SSLError, h2.exceptions.ProtocolError) as err:
        finish(f"{type(err).__name__}: {err}")


if __name__ == "__main__":
    main()
