#!/usr/bin/env python3
"""What the CPU profiler costs, and what the agent holds, measured in one run.

1. Two CPU-bound workloads pinned to CPU 0, both without frame pointers: a
   -O2 C loop (bench/cpu_work.c) and Debian's own python3.11 running a
   Python loop. A warm-up agent first fills an empty unwind table cache
   while they run once, until no table was built for --settle s (the
   tables of every binary the host runs). Then they run in interleaved
   rounds without the agent and with `otelbpf run` profiling the whole host
   (cpu_profile only, 99 Hz on every CPU, the default 10 s interval, OTLP
   gRPC to a local receiver, that cache); every other round runs without
   the agent last. Prints the median of the rounds' slowdowns of each
   (target <= 1%; on a shared VM one round's noise is several %). Then, in
   one agent that keeps running, sampling is switched off and on (its perf
   events, through pidfd_getfd) between short runs of each workload, in
   ABBA pairs seconds apart: the slowdown sampling puts on the workload's
   CPU, with the host's drift cancelled (target <= 1%). Also printed: what a sample costs in the kernel (BPF run-time stats,
   on while the rounds run), and the agent's CPU as a share of one core
   while they ran, after 1.5 intervals: its own, and its table build
   children's (target <= 1%).
2. The tables the warm-up built, per binary, from the agent's debug log
   (wall time, the build child's own time and peak RSS), and the row pool's
   use at the end (otelbpf.profiler.unwind.table.memory, as exported).
3. The agent's memory with every probe on (the default config, as `make
   run` starts it, only the exporter set: OTLP gRPC to a local receiver, then
   the file exporter) after --steady seconds: RSS (median and peak of 10
   samples a second apart), USS and PSS, and its CPU meanwhile (children
   included); then with OTLP gRPC again while bench/soak.py's mixed load
   runs (forks, TCP, UDP, HTTP on new paths, Python CPU). Target: RSS <= 100 MiB.

The host's load average is printed at the start and the end: other work on
the machine moves every figure.

Usage: python bench/profiler_overhead.py [--rounds 6] [--pairs 30] [--iterations N] [--py-iterations N]
                                         [--interval 10s] [--steady 60] [--settle 60]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from common import ROOT, build, free_port  # noqa: E402  (puts the checkout on sys.path)

PYTHON = "/usr/bin/python3.11"   # Debian's: built without frame pointers
PY_LOOP = """
import sys, time
def leaf(n):
    s = 0
    for i in range(n):
        s += i ^ (i >> 3)
    return s
def work(n):
    return sum(leaf(1000) for _ in range(n))
t = time.perf_counter()
work(int(sys.argv[1]))
print(time.perf_counter() - t)
"""
SYS_BPF, BPF_ENABLE_STATS = 321, 32      # x86-64
BUILT = re.compile(r"unwind table for (\S+): (\d+) rows in (\d+) ms \(built: child (\d+) ms, peak RSS (\d+) KiB\)")


def work(cmd: list) -> float:
    out = subprocess.run(["taskset", "-c", "0", *cmd], capture_output=True, text=True, check=True)
    return float(out.stdout)


class Agent:
    """`otelbpf run` with a config dict; stderr to a file (a pipe nobody reads would block it)."""

    def __init__(self, tmp: Path, name: str, cfg: dict):
        self.err = tmp / f"{name}.stderr"
        cfg = {"lock_file": str(tmp / f"{name}.lock"), "health": f"127.0.0.1:{free_port()}", **cfg}
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.proc = subprocess.Popen([sys.executable, "-m", "collector.cli", "run", "--config", str(path)], cwd=ROOT,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(self.err, "w"))
        self.ps = psutil.Process(self.proc.pid)
        while "collecting every" not in self.err.read_text():
            if self.proc.poll() is not None:
                raise SystemExit(f"agent exited: {self.err.read_text()}")
            time.sleep(0.1)

    def cpu_own(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def cpu_children(self) -> float:
        """CPU seconds of its finished children: table builds, TLS placement."""
        t = self.ps.cpu_times()
        return t.children_user + t.children_system

    def cpu(self) -> float:
        return self.cpu_own() + self.cpu_children()

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        return self.err.read_text()


def bpf_run_stats():
    """Run-time stats of every BPF program, on while the returned fd is open
    (BPF_ENABLE_STATS: the kernel times each program run); None if refused."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(128)     # union bpf_attr, enable_stats.type = BPF_STATS_RUN_TIME (0)
    fd = libc.syscall(SYS_BPF, BPF_ENABLE_STATS, attr, 4)
    return fd if fd >= 0 else None


def prog_stats(name: str) -> dict:
    """id -> (run_time_ns, run_cnt) of the loaded programs called name, from bpftool."""
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True).stdout
    return {p["id"]: (p.get("run_time_ns", 0), p.get("run_cnt", 0))
            for p in json.loads(out or "[]") if p.get("name") == name}


SYS_PIDFD_GETFD = 438                                    # x86-64
PERF_EVENT_IOC_ENABLE, PERF_EVENT_IOC_DISABLE = 0x2400, 0x2401


def sampling_switch(pid: int):
    """Copies of the agent's perf event fds (pidfd_getfd); with cpu_profile
    the only probe, they are its samplers, one per CPU. Returns a function
    that turns sampling on or off in the running agent."""
    import ctypes
    import fcntl
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    fds = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[perf_event]":
                    continue
            except OSError:
                continue
            got = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(fd), 0)
            if got < 0:
                raise SystemExit(f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
            fds.append(got)
    finally:
        os.close(pidfd)
    if len(fds) != os.cpu_count():
        raise SystemExit(f"expected one perf event per CPU in the agent, found {len(fds)}")

    def switch(on: bool) -> None:
        for fd in fds:
            fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE if on else PERF_EVENT_IOC_DISABLE, 0)
    return switch


def toggled_pairs(args, tmp: Path, cfg: dict, workloads: dict) -> dict:
    """One agent runs throughout; its sampling is switched off and on
    between short runs of each workload (ABBA order), so the two runs of a
    pair are seconds apart and drift on the host cancels out. What this
    measures is the cost the profiler puts on the workload's own CPU (the
    sample interrupt, the BPF walk, what it evicts from caches); the agent's
    user-space work runs in both halves and is reported as agent CPU."""
    agent = Agent(tmp, "toggled", cfg)
    time.sleep(float(args.interval.rstrip("s")) * 1.5)
    switch = sampling_switch(agent.proc.pid)
    out = {w: [] for w in workloads}
    try:
        for i in range(args.pairs):
            for w, cmd in workloads.items():
                short = cmd[:-1] + [str(int(cmd[-1]) // args.pair_divisor)]
                order = (True, False) if i % 2 == 0 else (False, True)
                t = {}
                for on in order:
                    switch(on)
                    t[on] = work(short)
                out[w].append(100 * (t[True] / t[False] - 1))
    finally:
        switch(True)
        agent.stop()
    return out


def grpc_receiver():
    sys.path.insert(0, str(ROOT / "tests"))
    from otlp_receiver import GrpcReceiver    # the tests' receiver: opentelemetry-proto's own stubs
    return GrpcReceiver()


def last_gauges(rx) -> dict:
    """(metric name, attributes) -> the latest value of each gauge the receiver got."""
    out = {}
    with rx.rx.lock:
        reqs = list(rx.rx.metrics)
    for req in reqs:
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.WhichOneof("data") == "gauge":
                        for dp in m.gauge.data_points:
                            attrs = tuple(sorted((a.key, a.value.string_value) for a in dp.attributes))
                            out[(m.name, attrs)] = dp.as_int or dp.as_double
    return out


def warm_up(args, tmp: Path, cfg: dict, workloads: dict) -> str:
    """A first agent with an empty table cache, while the workloads run once,
    until no table was built for --settle s: the tables of every binary the
    host runs are in the cache. Returns its log (one line per table)."""
    agent = Agent(tmp, "warm-up", cfg)
    for cmd in workloads.values():
        work(cmd[:-1] + [str(int(cmd[-1]) // 4)])
    last, seen, t0 = time.monotonic(), 0, time.monotonic()
    while time.monotonic() - last < args.settle and time.monotonic() - t0 < args.settle_max:
        n = agent.err.read_text().count("unwind table for ")
        if n != seen:
            seen, last = n, time.monotonic()
        time.sleep(1)
    return agent.stop()


def profiler_rounds(args, tmp: Path) -> dict:
    workloads = {"cpu_work (C, -O2)": [build("cpu_work"), str(args.iterations)],
                 "python3.11 loop (Debian)": [PYTHON, "-c", PY_LOOP, str(args.py_iterations)]}
    rx = grpc_receiver()
    cfg = {"interval": args.interval, "log_level": "debug",
           "exporters": {"otlp": {"endpoint": rx.endpoint, "protocol": "grpc", "insecure": True}},
           "probes": {"cpu_profile": {"frequency": args.frequency, "unwind_cache_dir": str(tmp / "unwind-cache")}}}
    t0 = time.monotonic()
    warm_log = warm_up(args, tmp, cfg, workloads)
    warm_s = time.monotonic() - t0
    base = {w: [] for w in workloads}
    prof = {w: [] for w in workloads}
    own, children, kernel_ns = [], [], []
    stats_fd = bpf_run_stats()
    for r in range(args.rounds):
        if r % 2 == 0:   # odd rounds run without the agent last: drift (clock, neighbours) cancels out
            for w, cmd in workloads.items():
                base[w].append(work(cmd))
        others = prog_stats("prof_sample")          # another agent's, if any
        agent = Agent(tmp, "profiler", cfg)
        time.sleep(float(args.interval.rstrip("s")) * 1.5)   # first collections: symbol tables, tables from the cache
        o0, c0, t0 = agent.cpu_own(), agent.cpu_children(), time.monotonic()
        k0 = {i: v for i, v in prog_stats("prof_sample").items() if i not in others}
        for w, cmd in workloads.items():
            prof[w].append(work(cmd))
        wall = time.monotonic() - t0
        k1 = prog_stats("prof_sample")
        runs = sum(k1[i][1] - k0[i][1] for i in k0 if i in k1)
        if stats_fd is not None and runs:
            kernel_ns.append(sum(k1[i][0] - k0[i][0] for i in k0 if i in k1) / runs)
        own.append((agent.cpu_own() - o0) / wall)
        children.append((agent.cpu_children() - c0) / wall)
        agent.stop()
        if r % 2 == 1:
            for w, cmd in workloads.items():
                base[w].append(work(cmd))
    if stats_fd is not None:
        os.close(stats_fd)
    gauges = last_gauges(rx)
    toggled = toggled_pairs(args, tmp, cfg, workloads)
    rx.stop()
    return {"base": base, "prof": prof, "own": own, "children": children, "kernel_ns": kernel_ns,
            "warm_log": warm_log, "warm_s": warm_s, "gauges": gauges, "toggled": toggled}


def mixed_load():
    """bench/soak.py's load (forks, TCP and UDP to new ports, HTTP on
    ever-new paths, Python burning CPU) in threads; returns its stop event."""
    import threading
    import soak
    stop = threading.Event()
    for f in (soak.forks, soak.tcp, soak.udp, soak.http, soak.cpu):
        threading.Thread(target=f, args=(stop,), daemon=True).start()
    return stop


def memory_run(args, tmp: Path, exporter: str, loaded: bool = False) -> dict:
    if exporter.startswith("otlp grpc"):
        rx = grpc_receiver()
        exporters = {"otlp": {"endpoint": rx.endpoint, "protocol": "grpc", "insecure": True}}
    else:
        rx = None
        exporters = {"file": {"path": str(tmp / "all.jsonl")}}
    agent = Agent(tmp, f"all-{exporter.replace(' ', '-')}-{int(loaded)}", {"exporters": exporters})  # every probe
    load_stop = mixed_load() if loaded else None
    time.sleep(args.steady / 2)
    c0, t0 = agent.cpu(), time.monotonic()
    time.sleep(args.steady / 2)
    rss = []
    for _ in range(10):
        rss.append(agent.ps.memory_info().rss)
        time.sleep(1)
    full = agent.ps.memory_full_info()
    cpu = (agent.cpu() - c0) / (time.monotonic() - t0)
    threads = agent.ps.num_threads()
    if load_stop is not None:
        load_stop.set()
    log = agent.stop()
    if rx is not None:
        rx.stop()
    probes = re.search(r"probes: ([^;]*);", log)
    return {"rss": statistics.median(rss), "rss_max": max(rss), "uss": full.uss, "pss": full.pss, "cpu": cpu,
            "threads": threads, "probes": probes.group(1) if probes else "?"}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--iterations", type=int, default=20_000_000_000, help="cpu_work loop iterations")
    ap.add_argument("--py-iterations", type=int, default=200_000, help="python loop: calls of leaf(1000)")
    ap.add_argument("--pairs", type=int, default=30, help="sampling on/off pairs of short runs")
    ap.add_argument("--pair-divisor", type=int, default=8, help="a short run is this much shorter than a round's")
    ap.add_argument("--interval", default="10s")
    ap.add_argument("--frequency", type=int, default=99)
    ap.add_argument("--steady", type=float, default=60.0, help="seconds after start before RSS is read")
    ap.add_argument("--settle", type=float, default=60.0, help="warm-up: ends once no table was built this long")
    ap.add_argument("--settle-max", type=float, default=600.0, help="warm-up: ends after this long regardless")
    args = ap.parse_args()
    print(f"load average at start: {load()} ({os.cpu_count()} CPUs)\n")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        p = profiler_rounds(args, tmp)
        mem = [(e, memory_run(args, tmp, e)) for e in ("otlp grpc", "file")]
        mem.append(("otlp grpc, mixed load", memory_run(args, tmp, "otlp grpc", loaded=True)))

    print(f"1. Workloads on CPU 0, {args.rounds} interleaved rounds, profiler at {args.frequency} Hz on every CPU, "
          f"interval {args.interval}")
    print(f"   {'workload':<26} {'without s':>10} {'with s':>9} {'slowdown':>9}")
    for w in p["base"]:
        b, x = statistics.median(p["base"][w]), statistics.median(p["prof"][w])
        pairs = [100 * (x_ / b_ - 1) for b_, x_ in zip(p["base"][w], p["prof"][w])]
        print(f"   {w:<26} {b:10.3f} {x:9.3f} {statistics.median(pairs):+8.2f}%   (median of the rounds' "
              f"{', '.join(f'{d:+.1f}' for d in pairs)}; target <= 1%)")
    print(f"   sampling switched off and on in one running agent, {args.pairs} pairs of runs 1/{args.pair_divisor} "
          f"as long (target <= 1%):")
    for w, pairs in p["toggled"].items():
        q = statistics.quantiles(pairs, n=4)
        print(f"   {w:<26} {statistics.median(pairs):+8.2f}%   (median of the pairs; quartiles {q[0]:+.2f}, "
              f"{q[2]:+.2f}; mean {statistics.fmean(pairs):+.2f} +- {statistics.stdev(pairs) / len(pairs) ** 0.5:.2f})")
    if p["kernel_ns"]:
        ns = statistics.median(p["kernel_ns"])
        print(f"   in the kernel: {ns / 1000:.2f} us per sample (the walk included; median of the rounds, "
              f"BPF run-time stats): {100 * ns * args.frequency / 1e9:.3f}% of each sampled CPU at {args.frequency} Hz")
    print(f"   agent CPU: {100 * statistics.median(p['own']):.2f}% of a core (median; rounds "
          f"{', '.join(f'{100 * x:.2f}' for x in p['own'])}), its table build children "
          f"{100 * statistics.median(p['children']):.2f}% (target <= 1% in all)")

    built = [(m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)), int(m.group(5)))
             for m in BUILT.finditer(p["warm_log"])]
    print(f"\n2. Unwind tables the warm-up built (empty cache, {p['warm_s']:.0f} s until none for {args.settle:g} s): "
          f"{len(built)} binaries, {sum(b[2] for b in built) / 1000:.1f} s of builds; the slowest:")
    print(f"   {'binary':<48} {'rows':>7} {'wall ms':>8} {'child ms':>9} {'child peak RSS':>15}")
    for path, rows, wall, child, peak in sorted(built, key=lambda b: -b[2])[:12]:
        print(f"   {path[-48:]:<48} {rows:7d} {wall:8d} {child:9d} {peak / 1024:11.1f} MiB")
    for name in (PYTHON, "cpu_work"):
        for b in built:
            if b[0].endswith(name):
                print(f"   (workload: {b[0]}: {b[1]} rows, {b[2]} ms)")
    g = p["gauges"]
    used = g.get(("otelbpf.profiler.unwind.table.memory", (("state", "used"),)), 0)
    cap = g.get(("otelbpf.profiler.unwind.table.memory", (("state", "capacity"),)), 0)
    tables = g.get(("otelbpf.profiler.unwind.tables", ()), 0)
    print(f"   row pool at the last round's end: {used / 2**20:.2f} of {cap / 2**20:.0f} MiB used, {tables:.0f} tables")

    print(f"\n3. The agent with every probe on, default config, after {args.steady:g} s (target: RSS <= 100 MiB); "
          f"CPU with its children")
    print(f"   {'exporter':<21} {'RSS MiB':>8} {'(peak)':>7} {'USS MiB':>8} {'PSS MiB':>8} {'CPU %':>6} "
          f"{'threads':>8}  probes")
    for e, r in mem:
        print(f"   {e:<21} {r['rss'] / 2**20:8.1f} {r['rss_max'] / 2**20:7.1f} {r['uss'] / 2**20:8.1f} "
              f"{r['pss'] / 2**20:8.1f} {100 * r['cpu']:6.2f} {r['threads']:8d}  {r['probes']}")
    print(f"\nload average at the end: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
