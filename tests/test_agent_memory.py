"""What keeps the agent's memory small, checked structurally (no timings,
no RSS thresholds: those depend on the host; bench/profiler_overhead.py
measures them):
- the unwind row pool is mapped only while a table is written, not for the
  agent's lifetime (a BPF array's every page is resident once mapped);
- capstone (the TLS uprobe placement's decoder) runs in a child, never in
  the agent; bcc and LLVM are not loaded either;
- what glibc kept of memory freed while probes started goes back, and its
  arenas are capped (collector/heap.py);
- libbpf's 4 MiB message buffer is resident only where messages reached."""
from __future__ import annotations

import os
import struct

import pytest
from conftest import ROOT, needs_root, wait_until

from collector import heap, libbpf
from collector.unwind.pool import RowPool

POOL_OBJ = ROOT / "tests" / "bpf" / "row_pool_test.bpf.o"
LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"


def _bpf_map_mappings(pid="self") -> list:
    with open(f"/proc/{pid}/maps") as f:
        return [line for line in f if "anon_inode:bpf-map" in line]


def _thread_arenas(pid) -> int:
    """glibc's arenas besides the main one: heaps of HEAP_MAX_SIZE (64 MiB on
    64-bit), aligned to it, a read-write part then PROT_NONE."""
    rows = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            rows.append((lo, hi, fields[1], len(fields) > 5))
    n = 0
    for (lo, hi, perm, named), nxt in zip(rows, rows[1:] + [None]):
        if perm != "rw-p" or named or lo % (64 << 20):
            continue
        reserved = nxt[1] if nxt is not None and nxt[0] == hi and nxt[2] == "---p" else hi
        n += reserved - lo == 64 << 20
    return n


def _rows(n: int, seed: int) -> bytes:
    return b"".join(struct.pack("<IhBb", seed + i * 4, i % 300, 1 + i % 5, -(i % 7)) for i in range(n))


@needs_root
def test_row_pool_writes_through_windows_it_unmaps():
    """Tables at starts that are no page multiple, across page ends, after
    an eviction: every row reads back through the map's syscall interface,
    and no mapping of the map outlives a write."""
    obj = libbpf.BpfObject(str(POOL_OBJ))
    obj.load()
    try:
        rows_map = obj.map("unwind_rows")
        evicted = []
        before = _bpf_map_mappings()
        pool = RowPool(rows_map, evicted.append)
        tables = {"a": _rows(700, 0x1000), "b": _rows(1300, 0x20000), "c": _rows(900, 0x40000)}
        for key, rows in tables.items():
            assert pool.load(key, rows) is not None
            assert _bpf_map_mappings() == before
        assert pool.load("d", _rows(600, 0x80000)) is not None     # 2900 of 3000 used: "a" goes
        assert evicted == ["a"]
        tables["d"] = _rows(600, 0x80000)
        del tables["a"]
        for key, rows in tables.items():
            t = pool.get(key)
            got = b"".join(rows_map.lookup(struct.pack("=I", t.start + i)) for i in range(t.n_rows))
            assert got == rows, key
        assert pool.used_rows == 2800
        assert _bpf_map_mappings() == before
        pool.close()
    finally:
        obj.close()


@needs_root
def test_agent_with_every_probe_maps_no_decoder_nor_pool(agent_factory, tmp_path):
    """The default probes (every one) with their TLS uprobes placed: after
    collections the agent maps neither libcapstone (nor bcc, nor LLVM) nor
    the unwind row pool, the placement still found the cheap sites, and
    its threads share heap.ARENAS glibc arenas."""
    out = tmp_path / "t.jsonl"
    agent = agent_factory({"interval": "1s", "lock_file": str(tmp_path / "lock"), "health": "",
                           "exporters": {"file": {"path": str(out)}}})
    agent.wait_for_log("collecting every", timeout=120)
    assert "probe cpu_profile: running" in agent.stderr() and "probe http: running" in agent.stderr()
    assert wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 3, timeout=30)
    with open(f"/proc/{agent.pid}/maps") as f:
        libs = {line.split()[5] for line in f if len(line.split()) > 5}
    assert not [lib for lib in libs if any(n in lib for n in ("libcapstone", "libbcc", "libLLVM"))]
    if os.path.exists(LIBSSL):
        assert "SSL_read_ex/SSL_read -> internal" in agent.stderr()   # placed by the child, as before
    pool = [m for m in _bpf_map_mappings(agent.pid) if "rw-s" in m]
    sizes = [int(b, 16) - int(a, 16) for a, b in (m.split()[0].split("-") for m in pool)]
    assert 16 << 20 not in sizes, pool                               # the default unwind_table_memory
    if "MALLOC_ARENA_MAX" not in os.environ:                        # that would decide instead
        assert _thread_arenas(agent.pid) <= heap.ARENAS - 1


def test_release_freed_returns_pages_glibc_kept():
    """Freed chunks under a live one stay resident until trimmed (the
    agent's heap after libbpf indexed the kernel's BTF for each object)."""
    import ctypes
    import psutil
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    chunks = [libc.malloc(16 << 10) for _ in range(4096)]       # 64 MiB, below the mmap threshold
    for c in chunks:
        ctypes.memset(c, 1, 16 << 10)
    pin = libc.malloc(64)                                        # above them: the heap cannot shrink
    for c in chunks:
        libc.free(c)
    rss = psutil.Process().memory_info().rss
    heap.release_freed()
    assert psutil.Process().memory_info().rss < rss - (32 << 20)
    libc.free(pin)


def _rss_kb_of_mapping_at(addr: int) -> int:
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1])
    raise AssertionError(f"{addr:#x} is in no mapping")


@needs_root
def test_libbpf_message_buffer_is_not_resident():
    """A verifier log went through it (the rejection's reason is read from
    it), and still only its first pages are resident, not its 4 MiB."""
    import ctypes
    obj = libbpf.BpfObject(str(ROOT / "tests" / "bpf" / "verifier_reject.bpf.o"))
    try:
        with pytest.raises(libbpf.BpfError) as err:
            obj.load()
    finally:
        obj.close()
    assert err.value.log
    assert len(libbpf._PRINT_BUF) == 4 << 20
    assert _rss_kb_of_mapping_at(ctypes.addressof(libbpf._PRINT_BUF)) < 1024
