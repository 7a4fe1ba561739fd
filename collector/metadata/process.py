"""pid -> process attributes, read from /proc, cached with a bound."""
from __future__ import annotations

import collections
import os
from typing import Optional


def _read(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace").strip()
    except OSError:
        return None


def alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


class ProcessCache:
    """Executable names by pid. Entries are keyed by (pid, start time) so a
    reused pid is not given its predecessor's name."""

    def __init__(self, max_entries: int = 8192):
        self._max = max_entries
        self._cache: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()

    @staticmethod
    def _start_time(pid: int) -> Optional[str]:
        stat = _read(f"/proc/{pid}/stat")
        if not stat:
            return None
        # the comm field may contain spaces and parens: split after the last ')'
        fields = stat.rsplit(")", 1)[-1].split()
        return fields[19] if len(fields) > 19 else None

    def executable_name(self, pid: int, fallback: Optional[str] = None) -> Optional[str]:
        start = self._start_time(pid)
        hit = self._cache.get(pid)
        if hit and hit[0] == start and start is not None:
            self._cache.move_to_end(pid)
            return hit[1]
        name = _read(f"/proc/{pid}/comm") if start is not None else None
        name = name or fallback
        if start is not None and name:
            self._cache[pid] = (start, name)
            if len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return name

    def forget(self, pid: int) -> None:
        self._cache.pop(pid, None)
