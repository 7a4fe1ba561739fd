#!/usr/bin/env python3
"""What the agent costs nginx serving HTTP/2, and whether it misses a request.

h2load (-c16 -m16: 16 connections, 16 streams in flight on each, a fixed
number of requests: about --seconds' worth without the agent) drives
Debian's nginx (`return 200`, tests/h2_peers.py's nginx_h2) on loopback, in
interleaved rounds so drift on a shared machine hits every setup alike:

  none            nothing attached (h2c by prior knowledge, and h2 over TLS)
  floor           programs that do nothing on the hooks the http probe uses:
                  the socket tracepoints (6.3+; before, sys_enter/sys_exit),
                  and for TLS also uprobes and uretprobes at the libssl places
                  it chooses: the ceiling of any probe on those hooks
  http            the real agent (`otelbpf run`) with only the http probe,
                  exporting OTLP/HTTP to a local sink
  default         the real agent with its default configuration: every
                  probe on, as `make run` starts it

Per setup it prints h2load's requests/s (median of rounds) and its ratio to
`none` of the same transport (and the median and range of each round's
ratio to that round's `none`: this machine's throughput drifts by several
points between runs of the same setup), the agent's CPU as % of one core over the
h2load run, and the requests nginx completed on that port (access log lines
whose $request_completion is OK) against those in the exported
http.server.request.duration of that server.port: the agent setups of all
rounds summed: with a fixed number of requests, every stream completes,
so the two must be equal. An agent that does not decode HTTP/2 exports
none of them. Then, from one extra round of
the agent setups with kernel.bpf_stats_enabled, what each BPF program cost
per request (both sides: h2load's calls are traced too).

Usage: python bench/h2_overhead.py [--rounds 5] [--seconds 5] [--conns 16] [--streams 16]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from common import ROOT  # noqa: E402  (puts the checkout on sys.path)

sys.path.insert(0, str(ROOT / "tests"))
import h2_peers  # noqa: E402  (the tests' HTTP/2 rigs)
from http_overhead import Agent, Floor  # noqa: E402  (`otelbpf run` exporting to a local OTLP sink)
from uprobe_cost import LIBSSL  # noqa: E402

from collector import libbpf  # noqa: E402


def completed(nginx, port: int) -> int:
    """Requests nginx completed on port ($request_completion OK). Counted
    line by line, as h2_peers.access_lines parses them: by the last rounds
    the log holds millions of lines, which as a list took gigabytes."""
    port_s, n = str(port), 0
    try:
        with open(nginx.log) as f:
            for line in f:
                p = line.split(" ", 8)
                n += len(p) == 9 and p[0] == port_s and p[7] == "OK"
    except FileNotFoundError:
        pass
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--streams", type=int, default=16, help="streams in flight per connection (h2load -m)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for tool in ("nginx", "h2load", "openssl"):
        if not shutil.which(tool):
            print(f"{tool} is not installed (make setup installs it)", file=sys.stderr)
            return 2
    d = tempfile.mkdtemp(prefix="otelbpf-bench-h2-")
    stats_was = open("/proc/sys/kernel/bpf_stats_enabled").read().strip()
    res = {}
    try:
        with h2_peers.nginx_h2(d) as nginx:
            h2c, tls = nginx.url("h2c", "/"), nginx.url("h2", "/")
            http_only = {"http": {}}
            floor = (Floor(["empty_sock_io"]) if libbpf.kernel_has_type("btf_trace_sock_send_length",
                                                                    libbpf.BTF_KIND_TYPEDEF)
                     else Floor(["empty_raw_tp"]))
            setups = {  # name -> (url, port, setup or None)
                "none (h2c)": (h2c, nginx.h2c_port, None),
                "floor (h2c)": (h2c, nginx.h2c_port, floor),
                "http (h2c)": (h2c, nginx.h2c_port, Agent(http_only, d)),
                "default config (h2c)": (h2c, nginx.h2c_port, Agent(None, d)),
                "none (TLS)": (tls, nginx.tls_port, None),
                "floor (TLS)": (tls, nginx.tls_port, Floor(floor.names, tls_uprobes=os.path.exists(LIBSSL))),
                "http (TLS)": (tls, nginx.tls_port, Agent(http_only, d)),
                "default config (TLS)": (tls, nginx.tls_port, Agent(None, d)),
            }
            res = {name: {"rps": [], "cpu": [], "logged": 0, "counted": 0, "errored": 0, "progs": {},
                          "requests": 0} for name in setups}

            # A round is a fixed number of requests, about --seconds' worth
            # without the agent (a warm-up run measures it), not -D: a run
            # cut at a time abandons the streams in flight, which nginx logs
            # with the bytes it had queued whether or not their responses
            # went out whole, so its log would not be exact ground truth.
            def load(url: str, n: int = None, seconds: float = None):
                return h2_peers.h2load(url, n=n, c=args.conns, m=args.streams, threads=args.threads,
                                       duration=seconds, timeout=4 * args.seconds + 60)

            size = {}
            for url in (h2c, tls):
                warm = load(url, seconds=2)
                size[url] = max(args.conns * args.streams, int(round(warm.rps * args.seconds, -3)))
            args.sizes = f"h2c {size[h2c]}, TLS {size[tls]}"
            # the rounds measured, then one of the agent setups with the
            # kernel's per-program statistics on (two clock reads per program
            # run: that round's throughput is not counted)
            for rnd in range(args.rounds + 1):
                profiling = rnd == args.rounds
                with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
                    f.write("1" if profiling else "0")
                for name, (url, port, setup) in setups.items():
                    r = res[name]
                    agent = isinstance(setup, Agent)
                    if profiling and not agent:
                        continue
                    if setup is not None:
                        setup.start()
                    try:
                        before = completed(nginx, port)
                        cpu0 = setup.cpu() if agent else 0.0
                        t0 = time.monotonic()
                        out = load(url, n=size[url])
                        elapsed = time.monotonic() - t0
                        if agent:
                            r["cpu"].append(100 * (setup.cpu() - cpu0) / elapsed)
                        logged = completed(nginx, port) - before
                    finally:
                        stopped = setup.stop(port) if setup is not None else {}
                    if agent:   # every round, the profiling one too: 0 missing in all
                        r["logged"] += logged
                        r["counted"] += stopped["counted"]
                    if profiling:
                        r["progs"], r["requests"] = stopped["progs"], logged
                        continue
                    r["rps"].append(out.rps)
                    r["errored"] += out.errored
    finally:
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write(stats_was)
        shutil.rmtree(d, ignore_errors=True)
    report(args, res)
    return 0


def report(args, res: dict) -> None:
    none = {"h2c": res["none (h2c)"]["rps"], "TLS": res["none (TLS)"]["rps"]}
    base = {k: statistics.median(v) for k, v in none.items()}
    print(f"h2load -c{args.conns} -m{args.streams} -t{args.threads} -n ({args.sizes} requests: about "
          f"{args.seconds:g} s without the agent) against nginx (return 200, HTTP/2) on loopback, {args.rounds} "
          f"interleaved rounds; medians\n")
    print(f"{'setup':24} {'req/s':>9} {'vs none':>8} {'per round':>16} {'agent CPU':>9} {'h2load errors':>13} "
          f"{'completed':>9} {'exported':>9} {'missing':>8}")
    for name, r in res.items():
        scheme = "TLS" if name.endswith("(TLS)") else "h2c"
        med = statistics.median(r["rps"])
        # against the same round's `none`: drift between rounds cancels
        paired = [x / n for x, n in zip(r["rps"], none[scheme])]
        per_round = f"{100 * statistics.median(paired):.1f}% ({100 * min(paired):.0f}-{100 * max(paired):.0f})"
        cpu = f"{statistics.median(r['cpu']):.1f}%" if r["cpu"] else "-"
        counts = (f"{r['logged']:>9} {r['counted']:>9} {r['logged'] - r['counted']:>8}" if r["cpu"]
                  else f"{'-':>9} {'-':>9} {'-':>8}")
        print(f"{name:24} {med:9.0f} {100 * med / base[scheme]:7.1f}% {per_round:>16} {cpu:>9} {r['errored']:>13} "
              f"{counts}")
    print("\n(per round: the median and range of each round's ratio to that round's `none`; agent CPU: its user + "
          "system time over the h2load run, export included; completed: nginx's access log lines with $request_completion "
          "OK on that port during the agent's rounds, the profiling round's too; exported: the count of "
          "http.server.request.duration for that server.port in the agent's last export)")
    print("\nwhere the time goes: BPF programs in an extra round with kernel.bpf_stats_enabled=1 (not counted "
          "above: the statistics add two clock reads per run), per request nginx completed (h2load's side "
          "included)")
    for name, r in res.items():
        if not r["progs"] or not r["requests"]:
            continue
        total = sum(ns for _cnt, ns in r["progs"].values())
        print(f"  {name}: {total / r['requests']:.0f} ns/request")
        for prog, (cnt, ns) in sorted(r["progs"].items(), key=lambda kv: -kv[1][1]):
            if ns < r["requests"]:
                continue    # under 1 ns a request (connection setup and teardown)
            print(f"    {prog:24} {cnt / r['requests']:7.2f} runs/request {ns / cnt:8.0f} ns/run "
                  f"{ns / r['requests']:8.0f} ns/request")


if __name__ == "__main__":
    sys.exit(main())
