#!/usr/bin/env python3
"""What the CPU profiler costs, measured in one run.

A fixed CPU-bound workload (bench/cpu_work.c, pinned to CPU 0) runs in
interleaved rounds without the agent and with `otelbpf run` profiling the
whole host (cpu_profile only, 99 Hz on every CPU). Prints the median
slowdown and the agent's own CPU time as a share of one core while the
workload ran. Targets: slowdown <= 1%, agent <= 2% of a core.

The agent is measured after a warm-up of 1.5 intervals (its first collection
loads the symbol table of every binary seen); its start-up cost is printed
separately.

Usage: python bench/profiler_overhead.py [--rounds 5] [--iterations N] [--interval 2s]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from common import ROOT, build  # noqa: E402




def work(binary: str, iterations: int) -> float:
    out = subprocess.run(["taskset", "-c", "0", binary, str(iterations)], capture_output=True, text=True, check=True)
    return float(out.stdout)


def start_agent(tmp: Path, interval: str, frequency: int) -> subprocess.Popen:
    cfg = tmp / "c.yaml"
    cfg.write_text(yaml.safe_dump({"interval": interval, "exporters": {"file": {"path": str(tmp / "t.jsonl")}},
                                   "probes": {"cpu_profile": {"frequency": frequency}}}))
    agent = subprocess.Popen([sys.executable, "-m", "collector.cli", "run", "--config", str(cfg)], cwd=ROOT,
                             stderr=subprocess.PIPE, text=True)
    while "collecting every" not in agent.stderr.readline():
        if agent.poll() is not None:
            raise SystemExit(f"agent exited: {agent.stderr.read()}")
    return agent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=1_500_000_000)
    ap.add_argument("--interval", default="2s")
    ap.add_argument("--frequency", type=int, default=99)
    args = ap.parse_args()
    binary = build("cpu_work")
    work(binary, args.iterations // 10)  # warm up
    base, prof, agent_cpu, agent_wall, startup_cpu = [], [], 0.0, 0.0, []
    warmup = float(args.interval.rstrip("s")) * 1.5  # past the first collection
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            base.append(work(binary, args.iterations))
            agent = start_agent(Path(tmp), args.interval, args.frequency)
            p = psutil.Process(agent.pid)
            time.sleep(warmup)  # first collection: loads symbol tables of every binary seen
            c0 = sum(p.cpu_times()[:2])
            startup_cpu.append(c0)
            t = work(binary, args.iterations)
            agent_cpu += sum(p.cpu_times()[:2]) - c0
            agent_wall += t
            prof.append(t)
            agent.terminate()
            agent.wait(timeout=30)
    b, w = statistics.median(base), statistics.median(prof)
    print(f"CPU-bound workload on CPU 0, {args.rounds} interleaved rounds, profiler at {args.frequency} Hz on "
          f"every CPU, agent interval {args.interval}\n")
    print(f"without agent   {b:.3f} s  (runs {min(base):.3f}-{max(base):.3f})")
    print(f"with profiler   {w:.3f} s  (runs {min(prof):.3f}-{max(prof):.3f})")
    print(f"slowdown        {100 * (w / b - 1):+.2f} %   (target <= 1%)")
    print(f"agent CPU       {100 * agent_cpu / agent_wall:.2f} % of one core while the workload ran, after "
          f"warm-up (target <= 2%)")
    print(f"agent start-up  {statistics.median(startup_cpu):.2f} s CPU until {warmup:g}s after start (imports, "
          f"kallsyms, first symbol tables), once")
    return 0


if __name__ == "__main__":
    sys.exit(main())
