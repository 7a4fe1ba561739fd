"""A kernel (or a sandbox) that refuses a hook, for real: a seccomp filter
denies the syscall, as container runtimes' default profiles do. The probe
that needs it is skipped with one line; the others run."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, needs_root

DENY = [sys.executable, str(ROOT / "tests" / "workloads" / "seccomp_deny.py")]


def _config(tmp_path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def _agent(prefix: list, cfg: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(prefix + [sys.executable, "-m", "collector.cli", *args, "--config", cfg], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def _lines(err: str, needle: str) -> list:
    return [line for line in err.splitlines() if needle in line]


@needs_root
def test_perf_events_denied_skip_the_profiler_and_tls_only(tmp_path):
    cfg = _config(tmp_path, "exporters: {console: {}}\nhealth: ''\n"
                  f"lock_file: {tmp_path}/lock\n"
                  "probes: {syscall_latency: {}, cpu_profile: {}, http: {tls: true}}\n")
    proc = _agent(DENY + ["perf_event_open", "EACCES", "--"], cfg, "run", "--duration", "3")
    err = proc.stderr
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    (skipped,) = _lines(err, "probe cpu_profile: skipped")
    assert "perf_event_open failed: Permission denied" in skipped and "seccomp" in skipped
    assert _lines(err, "probe syscall_latency: running") and _lines(err, "probe http: running")
    (tls,) = _lines(err, "TLS:")  # one line, not one per library
    assert "uprobes cannot be attached here" in tls
    # the live view shows the probes that run
    assert "otelbpf.syscall.duration" in proc.stdout
    check = _agent(DENY + ["perf_event_open", "EACCES", "--"], cfg, "check")
    assert check.returncode == 0, check.stderr
    assert "[no] perf_event" in check.stdout
    assert "cpu_profile: cannot run: needs perf_event" in check.stdout


@needs_root
def test_tracefs_that_cannot_be_mounted_is_one_line_and_the_probes_run(tmp_path):
    """A private mount namespace without tracefs, where mount() is denied."""
    cfg = _config(tmp_path, "exporters: {console: {}}\nhealth: ''\n"
                  f"lock_file: {tmp_path}/lock\n"
                  "probes: {syscall_latency: {}, net_flows: {}}\n")
    inner = (f"umount -l /sys/kernel/tracing 2>/dev/null; umount -l /sys/kernel/debug 2>/dev/null; "
             f"grep -q ' tracefs ' /proc/mounts && exit 99; "
             f"exec {' '.join(DENY)} mount EPERM -- {sys.executable} -m collector.cli run --config {cfg} "
             f"--duration 3")
    host_had_tracefs = " tracefs " in open("/proc/mounts").read()
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", inner], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    err = proc.stderr
    assert proc.returncode != 99, "tracefs could not be unmounted in the test's namespace"
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    (line,) = _lines(err, "tracefs is not mounted")
    assert "Operation not permitted" in line and "mount -t tracefs" in line
    assert _lines(err, "probe syscall_latency: running") and _lines(err, "probe net_flows: running")
    # the host's mounts are untouched by the test's namespace
    assert (" tracefs " in open("/proc/mounts").read()) == host_had_tracefs
