"""A gRPC server and client on Python's grpcio for the waypoint's gRPC tests.

Messages are raw bytes (no protobuf): grpcio passes them through when no serializers are given.

    grpc_peer.py server ADDRESS NAME [--max-connection-age-ms MS] [--max-concurrent-streams N]
        Serves test.Echo until killed and prints "ready" once listening.
        Unary       answers NAME + b":" + the request (an x-test header comes back in the
                    x-seen-test trailer).
        Stream      answers b"first", waits 1.5 s, answers b"last".
        Bidi        echoes every message.
        Slow        waits 2 s, then answers like Unary (a deadline ends it first).
        Unavailable answers UNAVAILABLE while the file named by the request exists, deleting it.
        Collect     reads the client's stream and answers b"<messages>:<bytes>"; while the file
                    named by the x-marker header exists, it deletes it after reading x-read
                    (default 1) messages and answers UNAVAILABLE, the client still sending.
        Watch       answers b"first", then waits (up to 20 s) for the client to cancel and
                    creates the file named by the request when it sees the cancellation.

    grpc_peer.py client TARGET MODE [ARGS]
        Prints one JSON line with what happened.
        unary N               N unary calls on one channel: ok, failures, names, seconds
        stream                one server-streaming call: messages, first_at, end_at (seconds)
        bidi N                a bidirectional stream of N messages: sent, echoed, in_order
        call METHOD [TIMEOUT_MS] [PAYLOAD]  one unary call: code, details, trailing metadata
        collect N SIZE GAP_MS MARKER [READ]  one client-streaming call of N messages of SIZE
                              bytes, GAP_MS apart: code, details, answer
        cancel PAYLOAD        calls Watch, cancels after the first message: first
"""

import json
import os
import sys
import threading
import time
from concurrent import futures

import grpc


def serve(address, name, max_age_ms, max_streams):
    def unary(request, context):
        seen = dict(context.invocation_metadata()).get("x-test")
        if seen is not None:
            context.set_trailing_metadata((("x-seen-test", seen),))
        return name.encode() + b":" + request

    def stream(request, context):
        yield b"first"
        time.sleep(1.5)
        yield b"last"

    def bidi(requests, context):
        for message in requests:
            yield message

    def slow(request, context):
        time.sleep(2)
        return unary(request, context)

    def unavailable(request, context):
        marker = request.decode()
        if os.path.exists(marker):
            os.remove(marker)
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return unary(request, context)

    def watch(request, context):
        yield b"first"
        deadline = time.monotonic() + 20
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not context.is_active():
            open(request.decode(), "w").close()

    def collect(requests, context):
        metadata = dict(context.invocation_metadata())
        marker = metadata.get("x-marker", "")
        messages = [next(requests) for _ in range(int(metadata.get("x-read", "1")))]
        if marker and os.path.exists(marker):
            os.remove(marker)
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        messages += list(requests)
        return b"%d:%d" % (len(messages), sum(len(m) for m in messages))

    handlers = {
        "Collect": grpc.stream_unary_rpc_method_handler(collect),
        "Watch": grpc.unary_stream_rpc_method_handler(watch),
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Unavailable": grpc.unary_unary_rpc_method_handler(unavailable),
    }
    options = []
    if max_age_ms:
        # The server sends GOAWAY once a connection is this old.
        options += [
            ("grpc.max_connection_age_ms", max_age_ms),
            ("grpc.max_connection_age_grace_ms", 5000),
        ]
    if max_streams:
        # Advertised in SETTINGS: streams a client may open at once on one connection.
        options.append(("grpc.max_concurrent_streams", max_streams))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    if server.add_insecure_port(address) == 0:
        sys.exit(f"cannot listen on {address}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def client(target, mode, args):
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=10)
    if mode == "unary":
        call = channel.unary_unary("/test.Echo/Unary")
        n = int(args[0])
        ok, failures, names = 0, [], {}
        start = time.monotonic()
        for i in range(n):
            payload = f"call-{i}".encode()
            try:
                answer = call(payload, timeout=10)
                pod, _, echoed = answer.partition(b":")
                if echoed == payload:
                    ok += 1
                    names[pod.decode()] = names.get(pod.decode(), 0) + 1
                else:
                    failures.append(f"call {i}: wrong answer {answer!r}")
            except grpc.RpcError as e:
                failures.append(f"call {i}: {e.code().name}: {e.details()}")
        result = {"ok": ok, "failures": failures[:5], "names": names,
                  "seconds": time.monotonic() - start}
    elif mode == "stream":
        call = channel.unary_stream("/test.Echo/Stream")
        start = time.monotonic()
        messages, first_at = [], None
        for message in call(b"go", timeout=20):
            if first_at is None:
                first_at = time.monotonic() - start
            messages.append(message.decode())
        result = {"messages": messages, "first_at": first_at, "end_at": time.monotonic() - start}
    elif mode == "bidi":
        call = channel.stream_stream("/test.Echo/Bidi")
        n = int(args[0])
        sent = []

        def requests():
            for i in range(n):
                message = f"message-{i}-".encode() * 8
                sent.append(message)
                yield message

        echoed = list(call(requests(), timeout=60))
        result = {"sent": len(sent), "echoed": len(echoed), "in_order": echoed == sent}
    elif mode == "call":
        method = args[0]
        timeout = int(args[1]) / 1000 if len(args) > 1 and args[1] != "-" else 20
        payload = args[2].encode() if len(args) > 2 else b"x"
        call = channel.unary_unary(f"/test.Echo/{method}")
        start = time.monotonic()
        try:
            answer, rpc = call.with_call(payload, timeout=timeout)
            result = {"code": "OK", "answer": answer.decode(),
                      "trailers": dict(rpc.trailing_metadata() or ())}
        except grpc.RpcError as e:
            result = {"code": e.code().name, "details": e.details(),
                      "trailers": dict(e.trailing_metadata() or ())}
        result["seconds"] = time.monotonic() - start
    elif mode == "collect":
        n, size, gap = int(args[0]), int(args[1]), int(args[2]) / 1000
        metadata = [("x-marker", args[3])] + ([("x-read", args[4])] if len(args) > 4 else [])

        def requests():
            for i in range(n):
                if i:
                    time.sleep(gap)
                yield bytes([i % 256]) * size

        try:
            answer = channel.stream_unary("/test.Echo/Collect")(
                requests(), timeout=30, metadata=metadata)
            result = {"code": "OK", "answer": answer.decode()}
        except grpc.RpcError as e:
            result = {"code": e.code().name, "details": e.details()}
    elif mode == "cancel":
        call = channel.unary_stream("/test.Echo/Watch")(args[0].encode(), timeout=30)
        first = next(call).decode()
        call.cancel()
        result = {"first": first}
    else:
        sys.exit(f"unknown mode {mode}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        age = 0
        if "--max-connection-age-ms" in sys.argv:
            age = int(sys.argv[sys.argv.index("--max-connection-age-ms") + 1])
        streams = 0
        if "--max-concurrent-streams" in sys.argv:
            streams = int(sys.argv[sys.argv.index("--max-concurrent-streams") + 1])
        serve(sys.argv[2], sys.argv[3], age, streams)
    else:
        client(sys.argv[2], sys.argv[3], sys.argv[4:])
