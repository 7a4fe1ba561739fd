"""What keeps the agent's memory small, checked structurally (no timings,
no RSS thresholds: those depend on the host; bench/profiler_overhead.py
measures them):
- the unwind row pool is mapped only while a table is written, not for the
  agent's lifetime (a BPF array's every page is resident once mapped);
- capstone (the TLS uprobe placement's decoder) runs in a child, never in
  the agent; bcc and LLVM are not loaded either;
- what glibc kept of memory freed while probes started goes back."""
from __future__ import annotations

import os
import struct

from conftest import ROOT, needs_root, wait_until

from collector import libbpf
from collector.unwind.pool import RowPool

POOL_OBJ = ROOT / "tests" / "bpf" / "row_pool_test.bpf.o"
LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"


def _bpf_map_mappings(pid="self") -> list:
    with open(f"/proc/{pid}/maps") as f:
        return [line for line in f if "anon_inode:bpf-map" in line]


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
    the unwind row pool, and the placement still found the cheap sites."""
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


def test_release_freed_returns_pages_glibc_kept():
    """Freed chunks under a live one stay resident until trimmed (the
    agent's heap after libbpf indexed the kernel's BTF for each object)."""
    import ctypes
    import psutil
    from collector import heap
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
