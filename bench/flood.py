#!/usr/bin/env python3
"""Floods: a million distinct UDP peers, thousands of distinct TCP peers and
thousands of short-lived processes, one after the other, against a running
agent (every probe, UDP counting on, OTLP/HTTP to a local sink that keeps
what it receives).

Per phase it prints what was sent, what the agent accounted for (counted in
a series, the overflow series included, or counted as dropped), how many
series it exported, and the agent's RSS before, at its peak and after, and
its CPU. Bounded memory and drops that add up are the point.

Usage: python bench/flood.py [--udp 1000000] [--tcp 20000] [--procs 3000] [--interval 1s]
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml
from common import latest, start_otlp_sink, total

ROOT = Path(__file__).resolve().parent.parent


class Watch:
    """The agent's RSS every 0.2 s, and its CPU."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.2)

    def phase_start(self):
        self.peak = self.rss()
        self.cpu0 = self.cpu()
        return self.rss()

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def cpu(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system


def udp_flood(n: int) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(n):  # a distinct loopback peer per datagram, 127.1.0.0 upwards
        s.sendto(b"x" * 32, (f"127.{1 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}", 9))
    s.close()
    return n


def tcp_flood(n: int) -> int:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 0))  # loopback peers 127.x.y.z all reach it
    srv.listen(512)
    port = srv.getsockname()[1]
    done = threading.Event()

    def accept():
        while not done.is_set():
            try:
                c, _ = srv.accept()
                c.close()
            except OSError:
                return
    threading.Thread(target=accept, daemon=True).start()
    made = 0
    for i in range(n):
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # RST: no TIME_WAIT pile-up
        try:
            c.connect((f"127.{1 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}", port))
            made += 1
        finally:
            c.close()
    done.set()
    srv.close()
    return made


def proc_flood(n: int) -> int:
    for _ in range(n):
        subprocess.run(["/bin/true"])
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--udp", type=int, default=1_000_000)
    ap.add_argument("--tcp", type=int, default=20_000)
    ap.add_argument("--procs", type=int, default=3000)
    ap.add_argument("--interval", default="1s")
    args = ap.parse_args()
    sink, store = start_otlp_sink(keep_metrics=True)
    endpoint = store.endpoint
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "c.yaml"
        cfg.write_text(yaml.safe_dump({
            "interval": args.interval, "health": "", "lock_file": str(Path(tmp) / "lock"),
            "exporters": {"otlp": {"endpoint": endpoint, "protocol": "http/protobuf"}},
            "probes": {"net_flows": {"udp": True}, "syscall_latency": {}, "cpu_profile": {}, "http": {}}}))
        agent = subprocess.Popen([sys.executable, "-m", "collector.cli", "run", "--config", str(cfg)], cwd=ROOT,
                                 stderr=subprocess.PIPE, text=True)
        while "collecting every" not in agent.stderr.readline():
            if agent.poll() is not None:
                raise SystemExit(f"agent exited: {agent.stderr.read()}")
        log_lines: list = []
        threading.Thread(target=lambda: log_lines.extend(agent.stderr), daemon=True).start()
        watch = Watch(agent.pid)
        settle = 3 * float(args.interval.rstrip("s")) + 1
        time.sleep(settle)

        def phase(name, run, counted_fn, dropped_fn, series_fn):
            c0, d0 = counted_fn(), dropped_fn()
            before = watch.phase_start()
            t0 = time.monotonic()
            sent = run()
            took = time.monotonic() - t0
            time.sleep(settle)
            rows.append((name, sent, took, counted_fn() - c0, dropped_fn() - d0, series_fn(),
                         before, watch.peak, watch.rss(), watch.cpu() - watch.cpu0))

        udp_packets = dict(name="otelbpf.network.packets", network__transport="udp",
                           network__io__direction="transmit")
        phase(f"UDP, {args.udp:,} distinct peers", lambda: udp_flood(args.udp),
              lambda: total(store, **udp_packets),
              lambda: total(store, "otelbpf.dropped", otelbpf__probe="net_flows", reason="udp_table_full"),
              lambda: len(latest(store, "otelbpf.network.packets", network__transport="udp")))
        # both ends of every connection are on this host: two opened events each
        phase(f"TCP ends, {args.tcp:,} distinct peers", lambda: 2 * tcp_flood(args.tcp),
              lambda: total(store, "otelbpf.tcp.connections", otelbpf__tcp__event="opened"),  # the overflow series too
              lambda: total(store, "otelbpf.dropped", otelbpf__probe="net_flows", reason="conn_table_full"),
              lambda: len(latest(store, "otelbpf.tcp.connections")))
        phase(f"processes, {args.procs:,} short-lived", lambda: proc_flood(args.procs),
              lambda: 0,  # processes are not counted as such: what matters is the bound below
              lambda: total(store, "otelbpf.dropped", otelbpf__probe="syscall_latency"),
              lambda: len(latest(store, "otelbpf.syscall.duration")))
        agent.terminate()
        agent.wait(timeout=60)
    sink.shutdown()
    mib = 1 << 20
    print(f"flood: every probe (UDP counting on), interval {args.interval}, OTLP/HTTP to a local sink\n")
    print(f"{'phase':34} {'sent':>10} {'s':>5} {'counted':>10} {'dropped':>10} {'accounted':>9} {'series':>7} "
          f"{'RSS before':>10} {'peak':>6} {'after':>6} {'CPU s':>6}")
    for name, sent, took, counted, dropped, series, before, peak, after, cpu in rows:
        procs = name.startswith("processes")
        accounted = "-" if procs else f"{100 * (counted + dropped) / sent:.1f}%"
        counted_s = "-" if procs else f"{counted:,}"
        print(f"{name:34} {sent:>10,} {took:5.1f} {counted_s:>10} {dropped:>10,} {accounted:>9} {series:>7,} "
              f"{before / mib:>9.0f}M {peak / mib:>5.0f}M {after / mib:>5.0f}M {cpu:6.1f}")
    print("\n(series: distinct series exported so far, the overflow series included; net_flows' max_series "
          "is shared by UDP and TCP. TCP: both ends of each connection are counted, and the agent's own export "
          "connections add a few. Processes: syscall "
          "series are per executable and for the top_processes busiest pids only)")
    warnings = [line.strip() for line in log_lines if "WARNING" in line or "ERROR" in line]
    if warnings:
        print("\nagent warnings:\n  " + "\n  ".join(warnings[:10]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
