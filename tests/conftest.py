"""Shared test helpers: the agent as a real subprocess, OTLP receivers,
compiled workloads, and bpftool views of what is loaded in the kernel."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "tests" / "bin"
sys.path.insert(0, str(ROOT / "tests"))

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF programs: run as root (CI does)")


def build_c(name: str, opt: str = "-O2", src: Optional[Path] = None) -> Path:
    """Compile tests/workloads/<name>.c (or src) into tests/bin/<name>, when
    it changed, and return the binary. Frame pointers are kept; GCC 12 still
    leaves them out of small leaf functions at -O1 and above, so profiling
    workloads build with -O0."""
    src = src or ROOT / "tests" / "workloads" / f"{name}.c"
    out = BIN / name
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        BIN.mkdir(exist_ok=True)
        subprocess.run(["gcc", opt, "-fno-omit-frame-pointer", "-o", str(out), str(src)], check=True)
    return out


class AgentProcess:
    """`otelbpf run` in a subprocess with a config written from a dict."""

    def __init__(self, tmp_path: Path, config: dict, args=(), env=None, wrapper=()):
        self.config_path = tmp_path / "otelbpf.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.stdout_path = tmp_path / "agent.stdout"
        self.stderr_path = tmp_path / "agent.stderr"
        cmd = list(wrapper) + [sys.executable, "-m", "collector.cli", "run", "--config", str(self.config_path),
                               *args]
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdin=subprocess.DEVNULL,
                                     stdout=open(self.stdout_path, "w"), stderr=open(self.stderr_path, "w"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.stderr():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited ({self.proc.returncode}) before logging {text!r}:\n"
                                     f"{self.stderr()}")
            time.sleep(0.05)
        raise AssertionError(f"agent did not log {text!r} within {timeout}s:\n{self.stderr()}")

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def agent_factory(tmp_path):
    started = []

    def start(config: dict, **kw) -> AgentProcess:
        a = AgentProcess(tmp_path, config, **kw)
        started.append(a)
        return a

    yield start
    for a in started:
        a.kill()


def wait_until(pred, timeout: float = 15.0, step: float = 0.25):
    """pred()'s first true value, or its last false one after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(step)


def curl(*args, check=True) -> str:
    """curl quietly; stdout is the HTTP status of each URL, one per line."""
    return subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}\\n", *args], check=check,
                          capture_output=True, text=True, timeout=30).stdout


def run_cli(*args, env=None, wrapper=(), timeout=60) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(list(wrapper) + [sys.executable, "-m", "collector.cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def bpftool_objects(kind: str) -> list:
    """`bpftool prog|map show -j` as a list of dicts."""
    out = subprocess.run(["bpftool", kind, "show", "-j"], capture_output=True, text=True, check=True).stdout
    return json.loads(out or "[]")


def maps_held(pid: int, name: Optional[str] = None) -> list:
    """`bpftool map show` records of the BPF maps process pid holds open
    (its fds' fdinfo give their ids; another agent's maps may have the same
    names), of the given name if one is given."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                held.update(int(line.split()[1]) for line in f if line.startswith("map_id:"))
        except OSError:
            continue
    return [m for m in bpftool_objects("map") if m["id"] in held and (name is None or m.get("name") == name)]


SYSCALL_LATENCY_PROGS = {"sc_lat_enter", "sc_lat_exit"}
SYSCALL_LATENCY_MAPS = {"sc_lat_slots", "sc_lat_hist", "sc_lat_ovf", "sc_lat_stats", "syscall_.rodata"}


def loaded_ids(kind: str, names: set) -> set:
    return {o["id"] for o in bpftool_objects(kind) if o.get("name") in names}


@pytest.fixture
def grpc_receiver():
    from otlp_receiver import GrpcReceiver
    r = GrpcReceiver()
    yield r
    r.stop()


@pytest.fixture
def http_receiver():
    from otlp_receiver import HttpReceiver
    r = HttpReceiver()
    yield r
    r.stop()


def run_sleepers(sleeps: dict, linger: float = 2.5) -> dict:
    """One sc_workload per entry of sleeps (ns -> how many nanosleep calls),
    all at once. Returns ns -> (pid, calls, lo ns, hi ns): every call took at
    least the requested time (a relative nanosleep never returns early; the
    kernel's sys_enter comes before it starts) and at most the wall time from
    "go" to "done" less the other calls' minimum, measured on
    CLOCK_MONOTONIC, the clock bpf_ktime_get_ns() reads. Each process stays
    `linger` s after its calls so the agent reads them while its pid lives."""
    procs = {}
    try:
        for ns, n in sleeps.items():
            w = subprocess.Popen([str(build_c("sc_workload")), "0", str(n), str(ns)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
            procs[ns] = (w, int(w.stdout.readline()))
        t0 = {}
        for ns, (w, _pid) in procs.items():
            t0[ns] = time.monotonic_ns()
            w.stdin.write("go\n")
            w.stdin.flush()
        out = {}
        for ns, (w, pid) in procs.items():
            assert w.stdout.readline().strip() == "done"
            wall = time.monotonic_ns() - t0[ns]
            n = sleeps[ns]
            out[ns] = (pid, n, ns, wall - (n - 1) * ns)
        time.sleep(linger)
        for w, _pid in procs.values():
            w.stdin.write("exit\n")
            w.stdin.close()
            assert w.wait(timeout=10) == 0
        return out
    finally:
        for w, _pid in procs.values():
            if w.poll() is None:
                w.kill()
                w.wait()


def every_form_config(tmp_path: Path, otlp_endpoint: str, otlp_form: str, file_form: str, probes: dict) -> dict:
    """An agent config exporting each number in every form at once: OTLP gRPC
    in one histogram form, the file exporter in the other, and the console
    (every row), collecting every second."""
    return {"interval": "1s", "lock_file": str(tmp_path / "lock"), "health": "127.0.0.1:0",
            "exporters": {"otlp": {"endpoint": otlp_endpoint, "protocol": "grpc", "histogram": otlp_form},
                          "file": {"path": str(tmp_path / "t.jsonl"), "histogram": file_form},
                          "console": {"top": 10000, "clear": False}},
            "probes": probes}


def within_sampling(observed: int, total: int, p: float, what: str) -> None:
    """observed of total samples, each in with probability p: within four
    standard errors of p * total."""
    se = math.sqrt(max(total * p * (1 - p), 1.0))
    assert abs(observed - p * total) <= 4 * se, \
        f"{what}: {observed} of {total} samples, expected {p * total:.1f} (p={p:.3f}, 4 SE = {4 * se:.1f})"
