"""Adds per-process resource-like attributes to every record that names a
process: container.id, k8s.pod.uid, process.executable.path, process.owner.
Cached per (pid, start time, comm), bounded, so a reused pid never inherits;
an exited process keeps its last attributes for its final records."""
from __future__ import annotations

import collections
import os
import pwd

from ..records import Profile
from .container import container_of
from .process import ProcessNames


MAX_COMMAND_LINE = 1024


def command_line(pid: int):
    """The process's arguments joined by spaces (NULs in /proc), bounded."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(MAX_COMMAND_LINE + 1)
    except OSError:
        return None
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", errors="replace")
    return text[:MAX_COMMAND_LINE] or None


class ProcessEnricher:
    def __init__(self, max_entries: int = 16384, pods=None, command_line: bool = False):
        """pods: a kubernetes.PodCache (or None): pod UID -> pod attributes.
        command_line: add process.command_line (off by default: arguments
        can hold secrets)."""
        self.pods = pods
        self.command_line = command_line
        self._cache: "collections.OrderedDict[tuple, dict]" = collections.OrderedDict()
        self._last: "collections.OrderedDict[int, dict]" = collections.OrderedDict()  # pid -> newest attrs
        self._max = max_entries
        self._owners: dict = {}

    def _owner(self, uid: int) -> str:
        if uid not in self._owners:
            try:
                self._owners[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._owners[uid] = str(uid)
        return self._owners[uid]

    def attributes(self, pid: int) -> dict:
        ident = ProcessNames.identity(pid)   # (start time, comm): an exec is a new entry
        if ident is None:
            # exited: its last records keep the attributes its series had, so
            # the final export is the same series, not a new one
            return self._last.get(pid, {})
        key = (pid, ident)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        attrs = dict(container_of(pid))
        try:
            attrs["process.executable.path"] = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            pass
        try:
            attrs["process.owner"] = self._owner(os.stat(f"/proc/{pid}").st_uid)
        except OSError:
            pass
        if self.command_line:
            cmd = command_line(pid)
            if cmd:
                attrs["process.command_line"] = cmd
        self._cache[key] = attrs
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        self._last[pid] = attrs
        self._last.move_to_end(pid)
        if len(self._last) > self._max:
            self._last.popitem(last=False)
        return attrs

    def enrich(self, records: list) -> None:
        """In place: metric records with process.pid, and profile samples. A
        process with many records (one per syscall...) is looked up once."""
        seen: dict = {}
        for r in records:
            if isinstance(r, Profile):
                for s in r.samples:
                    self._add(s, seen)
            else:
                self._add(r, seen)

    def _extra(self, pid: int) -> dict:
        extra = self.attributes(pid)
        uid = extra.get("k8s.pod.uid")
        if uid and self.pods is not None:
            pod = self.pods.get(uid)  # looked up each call: the watch may have learnt it since
            if pod:
                extra = {**extra, **pod}
        return extra

    def _add(self, rec, seen: dict) -> None:
        pid = rec.attributes.get("process.pid")
        if isinstance(pid, int) and pid > 0:
            extra = seen.get(pid)
            if extra is None:
                extra = seen[pid] = self._extra(pid)
            if extra and not all(k in rec.attributes for k in extra):
                rec.attributes = {**rec.attributes, **extra}
