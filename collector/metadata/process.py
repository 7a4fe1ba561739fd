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
    """Executable names by pid. Entries are keyed by (pid, start time, comm):
    a reused pid is not given its predecessor's name, and a process that
    exec()s another program is not kept under the name it had before (a
    forked child is first seen, between fork and exec, as its parent)."""

    def __init__(self, max_entries: int = 8192):
        self._max = max_entries
        self._cache: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()

    @staticmethod
    def _identity(pid: int) -> Optional[tuple]:
        """(start time, comm) from /proc/PID/stat; None when it is gone."""
        stat = _read(f"/proc/{pid}/stat")
        if not stat or ")" not in stat:
            return None
        # the comm field may contain spaces and parens: split at the last ')'
        head, tail = stat.rsplit(")", 1)
        fields = tail.split()
        return (fields[19], head.split("(", 1)[-1]) if len(fields) > 19 else None

    def executable_name(self, pid: int, fallback: Optional[str] = None) -> Optional[str]:
        ident = self._identity(pid)
        hit = self._cache.get(pid)
        if hit and ident is not None and hit[0] == ident:
            self._cache.move_to_end(pid)
            return hit[1]
        name = _read(f"/proc/{pid}/comm") if ident is not None else None
        name = name or fallback
        if ident is not None and name:
            self._cache[pid] = (ident, name)
            if len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return name

    def forget(self, pid: int) -> None:
        self._cache.pop(pid, None)
