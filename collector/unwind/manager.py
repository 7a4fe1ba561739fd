"""Keeps the kernel walker's tables current, in a thread of its own.

The kernel asks (map `unwind_wanted`) for processes it sampled without a
mapping table, or whose pc fell outside every mapping (dlopen, exec). This
thread answers: it reads the process's mappings, loads the tables the cache
holds, builds missing ones in a child process (collector.unwind.build; one
at a time, waited for by a thread of its own so that new processes are not
held up), writes them into the row pool and the process's entry. Nothing of
this runs on the collection path; a sample taken before its table exists is
walked by frame pointers and still counted.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..metadata.process import alive
from .pool import RowPool
from .procs import BinaryIdentity, exec_mappings, mapping_bias, pack_proc
from .rows import UnwindTable

log = logging.getLogger("otelbpf.unwind")

POLL_S = 0.2
REFRESH_MIN_S = 1.0         # a process's mappings are re-read at most this often
REAP_EVERY_S = 5.0          # entries of exited processes are removed this often
_PID = struct.Struct("=I")
_WANT = struct.Struct("=IIQ")    # struct want_key: pid, why, mapping start
WANT_PROCESS, WANT_MAPPING, WANT_REFRESH = 1, 2, 3


@dataclass
class TrackedProcess:
    mappings: list                     # ExecMapping, as last read
    keys: dict                         # ExecMapping -> binary key
    biases: dict                       # ExecMapping -> pc - link-time address (None: unknown)
    refreshed: float
    sampled: float
    binaries: set = field(init=False)

    def __post_init__(self):
        self.binaries = set(self.keys.values())


@dataclass
class _Build:
    """One table being built, by a thread that waits for the build child."""
    key: tuple
    mapping: object                    # ExecMapping
    started: float
    thread: Optional[threading.Thread] = None
    table: Optional[UnwindTable] = None
    ended: Optional[float] = None


class UnwindManager:
    def __init__(self, obj, builder, max_processes: int, python: Optional[Callable] = None):
        """builder: a collector.unwind.builder.TableBuilder; python(pid)
        -> (py_procs value or None, whether to ask again later: an
        interpreter not initialised yet)."""
        self._procs_map = obj.map("unwind_procs")
        self._wanted_map = obj.map("unwind_wanted")
        self._py_map = obj.map("py_procs") if python else None
        self._builder = builder
        self._python = python
        self._max_processes = max_processes
        self.pool = RowPool(obj.map("unwind_rows"), self._evicted)
        self._ids = BinaryIdentity()
        self._procs: dict = {}          # pid -> TrackedProcess
        self._failed: dict = {}         # binary key -> why no table (not retried)
        self._queue: dict = {}          # binary key -> [samples that lacked it, pid, mapping]
        self._lock = threading.Lock()   # _procs is touched by collect() through sampled()
        self._stop = threading.Event()
        self._gen = 0
        self._python_later: set = set()   # pids whose interpreter was not ready yet
        self._building: Optional[_Build] = None
        self.build_seconds: dict = {}   # binary path -> seconds, the most recent builds
        self.stats = {"tables_built": 0, "tables_cached": 0, "tables_failed": 0, "build_seconds": 0.0,
                      "processes_evicted": 0}
        self._thread = threading.Thread(target=self._run, name="otelbpf-unwind", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.pool.close()

    def sampled(self, pids) -> None:
        """From collect(): these processes had samples (their tables stay warm)."""
        now = time.monotonic()
        with self._lock:
            for pid in pids:
                entry = self._procs.get(pid)
                if entry is not None:
                    entry.sampled = now
                    for key in entry.binaries:
                        self.pool.touch(key)

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        last_reap = time.monotonic()
        while not self._stop.is_set():
            try:
                for pid, why, start, samples in self._take_wanted():
                    if why == WANT_MAPPING:
                        self._wanted_mapping(pid, start, samples)
                    else:
                        self._refresh(pid, forced=(why == WANT_PROCESS))
                self._build_step()
                if time.monotonic() - last_reap > REAP_EVERY_S:
                    self._reap()
                    last_reap = time.monotonic()
            except Exception:   # the profiler keeps running on frame pointers
                log.exception("unwind table upkeep failed")
            self._stop.wait(0 if self._queue and self._building is None else POLL_S)

    def _take_wanted(self) -> list:
        """(pid, why, mapping start, samples), processes before their mappings."""
        out = []
        for k in list(self._wanted_map.keys()):
            v = self._wanted_map.lookup_and_delete(k)
            if v is not None:
                out.append(_WANT.unpack(k) + _PID.unpack(v))
        return sorted(out, key=lambda w: w[1])

    def _wanted_mapping(self, pid: int, start: int, samples: int) -> None:
        """Samples walked through a mapping without rows: its table moves up the queue."""
        with self._lock:
            entry = self._procs.get(pid)
        if entry is None:
            return
        for m, key in entry.keys.items():
            if m.start == start and key in self._queue:
                self._queue[key][0] += samples

    def _refresh(self, pid: int, forced: bool) -> None:
        with self._lock:
            entry = self._procs.get(pid)
        now = time.monotonic()
        if entry is not None and not forced and now - entry.refreshed < REFRESH_MIN_S:
            return
        mappings = exec_mappings(pid)
        if not mappings:
            return
        if entry is not None and entry.mappings == mappings:
            entry.refreshed = now
            return
        if entry is None and len(self._procs) >= self._max_processes:
            self._evict_process()
        keys = {}
        for m in mappings:
            key = self._ids.key(pid, m)
            keys[m] = key
            if self.pool.get(key) is None and key not in self._failed and not self._pending(key) \
                    and not self._load_cached(key, pid, m):
                self._queue[key] = [0, pid, m]
        tracked = TrackedProcess(mappings, keys, {m: mapping_bias(pid, m) for m in mappings}, now, now)
        with self._lock:
            self._procs[pid] = tracked
        self._write(pid)
        if self._python is not None and (entry is None or pid in self._python_later):
            self._register_python(pid)

    def _pending(self, key) -> bool:
        """Queued, or being built."""
        return key in self._queue or (self._building is not None and self._building.key == key)

    def _load_cached(self, key, pid: int, m) -> bool:
        """A table the cache already holds goes into the pool now, not after
        the builds queued before it (each may take minutes at nice 10 on a
        busy host): a restarted agent walks whole stacks from the start."""
        if m.is_vdso:
            return False
        table = self._builder.cached(m.open_path(pid))
        if not table or self.pool.load(key, table.rows) is None:
            return False   # none, or empty (its reason is logged by the build path)
        self.stats["tables_cached"] += 1
        with self._lock:
            users = [p for p, e in self._procs.items() if key in e.binaries and p != pid]
        for p in users:
            self._write(p)
        return True

    def _register_python(self, pid: int) -> None:
        value, later = self._python(pid)
        if later:
            self._python_later.add(pid)
        else:
            self._python_later.discard(pid)
        if value is not None:
            self._py_map.update(_PID.pack(pid), value)

    def _write(self, pid: int) -> None:
        with self._lock:
            entry = self._procs.get(pid)
        if entry is None:
            return
        rows = []
        for m in entry.mappings:
            bias = entry.biases[m]
            if bias is None:
                continue
            t = self.pool.get(entry.keys[m])
            rows.append((m.start, bias, min(m.end - m.start, 0xFFFFFFFF),
                         t.start if t else 0, t.n_rows if t else 0, 0))
        self._gen += 1
        try:
            self._procs_map.update(_PID.pack(pid), pack_proc(rows, self._gen))
        except OSError as e:
            log.debug("pid %d: mapping table not written: %s", pid, e)

    def _build_step(self) -> None:
        """Takes in the table of a finished build, then starts the next one.
        A build is waited for by a thread of its own, so that new processes
        are answered (and tables the cache holds loaded) while a big binary
        builds, which at nice 10 on a busy host takes minutes."""
        b = self._building
        if b is not None:
            if b.thread.is_alive():
                return
            self._building = None
            self._built(b)
        if self._queue:
            self._start_build()

    def _start_build(self) -> None:
        key = max(self._queue, key=lambda k: self._queue[k][0])   # the most wanted; ties: the oldest
        wanted, pid, m = self._queue.pop(key)
        if not m.is_vdso and not os.path.exists(m.open_path(pid)):
            self._requeue_from_another_process(key, wanted)   # that process exited: not the binary's fault
            return
        b = _Build(key, m, time.monotonic())

        def run():
            try:
                b.table = self._builder.get_vdso() if m.is_vdso else \
                    self._builder.get(m.open_path(pid), known_as=m.path)
            except Exception:
                log.exception("unwind table build of %s failed", m.path)
            b.ended = time.monotonic()
        b.thread = threading.Thread(target=run, name="otelbpf-unwind-build", daemon=True)
        self._building = b
        b.thread.start()

    def _built(self, b: "_Build") -> None:
        key, m = b.key, b.mapping
        table = b.table if b.table is not None else UnwindTable(reason="build failed")
        took = (b.ended or time.monotonic()) - b.started
        self.stats["build_seconds"] += took
        if not table or self.pool.load(key, table.rows) is None:
            self._failed[key] = table.reason or "does not fit the row pool"
            self.stats["tables_failed"] += 1
            log.info("no unwind table for %s: %s (frame pointers there)", m.path, self._failed[key])
            return
        self.stats["tables_built"] += 1
        self.build_seconds[m.path] = took
        with self._lock:
            users = [p for p, e in self._procs.items() if key in e.binaries]
        for p in users:
            self._write(p)

    def _requeue_from_another_process(self, key, wanted: int) -> None:
        with self._lock:
            for pid, e in self._procs.items():
                for m, k in e.keys.items():
                    if k == key and os.path.exists(m.open_path(pid)):
                        self._queue[key] = [wanted, pid, m]
                        return

    def _evicted(self, key) -> None:
        """The pool drops this table: rewrite the entries that point at it."""
        with self._lock:
            users = [p for p, e in self._procs.items() if key in e.binaries]
        for p in users:
            self._write(p)

    def _evict_process(self) -> None:
        with self._lock:
            pid = min(self._procs, key=lambda p: self._procs[p].sampled)
        self._forget(pid)
        self.stats["processes_evicted"] += 1

    def _forget(self, pid: int) -> None:
        with self._lock:
            self._procs.pop(pid, None)
        self._procs_map.delete(_PID.pack(pid))
        if self._py_map is not None:
            self._py_map.delete(_PID.pack(pid))

    def _reap(self) -> None:
        with self._lock:
            pids = list(self._procs)
        for pid in pids:
            if not alive(pid):
                self._forget(pid)
        for pid in list(self._python_later):
            if pid in self._procs:
                self._register_python(pid)
            else:
                self._python_later.discard(pid)

    @property
    def processes(self) -> int:
        return len(self._procs)
