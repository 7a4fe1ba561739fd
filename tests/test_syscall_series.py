"""Series bounding in the syscall_latency probe's user-space half: top-N
per-pid series, per-executable aggregation for the rest, idle demotion,
max_series overflow. Fed with synthetic kernel deltas (the kernel half is
tested in test_syscall_latency.py)."""
from __future__ import annotations

import os
import subprocess

import pytest
from collector.config import PROBE_COMMON, parse_section
from collector.metadata.process import ProcessNames
from probes.syscall_latency import IDLE_TICKS, NBUCKETS, SyscallLatencyProbe, syscall_table


def _probe(**cfg):
    schema = dict(PROBE_COMMON)
    schema.update(SyscallLatencyProbe.config_schema)
    p = SyscallLatencyProbe.__new__(SyscallLatencyProbe)
    p.config = parse_section(cfg, schema, "probes.syscall_latency")
    p._table = syscall_table()
    p._procs = ProcessNames()
    p._cgroups = None
    p._series, p._pid_series, p._retiring = {}, {}, set()
    p._series_overflow, p._tick, p._last_tick_ns = 0, 0, 0
    return p


def _delta(pid, nr=0, n=1):
    b = [0] * NBUCKETS
    b[5] = n
    return (pid, nr, f"comm{pid % 7}", b, 30 * n, 0)


def _tick(p, deltas):
    p._tick += 1
    for pid in p._retiring:
        p._retire_pid(pid)
    p._retiring = set()
    p._route(deltas, 0)


FAKE = 4_000_000  # pids that do not exist: names come from the kernel's comm


@pytest.fixture
def live():
    """Three live pids (only live processes get per-pid series)."""
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    yield [p.pid for p in procs]
    for p in procs:
        p.kill()
        p.wait()


def test_top_n_get_pids_the_rest_aggregate_by_executable(live):
    a, b, c = live
    p = _probe(top_processes=2)
    _tick(p, [_delta(a, n=100), _delta(b, n=50), _delta(c, n=1), _delta(FAKE + 3, n=1), _delta(FAKE + 10, n=1)])
    keys = [dict(k) for k in p._series]
    with_pid = sorted(k["process.pid"] for k in keys if "process.pid" in k)
    assert with_pid == sorted([a, b])
    assert {"process.executable.name": "sleep", "syscall.name": p._table[0]} in keys  # c, aggregated
    rest = [k for k in keys if "process.pid" not in k and k["process.executable.name"] != "sleep"]
    # FAKE+3 and FAKE+10 have the same comm: one series without a pid
    assert len(rest) == 1 and rest[0]["process.executable.name"] == f"comm{(FAKE + 3) % 7}"
    assert sum(a.buckets[5] for a in p._series.values()) == 153  # nothing lost


def test_exited_processes_get_no_pid_series():
    p = _probe(top_processes=5)
    _tick(p, [_delta(FAKE + 1, n=100)])
    assert not p._pid_series
    assert [dict(k).get("process.pid") for k in p._series] == [None]


def test_idle_pid_series_are_demoted_to_make_room(live):
    a, b, _ = live
    p = _probe(top_processes=1)
    _tick(p, [_delta(a)])
    assert list(p._pid_series) == [a]
    for _ in range(IDLE_TICKS + 2):
        _tick(p, [_delta(b)])
    assert list(p._pid_series) == [b]
    assert not any(("process.pid", a) in k for k in p._series)


def test_max_series_overflow_keeps_counts():
    p = _probe(top_processes=0, max_series=3)
    _tick(p, [_delta(FAKE + i, nr=i) for i in range(10)])
    regular = [k for k in p._series if ("otelbpf.overflow", True) not in k]
    overflow = [k for k in p._series if ("otelbpf.overflow", True) in k]
    assert len(regular) == 3
    assert len(overflow) == 7  # one overflow series per syscall: bounded by the syscall table
    assert p._series_overflow == 7
    assert sum(a.buckets[5] for a in p._series.values()) == 10


def test_live_process_named_from_proc():
    p = _probe()
    _tick(p, [_delta(os.getpid())])
    (key,) = p._series
    attrs = dict(key)
    assert attrs["process.pid"] == os.getpid()
    assert attrs["process.executable.name"] == open("/proc/self/comm").read().strip()
