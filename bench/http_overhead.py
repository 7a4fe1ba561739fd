#!/usr/bin/env python3
"""What the agent costs a busy nginx, and whether it misses a request, in one run.

wrk drives Debian's nginx (`return 200`, on loopback) as hard as this machine
allows, in interleaved rounds so drift on a shared machine hits every setup
alike:

  none            nothing attached (plain HTTP, and again over TLS)
  floor           programs that do nothing, on the hooks a design needs: what
                  it pays before doing anything, the ceiling of any probe on
                  those hooks. Empty raw_tp sys_enter/sys_exit (any design
                  that hooks every syscall; the http probe's before 6.3);
                  empty sock_send_length/sock_recv_length (the http probe's,
                  6.3+); those plus a sys_enter/sys_exit pair that reads the
                  clock (syscall_latency's own reference), the default
                  config's floor; empty uprobes and uretprobes at the libssl
                  places the http probe chooses (TLS)
  http            the real agent (`otelbpf run`) with only the http probe,
                  exporting OTLP/HTTP to a local sink (plain, and TLS)
  default         the real agent with its default configuration: every probe
                  on, as `make run` starts it (plain HTTP)

Per setup it prints wrk's requests/s (median of rounds) and its ratio to
`none` of the same scheme (targets: http plain >= 92%, http TLS >= 75%,
default >= 90%), the agent's CPU as % of one core, what one getppid() costs
more than bare (the syscall hooks' toll on every syscall of the host), and
the requests nginx answered (access log lines with bytes sent) against those
in the exported http.server.request.duration (target: 0 missing).

Then where the time goes: each BPF program's run count and average run time
from the kernel's own statistics (kernel.bpf_stats_enabled) in one extra
round per agent setup, not counted in the throughput, per request; and what one uprobe hit costs at each placement the http
probe chose for libssl.

Usage: python bench/http_overhead.py [--rounds 5] [--seconds 5] [--conns 32]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import psutil
import yaml

from common import ROOT, answered, build, start_nginx, start_otlp_sink, total  # noqa: E402

from collector import libbpf  # noqa: E402

TARGETS = {"http (plain)": 92.0, "http (TLS)": 75.0, "default config (plain)": 90.0}


def wrk(url: str, seconds: int, conns: int) -> float:
    out = subprocess.run(["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", url], capture_output=True, text=True,
                         check=True).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def getppid_ns(loop: str, calls: int) -> float:
    out = subprocess.run(["taskset", "-c", "0", loop, str(calls)], capture_output=True, text=True, check=True)
    return float(out.stdout)


def prog_stats() -> dict:
    """id -> (name, run_cnt, run_time_ns) of every loaded BPF program."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {p["id"]: (p.get("name", "?"), p.get("run_cnt", 0), p.get("run_time_ns", 0)) for p in json.loads(out)}


def prog_ids_of(pid: int) -> set:
    """Ids of the BPF programs a process holds (its fds' fdinfo names them)."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                m = re.search(r"^prog_id:\s+(\d+)", f.read(), re.M)
        except OSError:
            continue
        if m:
            ids.add(int(m.group(1)))
    return ids


class Floor:
    """Programs that do nothing useful, loaded in this process: what their
    hooks cost by themselves, below which no probe on those hooks can go.
    objects: bench/bpf objects whose programs attach as their sections say;
    tls_uprobes: empty uprobes (and uretprobes where the http probe has one)
    at the libssl places the http probe chooses."""

    def __init__(self, objects=(), tls_uprobes: bool = False):
        self.names, self.tls_uprobes = objects, tls_uprobes
        self.objs, self.links = [], []

    def start(self):
        for name in self.names:
            obj = libbpf.BpfObject(str(ROOT / "bench" / "bpf" / f"{name}.bpf.o"))
            obj.load()
            self.objs.append(obj)
            for p in obj.programs():
                p.attach()
        if self.tls_uprobes:
            from probes.http import SSL_LIFECYCLE_FUNCS
            from probes.uprobe_placement import place
            from uprobe_cost import LIBSSL
            obj = libbpf.BpfObject(str(ROOT / "bench" / "bpf" / "empty_uprobe.bpf.o"))
            obj.load()
            self.objs.append(obj)
            for group, site in place(LIBSSL).sites.items():
                func = None if site.offset is not None else site.covers[0]
                self.links.append(obj.program("empty_uprobe").attach_uprobe(LIBSSL, func, site.offset or 0))
                if group not in SSL_LIFECYCLE_FUNCS:
                    self.links.append(obj.program("empty_uretprobe").attach_uprobe(LIBSSL, func, site.offset or 0,
                                                                                  retprobe=True))

    def stop(self, _port: int) -> dict:
        for link in self.links:
            link.close()
        for obj in self.objs:
            obj.close()
        self.objs, self.links = [], []
        return {}


class Agent:
    """`otelbpf run` with a config, exporting to a fresh OTLP/HTTP sink."""

    def __init__(self, probes, d: str):
        self.probes, self.d = probes, d

    def start(self):
        self.sink, self.store = start_otlp_sink(keep_metrics=True)
        # 1 s, not the default 10 s: the agent turns spans into OTLP and
        # exports at each collection, so a round of a few seconds at 10 s
        # would hold none of that work, in its CPU or its throughput. At
        # 10 s the agent costs less: over 18 s of h2load, 2.6% of a core
        # against 4.3% at 1 s (its user + system time; 1,000 spans/s both)
        cfg = {"interval": "1s", "health": "", "lock_file": f"{self.d}/agent.lock",
               "exporters": {"otlp": {"endpoint": self.store.endpoint, "protocol": "http/protobuf"}}}
        if self.probes is not None:
            cfg["probes"] = self.probes
        with open(f"{self.d}/agent.yaml", "w") as f:
            yaml.safe_dump(cfg, f)
        self.log = open(f"{self.d}/agent.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "collector.cli", "run", "--config",
                                      f"{self.d}/agent.yaml"], cwd=str(ROOT), stderr=self.log,
                                     stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while "collecting every" not in open(f"{self.d}/agent.log").read():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("agent did not start: " + open(f"{self.d}/agent.log").read())
            time.sleep(0.1)
        self.ps = psutil.Process(self.proc.pid)
        mine = prog_ids_of(self.proc.pid)
        self.progs0 = {k: v for k, v in prog_stats().items() if k in mine}

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self, port: int) -> dict:
        progs = {k: v for k, v in prog_stats().items() if k in self.progs0}
        self.proc.send_signal(signal.SIGINT)    # a final collection and export, then exit
        self.proc.wait(timeout=60)
        self.sink.shutdown()
        counted = total(self.store, "http.server.request.duration", server__port=port)
        runs = {}
        for k, (name, cnt, ns) in progs.items():
            n0, c0, t0 = self.progs0[k]
            if cnt > c0:
                runs[name] = (cnt - c0, ns - t0)
        return {"counted": counted, "progs": runs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--getppid", type=int, default=500_000, help="getppid calls per setup and round")
    args = ap.parse_args()
    for tool in ("nginx", "wrk", "openssl", "bpftool"):
        if not shutil.which(tool):
            print(f"{tool} is not installed (make setup installs it)", file=sys.stderr)
            return 2
    loop = build("getppid_loop")
    d = tempfile.mkdtemp(prefix="otelbpf-bench-")
    port, tls_port = start_nginx(d)
    plain, tls = f"http://127.0.0.1:{port}/", f"https://127.0.0.1:{tls_port}/"
    http_only = {"http": {}}
    setups = {  # name -> (url, port, setup or None)
        "none (plain)": (plain, port, None),
        "floor: empty sys_enter/sys_exit pair (plain)": (plain, port, Floor(["empty_raw_tp"])),
        "floor: empty sock_send/recv pair (plain)": (plain, port, Floor(["empty_sock_io"])),
        "floor: clock pair + empty sock pair (plain)": (plain, port, Floor(["clock_floor", "empty_sock_io"])),
        "http (plain)": (plain, port, Agent(http_only, d)),
        "default config (plain)": (plain, port, Agent(None, d)),
        "none (TLS)": (tls, tls_port, None),
        "floor: empty uprobes at the chosen places (TLS)": (tls, tls_port, Floor(tls_uprobes=True)),
        "http (TLS)": (tls, tls_port, Agent(http_only, d)),
    }
    if not libbpf.kernel_has_type("btf_trace_sock_send_length", libbpf.BTF_KIND_TYPEDEF):
        # before 6.3 the http probe captures at sys_exit: the pair above is its floor
        for name in [n for n in setups if "sock pair" in n]:
            del setups[name]
    from uprobe_cost import LIBSSL
    if not os.path.exists(LIBSSL):      # (the places are Debian's libssl.so.3's)
        del setups["floor: empty uprobes at the chosen places (TLS)"]
    res = {name: {"rps": [], "cpu": [], "ns": [], "logged": 0, "missing": 0, "progs": {}, "requests": 0}
           for name in setups}
    stats_was = open("/proc/sys/kernel/bpf_stats_enabled").read().strip()
    try:
        time.sleep(0.3)
        wrk(plain, 1, args.conns)  # warm up
        wrk(tls, 1, args.conns)
        # the rounds measured, then one with the kernel's per-program
        # statistics on (they cost two clock reads per program run, so that
        # round's throughput is not counted)
        for rnd in range(args.rounds + 1):
            profiling = rnd == args.rounds
            with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
                f.write("1" if profiling else "0")
            for name, (url, target, setup) in setups.items():
                r = res[name]
                if profiling and not isinstance(setup, Agent):
                    continue
                if setup is not None:
                    setup.start()
                try:
                    ns = getppid_ns(loop, args.getppid)
                    before = answered(f"{d}/access.log", target)
                    cpu0 = setup.cpu() if isinstance(setup, Agent) else 0.0
                    t0 = time.monotonic()
                    rps = wrk(url, args.seconds, args.conns)
                    elapsed = time.monotonic() - t0
                    cpu = 100 * (setup.cpu() - cpu0) / elapsed if isinstance(setup, Agent) else None
                    if isinstance(setup, Agent):
                        time.sleep(0.5)   # let the last responses' writes return
                    logged = answered(f"{d}/access.log", target) - before
                finally:
                    out = setup.stop(target) if setup is not None else {}
                if "counted" in out:   # every round, the profiling one too: 0 missing in all
                    r["logged"] += logged
                    r["missing"] += logged - out["counted"]
                if profiling:
                    r["progs"], r["requests"] = out["progs"], logged
                    continue
                r["ns"].append(ns)
                r["rps"].append(rps)
                if cpu is not None:
                    r["cpu"].append(cpu)
    finally:
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write(stats_was)
        subprocess.run(["nginx", "-c", f"{d}/nginx.conf", "-s", "stop"], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)
    report(args, res)
    uprobe_costs(args)
    return 0


def uprobe_costs(args) -> None:
    """What one hit costs at each place the http probe put its libssl probes,
    and at the exported entry it falls back to (SSL_read_ex() in a loop)."""
    from probes.uprobe_placement import place
    from uprobe_cost import LIBSSL, pair_cost
    if not os.path.exists(LIBSSL):
        return
    placement = place(LIBSSL)
    print(f"\nuprobe hits on {LIBSSL} (SSL_read_ex() in a loop, ns added per call, best of 3):")
    print(f"  placement: {placement.summary()}")
    loop = build("ssl_read_loop", ["-lssl", "-lcrypto"])
    read = placement.sites.get("read")
    places = [("exported entry SSL_read_ex (the fallback)", "SSL_read_ex", 0)]
    if read is not None and read.offset is not None:
        places.insert(0, (f"{read.where} ({read.kind}), used here", None, read.offset))
    with libbpf.BpfObject(str(ROOT / "bench" / "bpf" / "empty_uprobe.bpf.o")) as obj:
        obj.load()
        for label, func, offset in places:
            bare, up, both = pair_cost(obj, loop, 100_000, 3, LIBSSL, func, offset)
            print(f"  {label:52} uprobe +{up - bare:6.0f}   uretprobe +{both - up:6.0f}")


def report(args, res: dict) -> None:
    base = {"plain": statistics.median(res["none (plain)"]["rps"]),
            "TLS": statistics.median(res["none (TLS)"]["rps"])}
    ns0 = statistics.median(res["none (plain)"]["ns"] + res["none (TLS)"]["ns"])
    print(f"wrk -t2 -c{args.conns} -d{args.seconds}s against nginx (return 200) on loopback, {args.rounds} "
          f"interleaved rounds; medians\n")
    width = max(len(name) for name in res)
    print(f"{'setup':{width}} {'req/s':>8} {'vs none':>8} {'target':>7} {'agent CPU':>9} {'+ns/syscall':>11} "
          f"{'answered':>9} {'missing':>7}")
    for name, r in res.items():
        scheme = "TLS" if name.endswith("(TLS)") else "plain"
        med = statistics.median(r["rps"])
        target = f">={TARGETS[name]:.0f}%" if name in TARGETS else ""
        cpu = f"{statistics.median(r['cpu']):.1f}%" if r["cpu"] else "-"
        counts = (f"{r['logged']:>9} {r['missing']:>7}" if r["logged"] else f"{'-':>9} {'-':>7}")
        print(f"{name:{width}} {med:8.0f} {100 * med / base[scheme]:7.1f}% {target:>7} {cpu:>9} "
              f"{statistics.median(r['ns']) - ns0:11.0f} {counts}")
    print("\n(+ns/syscall: a getppid() loop on CPU 0 in each setup, against the no-agent rounds; agent CPU: "
          "its user + system time over the wrk run, export included)")
    print("\nwhere the time goes: BPF programs in an extra round with kernel.bpf_stats_enabled=1 (not counted "
          "above: the statistics add two clock reads per run), per request nginx answered")
    for name, r in res.items():
        if not r["progs"] or not r["requests"]:
            continue
        print(f"  {name}:")
        rows = sorted(r["progs"].items(), key=lambda kv: -kv[1][1])
        for prog, (cnt, ns) in rows:
            print(f"    {prog:24} {cnt / r['requests']:7.2f} runs/request {ns / cnt:8.0f} ns/run "
                  f"{ns / r['requests']:8.0f} ns/request")


if __name__ == "__main__":
    sys.exit(main())
