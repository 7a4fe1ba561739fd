"""The unwind tables' upkeep in the agent (collector/unwind: pool, procs,
stacks), against the real kernel's maps and live processes."""
from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest
from conftest import ROOT, needs_root

from collector.libbpf import BpfObject
from collector.symbolize.debuginfo import load_table
from collector.unwind.builder import prune
from collector.unwind.pool import ROW_BYTES, RangeAllocator, RowPool
from collector.unwind.procs import exec_mappings, mapping_bias, pack_proc, unpack_proc
from collector.unwind.stacks import PC_EXACT, decode

OBJ = ROOT / "bpf" / "cpu_profile.bpf.o"


def test_range_allocator_reuses_and_merges_freed_ranges():
    a = RangeAllocator(100)
    x, y, z = a.alloc(40), a.alloc(40), a.alloc(20)
    assert (x, y, z) == (0, 40, 80) and a.alloc(1) is None
    a.release(x, 40)
    a.release(y, 40)          # adjacent to x's range: one free range of 80
    assert a.free_rows == 80 and a.alloc(80) == 0


@pytest.fixture
def rows_map():
    if not OBJ.exists():
        pytest.skip("make bpf first")
    obj = BpfObject(str(OBJ))
    obj.map("unwind_rows").set_max_entries(1024)
    obj.load()
    yield obj.map("unwind_rows")
    obj.close()


@needs_root
def test_row_pool_writes_rows_the_kernel_map_holds_and_evicts_the_least_recent(rows_map):
    evicted = []
    pool = RowPool(rows_map, evicted.append)
    a = struct.pack("<IhBb", 0x1000, 8, 1, 0) * 400
    b = struct.pack("<IhBb", 0x2000, 16, 2, -2) * 400
    ta, tb = pool.load("a", a), pool.load("b", b)
    # what user space wrote through mmap is what a kernel lookup returns
    assert rows_map.lookup(struct.pack("=I", ta.start)) == a[:ROW_BYTES]
    assert rows_map.lookup(struct.pack("=I", tb.start + 399)) == b[-ROW_BYTES:]
    pool.touch("a")           # b is now the least recently used
    tc = pool.load("c", struct.pack("<IhBb", 0x3000, 24, 1, 0) * 400)
    assert evicted == ["b"] and pool.get("b") is None and tc is not None
    assert pool.get("a").start == ta.start and pool.evictions == 1
    assert pool.load("huge", b"\0" * ROW_BYTES * 2048) is None and pool.too_big == 1
    pool.close()


def test_proc_entries_round_trip_sorted_by_start():
    entries = [(0x7000, 0x6000, 0x100, 5, 6, 0), (0x1000, 0, 0x200, 0, 5, 0)]
    raw = pack_proc(entries, gen=3)
    assert unpack_proc(raw) == sorted(entries)


def test_a_walked_stack_decodes_native_and_python_slots():
    slots = [0x401000, 0x402000 | PC_EXACT, 0xAA, 7, 0xBB, (1 << 32) | 9]
    raw = struct.pack("=HHI", 2, 2, 5) + struct.pack(f"={len(slots)}Q", *slots) + b"\0" * 64
    w = decode(raw)
    assert w.native == (0x401000, 0x402000 | PC_EXACT)
    assert w.python == ((0xAA, 7), (0xBB, (1 << 32) | 9)) and w.flags == 5


@needs_root
def test_the_bias_maps_a_live_address_to_its_link_time_address():
    """libc's getpid as the dynamic loader placed it in a live process, minus
    the bias we compute, is getpid's address in libc's symbol table."""
    child = subprocess.Popen([sys.executable, "-c",
                              "import ctypes, sys; f = ctypes.CDLL(None).getpid; "
                              "print(ctypes.cast(f, ctypes.c_void_p).value, flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        addr = int(child.stdout.readline())
        m = next(m for m in exec_mappings(child.pid) if m.start <= addr < m.end)
        assert "libc.so" in m.path
        table = load_table(m.open_path(child.pid), m.path, None)
        name = table.lookup(addr - mapping_bias(child.pid, m))
        assert name is not None and name.decode().lstrip("_").startswith("getpid"), name
    finally:
        child.kill()
        child.wait()


def test_the_disk_cache_is_pruned_oldest_first(tmp_path):
    for i, name in enumerate(("old", "mid", "new")):
        f = tmp_path / name
        f.write_bytes(b"x" * 1000)
        os.utime(f, (1000 + i, 1000 + i))
    assert prune(str(tmp_path), 2000) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mid", "new"]
