"""The ctypes libbpf binding against the real kernel: globals, maps (batch
and per-key), ring buffer, every attach type the agent uses, error reporting
and cleanup."""
from __future__ import annotations

import ctypes
import errno
import os
import struct
import time

import pytest
from conftest import ROOT, bpftool_objects, needs_root

from collector import features, libbpf, perf

pytestmark = needs_root
BPF = ROOT / "tests" / "bpf"
NR_GETPPID = {"x86_64": 110, "aarch64": 173}[os.uname().machine]
HIT_TRACEPOINT, HIT_UPROBE, HIT_PERF_EVENT = 0, 1, 2


def _libc_path() -> str:
    for line in open("/proc/self/maps"):
        if "libc.so" in line:
            return line.split()[-1]
    raise AssertionError("libc not mapped")


@pytest.fixture
def engine():
    obj = libbpf.BpfObject(BPF / "engine_test.bpf.o")
    obj.set_global("target_tgid", struct.pack("=I", os.getpid()))
    obj.set_global("magic", struct.pack("=Q", 0xC0FFEE))
    obj.load()
    yield obj
    obj.close()


def _u64(b: bytes) -> int:
    return struct.unpack("=Q", b[:8])[0]


def test_raw_tracepoint_maps_and_ring_buffer(engine):
    events = []
    rb = engine.ring_buffer("events", events.append)
    engine.program("engine_enter").attach()
    libc = ctypes.CDLL(None)
    for _ in range(100):
        libc.syscall(NR_GETPPID)
    rb.poll(100)
    rb.consume()
    decoded = [struct.unpack("=QII", e) for e in events]
    ours = [d for d in decoded if d[2] == NR_GETPPID]
    assert len(ours) >= 100 and all(d[0] == 0xC0FFEE and d[1] == os.getpid() for d in ours)
    assert rb.callback_errors == 0

    counts = engine.map("counts")
    key = struct.pack("=I", NR_GETPPID)
    assert _u64(counts.lookup(key)) >= 100
    # batch read and per-key iteration agree
    batch = dict(counts._items_batch(chunk=2))
    slow = {k: counts.lookup(k) for k in counts.keys()}
    assert batch.keys() == slow.keys() and len(batch) >= 1
    # per-CPU values, one per possible CPU
    per_cpu = engine.map("total").lookup_percpu(struct.pack("=I", 0))
    assert len(per_cpu) == libbpf.num_possible_cpus()
    assert sum(_u64(v) for v in per_cpu) >= 100
    # user-space update and delete
    counts.update(struct.pack("=I", 999), struct.pack("=Q", 7))
    assert _u64(counts.lookup(struct.pack("=I", 999))) == 7
    assert counts.delete(struct.pack("=I", 999)) is True
    assert counts.lookup(struct.pack("=I", 999)) is None
    assert counts.delete(struct.pack("=I", 999)) is False
    # batch delete, with a missing key in the middle
    keys = [struct.pack("=I", 1000 + i) for i in range(4)]
    for k in keys:
        counts.update(k, struct.pack("=Q", 1))
    assert counts.delete_many([keys[0], keys[1], struct.pack("=I", 5555), keys[2], keys[3]]) == 4
    assert all(counts.lookup(k) is None for k in keys)


def test_tracepoint_uprobe_and_perf_event_attach(engine):
    features.ensure_tracefs()
    engine.program("engine_tp").attach()
    engine.program("engine_uprobe").attach_uprobe(_libc_path(), func_name="getppid")
    fds = [perf.open_cpu_clock(cpu, freq=999) for cpu in range(os.cpu_count())]
    try:
        for fd in fds:
            engine.program("engine_perf").attach_perf_event(fd)
        for _ in range(1000):
            os.getppid()  # libc's getppid: the uprobe and the tracepoint
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            pass
    finally:
        for fd in fds:
            os.close(fd)
    hits = engine.map("hits")
    got = [_u64(hits.lookup(struct.pack("=I", i))) for i in range(3)]
    assert got[HIT_TRACEPOINT] >= 1000
    assert got[HIT_UPROBE] >= 1000
    assert got[HIT_PERF_EVENT] > 0


def test_close_detaches_and_frees():
    obj = libbpf.BpfObject(BPF / "engine_test.bpf.o")
    obj.load()
    obj.program("engine_enter").attach()
    prog_id = next(p["id"] for p in bpftool_objects("prog") if p.get("name") == "engine_enter")
    obj.close()
    obj.close()  # idempotent
    deadline = time.monotonic() + 10
    while any(p["id"] == prog_id for p in bpftool_objects("prog")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(p["id"] == prog_id for p in bpftool_objects("prog"))


def test_verifier_rejection_names_program_and_errno_with_log(capfd):
    obj = libbpf.BpfObject(BPF / "verifier_reject.bpf.o")
    with pytest.raises(libbpf.BpfError) as e:
        obj.load()
    obj.close()
    err = e.value
    assert err.errno == errno.EACCES
    assert "verifier_reject.bpf.o" in str(err)
    assert "rejected_prog" in err.log
    assert "map_value_or_null" in err.log  # the verifier's own words
    assert capfd.readouterr().err == ""   # captured, not sprayed on stderr


def test_globals_are_checked():
    obj = libbpf.BpfObject(BPF / "engine_test.bpf.o")
    try:
        with pytest.raises(ValueError):
            obj.set_global("target_tgid", b"\0" * 8)
        with pytest.raises(libbpf.BpfError):
            obj.set_global("no_such_global", b"\0")
        obj.load()
        with pytest.raises(libbpf.BpfError):
            obj.set_global("target_tgid", b"\0" * 4)
    finally:
        obj.close()


def test_missing_object_and_attach_errors(engine):
    with pytest.raises(libbpf.BpfError) as e:
        libbpf.BpfObject("/nonexistent/x.bpf.o")
    assert e.value.errno == errno.ENOENT and "make bpf" in str(e.value)
    with pytest.raises(libbpf.BpfError) as e:
        engine.program("engine_uprobe").attach_uprobe(_libc_path(), func_name="no_such_function_xyz")
    assert "engine_uprobe" in str(e.value) and "no_such_function_xyz" in str(e.value)
    with pytest.raises(libbpf.BpfError) as e:
        engine.program("nope")
    assert e.value.errno == errno.ENOENT
