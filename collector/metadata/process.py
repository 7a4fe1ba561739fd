"""pid -> process attributes, read from /proc, cached with a bound."""
from __future__ import annotations

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


class ProcessNames:
    """Executable names by pid, read from /proc/PID/stat once per collection
    pass (begin_pass): the name is the process's comm as it is then, so a reused pid is never given
    its predecessor's name, and a process that exec()s another program is
    not kept under the name it had before (a forked child is first seen,
    between fork and exec, as its parent)."""

    def __init__(self):
        self._names: dict = {}   # pid -> name, this collection pass only

    def begin_pass(self) -> None:
        """A probe's collection starts: names are read again from /proc (once
        per pid per pass: a pass names a thousand spans of one server with
        one read, not a thousand)."""
        self._names.clear()

    @staticmethod
    def identity(pid: int) -> Optional[tuple]:
        """(start time, comm) from /proc/PID/stat; None when it is gone. The
        pair names one program run: start time for pid reuse, comm for exec."""
        stat = _read(f"/proc/{pid}/stat")
        if not stat or ")" not in stat:
            return None
        # the comm field may contain spaces and parens: split at the last ')'
        head, tail = stat.rsplit(")", 1)
        fields = tail.split()
        return (fields[19], head.split("(", 1)[-1].strip()) if len(fields) > 19 else None

    def executable_name(self, pid: int, fallback: Optional[str] = None) -> Optional[str]:
        if pid not in self._names:
            ident = self.identity(pid)
            self._names[pid] = ident[1] if ident is not None else None
        return self._names[pid] or fallback
