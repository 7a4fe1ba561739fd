"""The kernel's pool of unwind rows (bpf map `unwind_rows`) and which
binary's table occupies which range of it.

Tables are written straight into the map through mmap (BPF_F_MMAPABLE):
one copy, no syscall per row. Only the pages a table goes to are mapped,
and only while it is written: the kernel maps every page of a BPF array at
mmap time, so a mapping of the whole pool kept all of it (16 MiB) in the
agent's RSS. The pool is bounded by its size; when a new table does not
fit, the tables used least recently are evicted, after every process entry
that points at them was rewritten without them (the caller's
`on_evict`), so the kernel never walks with another binary's rows.
"""
from __future__ import annotations

import collections
import mmap
import time
from dataclasses import dataclass
from typing import Callable, Optional

ROW_BYTES = 8           # struct unwind_row
EVICT_GRACE_S = 0.01    # lets a walk that read the old process entry finish


@dataclass
class LoadedTable:
    start: int          # first row in the pool
    n_rows: int
    last_used: float


class RangeAllocator:
    """First-fit over [0, capacity), adjacent free ranges merged."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._free = [(0, capacity)]   # (start, length), sorted by start

    def alloc(self, n: int) -> Optional[int]:
        for i, (start, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = (start + n, length - n)
                return start
        return None

    def release(self, start: int, n: int) -> None:
        self._free.append((start, n))
        self._free.sort()
        merged = []
        for s, length in self._free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((s, length))
        self._free = merged

    @property
    def free_rows(self) -> int:
        return sum(length for _, length in self._free)


class RowPool:
    def __init__(self, rows_map, on_evict: Callable[[object], None]):
        self.capacity = rows_map.max_entries
        self._map = rows_map     # its fd stays open as long as the map
        self._alloc = RangeAllocator(self.capacity)
        self._tables: "collections.OrderedDict[object, LoadedTable]" = collections.OrderedDict()
        self._on_evict = on_evict
        self.evictions = 0
        self.too_big = 0     # tables larger than the whole pool

    def get(self, key) -> Optional[LoadedTable]:
        t = self._tables.get(key)
        if t is not None:
            t.last_used = time.monotonic()
            self._tables.move_to_end(key)
        return t

    def touch(self, key) -> None:
        self.get(key)

    def load(self, key, rows: bytes) -> Optional[LoadedTable]:
        n = len(rows) // ROW_BYTES
        if n == 0:
            return None
        if n > self.capacity:
            self.too_big += 1
            return None
        start = self._alloc.alloc(n)
        while start is None and self._tables:
            self._evict_oldest()
            start = self._alloc.alloc(n)
        if start is None:
            return None
        self._write(start, rows)
        t = LoadedTable(start, n, time.monotonic())
        self._tables[key] = t
        return t

    def _write(self, start: int, rows: bytes) -> None:
        lo = start * ROW_BYTES
        page = lo - lo % mmap.PAGESIZE
        with mmap.mmap(self._map.fd, lo + len(rows) - page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                       offset=page) as mm:
            mm[lo - page:] = rows

    def _evict_oldest(self) -> None:
        key, t = self._tables.popitem(last=False)
        self._on_evict(key)          # process entries stop pointing at it first
        time.sleep(EVICT_GRACE_S)
        self._alloc.release(t.start, t.n_rows)
        self.evictions += 1

    @property
    def used_rows(self) -> int:
        return self.capacity - self._alloc.free_rows

    @property
    def tables(self) -> int:
        return len(self._tables)

    def close(self) -> None:
        self._map = None
