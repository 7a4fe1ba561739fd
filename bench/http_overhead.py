#!/usr/bin/env python3
"""What the http probe costs nginx, and whether it misses anything, in one run.

wrk drives Debian's nginx (`return 200`, plain HTTP on loopback) as hard as
this machine allows, in interleaved rounds: without the probe, with it as
configured by default (metrics + spans capped at max_spans_per_second), and
with spans off. The probe is loaded the way the agent loads it; a thread
collects every second as the agent does (export not included).

Per setup it prints wrk's requests/s (median, and as a ratio of the
no-probe rounds: target >= 97%), the probe process's CPU as % of one core,
the requests nginx answered (access log lines with bytes sent) versus those
in the exported histograms (target: 0 missing), and the spans dropped by the rate cap or a full buffer.

Usage: python bench/http_overhead.py [--rounds 5] [--seconds 5] [--conns 32] [--tls]
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import common  # noqa: F401  (puts the checkout on sys.path)

from collector.config import PROBE_COMMON, parse_section  # noqa: E402
from collector.features import ensure_tracefs  # noqa: E402
from collector.probe import ProbeContext, default_bpf_dir  # noqa: E402
from probes.http import SERVER_DURATION, STATS, HttpProbe  # noqa: E402

NGINX_CONF = """
user root;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
  log_format sent '$bytes_sent';
  access_log {d}/access.log sent;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{port};
    listen 127.0.0.1:{tls_port} ssl;
    ssl_certificate {d}/cert.pem;
    ssl_certificate_key {d}/key.pem;
    location / {{ return 200 "hello\\n"; }}
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_lines(path: str) -> int:
    """Requests nginx answered: it also logs requests whose client hung up
    before the response could be written (0 bytes sent)."""
    with open(path, "rb") as f:
        return sum(1 for line in f if int(line) > 0)


def wrk(url: str, seconds: int, conns: int) -> float:
    out = subprocess.run(["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", url], capture_output=True, text=True,
                         check=True).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


class Collector:
    """Calls probe.collect() every second, as the agent's loop does."""

    def __init__(self, probe):
        self.probe, self.records, self._stop = probe, [], threading.Event()
        self.spans = 0
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(1.0):
            self._take(self.probe.collect())

    def _take(self, records: list) -> list:
        self.spans += sum(1 for x in records if type(x).__name__ == "Span")
        return records

    def stop(self) -> list:
        self._stop.set()
        self._t.join()
        return self._take(self.probe.collect())


def agent_round(url: str, seconds: int, conns: int, receiver, d: str) -> dict:
    """One wrk run with the real agent exporting to receiver."""
    import psutil
    import yaml
    cfg = {"interval": "1s", "health": "127.0.0.1:0", "lock_file": f"{d}/agent.lock",
           "exporters": {"otlp": {"endpoint": receiver.endpoint, "protocol": "grpc"}}, "probes": {"http": {}}}
    with open(f"{d}/agent.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    err = open(f"{d}/agent.log", "w+")
    agent = subprocess.Popen([sys.executable, "-m", "collector.cli", "run", "--config", f"{d}/agent.yaml"],
                             cwd=str(common.ROOT), stderr=err, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while "collecting every" not in open(f"{d}/agent.log").read():
        if agent.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("agent did not start: " + open(f"{d}/agent.log").read())
        time.sleep(0.1)
    proc = psutil.Process(agent.pid)
    spans_before = receiver_spans(receiver)
    c0, t0 = proc.cpu_times(), time.monotonic()
    rps = wrk(url, seconds, conns)
    c1, t1 = proc.cpu_times(), time.monotonic()
    agent.send_signal(2)
    agent.wait(timeout=60)
    return {"rps": rps, "cpu": 100 * (c1.user + c1.system - c0.user - c0.system) / (t1 - t0),
            "spans": receiver_spans(receiver) - spans_before}


def receiver_spans(receiver) -> int:
    with receiver.rx.lock:
        return sum(len(ss.spans) for req in receiver.rx.traces for rs in req.resource_spans
                   for ss in rs.scope_spans)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--tls", action="store_true", help="https (OpenSSL uprobes) instead of plain HTTP")
    ap.add_argument("--agent", action="store_true", help="also run the real agent with OTLP export")
    args = ap.parse_args()
    for tool in ("nginx", "wrk", "openssl"):
        if not shutil.which(tool):
            print(f"{tool} is not installed (make setup installs it)", file=sys.stderr)
            return 2
    tracefs = ensure_tracefs()
    logging.getLogger("bench").setLevel(logging.ERROR)   # the TLS cost warning, once per round, is noise here
    d = tempfile.mkdtemp(prefix="otelbpf-bench-")
    port, tls_port = free_port(), free_port()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{d}/key.pem", "-out",
                    f"{d}/cert.pem", "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    with open(f"{d}/nginx.conf", "w") as f:
        f.write(NGINX_CONF.format(d=d, port=port, tls_port=tls_port))
    subprocess.run(["nginx", "-c", f"{d}/nginx.conf"], check=True)
    url = f"https://127.0.0.1:{tls_port}/" if args.tls else f"http://127.0.0.1:{port}/"
    target = tls_port if args.tls else port
    setups = {"none": None, "http (default: metrics + spans)": {}, "http, spans: false": {"spans": False}}
    receiver = None
    if args.agent:
        sys.path.insert(0, str(common.ROOT / "tests"))
        from otlp_receiver import GrpcReceiver
        receiver = GrpcReceiver()
        setups["agent process, OTLP/gRPC export"] = "agent"
    res = {name: {"rps": [], "cpu": [], "missing": [], "logged": [], "spans_dropped": [], "spans": []}
           for name in setups}
    try:
        time.sleep(0.3)
        wrk(url, 1, args.conns)  # warm up
        for _ in range(args.rounds):
            for name, overrides in setups.items():
                probe = coll = None
                if overrides == "agent":
                    out = agent_round(url, args.seconds, args.conns, receiver, d)
                    for k in ("rps", "cpu", "spans"):
                        res[name][k].append(out[k])
                    continue
                if overrides is not None:
                    cfg = parse_section(overrides, {**PROBE_COMMON, **HttpProbe.config_schema}, "probes.http")
                    ctx = ProbeContext(default_bpf_dir(), None, tracefs, os.getpid(), time.time_ns(),
                                       logging.getLogger("bench"))
                    probe = HttpProbe(cfg, ctx)
                    probe.start()
                    coll = Collector(probe)
                before = log_lines(f"{d}/access.log")
                cpu0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.monotonic()
                rps = wrk(url, args.seconds, args.conns)
                elapsed = time.monotonic() - t0
                r = res[name]
                r["rps"].append(rps)
                if probe is not None:
                    time.sleep(0.3)   # let the last responses' writes return
                    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
                    records = coll.stop()
                    r["cpu"].append(100 * (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / elapsed)
                    logged = log_lines(f"{d}/access.log") - before
                    counted = sum(sum(x.buckets) for x in records if getattr(x, "instrument", None) is SERVER_DURATION
                                  and x.attributes.get("server.port") == target)
                    stats = dict(zip(STATS, probe.obj.map("http_stats").counters(len(STATS))))
                    r["logged"].append(logged)
                    r["missing"].append(logged - counted)
                    r["spans_dropped"].append(stats["rate_limited"] + stats["ringbuf_full"] + probe._queue_full)
                    r["spans"].append(coll.spans)
                    probe.stop()
    finally:
        subprocess.run(["nginx", "-c", f"{d}/nginx.conf", "-s", "stop"], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)
        if receiver is not None:
            receiver.stop()
    base = statistics.median(res["none"]["rps"])
    print(f"wrk -t2 -c{args.conns} -d{args.seconds}s {url} against nginx, {args.rounds} interleaved rounds")
    for name, r in res.items():
        med = statistics.median(r["rps"])
        line = f"  {name:34s} {med:9.0f} req/s  ({100 * med / base:5.1f}% of none; rounds " \
               f"{min(r['rps']):.0f}-{max(r['rps']):.0f})"
        if name.startswith("agent"):
            line += (f"\n  {'':34s} agent CPU {statistics.median(r['cpu']):.1f}% of a core (export included); spans "
                     f"received {sum(r['spans'])}")
        elif r["cpu"]:
            line += (f"\n  {'':34s} probe CPU {statistics.median(r['cpu']):.1f}% of a core; requests logged by nginx "
                     f"{sum(r['logged'])}, missing from the metrics {sum(r['missing'])}; spans exported "
                     f"{sum(r['spans'])}, dropped {sum(r['spans_dropped'])}")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
