#!/usr/bin/env python3
"""What one uprobe hit costs on this machine: the floor under TLS tracing.

libc's getppid() in a loop (bench/libc_getppid_loop.c), bare, with an empty
uprobe on it, then with an empty uretprobe too (bench/bpf/empty_uprobe.bpf.c).
The http probe puts an entry and a return probe on every SSL_read and
SSL_write, so a TLS request costs at least four of these per side.

Usage: python bench/uprobe_cost.py [--calls 200000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from common import ROOT, build  # noqa: E402  (puts the checkout on sys.path)

from collector import libbpf  # noqa: E402
from probes.http import libc_path  # noqa: E402


def run(binary: str, calls: int) -> float:
    t = time.perf_counter()
    subprocess.run([binary, str(calls)], check=True)
    return (time.perf_counter() - t) / calls * 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    binary = build("libc_getppid_loop")
    obj_path = ROOT / "bench" / "bpf" / "empty_uprobe.bpf.o"
    if not obj_path.exists():
        print(f"{obj_path} missing: run `make bpf`", file=sys.stderr)
        return 2
    libc = libc_path()
    if libc is None:
        print("no libc.so.6 found to put the uprobe on", file=sys.stderr)
        return 2
    best = {}
    with libbpf.BpfObject(str(obj_path)) as obj:
        obj.load()
        best["bare"] = min(run(binary, args.calls) for _ in range(args.rounds))
        obj.program("empty_uprobe").attach_uprobe(libc, "getppid")
        best["uprobe"] = min(run(binary, args.calls) for _ in range(args.rounds))
        obj.program("empty_uretprobe").attach_uprobe(libc, "getppid", retprobe=True)
        best["both"] = min(run(binary, args.calls) for _ in range(args.rounds))
    print(f"libc getppid(), {args.calls} calls, best of {args.rounds} (ns per call, process start included)")
    print(f"  bare                      {best['bare']:8.0f}")
    print(f"  + empty uprobe            {best['uprobe']:8.0f}   (+{best['uprobe'] - best['bare']:.0f} per hit)")
    print(f"  + empty uretprobe as well {best['both']:8.0f}   (+{best['both'] - best['uprobe']:.0f} per return)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
