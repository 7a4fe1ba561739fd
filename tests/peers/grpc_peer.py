#!/usr/bin/env python3
"""A gRPC server and client (grpcio, generic handlers, raw bytes: no protoc),
each run as its own process by tests/h2_peers.py, so their traffic is
another process's than the test's.

Service demo.Echo:
  Unary   returns the request: OK
  Fail    context.abort(NOT_FOUND, "no such thing")
  Slow    waits up to --slow-seconds (2 s), or until the call ends: the
          client's deadline (shorter) passes first, DEADLINE_EXCEEDED
  Stream  server streaming: as many messages as the request's ASCII number

server: grpc_peer.py server [--tls CERT KEY] [--port 0] [--slow-seconds 2]
  prints "ready PORT PID" once listening. Counts per (method, code) as the
  server saw them; SIGUSR2 dumps them to --counts FILE (atomically, with a
  sequence number and the calls still in their handler); SIGTERM/SIGINT
  dumps them, stops the server (1 s grace) and exits 0.

  What the server "saw" is what its handler did: OK when the handler
  returned (or finished streaming), the code given to context.abort(), and
  for a call that ended while its handler still ran (grpc cancels the call
  on the server too once the grpc-timeout the client sent has passed, or
  when the client resets the stream) DEADLINE_EXCEEDED if the call's
  deadline had passed by then (context.time_remaining() <= 0), else
  CANCELLED. grpcio hands the server application no status of its own for
  such a call: this is inferred from the deadline, as an application would.

client: grpc_peer.py client --target HOST:PORT [--tls CERT] [--unary N]
        [--fail N] [--slow N] [--stream N] [--stream-messages K]
        [--deadline 0.2] [--traceparent none|random|VALUE] [--parallel P]
        [--linger S]
  makes the calls in that order (Unary, Fail, Slow, Stream; --parallel P
  keeps up to P calls in flight on its one channel, one HTTP/2
  connection), then prints one JSON object: {"pid", "calls": [{"method",
  "code", "traceparent", "messages", "details"}]}. traceparent "random" sends
  a fresh sampled W3C traceparent with every call, VALUE sends that one.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import threading
import time
from concurrent import futures

import grpc

SERVICE = "demo.Echo"


def _ident(b: bytes) -> bytes:
    return b


class Counts:
    def __init__(self):
        self.lock = threading.Lock()
        self.by_key: dict = {}
        self.in_flight = 0
        self.seq = 0

    def begin(self) -> None:
        with self.lock:
            self.in_flight += 1

    def end(self, method: str, code: str) -> None:
        with self.lock:
            self.by_key[(method, code)] = self.by_key.get((method, code), 0) + 1
            self.in_flight -= 1

    def dump(self, path: str) -> None:
        with self.lock:
            self.seq += 1
            doc = {"seq": self.seq, "pid": os.getpid(), "in_flight": self.in_flight,
                   "counts": [[m, c, n] for (m, c), n in sorted(self.by_key.items())]}
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)


def _ended_code(context) -> str:
    """The code of a call that is no longer active while its handler runs."""
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


def serve(args) -> int:
    counts = Counts()
    slow_s = args.slow_seconds

    def counted(method: str, fn, streaming: bool = False):
        path = f"/{SERVICE}/{method}"

        def code_after(context, exc) -> str:
            if not context.is_active():
                return _ended_code(context)
            code = context.code()     # set by context.abort() / set_code()
            if code is not None:
                return code.name
            return "UNKNOWN" if exc is not None else "OK"

        if streaming:
            def handler(request, context):
                counts.begin()
                exc = None
                try:
                    yield from fn(request, context)
                except BaseException as e:  # abort() raises; grpc needs it re-raised
                    exc = e
                    raise
                finally:
                    counts.end(path, code_after(context, exc))
            return grpc.unary_stream_rpc_method_handler(handler, request_deserializer=_ident,
                                                        response_serializer=_ident)

        def handler(request, context):
            counts.begin()
            exc = None
            try:
                return fn(request, context)
            except BaseException as e:
                exc = e
                raise
            finally:
                counts.end(path, code_after(context, exc))
        return grpc.unary_unary_rpc_method_handler(handler, request_deserializer=_ident,
                                                   response_serializer=_ident)

    def unary(request, context):
        return request

    def fail(request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    def slow(request, context):
        done = threading.Event()
        context.add_callback(done.set)    # runs when the call ends: deadline, cancel, or after we return
        done.wait(slow_s)
        return request

    def stream(request, context):
        n = int(request or b"0")
        for i in range(n):
            yield b"message %d" % i

    handlers = {"Unary": counted("Unary", unary), "Fail": counted("Fail", fail),
                "Slow": counted("Slow", slow), "Stream": counted("Stream", stream, streaming=True)}
    # SO_REUSEPORT off: a second server may not share the port unnoticed
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    addr = f"127.0.0.1:{args.port}"
    if args.tls:
        cert, key = (open(p, "rb").read() for p in args.tls)
        port = server.add_secure_port(addr, grpc.ssl_server_credentials([(key, cert)]))
    else:
        port = server.add_insecure_port(addr)
    if not port:
        print(f"cannot listen on {addr}", file=sys.stderr)
        return 1
    server.start()

    stop = threading.Event()
    dump_wanted = threading.Event()
    signal.signal(signal.SIGUSR2, lambda *_: dump_wanted.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"ready {port} {os.getpid()}", flush=True)
    while not stop.is_set():
        stop.wait(0.05)
        if dump_wanted.is_set():
            dump_wanted.clear()
            counts.dump(args.counts)
    server.stop(1).wait(5)
    counts.dump(args.counts)
    return 0


def _traceparent(mode: str):
    if mode == "none":
        return None
    if mode == "random":
        return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    return mode


def client(args) -> int:
    opts = [("grpc.enable_http_proxy", 0)]    # loopback only, whatever the environment says
    if args.tls:
        creds = grpc.ssl_channel_credentials(root_certificates=open(args.tls, "rb").read())
        channel = grpc.secure_channel(args.target, creds, options=opts)
    else:
        channel = grpc.insecure_channel(args.target, options=opts)
    grpc.channel_ready_future(channel).result(timeout=10)
    stubs = {m: channel.unary_unary(f"/{SERVICE}/{m}", request_serializer=_ident, response_deserializer=_ident)
             for m in ("Unary", "Fail", "Slow")}
    stubs["Stream"] = channel.unary_stream(f"/{SERVICE}/Stream", request_serializer=_ident,
                                           response_deserializer=_ident)
    plan = ["Unary"] * args.unary + ["Fail"] * args.fail + ["Slow"] * args.slow + ["Stream"] * args.stream

    def call(method: str) -> dict:
        tp = _traceparent(args.traceparent)
        md = [("traceparent", tp)] if tp else None
        timeout = args.deadline if method == "Slow" else 10.0
        out = {"method": f"/{SERVICE}/{method}", "traceparent": tp, "messages": 0, "details": None}
        try:
            if method == "Stream":
                for _msg in stubs[method](str(args.stream_messages).encode(), timeout=timeout, metadata=md):
                    out["messages"] += 1
            else:
                stubs[method](b"ping", timeout=timeout, metadata=md)
                out["messages"] = 1
            out["code"] = "OK"
        except grpc.RpcError as e:
            out["code"], out["details"] = e.code().name, e.details()
        return out

    if args.parallel > 1:
        with futures.ThreadPoolExecutor(max_workers=args.parallel) as pool:
            calls = list(pool.map(call, plan))
    else:
        calls = [call(m) for m in plan]
    channel.close()
    json.dump({"pid": os.getpid(), "calls": calls}, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    time.sleep(args.linger)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    s.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    s.add_argument("--counts", required=True, help="file the counts are dumped to (SIGUSR2, exit)")
    s.add_argument("--slow-seconds", type=float, default=2.0)
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--tls", metavar="CERT", help="trust this certificate (TLS)")
    for m in ("unary", "fail", "slow", "stream"):
        c.add_argument(f"--{m}", type=int, default=0, help=f"{m} calls")
    c.add_argument("--stream-messages", type=int, default=3)
    c.add_argument("--deadline", type=float, default=0.2, help="s, the Slow calls' deadline")
    c.add_argument("--traceparent", default="none", help="none, random (a new one per call), or a value")
    c.add_argument("--parallel", type=int, default=1)
    c.add_argument("--linger", type=float, default=0.0, help="s to stay alive after the calls")
    args = ap.parse_args()
    return serve(args) if args.role == "server" else client(args)


if __name__ == "__main__":
    sys.exit(main())
