"""Bad input gets one clear line and exit 2 (config) or 1 (cannot run),
never a traceback."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, needs_root, run_cli


def _config(tmp_path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def _one_clear_line(proc, *needles):
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith("otelbpf: config error")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.parametrize("text,needles", [
    ("interval: [10s\n", ["line 2", "invalid YAML", "fix the YAML syntax"]),
    ("interval: 10 parsecs\n", ["interval", "not a duration", "10s"]),
    ("interval: -5s\n", ["interval"]),
    ("export_queue_memory: 64MB\n", ["export_queue_memory", "not a size", "64MiB"]),
    ("export_queue_memory: 1KiB\n", ["export_queue_memory", "below the minimum"]),
    ("intervall: 10s\n", ["intervall: unknown key", "did you mean 'interval'"]),
    ("probes: {nope: {}}\n", ["probes.nope: unknown probe", "installed probes: cpu_profile, http, net_flows, syscall_latency"]),
    ("probes: {syscall_latency: {enabled: yes please}}\n", ["probes.syscall_latency.enabled", "true or false"]),
    ("probes: {syscall_latency: {syscalls: [getppid, opnat]}}\n",
     ["probes.syscall_latency.syscalls[1]", "unknown syscall 'opnat'", "did you mean"]),
    ("probes: {syscall_latency: {inflight_slots: 5000}}\n", ["inflight_slots", "power of two", "8192"]),
    ("probes: {http: {inflight_slots: 65536}}\n", ["probes.http.inflight_slots: is no longer used", "delete it"]),
    ("probes: {http: {capture: syscall}}\n", ["probes.http.capture", "auto, sockets, syscalls"]),
    ("exporters: {otlp: {protocol: grpcc}}\n", ["exporters.otlp.protocol", "grpc, http/protobuf"]),
    ("exporters: {otlp: {endpont: x}}\n", ["exporters.otlp.endpont: unknown key", "did you mean 'endpoint'"]),
    ("exporters: {kafka: {}}\n", ["exporters.kafka: unknown exporter"]),
    ("exporters: {file: {path: /etc/hostname/sub/t.jsonl}}\n", ["exporters.file.path", "cannot write"]),
    ("kernel: {btf: /nonexistent/vmlinux}\n", ["kernel.btf", "does not exist"]),
    ("resource: [a, b]\n", ["resource", "expected a mapping"]),
    ("- just\n- a list\n", ["top level", "expected a mapping"]),
])
def test_check_rejects_bad_config(tmp_path, text, needles):
    proc = run_cli("check", "--config", _config(tmp_path, text))
    assert proc.returncode == 2, proc.stderr
    _one_clear_line(proc, *needles)


def test_run_rejects_bad_config_too(tmp_path):
    proc = run_cli("run", "--config", _config(tmp_path, "probes: {syscal_latency: {}}\n"), "--duration", "1")
    assert proc.returncode == 2
    _one_clear_line(proc, "probes.syscal_latency", "did you mean 'syscall_latency'")


def test_missing_config_file():
    proc = run_cli("check", "--config", "/nonexistent/otelbpf.yaml")
    assert proc.returncode == 2
    _one_clear_line(proc, "not found")


def test_bad_duration_flag():
    proc = run_cli("run", "--duration", "soon")
    assert proc.returncode == 2
    assert "--duration" in proc.stderr and "Traceback" not in proc.stderr


def test_shipped_config_is_valid():
    proc = run_cli("check", "--config", "config/otelbpf.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "valid" in proc.stdout


@needs_root
def test_without_bpf_privileges_the_agent_says_so(tmp_path):
    """capsh drops CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN: the probe is skipped
    with one line naming the capability, and run exits 1."""
    cfg = _config(tmp_path, "exporters: {console: {}}\nprobes: {syscall_latency: {}}\n")
    cmd = (f"{sys.executable} -m collector.cli run --config {cfg} --duration 2")
    proc = subprocess.run(["capsh", "--drop=cap_bpf,cap_perfmon,cap_sys_admin", "--", "-c", cmd],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "probe syscall_latency: skipped" in proc.stderr
    assert "CAP_BPF" in proc.stderr
    assert "no probe could start" in proc.stderr
    check = subprocess.run(["capsh", "--drop=cap_bpf,cap_perfmon,cap_sys_admin", "--", "-c",
                            f"{sys.executable} -m collector.cli check --config {cfg}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0
    assert "[no] cap_bpf" in check.stdout
    assert "syscall_latency: cannot run: needs cap_bpf" in check.stdout


@needs_root
def test_kernel_without_btf_skips_the_probe_with_one_line(tmp_path):
    cfg = _config(tmp_path, "exporters: {console: {}}\nprobes: {syscall_latency: {}}\n")
    env = {"OTELBPF_KERNEL_BTF": "/nonexistent/vmlinux"}
    proc = run_cli("run", "--config", cfg, "--duration", "1", env=env)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    skipped = [l for l in proc.stderr.splitlines() if "probe syscall_latency: skipped" in l]
    assert len(skipped) == 1 and "CONFIG_DEBUG_INFO_BTF" in skipped[0] and "kernel.btf" in skipped[0]
    check = run_cli("check", "--config", cfg, env=env)
    assert check.returncode == 0 and "[no] btf" in check.stdout


UNIT_CAPS = {"cap_bpf", "cap_perfmon", "cap_net_admin", "cap_sys_resource", "cap_sys_ptrace", "cap_dac_read_search"}


@needs_root
def test_the_units_capabilities_are_enough_for_every_probe(tmp_path):
    """Root's uid, but a bounding set of only the capabilities the systemd
    unit and the DaemonSet grant (no CAP_SYS_ADMIN): every probe runs."""
    bounding = subprocess.run(["capsh", "--print"], capture_output=True, text=True, check=True).stdout
    have = next(l for l in bounding.splitlines() if l.startswith("Bounding set ="))
    others = sorted(set(have.split("=", 1)[1].split(",")) - UNIT_CAPS)
    jsonl = tmp_path / "t.jsonl"
    cfg = _config(tmp_path, f"interval: 1s\nhealth: ''\nlock_file: {tmp_path}/lock\n"
                  f"exporters: {{file: {{path: {jsonl}}}}}\n"
                  "probes: {syscall_latency: {}, cpu_profile: {}, net_flows: {udp: true}, http: {}}\n")
    cmd = f"{sys.executable} -m collector.cli run --config {cfg} --duration 5"
    agent = subprocess.Popen(["capsh", f"--drop={','.join(others)}", "--", "-c", cmd], cwd=ROOT,
                             stderr=subprocess.PIPE, text=True)
    err = []
    for line in agent.stderr:  # traffic for net_flows once it collects
        err.append(line)
        if "collecting every" in line:
            break
    with socket.create_server(("127.0.0.1", 0)) as srv:
        with socket.create_connection(srv.getsockname()) as c, srv.accept()[0] as a:
            c.sendall(b"x" * 5000)
            a.recv(8192)
    err += agent.stderr.readlines()
    assert agent.wait(timeout=60) == 0, "".join(err)
    stderr = "".join(err)
    assert "Traceback" not in stderr and "skipped" not in stderr, stderr
    for probe in ("syscall_latency", "cpu_profile", "net_flows", "http"):
        assert f"probe {probe}: running" in stderr, stderr
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    metric_names = {m["name"] for line in lines for rm in line.get("resourceMetrics", [])
                    for sm in rm.get("scopeMetrics", []) for m in sm.get("metrics", [])}
    assert {"otelbpf.syscall.duration", "otelbpf.network.io"} <= metric_names, metric_names
    assert any(line.get("resourceProfiles") for line in lines)  # the profiler sampled
    check = subprocess.run(["capsh", f"--drop={','.join(others)}", "--", "-c",
                            f"{sys.executable} -m collector.cli check --config {cfg}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    caps = next(l for l in check.stdout.splitlines() if "effective:" in l)
    assert check.returncode == 0 and "CAP_BPF" in caps and "CAP_SYS_ADMIN" not in caps, check.stdout
    for probe in ("syscall_latency", "cpu_profile", "net_flows", "http"):
        assert f"  {probe}: runs" in check.stdout, check.stdout
