#!/usr/bin/env python3
"""A thread-per-connection HTTP/1.1 server (http.server's ThreadingHTTPServer,
keep-alive) whose routes burn CPU, measuring what each request burned.

  GET /heavy?units=N  and  GET /light?units=N   burn N units of CPU (a
      fixed loop) in the handler, between reading the request and writing
      its response; the thread's CPU time over the burn is added to the
      route's total and, for a request carrying a traceparent, to that
      trace's.
  GET /stats          {"routes": {route: {"cpu_ns", "requests"}},
                       "traces": {trace id hex: {"route", "cpu_ns"}},
                       "background_cpu_ns", "pid"}

A background thread named "bgburn" (its kernel thread name, set with
prctl) burns CPU outside any request, --background-duty of the time (0: no
such thread).

  cpu_routes_server.py --port 0 [--background-duty 0.2] [--tls CERT KEY]
(--tls: HTTPS, through Python's ssl module, i.e. the system's libssl)
prints "ready PORT PID" once listening; SIGTERM stops it.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PR_SET_NAME = 15
LOOP_PER_UNIT = 20000       # ~1 ms of CPU per unit on this machine

lock = threading.Lock()
routes = {"/heavy": {"cpu_ns": 0, "requests": 0}, "/light": {"cpu_ns": 0, "requests": 0}}
traces: dict = {}
background = {"cpu_ns": 0}


def burn(units: int) -> int:
    """Burn units of CPU; the thread CPU time it took (ns)."""
    t0 = time.thread_time_ns()
    x = 0
    for i in range(units * LOOP_PER_UNIT):
        x += i * i % 7
    return time.thread_time_ns() - t0


def name_thread(name: bytes) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


def background_burner(duty: float, stop: threading.Event) -> None:
    name_thread(b"bgburn")
    while not stop.is_set():
        spent = burn(5)
        with lock:
            background["cpu_ns"] += spent
        stop.wait(0.005 * (1 - duty) / duty)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/stats":
            with lock:
                body = json.dumps({"routes": routes, "traces": traces, "background_cpu_ns": background["cpu_ns"],
                                   "pid": os.getpid()}).encode()
        elif url.path in routes:
            units = int(parse_qs(url.query).get("units", ["1"])[0])
            spent = burn(units)
            tp = self.headers.get("traceparent")
            with lock:
                routes[url.path]["cpu_ns"] += spent
                routes[url.path]["requests"] += 1
                if tp:
                    traces[tp.split("-")[1]] = {"route": url.path, "cpu_ns": spent}
            body = b"done\n"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--background-duty", type=float, default=0.2)
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    args = ap.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    if args.tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*args.tls)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    stop = threading.Event()
    if args.background_duty > 0:
        threading.Thread(target=background_burner, args=(args.background_duty, stop), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"ready {server.server_address[1]} {os.getpid()}", flush=True)
    server.serve_forever()
    stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
