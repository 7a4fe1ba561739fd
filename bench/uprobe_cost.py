#!/usr/bin/env python3
"""What one uprobe hit costs on this machine: the floor under TLS tracing.

1. libc's getppid() in a loop (bench/libc_getppid_loop.c), bare, with an
   empty uprobe on it (its first instruction, a mov, is single-stepped), then
   with an empty uretprobe too (bench/bpf/empty_uprobe.bpf.c).
2. The real libssl, per kind of place the http probe may use: SSL_read_ex()
   in a loop (bench/ssl_read_loop.c) with the empty pair on SSL_read_ex's
   entry (`sub`: single-stepped, the fallback) or on the internal function
   it calls (`push`: emulated since 5.9, where probes/uprobe_placement.py
   puts it).
3. Hits per TLS request: wrk against nginx over TLS with counting programs
   (bench/bpf/count_hits.bpf.c) on the places uprobe_placement chose, per
   side (nginx, wrk), divided by the requests nginx logged.

Usage: python bench/uprobe_cost.py [--calls 200000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

from common import ROOT, answered, build, start_nginx  # noqa: E402  (puts the checkout on sys.path)

from collector import libbpf  # noqa: E402
from probes.http import SSL_LIFECYCLE_FUNCS, libc_path  # noqa: E402
from probes.uprobe_placement import place  # noqa: E402

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"


def run(binary: str, calls: int) -> float:
    t = time.perf_counter()
    subprocess.run([binary, str(calls)], check=True)
    return (time.perf_counter() - t) / calls * 1e9


def pair_cost(obj, binary: str, calls: int, rounds: int, target: str, func=None, offset: int = 0) -> tuple:
    """(bare, + uprobe, + uretprobe too) ns per call of binary, best of rounds."""
    best = [min(run(binary, calls) for _ in range(rounds))]
    links = [obj.program("empty_uprobe").attach_uprobe(target, func, offset)]
    best.append(min(run(binary, calls) for _ in range(rounds)))
    links.append(obj.program("empty_uretprobe").attach_uprobe(target, func, offset, retprobe=True))
    best.append(min(run(binary, calls) for _ in range(rounds)))
    for link in links:
        link.close()
    return tuple(best)


def show(title: str, best: tuple) -> None:
    bare, up, both = best
    print(title)
    print(f"  bare                      {bare:8.0f}")
    print(f"  + empty uprobe            {up:8.0f}   (+{up - bare:.0f} per hit)")
    print(f"  + empty uretprobe as well {both:8.0f}   (+{both - up:.0f} per return)")


def hits_per_request(seconds: int) -> None:
    """Entry and return hits per TLS request on the places the http probe uses."""
    if not shutil.which("nginx") or not shutil.which("wrk"):
        print("hits per TLS request: needs nginx and wrk")
        return
    placement = place(LIBSSL)
    d = tempfile.mkdtemp(prefix="otelbpf-uprobe-")
    _plain_port, port = start_nginx(d)
    try:
        time.sleep(0.3)
        with libbpf.BpfObject(str(ROOT / "bench" / "bpf" / "count_hits.bpf.o")) as obj:
            obj.load()
            for group, site in placement.sites.items():
                func = None if site.offset is not None else site.covers[0]
                obj.program("count_entry").attach_uprobe(LIBSSL, func, site.offset or 0)
                if group not in SSL_LIFECYCLE_FUNCS:
                    obj.program("count_return").attach_uprobe(LIBSSL, func, site.offset or 0, retprobe=True)
            pids = {int(p) for p in subprocess.run(["pgrep", "-P", open(f"{d}/nginx.pid").read().strip()],
                                                   capture_output=True, text=True).stdout.split()}
            client = subprocess.Popen(["wrk", "-t2", "-c4", f"-d{seconds}s", f"https://127.0.0.1:{port}/"],
                                      stdout=subprocess.DEVNULL)
            client.wait()
            per = {struct.unpack("=I", k)[0]: struct.unpack("=QQ", v) for k, v in obj.map("hits").items()}
        requests = answered(f"{d}/access.log", port)
    finally:
        subprocess.run(["nginx", "-c", f"{d}/nginx.conf", "-s", "stop"], capture_output=True)
    print(placement.summary())
    print(f"hits per TLS request (wrk -c4 against nginx, {requests} requests, keep-alive):")
    for side, tgids in (("server (nginx)", pids), ("client (wrk)", {client.pid})):
        entry = sum(per.get(t, (0, 0))[0] for t in tgids)
        ret = sum(per.get(t, (0, 0))[1] for t in tgids)
        print(f"  {side:16s} {entry / max(requests, 1):5.2f} uprobe hits, {ret / max(requests, 1):5.2f} "
              "uretprobe hits")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=2, help="wrk run for the hits per request")
    args = ap.parse_args()
    binary = build("libc_getppid_loop")
    obj_path = ROOT / "bench" / "bpf" / "empty_uprobe.bpf.o"
    if not obj_path.exists() or not (ROOT / "bench" / "bpf" / "count_hits.bpf.o").exists():
        print(f"{obj_path.parent}/*.bpf.o missing: run `make bpf`", file=sys.stderr)
        return 2
    libc = libc_path()
    if libc is None:
        print("no libc.so.6 found to put the uprobe on", file=sys.stderr)
        return 2
    with libbpf.BpfObject(str(obj_path)) as obj:
        obj.load()
        show(f"libc getppid() (mov: single-stepped), {args.calls} calls, best of {args.rounds} "
             "(ns per call, process start included)", pair_cost(obj, binary, args.calls, args.rounds, libc,
                                                                "getppid"))
        if not os.path.exists(LIBSSL):
            print(f"{LIBSSL} not found: no libssl figures")
            return 0
        ssl_loop = build("ssl_read_loop", ["-lssl", "-lcrypto"])
        read = place(LIBSSL).sites.get("read")
        show(f"SSL_read_ex() on real libssl, probes on its entry (fallback placement), {args.calls} calls",
             pair_cost(obj, ssl_loop, args.calls, args.rounds, LIBSSL, "SSL_read_ex"))
        if read is None:
            print("uprobe_placement found no internal read function here: " + place(LIBSSL).summary())
        else:
            show(f"SSL_read_ex() on real libssl, probes on {read.where} ({read.kind}), {args.calls} calls",
                 pair_cost(obj, ssl_loop, args.calls, args.rounds, LIBSSL, None, read.offset))
    hits_per_request(args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
