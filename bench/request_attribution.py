#!/usr/bin/env python3
"""What tying CPU samples to the HTTP request their thread serves costs.

wrk drives Debian's nginx (`return 200`, loopback) as hard as it can, so
nearly every nginx sample lands inside a request. Interleaved rounds, the
probes loaded in this process:

- http alone: the per-request cost (the slot the kernel writes at each
  server request's start and clears at its end is part of it);
- http + cpu_profile at --frequency, each with its own thread_request map:
  the profiler's lookup finds no request (as if the http probe were off);
- http + cpu_profile sharing the map (what the agent runs): the lookup
  finds the request, copies it into the sample and counts it.

Prints wrk's requests/s (median of rounds), the shared setup's ratio to the
unshared one round by round (the lookup's slowdown; target: none
measurable) and to http alone (the profiler's), how many of nginx's samples
were attributed, and, from one extra round with kernel.bpf_stats_enabled=1
(not counted: the statistics add two clock reads per run), ns per run of
the profiler's prof_sample with and without requests to find, and of the
http probe's socket programs (which claim and free the thread's slot).

Usage: python bench/request_attribution.py [--rounds 5] [--seconds 5] [--frequency 99]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from common import start_nginx  # noqa: E402  (puts the checkout on sys.path)

from collector import config
from collector.probe import ProbeContext, default_bpf_dir, discover
from collector.records import Profile
from collector.shared import SharedState


def wrk(url: str, seconds: int, conns: int) -> float:
    out = subprocess.run(["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", url], capture_output=True, text=True,
                         check=True).stdout
    return float(next(line for line in out.splitlines() if line.startswith("Requests/sec:")).split()[1])


class Probes:
    """The probes of one setup, loaded in this process, collected every second."""

    def __init__(self, names: tuple, shared: bool, frequency: int):
        self.names, self.shared, self.frequency = names, shared, frequency
        self.attributed = self.samples = 0

    def start(self, nginx_pids: set) -> None:
        entries = discover()
        shared = SharedState() if self.shared else None
        self._shared_state = shared
        self.probes = []
        for name in self.names:
            cls = entries[name].cls
            over = {"tls": False} if name == "http" else {"frequency": self.frequency}
            cfg = config.parse_section(over, {**config.PROBE_COMMON, **cls.config_schema}, f"probes.{name}")
            ctx = ProbeContext(default_bpf_dir(), None, None, os.getpid(), time.time_ns(),
                               logging.getLogger(name), shared=shared)
            probe = cls(cfg, ctx)
            probe.start()
            self.probes.append(probe)
        self._pids = nginx_pids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect_loop, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        for probe in self.probes:
            for r in probe.collect():
                if isinstance(r, Profile):
                    for s in r.samples:
                        if s.attributes.get("process.pid") in self._pids:
                            self.samples += s.count
                            self.attributed += s.count if "http.request.method" in s.attributes else 0

    def _collect_loop(self) -> None:
        while not self._stop.wait(1.0):
            self._collect()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._collect()
        for probe in reversed(self.probes):
            probe.stop()
        if self._shared_state is not None:
            self._shared_state.close()


MEASURED = ("prof_sample", "http_sock_recv", "http_sock_send", "http_sys_exit")


def run_stats() -> dict:
    """program name -> (runs, ns) summed over the loaded programs of MEASURED."""
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True).stdout
    stats: dict = {}
    for p in json.loads(out or "[]"):
        if p.get("name") in MEASURED:
            runs, ns = stats.get(p["name"], (0, 0))
            stats[p["name"]] = (runs + p.get("run_cnt", 0), ns + p.get("run_time_ns", 0))
    return stats


def nginx_pids(pidfile: str) -> set:
    master = int(open(pidfile).read())
    kids = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
    return {master, *map(int, kids)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--frequency", type=int, default=99)
    args = ap.parse_args()
    for tool in ("nginx", "wrk", "openssl", "bpftool"):
        if not shutil.which(tool):
            print(f"{tool} is not installed (make setup installs it)", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.WARNING)
    d = tempfile.mkdtemp(prefix="otelbpf-bench-")
    port, _tls_port = start_nginx(d)
    url = f"http://127.0.0.1:{port}/"
    setups = {
        "http alone": Probes(("http",), True, args.frequency),
        "http + cpu_profile, maps apart (no request found)": Probes(("http", "cpu_profile"), False, args.frequency),
        "http + cpu_profile, shared map (samples attributed)": Probes(("http", "cpu_profile"), True, args.frequency),
    }
    rps = {name: [] for name in setups}
    per_run = {}
    stats_was = open("/proc/sys/kernel/bpf_stats_enabled").read().strip()
    try:
        time.sleep(0.3)
        pids = nginx_pids(f"{d}/nginx.pid")
        wrk(url, 1, args.conns)   # warm up
        for rnd in range(args.rounds + 1):
            profiling = rnd == args.rounds
            with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
                f.write("1" if profiling else "0")
            for name, setup in setups.items():
                setup.start(pids)
                try:
                    before = run_stats()
                    got = wrk(url, args.seconds, args.conns)
                    after = run_stats()
                finally:
                    setup.stop()
                if profiling:
                    per_run[name] = {prog: ((ns - before.get(prog, (0, 0))[1]) / (runs - before.get(prog, (0, 0))[0]),
                                            runs - before.get(prog, (0, 0))[0])
                                     for prog, (runs, ns) in after.items() if runs > before.get(prog, (0, 0))[0]}
                else:
                    rps[name].append(got)
    finally:
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write(stats_was)
        subprocess.run(["nginx", "-c", f"{d}/nginx.conf", "-s", "stop"], check=False)
        shutil.rmtree(d, ignore_errors=True)

    print(f"wrk -t2 -c{args.conns} -d{args.seconds}s against nginx (return 200) on loopback, {args.rounds} "
          f"interleaved rounds, profiler at {args.frequency} Hz per CPU; load average now "
          f"{os.getloadavg()[0]:.2f}")
    med = {name: statistics.median(v) for name, v in rps.items()}
    names = list(setups)
    for name in names:
        print(f"  {name:<55} {med[name]:>10.0f} req/s  (rounds: {', '.join(f'{v:.0f}' for v in rps[name])})")
    def paired(a: str, b: str) -> str:
        """a's throughput over b's, round by round (each pair minutes closer
        than the medians): median and range"""
        r = sorted(100 * x / y for x, y in zip(rps[a], rps[b]))
        return f"median {statistics.median(r):.1f}% (rounds {r[0]:.1f}-{r[-1]:.1f}%)"
    print(f"the lookup (shared / apart, per round):     {paired(names[2], names[1])}")
    print(f"the profiler (shared / http alone, per round): {paired(names[2], names[0])}")
    s = setups[names[2]]
    print(f"nginx samples attributed to a request with the shared map: {s.attributed} of {s.samples}; "
          f"with maps apart: {setups[names[1]].attributed} of {setups[names[1]].samples}")
    print("ns per run, from the bpf_stats round (prof_sample: the whole sample, its tail-called walk included):")
    for name, progs in per_run.items():
        print(f"  {name:<55} " + ", ".join(f"{prog} {ns:.0f} ns ({runs} runs)" for prog, (ns, runs) in sorted(progs.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
