#!/usr/bin/env python3
"""What the net_flows probe costs TCP, measured in one run.

bench/tcp_loop.c on loopback, in interleaved rounds without and with the
probe loaded (as the agent loads it, collecting once per round):

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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from collector.config import PROBE_COMMON, parse_section  # noqa: E402
from collector.features import ensure_tracefs  # noqa: E402
from collector.probe import ProbeContext, default_bpf_dir  # noqa: E402
from probes.net_flows import NetFlowsProbe  # noqa: E402


def build() -> str:
    out = ROOT / "bench" / "bin" / "tcp_loop"
    out.parent.mkdir(exist_ok=True)
    subprocess.run(["gcc", "-O2", "-o", str(out), str(ROOT / "bench" / "tcp_loop.c")], check=True)
    return str(out)


def run(binary: str, mode: str, amount: int) -> float:
    return float(subprocess.run([binary, mode, str(amount)], capture_output=True, text=True, check=True).stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--bytes", type=float, default=4e9)
    ap.add_argument("--conns", type=int, default=5000)
    args = ap.parse_args()
    binary = build()
    tracefs = ensure_tracefs()
    cfg = parse_section({}, {**PROBE_COMMON, **NetFlowsProbe.config_schema}, "probes.net_flows")
    results = {(m, p): [] for m in ("bulk", "conns") for p in (False, True)}
    run(binary, "bulk", int(args.bytes) // 4)  # warm up
    for _ in range(args.rounds):
        for with_probe in (False, True):
            probe = None
            if with_probe:
                ctx = ProbeContext(default_bpf_dir(), None, tracefs, os.getpid(), time.time_ns(),
                                   logging.getLogger("bench"))
                probe = NetFlowsProbe(cfg, ctx)
                probe.start()
            try:
                results[("bulk", with_probe)].append(run(binary, "bulk", int(args.bytes)))
                results[("conns", with_probe)].append(run(binary, "conns", args.conns))
                if probe:
                    probe.collect()
            finally:
                if probe:
                    probe.stop()
    print(f"loopback TCP, {args.rounds} interleaved rounds, medians\n")
    for mode, unit, target in (("bulk", "Gbit/s", "target >= 98%"), ("conns", "conn/s", "")):
        base = statistics.median(results[(mode, False)])
        withp = statistics.median(results[(mode, True)])
        print(f"{mode:<6} without {base:10.2f} {unit}   with net_flows {withp:10.2f} {unit}   "
              f"ratio {100 * withp / base:6.1f}%  {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
