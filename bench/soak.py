#!/usr/bin/env python3
"""Soak: the agent's memory under a long mixed load must stay flat.

(Exports OTLP/HTTP to a local sink. The file exporter's JSON encoding costs
far more CPU per series than protobuf: measured ~30% of a core for this
load at a 2 s interval, against ~5% for the probes themselves.)

Runs `otelbpf run` with every probe while the host forks short-lived
processes, opens and closes TCP connections to ever-new ports, sends UDP to
many endpoints, serves HTTP for ever-new paths (/items/<id>, over keep-alive
and fresh connections) and burns CPU; samples the agent's RSS and CPU every
--sample seconds for --minutes, and prints them with the growth between the
second sample (after start-up) and the last.

Usage: python bench/soak.py [--minutes 10] [--sample 10] [--interval 2s]
"""
from __future__ import annotations

import argparse
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import yaml
from common import start_otlp_sink

ROOT = Path(__file__).resolve().parent.parent


def forks(stop):
    while not stop.is_set():
        subprocess.run(["sh", "-c", "cat /proc/self/status > /dev/null"])


def tcp(stop):
    while not stop.is_set():
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        for _ in range(20):
            c = socket.create_connection(srv.getsockname())
            a, _ = srv.accept()
            c.sendall(b"x" * 1000)
            a.recv(2000)
            a.close()
            c.close()
        srv.close()


def udp(stop):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    while not stop.is_set():
        s.sendto(b"y" * 100, ("127.0.0.1", random.randint(20000, 60000)))
        time.sleep(0.001)


class Items(BaseHTTPRequestHandler):
    """The HTTP load's server: every path is a new one, so route learning and
    the span path are exercised without end."""
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b"item " + self.path.encode()
        self.send_response(200 if random.random() < 0.95 else 500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def http(stop):
    import http.client
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Items)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    while not stop.is_set():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for _ in range(random.randint(1, 20)):  # keep-alive runs of varying length
            conn.request("GET", f"/items/{random.getrandbits(48)}?q={random.getrandbits(16)}",
                         headers={"User-Agent": f"soak/{random.randint(1, 50)}"})
            conn.getresponse().read()
        conn.close()
        time.sleep(0.005)
    srv.shutdown()


def cpu(stop):
    while not stop.is_set():
        sum(i * i for i in range(10000))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--sample", type=float, default=10)
    ap.add_argument("--interval", default="2s")
    args = ap.parse_args()
    sink, store = start_otlp_sink()
    endpoint = store.endpoint
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "c.yaml"
        cfg.write_text(yaml.safe_dump({"interval": args.interval, "health": "",
                                       "lock_file": str(Path(tmp) / "lock"),
                                       "exporters": {"otlp": {"endpoint": endpoint, "protocol": "http/protobuf"}}}))
        agent = subprocess.Popen([sys.executable, "-m", "collector.cli", "run", "--config", str(cfg)], cwd=ROOT,
                                 stderr=subprocess.PIPE, text=True)
        while "collecting every" not in agent.stderr.readline():
            if agent.poll() is not None:
                raise SystemExit(f"agent exited: {agent.stderr.read()}")
        threading.Thread(target=lambda: agent.stderr.read(), daemon=True).start()  # keep the pipe drained
        proc = psutil.Process(agent.pid)
        stop = threading.Event()
        workers = [threading.Thread(target=f, args=(stop,), daemon=True) for f in (forks, tcp, udp, http, cpu)]
        for w in workers:
            w.start()
        samples = []
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < args.minutes * 60:
                time.sleep(args.sample)
                t = proc.cpu_times()
                samples.append((time.monotonic() - t0, proc.memory_info().rss / 2 ** 20, t.user + t.system))
        finally:
            stop.set()
            agent.terminate()
            agent.wait(timeout=60)
    sink.shutdown()
    print(f"soak: {args.minutes:g} min, all probes, interval {args.interval}, OTLP/HTTP export "
          f"({store.received} requests), forks + TCP + UDP + HTTP + CPU load\n")
    print(f"{'t (s)':>7} {'RSS MiB':>8} {'CPU %':>6}")
    prev_t, prev_c = 0.0, samples[0][2] if samples else 0.0
    for t, rss, c in samples:
        print(f"{t:7.0f} {rss:8.1f} {100 * (c - prev_c) / max(t - prev_t, 1e-9):6.1f}")
        prev_t, prev_c = t, c
    if len(samples) >= 3:
        base, last = samples[1][1], samples[-1][1]
        print(f"\nRSS growth from the 2nd sample to the last: {last - base:+.1f} MiB ({100 * (last / base - 1):+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
