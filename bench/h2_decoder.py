#!/usr/bin/env python3
"""What the HTTP/2 decoder (probes/l7/http2.py) costs per exchange, in user
space, on records of real traffic: h2load's GETs against nginx (cleartext
HTTP/2, 10 streams in flight) and gRPC unary calls with a unique traceparent
each (grpcio, 10 in flight). The conversations are recorded by the tests'
relay and turned into the kernel's records first (tests/h2_recordings.py); only
Http2Tracker.feed and take_exchanges are timed, best of --rounds.

Usage: python bench/h2_decoder.py [--requests 5000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import h2_recordings as hp                                   # noqa: E402
from probes.l7.http2 import Http2Tracker                # noqa: E402


def h2load(n: int):
    with tempfile.TemporaryDirectory() as tmp, hp.nginx_h2c(Path(tmp), "keepalive_requests 1000000;") as port:
        relay = hp.Relay(port)
        try:
            hp.subprocess.run(["h2load", "-n", str(n), "-c", "1", "-m", "10", f"http://127.0.0.1:{relay.port}/hello"],
                              capture_output=True, timeout=120, check=True)
            relay.wait_closed(1)
        finally:
            relay.close()
    return relay.conns[0]


def grpc_unary(n: int):
    with hp.grpc_server() as port:
        relay = hp.Relay(port)
        ch = hp.grpc_channel(relay.port)
        try:
            for i in range(0, n, 10):
                calls = [hp.grpc_call(ch, "Unary", b"x" * 20, "00-%032x-%016x-01" % (i + j + 1, i + j + 1))
                         for j in range(10)]
                for f in calls:
                    f.result()
        finally:
            ch.close()
            try:
                relay.wait_closed(1)
            finally:
                relay.close()
    return relay.conns[0]


def cost(events, rounds: int):
    best = None
    for _ in range(rounds):
        tr = Http2Tracker()
        t = time.perf_counter()
        for ev in events:
            tr.feed(ev)
        exs = tr.take_exchanges()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    assert tr.stats["internal_error"] == 0 and tr.stats["partial"] == 0
    return best, len(exs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    for name, record in (("h2load GET (nginx)", h2load), ("gRPC unary, unique traceparent", grpc_unary)):
        events = hp.walk(record(args.requests))
        dt, n = cost(events, args.rounds)
        print(f"{name:32s} {n} exchanges, {len(events) / n:.1f} records each: "
              f"{dt / n * 1e6:.1f} us per exchange ({n / dt:,.0f} exchanges/s on one core)")


if __name__ == "__main__":
    main()
