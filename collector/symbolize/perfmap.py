"""JIT symbols from /tmp/perf-PID.map (Node --perf-basic-prof, perf-map-agent,
CPython -X perf): lines "START SIZE name", START and SIZE in hex. Read through
/proc/PID/root so a container's map is found, re-read only when its size or
mtime changed, and bounded in lines."""
from __future__ import annotations

import bisect
import os
from array import array
from typing import Optional

MAX_LINES = 500_000   # a runaway JIT's map is cut here rather than grow the agent without bound


class PerfMap:
    def __init__(self, pid: int):
        self.path = f"/proc/{pid}/root/tmp/perf-{pid}.map"
        self._stamp = None
        self._starts = array("Q")
        self._ends = array("Q")
        self._names: list = []

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            return  # keep what we had: the process may have exited with samples pending
        stamp = (st.st_size, st.st_mtime_ns)
        if stamp == self._stamp:
            return
        entries = {}
        try:
            with open(self.path, "rb") as f:
                for n, line in enumerate(f):
                    if n >= MAX_LINES:
                        break
                    parts = line.rstrip(b"\n").split(b" ", 2)
                    if len(parts) != 3:
                        continue
                    try:
                        start, size = int(parts[0], 16), int(parts[1], 16)
                    except ValueError:
                        continue
                    if size:
                        entries[start] = (start + size, parts[2])  # a later line for one address wins (code re-JITted)
        except OSError:
            return
        self._stamp = stamp
        order = sorted(entries)
        self._starts = array("Q", order)
        self._ends = array("Q", (entries[s][0] for s in order))
        self._names = [entries[s][1] for s in order]

    def lookup(self, addr: int) -> Optional[str]:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._ends[i]:
            return self._names[i].decode(errors="replace")
        return None
