#!/usr/bin/env python3
"""The agent's own CPU and memory while the host is busy.

Runs `otelbpf run` (syscall_latency, file exporter) for --seconds while a load
keeps the machine making syscalls from many short-lived processes (a forking
server's pattern: a new pid per request), then prints the agent's CPU time as
a percentage of one core, its peak RSS, and how many series and processes the
probe exported, next to the same figures for an idle host measured in the same
run.

Usage: python bench/agent_cpu.py [--seconds 20] [--interval 2s]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent


def forking_load(stop: threading.Event, counter: list) -> None:
    """Short-lived processes, each doing a few hundred syscalls."""
    while not stop.is_set():
        subprocess.run(["sh", "-c", "for i in 1 2 3 4 5 6 7 8; do cat /proc/self/stat >/dev/null; done"])
        counter[0] += 1


def measure(seconds: float, interval: str, load: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "t.jsonl"
        cfg = Path(tmp) / "c.yaml"
        cfg.write_text(yaml.safe_dump({"interval": interval, "exporters": {"file": {"path": str(out)}},
                                       "probes": {"syscall_latency": {}}}))
        agent = subprocess.Popen([sys.executable, "-m", "collector.cli", "run", "--config", str(cfg)], cwd=ROOT,
                                 stderr=subprocess.PIPE, text=True)
        while "collecting every" not in agent.stderr.readline():
            if agent.poll() is not None:
                raise SystemExit(f"agent exited: {agent.stderr.read()}")
        proc = psutil.Process(agent.pid)
        stop, spawned = threading.Event(), [0]
        workers = [threading.Thread(target=forking_load, args=(stop, spawned)) for _ in range(2 if load else 0)]
        for w in workers:
            w.start()
        t0, c0 = time.monotonic(), sum(proc.cpu_times()[:2])
        peak_rss = 0
        while time.monotonic() - t0 < seconds:
            peak_rss = max(peak_rss, proc.memory_info().rss)
            time.sleep(0.5)
        cpu = sum(proc.cpu_times()[:2]) - c0
        wall = time.monotonic() - t0
        stop.set()
        for w in workers:
            w.join()
        agent.terminate()
        agent.wait(timeout=30)
        series, pids = 0, set()
        lines = out.read_text().splitlines()
        if lines:
            last = json.loads(lines[-1])
            for rm in last["resourceMetrics"]:
                for sm in rm["scopeMetrics"]:
                    for m in sm["metrics"]:
                        if m["name"] == "otelbpf.syscall.duration":
                            pts = m["exponentialHistogram"]["dataPoints"]
                            series += len(pts)
                            for p in pts:
                                for a in p["attributes"]:
                                    if a["key"] == "process.pid":
                                        pids.add(a["value"]["intValue"])
        return {"cpu_pct": 100 * cpu / wall, "peak_rss_mib": peak_rss / 2 ** 20, "series": series,
                "pid_series": len(pids), "processes_spawned": spawned[0], "seconds": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--interval", default="2s")
    args = ap.parse_args()
    rows = [("idle host", measure(args.seconds, args.interval, load=False)),
            ("forking load", measure(args.seconds, args.interval, load=True))]
    print(f"agent: syscall_latency, interval {args.interval}, {args.seconds:.0f}s per run, {os.cpu_count()} CPUs\n")
    print(f"{'host':<14} {'agent CPU % of a core':>22} {'peak RSS MiB':>13} {'series':>7} {'pid series':>11} "
          f"{'procs spawned':>14}")
    for name, r in rows:
        print(f"{name:<14} {r['cpu_pct']:22.2f} {r['peak_rss_mib']:13.1f} {r['series']:7d} {r['pid_series']:11d} "
              f"{r['processes_spawned']:14d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
