#!/usr/bin/env python3
"""What the net_flows probe costs TCP, measured in one run.

bench/tcp_loop.c on loopback, in interleaved rounds without the probe, with
it as configured by default (TCP), and with `udp: true` (cgroup_skb programs
that see every packet of the host), loaded as the agent loads it:

  bulk    one connection streaming --bytes; Gbit/s     (target: >= 98% with the probe)
  conns   --conns connect/close cycles; connections/s  (the per-connection hooks' cost)

Usage: python bench/net_overhead.py [--rounds 7] [--bytes 4e9] [--conns 5000]
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import time

from common import build  # noqa: E402  (puts the checkout on sys.path)

from collector.config import PROBE_COMMON, parse_section  # noqa: E402
from collector.features import ensure_tracefs  # noqa: E402
from collector.probe import ProbeContext, default_bpf_dir  # noqa: E402
from probes.net_flows import NetFlowsProbe  # noqa: E402




def run(binary: str, mode: str, amount: int) -> float:
    return float(subprocess.run([binary, mode, str(amount)], capture_output=True, text=True, check=True).stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--bytes", type=float, default=4e9)
    ap.add_argument("--conns", type=int, default=5000)
    args = ap.parse_args()
    binary = build("tcp_loop")
    tracefs = ensure_tracefs()
    setups = {"none": None, "net_flows (default: TCP)": {"udp": False}, "net_flows + udp: true": {"udp": True}}
    results = {(m, name): [] for m in ("bulk", "conns") for name in setups}
    run(binary, "bulk", int(args.bytes) // 4)  # warm up
    for _ in range(args.rounds):
        for name, overrides in setups.items():
            probe = None
            if overrides is not None:
                cfg = parse_section(overrides, {**PROBE_COMMON, **NetFlowsProbe.config_schema}, "probes.net_flows")
                ctx = ProbeContext(default_bpf_dir(), None, tracefs, os.getpid(), time.time_ns(),
                                   logging.getLogger("bench"))
                probe = NetFlowsProbe(cfg, ctx)
                probe.start()
            try:
                results[("bulk", name)].append(run(binary, "bulk", int(args.bytes)))
                results[("conns", name)].append(run(binary, "conns", args.conns))
                if probe:
                    probe.collect()
            finally:
                if probe:
                    probe.stop()
    print(f"loopback TCP, {args.rounds} interleaved rounds, medians (ratio against no probe)\n")
    for mode, unit, target in (("bulk", "Gbit/s", "  target >= 98%"), ("conns", "conn/s", "")):
        base = statistics.median(results[(mode, "none")])
        for name in setups:
            v = statistics.median(results[(mode, name)])
            print(f"{mode:<6} {name:<26} {v:10.2f} {unit}  {100 * v / base:6.1f}%" + (target if name != "none" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
