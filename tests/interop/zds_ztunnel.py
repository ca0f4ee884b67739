#!/usr/bin/env python3
"""An independent ZDS peer on ztunnel's side (``istio.workload.zds``), stdlib only.

ztunnel connects to the node agent's socket (``SOCK_SEQPACKET``, one message per packet), sends
``ZdsHello``, then answers every ``WorkloadRequest`` with a ``WorkloadResponse``. This script does
the same, decoding each request by hand from the field numbers of Istio ztunnel's
``proto/zds.proto`` (not from generated code, nor from Ambit's):

    ZdsHello         { Version version = 1; }                 NOT_USED = 0, V1 = 1
    WorkloadRequest  { oneof payload { AddWorkload add = 1; KeepWorkload keep = 5;
                                       DelWorkload del = 2; SnapshotSent snapshot_sent = 3; } }
    AddWorkload      { string uid = 1; WorkloadInfo workload_info = 2; }
    WorkloadInfo     { string name = 1; string namespace = 2; string service_account = 3; }
                     (4 is reserved: the removed trust_domain)
    KeepWorkload     { string uid = 1; }
    DelWorkload      { string uid = 2; }
    SnapshotSent     { }
    WorkloadResponse { oneof payload { Ack ack = 1; } }
    Ack              { string error = 1; }                    "" acks, anything else nacks

Add and Keep carry the pod's network namespace as one fd (``SCM_RIGHTS``); the script reports
what it received: how many fds, and for the first its ``/proc/self/fd`` link, its ``fstat`` inode
and device, and whether it lives on nsfs (the device of this process's own
``/proc/self/ns/net``), i.e. is a namespace file.

It prints one JSON line per event and flushes:

    {"connected": path}
    {"message": "add"|"keep"|"del"|"snapshot_sent"|"unknown", "uid": str, "workload_info":
     {"name", "namespace", "service_account"} | null, "fds": int, "fd_link": str | null,
     "fd_inode": int | null, "fd_dev": int | null, "fd_nsfs": bool, "unknown_fields": [str],
     "acked": bool,
     "raw": hex}
    {"closed": str}                            (the agent closed the connection, or an error)

``--nack UID`` answers Adds for that uid with an error. It exits at stdin EOF or when the agent
closes the connection.

Usage: zds_ztunnel.py --socket /run/ztunnel/ztunnel.sock [--nack UID]...
"""

import argparse
import array
import json
import os
import select
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
    return varint(number << 3 | 2) + varint(len(payload)) + payload


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
    """[(field number, wire type, value)] in wire order (varints as int, others as bytes)."""
    fields, pos = [], 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
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
        fields.append((number, wire, value))
    return fields


def strings(data, known, where, unknown):
    """Decodes a message of string fields {number: name}; notes any other field."""
    out = {name: "" for name in known.values()}
    for number, wire, value in parse(data):
        if number in known and wire == 2:
            out[known[number]] = value.decode("utf-8")
        else:
            unknown.append(f"{where}.{number}")
    return out


def decode_request(packet):
    """WorkloadRequest → (kind, uid, workload_info, unknown fields)."""
    unknown = []
    kind, uid, info = "unknown", "", None
    payloads = []
    for number, wire, value in parse(packet):
        names = {1: "add", 5: "keep", 2: "del", 3: "snapshot_sent"}
        if number in names and wire == 2:
            payloads.append((names[number], value))
        else:
            unknown.append(f"WorkloadRequest.{number}")
    if len(payloads) != 1:
        unknown.append(f"WorkloadRequest: {len(payloads)} payloads set in a oneof")
    if payloads:
        kind, body = payloads[-1]
        if kind == "add":
            for number, wire, value in parse(body):
                if number == 1 and wire == 2:
                    uid = value.decode("utf-8")
                elif number == 2 and wire == 2:
                    info = strings(value, {1: "name", 2: "namespace", 3: "service_account"},
                                   "WorkloadInfo", unknown)
                else:
                    unknown.append(f"AddWorkload.{number}")
        elif kind == "keep":
            uid = strings(body, {1: "uid"}, "KeepWorkload", unknown)["uid"]
        elif kind == "del":
            uid = strings(body, {2: "uid"}, "DelWorkload", unknown)["uid"]
        else:
            for number, _, _ in parse(body):
                unknown.append(f"SnapshotSent.{number}")
    return kind, uid, info, unknown


def response(error=""):
    ack = field_bytes(1, error.encode("utf-8")) if error else b""
    return field_bytes(1, ack)  # WorkloadResponse.ack = 1


def hello():
    return varint(1 << 3 | 0) + varint(1)  # ZdsHello.version = V1


def emit(record):
    print(json.dumps(record), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--nack", action="append", default=[])
    args = parser.parse_args()

    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(args.socket)
        conn.sendall(hello())
    except OSError as err:
        emit({"closed": f"connect: {err}"})
        return
    emit({"connected": args.socket})

    stdin = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([conn, stdin], [], [])
        if stdin in ready and not os.read(stdin, 4096):
            emit({"closed": "stdin EOF"})
            break
        if conn not in ready:
            continue
        fds = array.array("i")
        try:
            packet, ancillary, flags, _ = conn.recvmsg(65536, socket.CMSG_SPACE(16 * fds.itemsize))
        except OSError as err:
            emit({"closed": f"recvmsg: {err}"})
            break
        if not packet:
            emit({"closed": "the node agent closed the connection"})
            break
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - (len(data) % fds.itemsize)])
        record = {"message": "unknown", "uid": "", "workload_info": None, "fds": len(fds),
                  "fd_link": None, "fd_inode": None, "fd_dev": None, "fd_nsfs": False,
                  "unknown_fields": [],
                  "acked": False, "raw": packet.hex(), "truncated": bool(flags & socket.MSG_CTRUNC)}
        try:
            kind, uid, info, unknown = decode_request(packet)
            record.update(message=kind, uid=uid, workload_info=info, unknown_fields=unknown)
        except (ValueError, UnicodeDecodeError) as err:
            record["unknown_fields"].append(f"undecodable: {err}")
            kind, uid = "unknown", ""
        if fds:
            record["fd_link"] = os.readlink(f"/proc/self/fd/{fds[0]}")
            st = os.fstat(fds[0])
            record["fd_inode"], record["fd_dev"] = st.st_ino, st.st_dev
            record["fd_nsfs"] = st.st_dev == os.stat("/proc/self/ns/net").st_dev
        for fd in fds:
            os.close(fd)
        error = ""
        if kind == "add" and uid in args.nack:
            error = f"zds_ztunnel.py refuses {uid}"
        elif kind == "unknown":
            error = "zds_ztunnel.py cannot decode the request"
        try:
            conn.sendall(response(error))
            record["acked"] = error == ""
        except OSError as err:
            record["unknown_fields"].append(f"answer failed: {err}")
        emit(record)
    conn.close()


if __name__ == "__main__":
    main()
