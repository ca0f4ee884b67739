#!/usr/bin/env python3
"""An independent ZDS node agent (the istio-cni side of ``istio.workload.zds``), stdlib only.

The protobuf messages are encoded and decoded by hand from the field numbers of ztunnel's
``proto/zds.proto`` (varints and length-delimited fields), not from generated code:

    ZdsHello         { Version version = 1; }            V1 = 1
    WorkloadRequest  { oneof { AddWorkload add = 1; DelWorkload del = 2;
                               SnapshotSent snapshot_sent = 3; KeepWorkload keep = 5; } }
    AddWorkload      { string uid = 1; WorkloadInfo workload_info = 2; }
    WorkloadInfo     { string name = 1; string namespace = 2; string service_account = 3; }
    DelWorkload      { string uid = 2; }
    WorkloadResponse { Ack ack = 1; }
    Ack              { string error = 1; }                "" is an ack

It listens on ``--socket`` (``SOCK_SEQPACKET``, one message per packet), prints
``{"listening": path}``, accepts one ztunnel, reads its ``ZdsHello``, sends one ``AddWorkload`` per
``--pod`` with the pod's netns fd attached (``SCM_RIGHTS``), then ``SnapshotSent``, reading the
answer to each. It prints the record as one JSON line:

    {"hello_version": int, "messages": [{"sent": "add <uid>" | "snapshot_sent", "ack": bool,
     "error": str}], "error": str | null}

and keeps the connection open until stdin reaches EOF (ztunnel keeps serving the pods), then exits.

Usage: zds_agent.py --socket /tmp/x.sock
       --pod uid=<uid>,name=<name>,namespace=<ns>,sa=<sa>,netns=/var/run/netns/<netns> ...
"""

import argparse
import json
import os
import socket
import sys


# --- protobuf wire format by hand ---

def varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_bytes(number, payload):
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def field_string(number, value):
    return field_bytes(number, value.encode("utf-8")) if value else b""


def read_varint(data, pos):
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def parse(data):
    """Decodes one message into {field number: [values]} (varints as int, others as bytes)."""
    fields, pos = {}, 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(data, pos)
        elif wire == 2:
            length, pos = read_varint(data, pos)
            value = bytes(data[pos:pos + length])
            if len(value) != length:
                raise ValueError("truncated length-delimited field")
            pos += length
        elif wire == 1:
            value, pos = bytes(data[pos:pos + 8]), pos + 8
        elif wire == 5:
            value, pos = bytes(data[pos:pos + 4]), pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def add_workload(uid, name, namespace, service_account):
    info = (field_string(1, name) + field_string(2, namespace)
            + field_string(3, service_account))
    add = field_string(1, uid) + field_bytes(2, info)
    return field_bytes(1, add)  # WorkloadRequest.add = 1


def snapshot_sent():
    return field_bytes(3, b"")  # WorkloadRequest.snapshot_sent = 3, an empty message


def decode_ack(packet):
    """Returns (is_ack, error) for a WorkloadResponse."""
    response = parse(packet)
    if 1 not in response:
        raise ValueError(f"a WorkloadResponse without an Ack: {packet.hex()}")
    ack = parse(response[1][0])
    error = ack.get(1, [b""])[0].decode("utf-8", "replace")
    return error == "", error


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--pod", action="append", default=[])
    parser.add_argument("--timeout", type=float, default=15.0)
    args = parser.parse_args()

    pods = []
    for spec in args.pod:
        pods.append(dict(item.split("=", 1) for item in spec.split(",")))

    try:
        os.unlink(args.socket)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(args.socket)
    listener.listen(8)
    listener.settimeout(args.timeout)
    print(json.dumps({"listening": args.socket}), flush=True)

    record = {"hello_version": None, "messages": [], "error": None}
    try:
        conn, _ = listener.accept()
        conn.settimeout(5.0)  # the CNI's read/write deadline
        hello = parse(conn.recv(1024))
        record["hello_version"] = hello.get(1, [0])[0]
        for pod in pods:
            message = add_workload(pod["uid"], pod["name"], pod.get("namespace", "default"),
                                   pod.get("sa", ""))
            netns = os.open(pod["netns"], os.O_RDONLY | os.O_CLOEXEC)
            try:
                socket.send_fds(conn, [message], [netns])
            finally:
                os.close(netns)
            ok, error = decode_ack(conn.recv(1024))
            record["messages"].append({"sent": f"add {pod['uid']}", "ack": ok, "error": error})
        conn.send(snapshot_sent())
        ok, error = decode_ack(conn.recv(1024))
        record["messages"].append({"sent": "snapshot_sent", "ack": ok, "error": error})
    except (OSError, ValueError, KeyError) as err:
        record["error"] = f"{type(err).__name__}: {err}"
        print(json.dumps(record), flush=True)
        sys.exit(0)
    print(json.dumps(record), flush=True)

    # Hold the connection (ztunnel would otherwise reconnect) until the test is done with us.
    sys.stdin.read()
    conn.close()


if __name__ == "__main__":
    main()
